#!/usr/bin/env bash
# The GPU paths that CPU tests cannot reach, on one CUDA GPU in under 8 minutes:
#
#   bash benchmarks/gpu_check.sh OUT_DIR        # e.g. bash benchmarks/gpu_check.sh /tmp/gpu_check
#
# One line per check, PASS or FAIL, in this order:
#   data       `emomae synth` (5 speakers x 6 classes x 2 clips, 160 px) + `emomae shards` (16 x 160 px)
#   gpudecode  tests/data_pipelines/test_device_decode.py with CUDA: nvjpeg decode + crop/flip/jitter and
#              eval resize on the GPU vs the CPU loader, bad JPEGs dropped by key, the datamodule on cuda
#              (every pretraining run below decodes on the GPU too: data.decode_device=auto)
#   tiny       `emomae pretrain` tiny, bf16-mixed, 30 steps (+ `emomae export` of it for the probes)
#   precision  that bf16 run logged each deliberate fp32 computation once (pretrain/losses.py: note_fp32)
#   base       `emomae pretrain` base, bf16-mixed, 30 steps
#   zero2/3    trainer.strategy=deepspeed_stage_{2,3}: 20 steps, SIGTERM, resume, 10 more steps,
#              `emomae export` of the DeepSpeed checkpoint directory, `load_encoder` + `emomae embed` on it
#   compile    trainer.compile=true, 20 steps
#   probe      `emomae finetune` head=linear on the synth data (fold 0, 10 epochs)
#   finetune   `emomae finetune` head=finetune, 1 epoch (fold 0)
# Everything goes under OUT_DIR: gpu_check.log (every command and its output), summary.json (one entry
# per check: status, seconds, detail; the GPU, torch and CUDA versions), data/, runs/, exports/.
# Exit status: 0 when every check passed, 1 otherwise, 2 when it cannot run (no CUDA, no OUT_DIR).
# Environment: EMOMAE_PYTHON (default .venv/bin/python, else python3), GPU_CHECK_BUDGET_S (default 440:
# a check that would start later is reported as FAIL and not run; a running command is stopped there).
set -uo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/gpu_setup.sh"
gpu_setup gpu_check.sh "$@"
LOG="$OUT/gpu_check.log"
RESULTS="$OUT/results.tsv"
: >"$LOG"
: >"$RESULTS"
BUDGET="${GPU_CHECK_BUDGET_S:-440}"
EMOMAE=("$PY" -m emomae.cli)
SHARDS="$OUT/data/shards"
# Shared by every pretraining run: a few clips, short epochs of the resampled stream (the progress bar
# and the loader cross epoch boundaries), one device, the csv logger only.
COMMON=(data.shards="$SHARDS" data.batch_size=8 data.num_workers=4 data.epoch_length=10 data.shuffle_buffer=64
        trainer.devices=1 trainer.precision=bf16-mixed trainer.log_every_n_steps=5 trainer.ckpt_every_n_steps=10
        optim.warmup_steps=5 logging.logger=[csv] logging.image_every_n_steps=15 resume=never)

