"""`emomae pretrain` with the demo config cut down to a seconds-long test run, and the CSV log it writes."""

from __future__ import annotations

import csv
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "pretrain" / "demo.yaml")


def tiny_run(shards: Path, run_dir: Path, **changes) -> list[str]:
    """Overrides for a run on `shards` into `run_dir`: batches of 2 read in the main process, every step
    logged to CSV, a checkpoint every 3 steps; then `changes`."""
    values = {
        "data.shards": str(shards),
        "run_dir": str(run_dir),
        "data.batch_size": 2,
        "data.num_workers": 0,
        "data.shuffle_buffer": 16,
        "trainer.log_every_n_steps": 1,
        "trainer.ckpt_every_n_steps": 3,
        "trainer.progress_bar": "false",
        "optim.warmup_steps": 2,
        "logging.logger": "[csv]",
    }
    return [f"{k}={v}" for k, v in (values | changes).items()]


def csv_rows(run_dir: Path, version: int = 0) -> list[dict]:
    """The rows of one CSV logger version (one per start of the run)."""
    with open(run_dir / "csv" / f"version_{version}" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def pretrain_args(shards: Path, run_dir: Path, steps: int, *extra: str) -> list[str]:
    """`emomae pretrain` of the demo config for `steps` steps on `shards` into `run_dir`: one checkpoint,
    at the end, no reconstruction pictures, no progress bar; then `extra`."""
    return [
        "pretrain",
        DEMO,
        f"data.shards={shards}",
        f"run_dir={run_dir}",
        f"trainer.max_steps={steps}",
        f"trainer.ckpt_every_n_steps={steps}",
        "trainer.progress_bar=false",
        "logging.image_every_n_steps=0",
        *extra,
    ]
