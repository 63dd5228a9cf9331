"""`emomae zeroshot`: prompt files, loading a stage-2 checkpoint or its export (the export keeps the
text heads and gives the same scores), refusing stage-1 models, and the CLI's report on real shards.
Accuracy after real training is asserted in tests/pretrain/test_inject.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from finetune.export import ExportError, export
from finetune.zeroshot import class_prompts, load_zeroshot_model, main, prompt_classifier, zeroshot_scores
from pretrain.text import DEFAULT_TEXT_ENCODER, FrozenTextEncoder, TextHeads

REPO = Path(__file__).resolve().parents[2]
TINY = dict(
    kind="separate",
    num_frames=8,
    img_size=32,
    tubelet=2,
    patch=16,
    fbank_frames=128,
    mel_bins=64,
    width=64,
    heads=2,
    depth=2,
    fusion_depth=1,
    decoder_width=32,
    decoder_heads=1,
    decoder_depth=3,
    skip_layers=[1, 2],
)


def _checkpoint(path: Path, stage: str, text_dim: int = 384) -> Path:
    """A checkpoint in the layout `emomae pretrain` writes (state_dict + checkpoint['emomae'])."""
    from pretrain.encoders import ModelConfig
    from pretrain.mae import MaskedAVAutoencoder

    torch.manual_seed(0)
    model = MaskedAVAutoencoder(ModelConfig.from_dict(TINY))
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    config = {
        "stage": stage,
        "data": {"num_frames": 8, "img_size": 32, "fbank": {}},
        "inject": {"text_encoder": DEFAULT_TEXT_ENCODER},
        "shard_sampling": {"frame_stride": 4},
    }
    if stage == "inject":
        state |= {f"text_heads.{k}": v for k, v in TextHeads(64, text_dim).state_dict().items()}
    torch.save({"state_dict": state, "emomae": {"model": dict(TINY), "config": config}}, path)
    return path


def test_prompt_file_gives_explicit_prompts_and_templates_fill_the_rest(tmp_path):
    prompts = class_prompts(REPO / "configs/zeroshot/crema-d.yaml")
    assert list(prompts) == ["ANG", "DIS", "FEA", "HAP", "NEU", "SAD"]
    assert all(len(p) == 2 for p in prompts.values())
    from_names = class_prompts(None, ["calm", "angry"], ["a {} voice"])
    assert from_names == {"calm": ["a calm voice"], "angry": ["a angry voice"]}
    spec = tmp_path / "p.yaml"
    spec.write_text("classes: [a, b]\nwords: {a: happy}\nprompts: {b: a sad face}\n")
    assert class_prompts(spec, templates=["she is {}"]) == {"a": ["she is happy"], "b": ["a sad face"]}


def test_bad_prompt_specs_are_named(tmp_path):
    spec = tmp_path / "p.yaml"
    spec.write_text("classes: [a]\nlabels: [x]\n")
    with pytest.raises(ValueError, match="unknown keys \\['labels'\\]"):
        class_prompts(spec)
    with pytest.raises(ValueError, match="must contain"):
        class_prompts(None, ["a"], ["no placeholder"])
    with pytest.raises(ValueError, match="no classes"):
        class_prompts(None)


def test_stage1_models_are_refused_with_a_pointer_to_stage2(tmp_path):
    ckpt = _checkpoint(tmp_path / "s1.ckpt", "mae")
    with pytest.raises(ExportError, match="stage-1 checkpoint"):
        load_zeroshot_model(ckpt)
    export(ckpt, tmp_path / "export")
    assert not (tmp_path / "export" / "text_heads.safetensors").exists()
    with pytest.raises(ExportError, match="text_heads.safetensors"):
        load_zeroshot_model(tmp_path / "export")


def test_export_of_a_stage2_checkpoint_keeps_the_text_heads_and_scores_identically(tmp_path, synth_shards):
    from data_pipelines.datamodule import resolve_shards
    from data_pipelines.stream import eval_pipeline
    from finetune.streams import loader, stream_config

    ckpt = _checkpoint(tmp_path / "s2.ckpt", "inject")
    export(ckpt, tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["text"] == {
        "encoder": DEFAULT_TEXT_ENCODER,
        "dim": 384,
        "branches": ["audio", "fused", "video"],
    }

    text = FrozenTextEncoder(DEFAULT_TEXT_ENCODER)
    classifier = prompt_classifier(text, class_prompts(REPO / "configs/zeroshot/crema-d.yaml"))
    results = []
    for source in (ckpt, tmp_path / "export"):
        encoder, heads, info = load_zeroshot_model(source)
        stream = eval_pipeline(
            resolve_shards(str(synth_shards), ["fold1"]),
            stream_config(info["input"], info["architecture"], 16, 0),
            rank=0,
            world_size=1,
        )
        results.append(zeroshot_scores(encoder, heads, classifier, loader(stream, 0)))
    assert results[0]["keys"] == results[1]["keys"] and len(results[0]["keys"]) == 24
    for branch in ("video", "audio", "fused", "ensemble"):
        probs = results[0]["probs"][branch]
        assert probs.shape == (24, 6)
        torch.testing.assert_close(torch.tensor(probs), torch.tensor(results[1]["probs"][branch]))


def test_an_export_that_names_the_branches_paths_still_loads(tmp_path):
    """Exports written before the rename say `paths` in config.json's text entry."""
    from finetune.export import read_export_config

    export(_checkpoint(tmp_path / "s2.ckpt", "inject"), tmp_path / "export")
    config_file = tmp_path / "export" / "config.json"
    config = json.loads(config_file.read_text())
    config["text"]["paths"] = config["text"].pop("branches")
    config_file.write_text(json.dumps(config))
    assert read_export_config(tmp_path / "export")["text"]["branches"] == ["audio", "fused", "video"]
    _, heads, _ = load_zeroshot_model(tmp_path / "export")
    assert sorted(heads.proj) == ["audio", "fused", "video"]
    # the old key is read, not ignored: a list that does not match the heads file is refused
    config["text"]["paths"] = ["video"]
    config_file.write_text(json.dumps(config))
    with pytest.raises(ExportError, match=r"names the branches \['video'\]"):
        load_zeroshot_model(tmp_path / "export")


def test_cli_reports_uar_and_war_per_branch_on_real_shards(tmp_path, synth_shards, capsys):
    ckpt = _checkpoint(tmp_path / "s2.ckpt", "inject")
    out = tmp_path / "zs.json"
    code = main(
        [
            str(ckpt),
            str(synth_shards),
            "--prompts",
            str(REPO / "configs/zeroshot/crema-d.yaml"),
            "--groups",
            "fold2",
            "--workers",
            "0",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert result["num_windows"] == 24 and result["chance_uar"] == pytest.approx(1 / 6)
    for branch in ("video", "audio", "fused", "ensemble"):
        m = result["metrics"][branch]
        assert 0 <= m["uar"] <= 1 and m["num_samples"] == 12  # 12 clips, windows averaged
    assert "ensemble" in capsys.readouterr().out
    assert main([str(tmp_path / "missing.ckpt"), str(synth_shards), "--classes", "a", "b"]) == 2
