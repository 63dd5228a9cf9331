"""A benchmark script re-run in a child process (one model size or one rank set each), with the options
the parent was given and the repository importable; and the one way benchmarks write their JSON."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def forwarded(args: argparse.Namespace, *names: str) -> list[str]:
    """`--name value` for each of `names`, with the values the parent parsed."""
    return [part for name in names for part in (f"--{name}", str(getattr(args, name)))]


def child_env(threads: int, **extra: str) -> dict[str, str]:
    """This environment with `threads` OpenMP threads per child and the repository on the path."""
    return dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO), **extra)


def write_results(out: Path, results: dict) -> None:
    """A benchmark's JSON at `out`, and the line saying where (relative to the repository when inside)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
