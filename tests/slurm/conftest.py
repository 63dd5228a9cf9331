"""A real one-machine SLURM cluster (slurm/local_cluster.sh) for the sbatch tests, started once per session."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def slurm_cluster() -> str:
    """Installs (if missing and root), configures and starts munge + slurmctld + slurmd; returns the
    partition name. Skips, with the script's reason, only where SLURM cannot be installed or started."""
    try:
        proc = subprocess.run(
            ["bash", str(REPO / "slurm" / "local_cluster.sh"), "start"],
            capture_output=True,
            text=True,
            timeout=600,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"local SLURM cluster could not be started: {err}")
    if proc.returncode != 0:
        pytest.skip(f"local SLURM cluster could not be started: {(proc.stderr or proc.stdout).strip()}")
    info = subprocess.run(
        ["sinfo", "-h", "-o", "%P %t"], capture_output=True, text=True, check=True
    ).stdout.split()
    return info[0].rstrip("*")
