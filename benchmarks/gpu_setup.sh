# Sourced by gpu_check.sh and gpu_bench.sh: `gpu_setup NAME "$@"` checks the one OUT_DIR argument and
# that torch sees a CUDA GPU (else it exits 2, having created nothing), then sets ROOT (the repository,
# also the working directory), PY (EMOMAE_PYTHON, default .venv/bin/python, else python3) and OUT (the
# absolute OUT_DIR, created), and exports what every run needs (PYTHONPATH, offline W&B and hub).
gpu_setup() {
  local name=$1; shift
  [ $# -eq 1 ] || { echo "usage: bash benchmarks/$name OUT_DIR" >&2; exit 2; }
  ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  cd "$ROOT" || exit 2
  if [ -z "${EMOMAE_PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then EMOMAE_PYTHON="$ROOT/.venv/bin/python"; else EMOMAE_PYTHON=python3; fi
  fi
  PY="$EMOMAE_PYTHON"
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1
  if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "$name: no CUDA GPU visible to torch (torch.cuda.is_available() is False with $PY);" \
         "these runs need one: run on a CUDA machine (CPU paths are covered by the test suite)" >&2
    exit 2
  fi
  OUT="$(mkdir -p "$1" && cd "$1" && pwd)" || { echo "$name: cannot create $1" >&2; exit 2; }
}
