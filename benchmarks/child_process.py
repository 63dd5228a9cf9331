"""A benchmark script re-run in a child process (one model size or one rank set each), with the options
the parent was given and the repository importable."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def forwarded(args: argparse.Namespace, *names: str) -> list[str]:
    """`--name value` for each of `names`, with the values the parent parsed."""
    return [part for name in names for part in (f"--{name}", str(getattr(args, name)))]


def child_env(threads: int, **extra: str) -> dict[str, str]:
    """This environment with `threads` OpenMP threads per child and the repository on the path."""
    return dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO), **extra)
