"""Resume: a run continued from its checkpoint reproduces the uninterrupted run exactly, and SIGTERM
makes a real training process save `last.ckpt` and exit cleanly so `resume=auto` can continue it."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import demo_run
import launch
import torch
from demo_run import DEMO, csv_rows

from emomae.cli import main as emomae


def tiny_run(shards: Path, run_dir: Path, **changes) -> list[str]:
    """The shared seconds-long run (tests/demo_run.py), its lr schedule 6 steps long, no pictures."""
    return demo_run.tiny_run(
        shards, run_dir, **{"optim.schedule_steps": 6, "logging.image_every_n_steps": 0, **changes}
    )


def endless_run(shards: Path, run_dir: Path) -> list[str]:
    """A run that only a signal stops: no periodic checkpoints (a last.ckpt can only come from the signal
    handler), and a reconstruction picture at step 2 that tells the test training is under way."""
    endless = {
        "trainer.max_steps": 10_000,
        "optim.schedule_steps": 10_000,
        "trainer.ckpt_every_n_steps": 10_000,
        "logging.image_every_n_steps": 2,
    }
    return tiny_run(shards, run_dir, **endless)


def logged(run_dir: Path, version: int, key: str) -> dict[int, float]:
    """step -> value of `key` from one CSV logger version (one per start of the run)."""
    return {int(r["step"]): float(r[key]) for r in csv_rows(run_dir, version) if r.get(key)}


def test_resumed_run_reproduces_the_uninterrupted_losses_exactly(synth_shards, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert emomae(["pretrain", DEMO, *tiny_run(synth_shards, straight, **{"trainer.max_steps": 6})]) == 0
    assert emomae(["pretrain", DEMO, *tiny_run(synth_shards, split, **{"trainer.max_steps": 3})]) == 0
    first = torch.load(split / "checkpoints" / "last.ckpt", weights_only=True)
    assert first["global_step"] == 3
    # resume=auto (the default) picks run_dir/checkpoints/last.ckpt
    assert emomae(["pretrain", DEMO, *tiny_run(synth_shards, split, **{"trainer.max_steps": 6})]) == 0

    for key in ("loss/total", "loss/recon_video", "loss/contrastive", "train/lr"):
        want = logged(straight, 0, key)
        got = {**logged(split, 0, key), **logged(split, 1, key)}
        assert sorted(want) == list(range(6)), key
        assert sorted(logged(split, 1, key)) == [3, 4, 5], f"{key}: the second start must begin at step 3"
        for step in range(6):  # same batches, masks, weights, optimizer and lr: identical numbers
            assert abs(got[step] - want[step]) <= 1e-6 * max(1.0, abs(want[step])), (key, step, got, want)

    end_straight = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    end_split = torch.load(split / "checkpoints" / "last.ckpt", weights_only=True)
    assert end_split["global_step"] == end_straight["global_step"] == 6
    assert end_split["AVDataModule"] == end_straight["AVDataModule"]
    data = end_split["AVDataModule"]  # one rank: its entry is the top-level position
    assert data["world_size"] == 1 and data["ranks"] == [
        {k: data[k] for k in ("epoch", "batches", "positions")}
    ]
    for name, value in end_straight["state_dict"].items():
        torch.testing.assert_close(end_split["state_dict"][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_resume_never_starts_from_scratch_even_with_a_checkpoint(synth_shards, tmp_path):
    run = tmp_path / "run"
    assert emomae(["pretrain", DEMO, *tiny_run(synth_shards, run, **{"trainer.max_steps": 3})]) == 0
    assert (
        emomae(
            ["pretrain", DEMO, *tiny_run(synth_shards, run, **{"trainer.max_steps": 2, "resume": "never"})]
        )
        == 0
    )
    assert sorted(logged(run, 1, "loss/total")) == [0, 1]
    assert logged(run, 1, "loss/total")[0] == logged(run, 0, "loss/total")[0]


def test_sigterm_saves_last_checkpoint_and_resume_continues_from_that_step(synth_shards, tmp_path):
    run = tmp_path / "run"
    args = endless_run(synth_shards, run)
    env = launch.child_env()
    proc = launch.start([sys.executable, "-m", "emomae.cli", "pretrain", DEMO, *args], env)
    try:
        deadline = time.monotonic() + 240
        while not (run / "images" / "step0000002.png").exists():
            assert proc.poll() is None, f"training exited early:\n{proc.stdout.read()}"
            assert time.monotonic() < deadline, "training did not reach step 2 in time"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "stopped by SIGTERM" in out
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    stopped_at = ckpt["global_step"]
    assert 2 <= stopped_at < 10_000
    assert ckpt["AVDataModule"]["batches"] == stopped_at  # the stream position matches the weights

    more = tiny_run(
        synth_shards,
        run,
        **{
            "trainer.max_steps": stopped_at + 2,
            "optim.schedule_steps": 10_000,
            "trainer.ckpt_every_n_steps": 10_000,
        },
    )
    assert emomae(["pretrain", DEMO, *more]) == 0
    assert sorted(logged(run, 1, "loss/total")) == [stopped_at, stopped_at + 1]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == stopped_at + 2


def test_sigusr1_outside_slurm_saves_and_stops_cleanly(synth_shards, tmp_path, monkeypatch):
    import threading

    for var in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_JOB_NAME"):
        monkeypatch.delenv(var, raising=False)
    run = tmp_path / "run"
    args = endless_run(synth_shards, run)

    def signal_at_step_2() -> None:
        deadline = time.monotonic() + 120
        while not (run / "images" / "step0000002.png").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR1)

    before = signal.getsignal(signal.SIGUSR1)
    sender = threading.Thread(target=signal_at_step_2, daemon=True)
    sender.start()
    assert emomae(["pretrain", DEMO, *args]) == 0  # a clean stop, not a crash
    sender.join()
    summary = __import__("json").loads((run / "summary.json").read_text())
    assert summary["interrupted_by"] == "SIGUSR1"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == summary["steps"] >= 2
    assert signal.getsignal(signal.SIGUSR1) == before  # the handler is ours only while training
