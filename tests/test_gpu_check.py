"""benchmarks/gpu_check.sh: valid bash, and without CUDA it refuses with a message and a non-zero exit
before it writes or runs anything."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def test_gpu_check_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_without_cuda_it_refuses_and_creates_nothing(tmp_path):
    out = tmp_path / "gpu_check"
    # no GPU visible, whatever this machine has
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", EMOMAE_PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(out)], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 2
    assert "no CUDA GPU" in proc.stderr and "torch.cuda.is_available() is False" in proc.stderr
    assert "PASS" not in proc.stdout and "FAIL" not in proc.stdout
    assert not out.exists()


def test_without_an_output_folder_it_prints_its_usage():
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage: bash benchmarks/gpu_check.sh OUT_DIR" in proc.stderr
