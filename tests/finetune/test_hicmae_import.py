"""`emomae import-hicmae` end to end on the checkpoints HiCMAE's own code wrote (the parity fixture):
import -> `load_encoder` / `emomae embed` -> a linear probe on the built-in data -> `emomae pretrain
init=` for a few steps -> the imported fine-tuned head evaluated by `emomae finetune eval_only=true`;
and the errors a wrong file gets."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from demo_run import pretrain_args
from safetensors.torch import load_file
from synth_finetune import synth_finetune

from emomae.cli import main as emomae
from finetune.export import load_encoder, read_export_config
from finetune.hicmae_import import HEAD_FILE, PRETRAIN_FILE, load_head
from pretrain.pooling import pool_tokens

REPO = Path(__file__).resolve().parents[2]
FIXTURE = Path(
    os.environ.get("EMOMAE_HICMAE_FIXTURE", REPO / ".." / "shared" / "fixtures" / "hicmae" / "small")
)


@pytest.fixture(scope="module")
def meta() -> dict:
    if not (FIXTURE / "meta.json").is_file():
        pytest.fail(f"HiCMAE parity fixture not found at {FIXTURE} (set EMOMAE_HICMAE_FIXTURE)")
    return json.loads((FIXTURE / "meta.json").read_text())


def head_overrides(meta: dict) -> list[str]:
    """Head counts are the one thing a state dict cannot tell (the CLI assumes 64-wide heads)."""
    pc = meta["pretrain_config"]
    return [f"heads={pc['encoder_num_heads']}", f"decoder_heads={pc['decoder_num_heads']}"]


@pytest.fixture(scope="module")
def imported(meta, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("imported")
    for kind in ("pretrain", "finetune"):
        assert (
            emomae(
                [
                    "import-hicmae",
                    str(FIXTURE / f"{kind}_checkpoint.pth"),
                    str(out / kind),
                    *head_overrides(meta),
                ]
            )
            == 0
        )
    return {"pretrain": out / "pretrain", "finetune": out / "finetune", "root": out}


@pytest.fixture(scope="module")
def fixture_shards(imported, synth_manifest, meta) -> Path:
    """The built-in dataset sharded at the imported model's input size (16 frames of 96 x 96 here)."""
    from data_pipelines.shards import ShardConfig, write_shards

    arch = read_export_config(imported["pretrain"])["architecture"]
    out = imported["root"] / "shards"
    write_shards(
        synth_manifest,
        out,
        ShardConfig(
            num_frames=arch["num_frames"], frame_stride=4, img_size=arch["img_size"], samples_per_shard=32
        ),
        workers=2,
        progress=False,
    )
    return out


def test_the_imported_fine_tuned_model_gives_hicmae_s_logits_through_the_files(imported):
    tensors = load_file(str(FIXTURE / "tensors.safetensors"))
    encoder, head = load_encoder(imported["finetune"]), load_head(imported["finetune"])
    with torch.no_grad():
        logits = head(
            pool_tokens(
                encoder.forward_features(tensors["video"].permute(0, 2, 1, 3, 4), tensors["audio"][:, 0])
            )
        )
    error = float((logits - tensors["finetune_logits"]).abs().max() / tensors["finetune_logits"].abs().max())
    assert error < 1e-5


def test_the_imported_pretrained_encoder_gives_hicmae_s_fused_features(imported):
    from pretrain.masking import Mask

    tensors = load_file(str(FIXTURE / "tensors.safetensors"))
    encoder = load_encoder(imported["pretrain"])
    vm, am = Mask.from_bool(tensors["mask_video"]), Mask.from_bool(tensors["mask_audio"])
    with torch.no_grad():
        out = encoder.forward_features(
            tensors["video"].permute(0, 2, 1, 3, 4), tensors["audio"][:, 0], vm.ids_keep, am.ids_keep
        )
    error = float((out.fused_video - tensors["fused_video"]).abs().max() / tensors["fused_video"].abs().max())
    assert error < 1e-5


