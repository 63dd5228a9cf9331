"""Fault tolerance of a real `emomae pretrain` process: a node failure (SIGKILL of the whole process
group, no chance to save) and a shard that vanishes from the file system mid-run.

The same command, started again, resumes from the last periodic checkpoint and reaches the final
step: every optimizer step after the checkpoint runs exactly once (logged steps, AdamW's own step
count). The vanished shard is reported (corrupt-sample log, warning) and skipped each time the
resampled stream draws it; neither start of the job dies of it.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import launch
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "configs" / "pretrain" / "demo.yaml")
MAX_STEPS, EVERY = 10, 3
VANISHING = "fold2-000000.tar"


def logged_steps(run_dir: Path, version: int) -> list[int]:
    with open(run_dir / "csv" / f"version_{version}" / "metrics.csv") as f:
        return sorted(int(r["step"]) for r in csv.DictReader(f) if r.get("loss/total"))


def vanished_shard_events(corrupt_dir: Path) -> list[dict]:
    events = []
    for path in sorted(corrupt_dir.glob("corrupt-pretrain-*.jsonl")):
        events += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in events if e["kind"] == "shard" and e["url"].endswith(VANISHING)]


def wait_for(what: str, predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(
                f"training exited (rc {proc.returncode}) before {what}:\n{proc.stdout.read()[-6000:]}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_final_step_once_each_and_a_vanished_shard_is_reported_and_skipped(
    synth_shards, tmp_path
):
    shards, run = tmp_path / "shards", tmp_path / "run"
    shutil.copytree(synth_shards, shards)  # the session's shards stay intact
    corrupt = run / "corrupt"
    cmd = [
        sys.executable,
        "-m",
        "emomae.cli",
        "pretrain",
        DEMO,
        f"data.shards={shards}",
        f"run_dir={run}",
        f"trainer.max_steps={MAX_STEPS}",
        f"trainer.ckpt_every_n_steps={EVERY}",
        "trainer.log_every_n_steps=1",
        "trainer.progress_bar=false",
        "optim.warmup_steps=2",
        "data.batch_size=4",
        "data.num_workers=1",
        # two shards, and a fresh draw of shards every 2 batches (epoch), so the vanished one is met soon
        "data.train_groups=[fold1,fold2]",
        "data.epoch_length=2",
        "data.shuffle_buffer=8",
        f"data.error_log_dir={corrupt}",
        "logging.logger=[csv]",
        "logging.image_every_n_steps=0",
    ]
    env = launch.child_env(WANDB_MODE="disabled")

    # first start: in its own process group, so one SIGKILL takes the trainer and its loader worker
    first = launch.start(cmd, env, start_new_session=True)
    try:
        wait_for(
            "the first periodic checkpoint", (run / "checkpoints" / f"step{EVERY:07d}.ckpt").exists, first
        )
        (shards / VANISHING).unlink()
        wait_for(
            "the running job to report the vanished shard", lambda: vanished_shard_events(corrupt), first, 120
        )
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == -signal.SIGKILL
    resume_from = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert EVERY <= resume_from < MAX_STEPS
    reported_before = len(vanished_shard_events(corrupt))

    # second start: the very same command
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-6000:]
    assert f"pretrain: {MAX_STEPS} steps" in out

    # every step after the checkpoint ran once, in order, and the optimizer applied exactly MAX_STEPS updates
    assert logged_steps(run, 1) == list(range(resume_from, MAX_STEPS))
    end = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert end["global_step"] == MAX_STEPS
    assert {int(s["step"]) for s in end["optimizer_states"][0]["state"].values()} == {MAX_STEPS}

    # the vanished shard: reported with its path by both starts, and as a warning in the log
    events = vanished_shard_events(corrupt)
    assert {e["mode"] for e in events} == {"pretrain"}
    assert all("unreadable shard" in e["reason"] for e in events)
    assert len(events) > reported_before  # the resumed start met it again and carried on
    assert "skipping corrupt shard" in out and VANISHING in out
