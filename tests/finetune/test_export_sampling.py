"""`emomae export` writes the frame stride the training shards were really cut with (recorded by the
run, or read beside its shards), refuses to guess one, and never leaves an owner-only file behind."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
import torch
from tiny_model import tiny

from finetune.export import ExportError, export, main, save_export
from pretrain.encoders import AVEncoder, ModelConfig
from pretrain.mae import MaskedAVAutoencoder

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data_pipelines"))
from shard_factory import write_shard_dir  # noqa: E402

TINY = tiny()


def checkpoint(path: Path, run_config: dict) -> Path:
    torch.manual_seed(0)
    mae = MaskedAVAutoencoder(ModelConfig(**TINY))
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in mae.state_dict().items()},
            "emomae": {"model": ModelConfig(**TINY).to_dict(), "config": run_config},
        },
        path,
    )
    return path


def shards_cut_with_stride(folder: Path, stride: int) -> Path:
    """Real shards whose index.json says they were cut `stride` grid steps apart, at 16 kHz."""
    write_shard_dir(folder, [2])
    index = json.loads((folder / "index.json").read_text())
    index["config"].update(frame_stride=stride, sample_rate=16000)
    (folder / "index.json").write_text(json.dumps(index))
    return folder


def exported_stride(out: Path) -> int:
    return json.loads((out / "config.json").read_text())["input"]["frame_stride"]


def test_the_frame_stride_is_read_beside_the_shards_of_a_glob_pattern(tmp_path):
    shards = shards_cut_with_stride(tmp_path / "shards", stride=2)
    ckpt = checkpoint(tmp_path / "last.ckpt", {"data": {"shards": f"{shards}/all-*.tar"}})
    assert exported_stride(export(ckpt, tmp_path / "out")) == 2


def test_the_recorded_frame_stride_is_used_when_the_shards_are_out_of_reach(tmp_path):
    run_config = {
        "data": {"shards": "/nowhere/vox2/all-{000000..000009}.tar"},
        "shard_sampling": {"frame_stride": 2, "sample_rate": 16000},
    }
    out = export(checkpoint(tmp_path / "last.ckpt", run_config), tmp_path / "out")
    assert exported_stride(out) == 2


def test_export_refuses_to_guess_and_asks_for_frame_stride(tmp_path, capsys):
    ckpt = checkpoint(tmp_path / "last.ckpt", {"data": {"shards": "/nowhere/vox2/all-*.tar"}})
    assert main([str(ckpt), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--frame-stride" in err and "last.ckpt" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert main([str(ckpt), str(tmp_path / "out"), "--frame-stride", "2"]) == 0
    assert exported_stride(tmp_path / "out") == 2


def test_a_frame_stride_option_that_contradicts_the_run_is_refused(tmp_path):
    ckpt = checkpoint(tmp_path / "last.ckpt", {"shard_sampling": {"frame_stride": 2}})
    with pytest.raises(ExportError, match="--frame-stride 3 disagrees with frame_stride=2"):
        export(ckpt, tmp_path / "out", frame_stride=3)


def test_a_failed_export_leaves_no_owner_only_weights_file(tmp_path):
    old = os.umask(0o022)
    try:
        with pytest.raises(
            TypeError
        ):  # config.json cannot hold an object(): the export fails after the weights
            save_export(
                AVEncoder(ModelConfig(**TINY)),
                ModelConfig(**TINY).to_dict(),
                {},
                tmp_path / "out",
                "x",
                extra={"bad": object()},
            )
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    assert modes == {"encoder.safetensors": 0o644}