def test_the_export_says_where_the_weights_came_from(imported, meta):
    config = read_export_config(imported["pretrain"])
    assert config["imported_from"]["kind"] == "pretrain" and config["license"] == "MIT"
    assert (
        config["input"]["frame_stride"] == 4
        and config["architecture"]["width"] == meta["pretrain_config"]["encoder_embed_dim"]
    )
    card = (imported["pretrain"] / "MODEL_CARD.md").read_text()
    assert "## Source" in card and "pretrain_checkpoint.pth" in card and "github.com/sunlicai/HiCMAE" in card
    pretrain_state = load_file(str(imported["pretrain"] / PRETRAIN_FILE))
    assert len(pretrain_state) == 540 and "video_decoder.head.weight" in pretrain_state
    head_config = json.loads((imported["finetune"] / "head.json").read_text())
    assert head_config["num_outputs"] == meta["num_classes"] and (imported["finetune"] / HEAD_FILE).is_file()
    for folder in (imported["pretrain"], imported["finetune"]):
        for f in folder.iterdir():
            assert f.stat().st_mode & 0o777 == 0o644, f


def test_hf_layout_import_loads_the_same_encoder(imported, meta, tmp_path):
    out = tmp_path / "hf"
    assert (
        emomae(
            [
                "import-hicmae",
                str(FIXTURE / "finetune_checkpoint.pth"),
                str(out),
                "--layout",
                "hf",
                *head_overrides(meta),
            ]
        )
        == 0
    )
    assert {"config.json", "model.safetensors", "README.md", HEAD_FILE} <= {f.name for f in out.iterdir()}
    ours, theirs = load_encoder(out).state_dict(), load_encoder(imported["finetune"]).state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_embed_reads_the_imported_export(imported, realdata_dir, tmp_path):
    clip = sorted(realdata_dir.rglob("*.mp4"))[0]
    out = tmp_path / "emb.npy"
    assert (
        emomae(
            [
                "embed",
                str(clip),
                "--encoder",
                str(imported["pretrain"]),
                "--out",
                str(out),
                "--max-windows",
                "1",
            ]
        )
        == 0
    )
    embedding = np.load(out)
    assert (
        embedding.ndim == 1
        and embedding.size >= 4 * 64
        and np.isfinite(embedding).all()
        and embedding.std() > 0
    )


def _finetune(export: Path, manifest: Path, shards: Path, out: Path, name: str, *extra: str) -> dict:
    args = synth_finetune(export, manifest, shards, out, f"run_name={name}", "fold=0", *extra)
    assert emomae(["finetune", *args]) == 0
    return json.loads((out / name / "results.json").read_text())


@pytest.mark.slow
def test_a_linear_probe_runs_on_the_imported_encoder(imported, synth_manifest, fixture_shards, tmp_path):
    result = _finetune(
        imported["pretrain"],
        synth_manifest,
        fixture_shards,
        tmp_path,
        "probe",
        "head=linear",
        "recipes.linear.epochs=5",
    )
    av = result["folds"][0]["test"]["av"]
    assert 0.0 <= av["uar"] <= 1.0 and np.asarray(av["confusion"]).sum() > 0


@pytest.mark.slow
def test_the_imported_fine_tuned_head_is_evaluated_without_training(
    imported, synth_manifest, fixture_shards, tmp_path
):
    result = _finetune(
        imported["finetune"],
        synth_manifest,
        fixture_shards,
        tmp_path,
        "eval",
        "head=finetune",
        "eval_only=true",
    )
    fold = result["folds"][0]
    assert result["eval_only"] is True and fold["selected_epoch"] == "imported" and fold["curve"] == []
    test_windows = fold["windows"]["test"]
    assert test_windows > 0
    for modality in ("av", "audio", "video"):  # missing-modality figures of the same imported model
        confusion = np.asarray(fold["test"][modality]["confusion"])
        assert confusion.shape == (6, 6) and confusion.sum() > 0
    assert "evaluated as it is" in (tmp_path / "eval" / "results.md").read_text()


def test_eval_only_refuses_a_head_of_another_class_count(
    imported, synth_manifest, fixture_shards, tmp_path, capsys
):
    files = (synth_manifest, fixture_shards, tmp_path)
    wrong_classes = ("protocol.classes=[A,B,C]", "head=finetune", "eval_only=true", "fold=0")
    code = emomae(["finetune", *synth_finetune(imported["finetune"], *files, *wrong_classes)])
    assert code == 2 and "has 6 outputs" in capsys.readouterr().err
    code = emomae(
        ["finetune", *synth_finetune(imported["pretrain"], *files, "head=linear", "eval_only=true")]
    )
    assert code == 2 and "set head=finetune" in capsys.readouterr().err


