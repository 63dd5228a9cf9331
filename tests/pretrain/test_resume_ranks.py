"""Resume under DDP: every rank continues its OWN shard stream, not rank 0's.

Every rank reads its own resampled shard stream, and a rank that skipped a corrupt sample is a raw
sample further along it than one that did not, so one shared position cannot resume them all. Two real gloo processes (torchrun)
train the tiny model with `emomae pretrain`'s own code path: straight to N steps, then stopped at
step k and resumed to N; each rank records its own loss and sample keys per step. Also: a resume
with another world size is refused with a message, and a checkpoint from before per-rank positions
still resumes (from rank 0's position, with a warning).

This file is also the worker script that torchrun starts (`python test_resume_ranks.py worker ...`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import launch
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "configs" / "pretrain" / "demo.yaml")
STEPS, STOP = 6, 3
# the smallest model of tests/tiny_model.py, two blocks deep: steps cost milliseconds
TINY_MODEL = {
    "model.num_frames": 4,
    "model.img_size": 32,
    "model.fbank_frames": 32,
    "model.mel_bins": 32,
    "model.width": 64,
    "model.heads": 2,
    "model.depth": 2,
    "model.fusion_depth": 1,
    "model.decoder_width": 32,
    "model.decoder_heads": 1,
    "model.decoder_depth": 3,
    "model.skip_layers": "[1,2]",
}


def run_args(shards: Path, run_dir: Path, max_steps: int, **changes) -> list[str]:
    values = {
        **TINY_MODEL,
        "data.shards": str(shards),
        "run_dir": str(run_dir),
        "data.batch_size": 2,
        "data.num_workers": 0,
        "data.shuffle_buffer": 4,
        "data.epoch_length": 4,
        "trainer.max_steps": max_steps,
        "optim.warmup_steps": 2,
        "optim.schedule_steps": STEPS,
        "trainer.ckpt_every_n_steps": STOP,
        "trainer.ckpt_keep": -1,  # step STOP's checkpoint outlives the resumed run's saves
        "trainer.log_every_n_steps": 1,
        "trainer.progress_bar": "false",
        "trainer.accelerator": "cpu",
        "logging.logger": "[csv]",
        "logging.image_every_n_steps": 0,
    }
    values.update(changes)
    return [f"{k}={v}" for k, v in values.items()]


# ---------------------------------------------------------------- the worker (runs under torchrun)


def worker(argv: list[str]) -> None:
    """Each `--phase name:max_steps` is one `pretrain()` of the run in `<out>/<name>` (phases that share
    a name continue one run: resume=auto); writes this rank's steps to `<out>/<name>-<max_steps>-rank<r>.json`."""
    from pytorch_lightning.callbacks import Callback

    import pretrain.train as train

    p = argparse.ArgumentParser()
    p.add_argument("--shards", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--phase", action="append", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    class Record(Callback):
        """This rank's own (not averaged) loss, sample keys and corrupt count of every step."""

        def __init__(self) -> None:
            self.steps: list[dict] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.steps.append(
                {
                    "step": trainer.global_step - 1,
                    "loss": float(outputs["loss"]),
                    "keys": list(batch["key"]),
                    "corrupt": batch["stream"]["corrupt"],
                }
            )

    build_callbacks = train.build_callbacks
    for phase in args.phase:
        name, max_steps = phase.split(":")
        record = Record()
        train.build_callbacks = lambda cfg, run_dir, record=record: [record, *build_callbacks(cfg, run_dir)]
        cfg = train.load_pretrain_config(
            DEMO,
            run_args(
                args.shards,
                args.out / name,
                int(max_steps),
                **{"trainer.devices": 2, "trainer.strategy": "ddp"},
            ),
        )
        train.pretrain(cfg)
        rank = int(os.environ["RANK"])
        (args.out / f"{name}-{max_steps}-rank{rank}.json").write_text(json.dumps(record.steps))


# ---------------------------------------------------------------- the tests


def torchrun(shards: Path, out: Path, *phases: str) -> None:
    me = Path(__file__).resolve()
    cmd = launch.torchrun(me, "worker", "--shards", shards, "--out", out, *[f"--phase={p}" for p in phases])
    launch.run_ok(cmd, launch.child_env(WANDB_MODE="disabled"))


@pytest.fixture(scope="module")
def shards_with_a_corrupt_sample(tmp_path_factory) -> Path:
    """Four shards of 4 tiny clips; the third also holds a clip whose frame is not a JPEG. With the
    run's seed, rank 0 draws that shard first and meets the clip in its second batch; rank 1 does
    not meet it in epoch 0."""
    import webdataset as wds

    sys.path.insert(0, str(REPO / "tests" / "data_pipelines"))
    from shard_factory import keys_of, make_sample, write_shard_dir

    out = tmp_path_factory.mktemp("rank_shards")
    write_shard_dir(out, [4, 4, 4, 4])
    bad = make_sample("zbad_w000", num_frames=4, size=32, seed=99)
    bad["f01.jpg"] = b"garbage"
    good = [
        make_sample(k, num_frames=4, size=32, label=(8 + i) % 6, seed=8 + i)
        for i, k in enumerate(keys_of([4], 8))
    ]
    with wds.TarWriter(str(out / "all-000002.tar")) as sink:
        for sample in good[:2] + [bad] + good[2:]:
            sink.write(sample)
    index = json.loads((out / "index.json").read_text())
    index["shards"][2]["samples"] = 5
    (out / "index.json").write_text(json.dumps(index))
    return out


@pytest.fixture(scope="module")
def two_rank_runs(shards_with_a_corrupt_sample, tmp_path_factory) -> Path:
    """`straight` (STEPS steps) and `split` (STOP steps, then resumed in fresh processes to STEPS)."""
    out = tmp_path_factory.mktemp("rank_runs")
    torchrun(shards_with_a_corrupt_sample, out, f"straight:{STEPS}", f"split:{STOP}")
    torchrun(shards_with_a_corrupt_sample, out, f"split:{STEPS}")
    return out


def steps_of(out: Path, phase: str, rank: int) -> list[dict]:
    return json.loads((out / f"{phase}-rank{rank}.json").read_text())


@pytest.mark.slow
def test_each_rank_resumes_its_own_stream_position_after_one_rank_skipped_a_corrupt_sample(two_rank_runs):
    out = two_rank_runs
    saved = torch.load(out / "split" / "checkpoints" / f"step{STOP:07d}.ckpt", weights_only=True)[
        "AVDataModule"
    ]
    assert saved["world_size"] == 2 and len(saved["ranks"]) == 2
    # the premise: the ranks stand at different raw positions, because one of them skipped the corrupt clip
    straight = {rank: steps_of(out, f"straight-{STEPS}", rank) for rank in (0, 1)}
    skipped = {rank: straight[rank][STOP - 1]["corrupt"] for rank in (0, 1)}
    assert sorted(skipped.values()) == [0, 1], skipped
    assert saved["ranks"][0]["positions"] != saved["ranks"][1]["positions"], saved
    # a periodic save in the middle of a run holds what the save at the stop holds
    mid_run = torch.load(out / "straight" / "checkpoints" / f"step{STOP:07d}.ckpt", weights_only=True)
    assert mid_run["AVDataModule"] == saved

    split = {
        rank: steps_of(out, f"split-{STOP}", rank) + steps_of(out, f"split-{STEPS}", rank) for rank in (0, 1)
    }
    for rank in (0, 1):
        assert [s["step"] for s in straight[rank]] == list(range(STEPS))
        assert [s["step"] for s in split[rank]] == list(range(STEPS)), (
            f"rank {rank} must continue at step {STOP}"
        )
        assert [s["keys"] for s in split[rank]] == [s["keys"] for s in straight[rank]], (
            f"rank {rank}'s samples"
        )
    # the contrastive loss gathers every rank's clips: one shifted rank would move both ranks' losses
    for rank in (0, 1):
        for got, want in zip(split[rank], straight[rank]):
            assert abs(got["loss"] - want["loss"]) <= 1e-6 * max(1.0, abs(want["loss"])), (rank, got, want)


@pytest.mark.slow
def test_resuming_with_another_world_size_is_refused_naming_both(
    shards_with_a_corrupt_sample, two_rank_runs, tmp_path, capsys
):
    from emomae.cli import main as emomae

    ckpt = two_rank_runs / "split" / "checkpoints" / f"step{STOP:07d}.ckpt"
    args = run_args(shards_with_a_corrupt_sample, tmp_path / "one_rank", STEPS, resume=str(ckpt))
    assert emomae(["pretrain", DEMO, *args, "trainer.devices=1"]) == 2
    err = capsys.readouterr().err
    assert f"resume from {ckpt}" in err
    assert "written by 2 ranks, this run has 1" in err
    assert "init=" in err
    assert not list((tmp_path / "one_rank").glob("checkpoints/*.ckpt"))  # refused before any step


def old_style(state: dict) -> dict:
    """A datamodule state as checkpoints had it before per-rank positions: rank 0's position only."""
    return {k: v for k, v in state.items() if k not in ("world_size", "ranks")}


def test_a_checkpoint_without_per_rank_positions_resumes_every_rank_from_rank_0s_with_a_warning():
    from data_pipelines.datamodule import AVDataModule

    rank0 = {"epoch": 1, "batches": 3, "positions": [7, 6], "num_workers": 2, "batch_size": 2}
    dm = AVDataModule({"shards": "unused", "num_workers": 2, "batch_size": 2}, rank=1, world_size=2)
    with pytest.warns(UserWarning, match="no per-rank positions.*rank 0's position"):
        dm.load_state_dict(rank0)
    assert dm.state_dict()["ranks"][1] == {"epoch": 1, "batches": 3, "positions": [7, 6]}


@pytest.mark.slow
def test_an_old_checkpoint_still_resumes_with_a_warning(
    shards_with_a_corrupt_sample, two_rank_runs, tmp_path
):
    from emomae.cli import main as emomae

    ckpt = torch.load(two_rank_runs / "split" / "checkpoints" / f"step{STOP:07d}.ckpt", weights_only=True)
    ckpt["AVDataModule"] = old_style(ckpt["AVDataModule"])
    torch.save(ckpt, tmp_path / "old.ckpt")
    args = run_args(shards_with_a_corrupt_sample, tmp_path / "run", STEPS, resume=str(tmp_path / "old.ckpt"))
    with pytest.warns(UserWarning, match="no per-rank positions"):
        assert emomae(["pretrain", DEMO, *args, "trainer.devices=1"]) == 0
    resumed = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == STEPS
    assert resumed["AVDataModule"]["world_size"] == 1  # saved in the new layout from then on


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    if sys.argv[1:2] != ["worker"]:
        sys.exit("usage: test_resume_ranks.py worker --shards DIR --out DIR --phase NAME:MAX_STEPS ...")
    worker(sys.argv[2:])