say() { echo "$*" | tee -a "$LOG"; }
run() {  # run CMD...: log the command and its output; at most the budget left (and 300 s)
  local left=$(( BUDGET - SECONDS )) rc; (( left > 300 )) && left=300; (( left < 10 )) && left=10
  echo "\$ $*" >>"$LOG"
  timeout --signal=TERM --kill-after=20 "$left" "$@" >>"$LOG" 2>&1; rc=$?
  if (( rc == 124 || rc == 137 )); then echo "timed out after $left s"; fi
  return "$rc"
}
record() {  # record NAME STATUS START DETAIL
  local took=$(( SECONDS - $3 ))
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$took" "$4" >>"$RESULTS"
  say "$(printf '%-4s  %-44s %4d s  %s' "$2" "$1" "$took" "$4")"
}
check() {  # check NAME FUNCTION ARGS...: the function prints what it found; exit 0 = PASS
  local name=$1 start=$SECONDS detail rc; shift
  if (( SECONDS >= BUDGET )); then record "$name" FAIL "$start" "not run: the ${BUDGET} s budget is spent"; return; fi
  echo "=== $name" >>"$LOG"
  detail=$("$@"); rc=$?
  detail=${detail//$'\n'/; }
  if (( rc == 0 )); then record "$name" PASS "$start" "$detail"; else record "$name" FAIL "$start" "${detail:-exit $rc} (see $LOG)"; fi
}
summary_steps() {  # summary_steps RUN_DIR EXPECTED_STEPS [interrupted]: summary.json says so, losses finite
  "$PY" - "$@" <<'EOF'
import json, math, sys
run, steps = sys.argv[1], int(sys.argv[2])
s = json.load(open(f"{run}/summary.json"))
want_stop = len(sys.argv) > 3
assert (s["interrupted_by"] == "SIGTERM") if want_stop else s["interrupted_by"] is None, s["interrupted_by"]
assert (s["steps"] >= steps) if want_stop else s["steps"] == steps, f"{s['steps']} steps, expected {steps}"
assert s["losses"] and all(math.isfinite(v) for v in s["losses"].values()), s["losses"]
print(s["steps"], f"steps, loss/total {s['losses'].get('loss/total', float('nan')):.4f}")
EOF
}

# --- the checks ----------------------------------------------------------------------------------

data() {
  run "${EMOMAE[@]}" synth --out "$OUT/data/synth" num_speakers=5 clips_per_speaker_class=2 frame_size=160 || { echo "synth failed"; return 1; }
  run "${EMOMAE[@]}" shards "$OUT/data/synth/manifest.csv" "$SHARDS" --workers 4 --no-progress \
      num_frames=16 frame_stride=4 img_size=160 samples_per_shard=16 || { echo "shards failed"; return 1; }
  echo "$(ls "$OUT"/data/synth/clips/*.mp4 | wc -l) clips, $(ls "$SHARDS"/*.tar | wc -l) shards"
}

gpudecode() {  # the device-parametrised tests; their "cuda" cases run only here
  run "$PY" -m pytest -q -p no:cacheprovider tests/data_pipelines/test_device_decode.py -rs \
      || { echo "tests/data_pipelines/test_device_decode.py failed"; return 1; }
  tail -n 40 "$LOG" | grep -q "GPU check: needs CUDA" && { echo "GPU checks were skipped: CUDA not seen by pytest"; return 1; }
  echo "decode on the GPU matches the CPU loader"
}

pretrain() {  # pretrain RUN SIZE STEPS [overrides...]: runs/RUN, configs/pretrain/SIZE.yaml
  local run_dir="$OUT/runs/$1" size=$2 steps=$3; shift 3
  run "${EMOMAE[@]}" pretrain "configs/pretrain/$size.yaml" "${COMMON[@]}" run_dir="$run_dir" \
      trainer.max_steps="$steps" "$@" || { echo "emomae pretrain exit $?"; return 1; }
  summary_steps "$run_dir" "$steps"
}

tiny() {
  pretrain tiny tiny 30 || return 1
  run "${EMOMAE[@]}" export "$OUT/runs/tiny/checkpoints/last.ckpt" "$OUT/exports/tiny" || { echo "export failed"; return 1; }
}

precision() {  # each loss-side note exactly once in the tiny bf16 run's part of the log (one process)
  local section place n
  section=$(sed -n '/^=== pretrain tiny/,/^=== precision/p' "$LOG")
  # reconstruction pictures run outside autocast on fp32 weights under bf16-mixed: no note expected there
  for place in "video reconstruction target" "audio reconstruction target" "reconstruction MSE" "contrastive logits"; do
    n=$(grep -c "low-precision run: $place" <<<"$section")
    [ "$n" -eq 1 ] || { echo "'$place' logged $n times, expected once"; return 1; }
  done
  echo "4 fp32 notes, once each"
}

zero() {  # zero STAGE: 20 steps, SIGTERM, resume for 10 more, export, load_encoder, embed
  local stage=$1 run_dir="$OUT/runs/zero$1" export="$OUT/exports/zero$1"
  local args=("configs/pretrain/tiny.yaml" "${COMMON[@]}" run_dir="$run_dir" trainer.strategy="deepspeed_stage_$stage"
              trainer.ckpt_every_n_steps=20 optim.schedule_steps=1000)
  echo "\$ ${EMOMAE[*]} pretrain ${args[*]} trainer.max_steps=1000 &  (SIGTERM after step 20)" >>"$LOG"
  "${EMOMAE[@]}" pretrain "${args[@]}" trainer.max_steps=1000 >>"$LOG" 2>&1 &
  local pid=$! deadline=$(( SECONDS + 180 < BUDGET ? SECONDS + 180 : BUDGET ))
  # DeepSpeed writes `latest` once the step-20 checkpoint directory is complete
  until [ -f "$run_dir/checkpoints/step0000020.ckpt/latest" ] || ! kill -0 "$pid" 2>/dev/null || (( SECONDS > deadline )); do
    sleep 1
  done
  kill -TERM "$pid" 2>/dev/null
  wait "$pid"; local rc=$?
  [ "$rc" -eq 143 ] || { echo "the SIGTERM-ed run exited $rc, expected 143"; return 1; }
  local stopped; stopped=$(summary_steps "$run_dir" 20 interrupted) || { echo "after SIGTERM: $stopped"; return 1; }
  stopped=${stopped%% *}
  # resume=auto takes checkpoints/last.ckpt, the directory LastCheckpoint wrote on the signal
  run "${EMOMAE[@]}" pretrain "${args[@]/resume=never/resume=auto}" trainer.max_steps=$(( stopped + 10 )) \
      || { echo "resume exit $?"; return 1; }
  summary_steps "$run_dir" $(( stopped + 10 )) >/dev/null || { echo "resume did not reach step $(( stopped + 10 ))"; return 1; }
  run "${EMOMAE[@]}" export "$run_dir/checkpoints/last.ckpt" "$export" || { echo "export of the DeepSpeed checkpoint failed"; return 1; }
  run "$PY" - "$export" <<'EOF' || { echo "load_encoder failed"; return 1; }
import sys, torch
from finetune import load_encoder
from finetune.export import read_export_config
spec = read_export_config(sys.argv[1])["input"]
enc = load_encoder(sys.argv[1], device="cuda")
t, s, f = spec["num_frames"], spec["img_size"], spec["fbank"]
video = torch.randn(2, t, 3, s, s, device="cuda")
fbank = torch.randn(2, f["fbank_frames"], f["mel_bins"], device="cuda")
with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
    out = enc.forward_features(video, fbank)
assert torch.isfinite(out.fused_video.float()).all() and torch.isfinite(out.fused_audio.float()).all()
print("load_encoder ok:", tuple(out.fused_video.shape), tuple(out.fused_audio.shape))
EOF
  local clip; clip=$(ls "$OUT"/data/synth/clips/*.mp4 | head -n 1)
  run "${EMOMAE[@]}" embed "$clip" --encoder "$export" --max-windows 1 --out "$OUT/exports/zero$stage-embedding.npy" \
      || { echo "emomae embed failed"; return 1; }
  echo "stopped at step $stopped, resumed to $(( stopped + 10 )), exported, embedded"
}

probe() {
  run "${EMOMAE[@]}" finetune configs/finetune/synth.yaml encoder="$OUT/exports/tiny" \
      protocol.manifest="$OUT/data/synth/manifest.csv" protocol.shards="$SHARDS" out_dir="$OUT/finetune" \
      run_name=linear head=linear fold=0 modalities=[av] recipes.linear.epochs=10 precision=bf16-mixed num_workers=4 \
      || { echo "emomae finetune head=linear exit $?"; return 1; }
  [ -f "$OUT/finetune/linear/results.json" ] || { echo "no results.json"; return 1; }
  echo "results: $OUT/finetune/linear/results.json"
}

finetune() {
  run "${EMOMAE[@]}" finetune configs/finetune/synth.yaml encoder="$OUT/exports/tiny" \
      protocol.manifest="$OUT/data/synth/manifest.csv" protocol.shards="$SHARDS" out_dir="$OUT/finetune" \
      run_name=finetune head=finetune fold=0 modalities=[av] recipes.finetune.epochs=1 recipes.finetune.warmup_epochs=0 \
      precision=bf16-mixed num_workers=4 || { echo "emomae finetune head=finetune exit $?"; return 1; }
  [ -f "$OUT/finetune/finetune/results.json" ] || { echo "no results.json"; return 1; }
  echo "results: $OUT/finetune/finetune/results.json"
}

say "gpu_check: $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)')"
say "log: $LOG"
check "data: emomae synth + emomae shards" data
check "decode on the GPU (device tests)" gpudecode
check "pretrain tiny bf16-mixed 30 steps + export" tiny
check "precision: fp32 notes once in the bf16 run" precision
check "pretrain base bf16-mixed 30 steps" pretrain base base 30
check "deepspeed_stage_2: SIGTERM, resume, export, embed" zero 2
check "deepspeed_stage_3: SIGTERM, resume, export, embed" zero 3
check "trainer.compile=true 20 steps" pretrain compile tiny 20 trainer.compile=true
check "linear probe (synth, fold 0)" probe
check "fine-tune 1 epoch (synth, fold 0)" finetune

"$PY" - "$RESULTS" "$OUT/summary.json" "$SECONDS" <<'EOF'
import json, sys, torch
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1]) if line.strip()]
checks = [{"name": n, "status": s, "seconds": int(t), "detail": d} for n, s, t, d in rows]
summary = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
           "seconds": int(sys.argv[3]), "passed": sum(c["status"] == "PASS" for c in checks),
           "failed": sum(c["status"] != "PASS" for c in checks), "checks": checks}
json.dump(summary, open(sys.argv[2], "w"), indent=2)
EOF
failed=$(grep -c $'\tFAIL\t' "$RESULTS")
say "gpu_check: $(( $(wc -l <"$RESULTS") - failed )) passed, $failed failed in ${SECONDS} s; summary: $OUT/summary.json"
[ "$failed" -eq 0 ]
