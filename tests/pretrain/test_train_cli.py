"""`emomae pretrain` end to end on the built-in dataset's shards (micro model, CPU, CSV logger), and
the config errors the CLI reports."""

from __future__ import annotations

from pathlib import Path

import demo_run
import pytest
import torch
import yaml
from demo_run import DEMO, csv_rows

from emomae.cli import main as emomae


def tiny_run(shards: Path, run_dir: Path, **changes) -> list[str]:
    """The shared seconds-long run (tests/demo_run.py): 6 steps, a reconstruction picture every 3."""
    return demo_run.tiny_run(
        shards, run_dir, **{"trainer.max_steps": 6, "logging.image_every_n_steps": 3, **changes}
    )


@pytest.fixture(scope="module")
def cli_run(synth_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pretrain") / "run"
    rc = emomae(["pretrain", DEMO, *tiny_run(synth_shards, run_dir)])
    return rc, run_dir


def test_cli_run_finishes_and_writes_the_resolved_config(cli_run):
    rc, run_dir = cli_run
    assert rc == 0
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["trainer"]["precision"] == "32-true"  # "auto" resolved: fp32 on CPU
    assert (
        cfg["data"]["num_frames"] == 8 and cfg["data"]["fbank_frames"] == 128
    )  # interpolated from the model
    # blr x (batch 2 x 1 device) / 256 written back as the absolute lr the run used
    assert cfg["optim"]["lr"] == pytest.approx(cfg["optim"]["blr"] * 2 / 256)
    assert cfg["model"]["width"] == 128 and cfg["run_dir"] == str(run_dir)


def test_cli_run_logs_every_loss_term_lr_and_throughput_to_csv(cli_run):
    _, run_dir = cli_run
    rows = csv_rows(run_dir)
    keys = set(rows[0])
    for key in (
        "loss/total",
        "loss/recon_video",
        "loss/recon_audio",
        "loss/contrastive",
        "loss/contrastive_l2",
        "loss/contrastive_l3",
        "loss/contrastive_l4",
        "train/lr",
        "train/device/samples_per_sec",
        "train/device/items_per_sec",
        "train/rss_peak_gib",
    ):
        assert key in keys, key
    losses = [float(r["loss/total"]) for r in rows if r["loss/total"]]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    throughput = [float(r["train/device/samples_per_sec"]) for r in rows if r["train/device/samples_per_sec"]]
    assert throughput and all(t > 0 for t in throughput)


def test_cli_run_checkpoints_load_weights_only_with_model_config(cli_run, synth_shards):
    _, run_dir = cli_run
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "last.ckpt").is_file()
    ckpt = torch.load(ckpts / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 6
    assert ckpt["emomae"]["model"]["width"] == 128 and ckpt["emomae"]["model"]["num_frames"] == 8
    assert ckpt["emomae"]["config"]["data"]["shards"] == str(
        synth_shards
    )  # the resolved run config travels too
    assert any(k.startswith("model.encoder.") for k in ckpt["state_dict"])
    assert "AVDataModule" in ckpt  # the stream position travels with the weights
    assert sorted(p.name for p in ckpts.glob("step*.ckpt")) == ["step0000006.ckpt"]  # demo keeps 1


def test_cli_run_saves_reconstruction_pictures(cli_run):
    _, run_dir = cli_run
    pictures = sorted(p.name for p in (run_dir / "images").glob("*.png"))
    assert pictures == ["step0000003.png", "step0000006.png"]
    assert all((run_dir / "images" / p).stat().st_size > 5000 for p in pictures)


def test_cli_run_writes_summary_with_steps_losses_and_checkpoint(cli_run):
    import json

    _, run_dir = cli_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 6
    assert summary["last_checkpoint"].endswith("last.ckpt")
    assert {"loss/total", "loss/recon_video", "loss/recon_audio"} <= set(summary["losses"])
    assert summary["interrupted_by"] is None


@pytest.mark.parametrize(
    "override, named",
    [
        ("optim.lrr=1", "optim.lrr"),
        ("trainer.max_steps=many", "trainer.max_steps"),
        ("logging.logger=[csv,neptune]", "logging.logger"),
        ("trainer.strategy=fsdp", "trainer.strategy"),
        ("model.heads=3", "model"),  # width 128 is not divisible by 3 heads
        ("optim.warmup_steps=10", "optim.warmup_steps"),  # longer than the 6-step schedule
        ("resume=/nowhere/last.ckpt", "resume"),
    ],
)
def test_config_errors_name_the_key_and_exit_2(override, named, tmp_path, capsys):
    rc = emomae(["pretrain", DEMO, *tiny_run(tmp_path, tmp_path / "run"), override])
    assert rc == 2
    assert named in capsys.readouterr().err


def test_deepspeed_on_cpu_is_refused_with_a_clear_message(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA, where DeepSpeed is allowed")
    rc = emomae(
        ["pretrain", DEMO, *tiny_run(tmp_path, tmp_path / "run"), "trainer.strategy=deepspeed_stage_2"]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert "deepspeed_stage_2" in err and "CUDA" in err


def test_missing_config_file_is_reported(tmp_path, capsys):
    assert emomae(["pretrain", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_print_config_shows_merged_values_without_training(tmp_path, capsys):
    assert emomae(["pretrain", DEMO, "--print-config", "optim.blr=0.123"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["blr"] == 0.123 and printed["model"]["depth"] == 4


def test_ema_weights_are_checkpointed_beside_the_model_and_restored(synth_shards, tmp_path):
    run = tmp_path / "run"
    ema = {
        "optim.ema": "true",
        "optim.ema_decay": 0.5,
        "logging.image_every_n_steps": 0,
        "trainer.ckpt_every_n_steps": 2,
        "optim.schedule_steps": 6,
    }
    assert emomae(["pretrain", DEMO, *tiny_run(synth_shards, run, **{"trainer.max_steps": 2, **ema})]) == 0
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    model, averaged = ckpt["state_dict"], ckpt["ema_state_dict"]
    assert set(averaged) >= {k for k in model if k.startswith("model.encoder.")}
    moved = [k for k in model if model[k].is_floating_point() and not torch.equal(model[k], averaged[k])]
    assert moved, "EMA weights should lag the trained weights"

    # resuming restores the average instead of restarting it from the current weights
    assert emomae(["pretrain", DEMO, *tiny_run(synth_shards, run, **{"trainer.max_steps": 3, **ema})]) == 0
    resumed = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    name = moved[0]
    # one more EMA step from the stored average: ema3 = 0.5 * ema2 + 0.5 * w3
    torch.testing.assert_close(
        resumed["ema_state_dict"][name], 0.5 * averaged[name] + 0.5 * resumed["state_dict"][name]
    )
