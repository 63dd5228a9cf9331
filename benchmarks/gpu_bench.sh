#!/usr/bin/env bash
# The GPU speed figures of docs/scaling.md, on one CUDA GPU within GPU_BENCH_BUDGET_S (default 600 s):
#
#   bash benchmarks/gpu_bench.sh OUT_DIR        # e.g. bash benchmarks/gpu_bench.sh /tmp/gpu_bench
#
# In this order, each writing its JSON under OUT_DIR:
#   clips         the real clips of ../shared/realdata when they are there, else `emomae synth` clips
#                 (160 px, with audio): the input of every benchmark below
#   step          bench_pretrain.py --sizes base --batch 40 --device cuda: bf16 autocast, eager
#   compiled      the same with --compile (trainer.compile=true's torch.compile)
#   loader        bench_loader.py --decode-device cuda: the CPU loader rows plus decoding on the GPU
#                 (DeviceFrameDecoder); CPU cores per GPU from the eager step above
#   feed          bench_feed.py base, batch 40, 6 workers, 60 steps: `emomae pretrain` on shards vs
#                 the step on synthetic input (target >= 0.9)
# Everything goes under OUT_DIR: gpu_bench.log (every command and its output), one JSON per benchmark,
# and summary.tsv (name, PASS/FAIL, seconds). Exit status: 0 when every benchmark ran, 1 otherwise,
# 2 when it cannot run (no CUDA, no OUT_DIR).
# Environment: EMOMAE_PYTHON (default .venv/bin/python, else python3), GPU_BENCH_BUDGET_S (default 600:
# a benchmark that would start later is not run; a running one is stopped there).
set -uo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/gpu_setup.sh"
gpu_setup gpu_bench.sh "$@"
LOG="$OUT/gpu_bench.log"
SUMMARY="$OUT/summary.tsv"
: >"$LOG"
: >"$SUMMARY"
BUDGET="${GPU_BENCH_BUDGET_S:-600}"
VIDEOS="$ROOT/../shared/realdata/voxceleb2_pcavs"

bench() {  # bench NAME CMD...: log it, at most the budget left, one summary line
  local name=$1 start=$SECONDS left rc; shift
  left=$(( BUDGET - SECONDS ))
  if (( left < 20 )); then
    printf '%s\tFAIL\t0\tnot run: the %s s budget is spent\n' "$name" "$BUDGET" | tee -a "$SUMMARY"
    return
  fi
  echo "=== $name: $*" >>"$LOG"
  timeout --signal=TERM --kill-after=20 "$left" "$@" >>"$LOG" 2>&1; rc=$?
  local status=PASS; (( rc == 0 )) || status=FAIL
  printf '%s\t%s\t%s\texit %s\n' "$name" "$status" "$(( SECONDS - start ))" "$rc" | tee -a "$SUMMARY"
}

echo "gpu_bench: $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)')" | tee -a "$LOG"
if ! ls "$VIDEOS"/*.mp4 >/dev/null 2>&1; then
  VIDEOS="$OUT/synth/clips"
  bench clips "$PY" -m emomae.cli synth --out "$OUT/synth" num_speakers=2 folds=2 clips_per_speaker_class=1 \
      frame_size=160 seconds=2.56
fi
echo "clips: $VIDEOS" | tee -a "$LOG"
bench step "$PY" benchmarks/bench_pretrain.py --sizes base --batch 40 --device cuda --steps 10 --warmup 3 \
    --out "$OUT/bench_pretrain.json"
bench compiled "$PY" benchmarks/bench_pretrain.py --sizes base --batch 40 --device cuda --steps 10 --warmup 5 \
    --compile --out "$OUT/bench_pretrain_compiled.json"
bench loader "$PY" benchmarks/bench_loader.py --seconds 1 --rounds 1 --videos "$VIDEOS" --decode-device cuda \
    --pretrain-results "$OUT/bench_pretrain.json" --out "$OUT/bench_loader.json"
bench feed "$PY" benchmarks/bench_feed.py --size base --batch 40 --workers 6 --steps 60 --videos "$VIDEOS" \
    --out "$OUT/bench_feed.json"

failed=$(grep -c $'\tFAIL\t' "$SUMMARY")
echo "gpu_bench: $(( $(wc -l <"$SUMMARY") - failed )) ran, $failed failed in ${SECONDS} s; log: $LOG" | tee -a "$LOG"
[ "$failed" -eq 0 ]
