"""Tracking: W&B (offline mode, read back from its own run file) and TensorBoard receive the loss
terms, lr, throughput and the reconstruction picture; the progress bar counts steps to max_steps."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from emomae.cli import main as emomae

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "configs" / "pretrain" / "demo.yaml")


def wandb_records(path: Path, wait: float = 60.0):
    """Records of a W&B run file (`run-<id>.wandb`): a LevelDB-style log of protobuf `Record`s in
    32 KiB blocks, each chunk with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle,
    4 last), after a 7-byte file header. wandb >= 0.20 ships no Python reader for it.

    `run.finish()` can return before wandb's service has written the file out, so this waits up to
    `wait` seconds for the run's closing `exit` record (a run that never finished has none)."""
    deadline = time.monotonic() + wait
    records = _read_records(path)
    while not any(r.WhichOneof("record_type") == "exit" for r in records) and time.monotonic() < deadline:
        time.sleep(0.2)
        records = _read_records(path)
    return iter(records)


def _read_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7 or data[pos + 6] == 0:  # block trailer / zero padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            records.append(record)
    return records


@pytest.fixture(scope="module")
def tracked_run(synth_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tracking") / "run"
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    args = {
        "data.shards": synth_shards,
        "run_dir": run_dir,
        "data.batch_size": 2,
        "data.num_workers": 0,
        "data.shuffle_buffer": 16,
        "trainer.max_steps": 3,
        "trainer.log_every_n_steps": 1,
        "trainer.ckpt_every_n_steps": 3,
        "optim.warmup_steps": 1,
        "logging.logger": "[wandb,tensorboard]",
        "logging.image_every_n_steps": 2,
        "logging.run_name": "tracking-test",
        "trainer.progress_bar": "true",
    }
    try:
        rc = emomae(["pretrain", DEMO, *(f"{k}={v}" for k, v in args.items())])
    finally:
        mp.undo()
    return rc, run_dir


def test_wandb_offline_run_holds_losses_lr_throughput_and_config(tracked_run):
    rc, run_dir = tracked_run
    assert rc == 0
    runs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    history, config, name = set(), {}, None
    for record in wandb_records(runs[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history |= {item.key or "/".join(item.nested_key) for item in record.history.item}
        elif kind == "run":
            name = record.run.display_name
            config |= {item.key: item.value_json for item in record.run.config.update}
    for key in (
        "loss/total",
        "loss/recon_video",
        "loss/recon_audio",
        "loss/contrastive_l2",
        "train/lr",
        "train/device/samples_per_sec",
        "train/device/items_per_sec",
        "trainer/global_step",
    ):
        assert key in history, key
    assert name == "tracking-test"
    assert {"model", "optim", "data", "trainer"} <= set(config)
    assert json.loads(config["model"])["width"] == 128
    # the id is kept so a resumed run appends to the same W&B run
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    assert run_id and runs[0].name == f"run-{run_id}.wandb"


def test_wandb_receives_the_reconstruction_picture(tracked_run):
    _, run_dir = tracked_run
    media = list((run_dir / "wandb").glob("offline-run-*/files/media/images/reconstruction_*.png"))
    assert len(media) == 1  # step 2 of 3
    assert (run_dir / "images" / "step0000002.png").is_file()


def test_tensorboard_gets_scalars_and_the_figure(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir = tracked_run
    (events_dir,) = [p.parent for p in (run_dir / "tb").rglob("events.out.tfevents.*")]
    acc = EventAccumulator(str(events_dir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"loss/total", "loss/recon_audio", "train/lr"} <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("loss/total")] == [0, 1, 2]
    assert "reconstruction" in tags["images"]


def test_progress_bar_counts_optimizer_steps_to_max_steps(tracked_run):
    # the bar wrote to the real stderr during the fixture run; check it through the run's own log file
    _, run_dir = tracked_run
    log = next((run_dir / "wandb").glob("offline-run-*/files/output.log")).read_text(errors="replace")
    assert "pretrain" in log and "3/3" in log
    assert os.path.getsize(run_dir / "summary.json") > 0
