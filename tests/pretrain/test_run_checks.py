"""`emomae pretrain` checks before anything runs: shards cut for another model, a data section that
does not follow the model, and `pipe:` shard URLs without the opt-in all exit 2 with one line and
leave no run folder behind."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from emomae.cli import main as emomae

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data_pipelines"))
from shard_factory import write_shard_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEMO = str(
    REPO / "configs" / "pretrain" / "demo.yaml"
)  # the micro model: 8 frames of 64 x 64, 128 fbank frames
SHORT = [
    "data.batch_size=2",
    "data.num_workers=0",
    "data.shuffle_buffer=4",
    "trainer.max_steps=2",
    "optim.warmup_steps=1",
    "trainer.progress_bar=false",
    "logging.logger=[csv]",
    "trainer.ckpt_every_n_steps=2",
]


def shards(folder: Path, num_frames: int, size: int, frame_stride: int = 4) -> Path:
    """Real shards whose index.json says how they were cut (as `emomae shards` writes it)."""
    write_shard_dir(folder, [2], num_frames=num_frames, size=size)
    index = json.loads((folder / "index.json").read_text())
    index["config"].update(frame_stride=frame_stride, sample_rate=16000, precompute_fbank=False)
    (folder / "index.json").write_text(json.dumps(index))
    return folder


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_micro_on_default_size_shards_exits_2_with_the_shard_options_it_needs(tmp_path, capsys):
    default = shards(tmp_path / "shards", num_frames=16, size=160)  # `emomae shards` defaults: 16 x 160
    run_dir = tmp_path / "run"
    assert emomae(["pretrain", DEMO, f"data.shards={default}", f"run_dir={run_dir}", *SHORT]) == 2
    err = one_line_error(capsys)
    assert "16 frames per clip, the model takes 8" in err and str(default) in err
    assert "emomae shards <manifest.csv> <out_dir> num_frames=8 frame_stride=4 img_size=64" in err
    assert not run_dir.exists()


def test_how_the_shards_were_cut_is_recorded_and_exported_after_they_are_gone(tmp_path, capsys):
    import shutil

    import torch
    import yaml

    fitting = shards(
        tmp_path / "shards", num_frames=8, size=64, frame_stride=2
    )  # 0.64 s windows: a note only
    run_dir = tmp_path / "run"
    assert emomae(["pretrain", DEMO, f"data.shards={fitting}/all-*.tar", f"run_dir={run_dir}", *SHORT]) == 0
    assert "a window's audio is 62 fbank frames, cut or padded to the model's 128" in capsys.readouterr().err
    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())["shard_sampling"]
    assert recorded["frame_stride"] == 2 and recorded["num_frames"] == 8 and recorded["sample_rate"] == 16000
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert (
        torch.load(ckpt, weights_only=True, map_location="cpu")["emomae"]["config"]["shard_sampling"]
        == recorded
    )
    shutil.rmtree(fitting)  # exported elsewhere: the shards are out of reach
    assert emomae(["export", str(ckpt), str(tmp_path / "export")]) == 0
    assert json.loads((tmp_path / "export" / "config.json").read_text())["input"]["frame_stride"] == 2


def test_a_data_section_that_does_not_follow_the_model_is_named(tmp_path, capsys):
    assert (
        emomae(["pretrain", DEMO, "data.shards=unused", "data.num_frames=16", f"run_dir={tmp_path / 'run'}"])
        == 2
    )
    err = one_line_error(capsys)
    assert "data.num_frames=16" in err and "model.num_frames=8" in err


@pytest.mark.parametrize("spec", ["pipe:cat {tar}", "pipe:cat {folder}/all-{{000000..000000}}.tar"])
def test_pipe_shard_urls_need_the_opt_in_key(spec, tmp_path, capsys):
    folder = shards(tmp_path / "shards", num_frames=8, size=64)
    url = spec.format(tar=folder / "all-000000.tar", folder=folder)
    run_dir = tmp_path / "run"
    assert emomae(["pretrain", DEMO, f"data.shards={url}", f"run_dir={run_dir}", *SHORT]) == 2
    err = one_line_error(capsys)
    assert "data.allow_pipe_urls=true" in err and "cat " in err
    assert not run_dir.exists()


def test_allowed_pipe_urls_print_the_commands_they_run(tmp_path, capsys):
    tar = tmp_path / "shards" / "all-000000.tar"
    assert (
        emomae(
            ["pretrain", DEMO, f"data.shards=pipe:cat {tar}", "data.allow_pipe_urls=true", "--print-config"]
        )
        == 0
    )
    assert f"shards are read by running: cat {tar}" in capsys.readouterr().err


def test_a_shard_that_ends_early_is_in_the_run_summary_and_its_corrupt_log(tmp_path, capsys):
    import tarfile

    folder = shards(tmp_path / "shards", num_frames=8, size=64)
    write_shard_dir(folder, [5], group="cut", num_frames=8, size=64, first_index=10)  # index.json: 5 samples
    cut = folder / "cut-000000.tar"
    with tarfile.open(cut) as tf:  # keep 2 samples: a valid tar that ends before the third one
        offset = min(m.offset for m in tf.getmembers() if m.name.startswith("c0012_w000."))
    cut.write_bytes(cut.read_bytes()[:offset])
    run_dir = tmp_path / "run"
    overrides = [f"data.shards={folder}", "data.train_groups=[cut]", f"run_dir={run_dir}", *SHORT]
    assert emomae(["pretrain", DEMO, *overrides]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())["corrupt"]
    assert summary["shards"] >= 1 and summary["samples_lost"] == 3 * summary["shards"]
    assert summary["log_dir"] == str(run_dir / "corrupt") and any(
        (run_dir / "corrupt").glob("corrupt-*.jsonl")
    )
    assert "samples missing from shards that ended early" in capsys.readouterr().out
