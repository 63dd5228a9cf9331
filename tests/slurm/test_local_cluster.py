"""slurm/local_cluster.sh itself: the node it configures can run the tests' 2-task jobs, whatever the
calling shell's OpenMP settings, and its slurm.conf holds only what the script wrote."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONF = Path("/etc/slurm/slurm.conf")
CONF_LINE = re.compile(r"^(#.*|(\w+=\S*)( \w+=\S*)*)$")


def test_a_stale_one_cpu_config_is_rewritten_from_a_one_thread_shell_and_stays_clean(slurm_cluster):
    cpus = len(os.sched_getaffinity(0))
    # What a shell with OMP_NUM_THREADS=1 used to leave behind: plain `nproc` said 1, and a later
    # `start` kept that node because it was up, so 2-task jobs pended forever.
    CONF.write_text(re.sub(r" CPUs=\d+ ", " CPUs=1 ", CONF.read_text()))
    # A job must exist for `scontrol show job` to print anything: the script once ran that command,
    # quoted in a comment of its unquoted heredoc, and pasted the job into slurm.conf.
    job = subprocess.run(
        ["sbatch", "--parsable", f"--partition={slurm_cluster}", "--output=/dev/null", "--wrap", "sleep 30"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    try:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(
            ["bash", str(REPO / "slurm" / "local_cluster.sh"), "start"],
            capture_output=True,
            text=True,
            env=env,
        )
        assert proc.returncode == 0, proc.stderr
        lines = [line for line in CONF.read_text().splitlines() if line.strip()]
        bad = [line for line in lines if not CONF_LINE.match(line)]
        assert not bad, f"slurm.conf holds lines the script did not mean to write: {bad[:3]}"
        assert f" CPUs={cpus} " in CONF.read_text()
        node = subprocess.run(["scontrol", "show", "node"], capture_output=True, text=True, check=True).stdout
        assert f"CPUTot={cpus}" in node
    finally:
        subprocess.run(["scancel", job], capture_output=True)
