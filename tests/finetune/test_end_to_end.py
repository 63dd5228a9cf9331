"""The whole downstream path on the built-in dataset: `emomae pretrain` (micro model, briefly) ->
`emomae export` -> `emomae finetune` with a linear probe, the same probe on a random encoder, and full
fine-tuning; plus `emomae embed` on a real clip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune.embed import main as embed_main
from finetune.export import input_spec, save_export
from pretrain.cli import main as emomae
from pretrain.encoders import AVEncoder, ModelConfig

REPO = Path(__file__).resolve().parents[2]


def _finetune(tmp_path, export: Path, manifest: Path, shards: Path, name: str, *extra: str) -> dict:
    args = ["finetune", str(REPO / "configs" / "finetune" / "synth.yaml"), f"encoder={export}",
            f"protocol.manifest={manifest}", f"protocol.shards={shards}", f"out_dir={tmp_path / 'runs'}",
            f"run_name={name}", "num_workers=0", "speed_batches=1", *extra]
    assert emomae(args) == 0
    return json.loads((tmp_path / "runs" / name / "results.json").read_text())


@pytest.fixture(scope="module")
def downstream(synth_manifest, synth_shards, tmp_path_factory) -> dict:
    """Pretrain briefly, export, then run the linear probe (pretrained and random encoder, 5 folds)
    and full fine-tuning (fold 0) once for the tests below."""
    tmp_path = tmp_path_factory.mktemp("downstream")
    run = tmp_path / "pretrain"
    assert emomae(["pretrain", str(REPO / "configs" / "pretrain" / "demo.yaml"), f"data.shards={synth_shards}",
                   f"run_dir={run}", "trainer.max_steps=80", "trainer.progress_bar=false", "data.num_workers=1",
                   "logging.image_every_n_steps=0", "trainer.ckpt_every_n_steps=80"]) == 0
    export = tmp_path / "export"
    assert emomae(["export", str(run / "checkpoints" / "last.ckpt"), str(export)]) == 0
    out = {
        "linear": _finetune(tmp_path, export, synth_manifest, synth_shards, "linear", "head=linear"),
        "random": _finetune(tmp_path, export, synth_manifest, synth_shards, "random", "head=linear",
                            "random_init=true", "modalities=[av]"),
        "finetune": _finetune(tmp_path, export, synth_manifest, synth_shards, "finetune", "head=finetune", "fold=0",
                              "recipes.finetune.epochs=3"),
        "runs": tmp_path / "runs",
    }
    print("UAR (validation-selected):", {k: out[k]["summary"]["av"]["uar"][0] for k in ("linear", "random", "finetune")},
          "finetune audio/video only:", out["finetune"]["summary"]["audio"]["uar"][0],
          out["finetune"]["summary"]["video"]["uar"][0])
    return out


@pytest.mark.slow
def test_finetune_run_directory_holds_tables_figures_config_and_commit(downstream):
    out = downstream["runs"] / "finetune"
    for name in ("results.md", "results.json", "config.yaml", "run.json", "confusion_av.png", "recall_av.png",
                 "fold0/confusion_video.png", "fold0/metrics.csv"):
        assert (out / name).is_file(), name
    assert "best epoch on TEST (papers' protocol" in (out / "results.md").read_text()
    assert "git_commit" in json.loads((out / "run.json").read_text())
    ft, lin = downstream["finetune"], downstream["linear"]
    assert [f["fold"] for f in ft["folds"]] == [0] and [f["fold"] for f in lin["folds"]] == [0, 1, 2, 3, 4]
    for f in lin["folds"]:
        assert f["windows"]["val"] > 0 and f["windows"]["train"] > 0
        assert set(f["test"]) == {"av", "audio", "video"}
        # the reported epoch is the validation pick; the papers' protocol figure can only be >= it
        assert f["best_on_test"]["uar"] >= f["test"]["av"]["uar"] - 1e-9
    # every window of the dataset was tested exactly once over the 5 folds
    assert sum(f["windows"]["test"] for f in lin["folds"]) == lin["cache"]["samples"]
    assert ft["speed"]["clips_per_s"] > 0


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason="not reached at test size: 80 pretraining steps on 72 clips and 3 fine-tuning "
                   "epochs leave fine-tuning near chance (measured UAR: linear 0.35, random-init linear 0.23, "
                   "finetune 0.13)")
def test_pretrained_probe_beats_random_finetuning_beats_probe_and_av_beats_one_modality(downstream):
    uar = {k: downstream[k]["summary"]["av"]["uar"][0] for k in ("linear", "random", "finetune")}
    assert uar["linear"] > uar["random"] + 0.05
    assert uar["finetune"] > uar["linear"] + 0.05
    for modality in ("audio", "video"):
        assert uar["finetune"] > downstream["finetune"]["summary"][modality]["uar"][0] + 0.05


def test_embed_prints_one_vector_per_real_clip(realdata_dir, tmp_path, capsys):
    cfg = ModelConfig(num_frames=4, img_size=32, fbank_frames=64, mel_bins=32, width=64, heads=2, depth=2,
                      fusion_depth=1, decoder_width=32, decoder_heads=2, decoder_depth=2, skip_layers=[2])
    torch.manual_seed(0)
    export = save_export(AVEncoder(cfg), cfg.to_dict(), input_spec({}, cfg.to_dict()), tmp_path / "export", "test")
    clip = realdata_dir / "grid_lipnet" / "bbaf2n.mpg"  # MPEG-1 + MP2 at 44.1 kHz: resampled to 16 kHz
    assert embed_main([str(clip), "--encoder", str(export), "--out", str(tmp_path / "e.npy")]) == 0
    emb = np.load(tmp_path / "e.npy")
    assert emb.shape == (4 * 64,) and np.isfinite(emb).all() and emb.std() > 0
    assert embed_main([str(tmp_path / "missing.mp4"), "--encoder", str(export)]) == 1
    assert "video file not found" in capsys.readouterr().err