@pytest.mark.slow
def test_pretraining_continues_from_the_imported_model(imported, fixture_shards, tmp_path):
    arch = read_export_config(imported["pretrain"])["architecture"]
    model_overrides = [f"model.{k}={json.dumps(v)}" for k, v in arch.items()]
    run = tmp_path / "run"
    small = ("data.num_workers=0", "data.batch_size=4", "optim.warmup_steps=1", *model_overrides)
    assert emomae(pretrain_args(fixture_shards, run, 2, f"init={imported['pretrain']}", *small)) == 0
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    trained = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    imported_state = load_file(str(imported["pretrain"] / PRETRAIN_FILE))
    assert trained.keys() == imported_state.keys()
    # two small steps away from HiCMAE's weights, nowhere near a fresh initialisation
    from pretrain.encoders import ModelConfig
    from pretrain.mae import MaskedAVAutoencoder

    fresh = MaskedAVAutoencoder(ModelConfig.from_dict(arch)).state_dict()
    key = "encoder.video_blocks.5.attn.qkv.weight"
    moved = (trained[key] - imported_state[key]).norm() / imported_state[key].norm()
    assert 0 < moved < 0.05 < (fresh[key] - imported_state[key]).norm() / imported_state[key].norm()


def test_a_file_that_is_not_a_checkpoint_gets_a_clear_error(tmp_path, capsys):
    not_ckpt = tmp_path / "notes.pth"
    not_ckpt.write_text("hello")
    assert emomae(["import-hicmae", str(not_ckpt), str(tmp_path / "out")]) == 1
    assert "not a torch.save file" in capsys.readouterr().err


def test_a_checkpoint_holding_code_objects_is_refused_not_unpickled(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"mask_token": torch.zeros(1)}, "hook": argparse.ArgumentParser}, path)
    assert emomae(["import-hicmae", str(path), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "argparse.ArgumentParser" in err and "only tensors, plain types and argparse.Namespace" in err


def test_a_foreign_checkpoint_names_what_it_has(tmp_path, capsys):
    path = tmp_path / "clip.pth"
    torch.save({"state_dict": {"visual.proj": torch.zeros(2), "text.proj": torch.zeros(2)}}, path)
    assert emomae(["import-hicmae", str(path), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "no state dict under 'model' or 'module'" in err
    torch.save({"model": {"visual.proj": torch.zeros(2)}}, path)
    assert emomae(["import-hicmae", str(path), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "not a HiCMAE checkpoint" in err and "visual.proj" in err


def test_a_shape_mismatch_or_unknown_key_is_named(tmp_path, meta, capsys):
    state = _fixture_state("finetune")
    state["head.weight"] = torch.zeros(6, 10)
    state["encoder.cls_token"] = torch.zeros(1, 1, 64)
    path = tmp_path / "bad.pth"
    torch.save({"module": state}, path)
    assert emomae(["import-hicmae", str(path), str(tmp_path / "out"), *head_overrides(meta)]) == 1
    err = capsys.readouterr().err
    assert "head.weight: checkpoint (6, 10) vs emomae head.fc.weight" in err and "encoder.cls_token" in err


def test_ema_weights_are_taken_when_asked_and_their_absence_is_an_error(tmp_path, meta, capsys):
    state = _fixture_state("finetune")
    ema = {k: v + 1.0 if v.is_floating_point() else v for k, v in state.items()}
    path = tmp_path / "with_ema.pth"
    torch.save({"model": state, "model_ema": ema}, path)
    assert emomae(["import-hicmae", str(path), str(tmp_path / "ema"), "--ema", *head_overrides(meta)]) == 0
    head = load_head(tmp_path / "ema")
    assert torch.equal(head.fc.bias, ema["head.bias"])
    assert (
        emomae(["import-hicmae", str(FIXTURE / "finetune_checkpoint.pth"), str(tmp_path / "x"), "--ema"]) == 1
    )
    assert "no 'model_ema'" in capsys.readouterr().err


def _fixture_state(kind: str) -> dict:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return dict(
            torch.load(FIXTURE / f"{kind}_checkpoint.pth", map_location="cpu", weights_only=True)["model"]
        )
