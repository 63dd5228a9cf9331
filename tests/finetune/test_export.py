"""Export: Lightning and DeepSpeed checkpoints -> safetensors + config.json, and `load_encoder`;
the Hugging Face layout (model.safetensors + config.json + README.md with front matter) and hub ids."""

from __future__ import annotations

import json
import math
import os
import stat
from collections import OrderedDict

import pytest
import torch
import yaml
from safetensors import safe_open
from tiny_model import tiny

from finetune import load_encoder
from finetune.export import (
    ExportError,
    build_encoder,
    export,
    input_spec,
    main,
    read_export_config,
    resolve_export_dir,
    save_export,
)
from pretrain.encoders import AVEncoder, ModelConfig
from pretrain.mae import MaskedAVAutoencoder

TINY = tiny()
RUN_CONFIG = {"data": {"num_frames": 4, "img_size": 32}, "shard_sampling": {"frame_stride": 4}}


def _tiny_mae(seed: int = 0) -> MaskedAVAutoencoder:
    torch.manual_seed(seed)
    return MaskedAVAutoencoder(ModelConfig(**TINY))


def _lightning_ckpt(path, mae: MaskedAVAutoencoder, model_cfg: dict | None = None):
    state = {f"model.{k}": v for k, v in mae.state_dict().items()}
    ckpt = {
        "state_dict": state,
        "epoch": 0,
        "global_step": 3,
        "emomae": {"model": model_cfg or ModelConfig(**TINY).to_dict(), "config": RUN_CONFIG},
    }
    torch.save(ckpt, path)
    return path


def _inputs(batch: int = 2):
    torch.manual_seed(1)
    c = ModelConfig(**TINY)
    return torch.randn(batch, c.num_frames, 3, c.img_size, c.img_size), torch.randn(
        batch, c.fbank_frames, c.mel_bins
    )


def test_lightning_export_round_trip_is_bit_identical(tmp_path):
    mae = _tiny_mae().eval()
    ckpt = _lightning_ckpt(tmp_path / "last.ckpt", mae)
    out = export(ckpt, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["MODEL_CARD.md", "config.json", "encoder.safetensors"]
    loaded = load_encoder(out)
    assert not any(m.training for m in loaded.modules())
    video, fbank = _inputs()
    with torch.no_grad():
        want, got = mae.encoder.forward_features(video, fbank), loaded.forward_features(video, fbank)
    for a, b in zip(
        want.video_layers + want.audio_layers + [want.fused_video, want.fused_audio],
        got.video_layers + got.audio_layers + [got.fused_video, got.fused_audio],
    ):
        assert torch.equal(a, b)
    config = read_export_config(out)
    assert config["architecture"] == ModelConfig(**TINY).to_dict()
    assert config["input"]["num_frames"] == 4 and config["input"]["img_size"] == 32
    assert config["input"]["fbank"]["mel_bins"] == 32 and config["input"]["fbank"]["htk_compat"] is True
    # decoders are not exported: only encoder tensors, as many as the encoder has
    assert config["num_parameters"] == sum(p.numel() for p in mae.encoder.state_dict().values())


def _deepspeed_zero2_dir(root, state: dict[str, torch.Tensor], world_size: int, tag: str = "global_step7"):
    """What DeepSpeed ZeRO-2 writes: per rank a slice of one flat fp32 vector of all trainable
    parameters (padded to a multiple of 2 x world size), plus the parameter shapes in the model file."""
    from deepspeed.checkpoint.constants import (
        BUFFER_NAMES,
        DS_VERSION,
        OPTIMIZER_STATE_DICT,
        PARAM_SHAPES,
        PARTITION_COUNT,
        SINGLE_PARTITION_OF_FP32_GROUPS,
        ZERO_STAGE,
    )

    names = list(state)
    flat = torch.cat([state[n].reshape(-1).float() for n in names])
    align = 2 * world_size
    flat = torch.cat([flat, flat.new_zeros(align * math.ceil(flat.numel() / align) - flat.numel())])
    parts = flat.chunk(world_size)
    folder = root / tag
    folder.mkdir(parents=True)
    (root / "latest").write_text(tag)
    shapes = [OrderedDict((n, state[n].shape) for n in names)]
    torch.save(
        {
            "module": {},
            BUFFER_NAMES: [],
            PARAM_SHAPES: shapes,
            "shared_params": {},
            DS_VERSION: "0.19.8",
            "emomae": {"model": ModelConfig(**TINY).to_dict(), "config": RUN_CONFIG},
        },
        folder / "mp_rank_00_model_states.pt",
    )
    for rank, part in enumerate(parts):
        torch.save(
            {
                OPTIMIZER_STATE_DICT: {
                    ZERO_STAGE: 2,
                    PARTITION_COUNT: world_size,
                    SINGLE_PARTITION_OF_FP32_GROUPS: [part.clone()],
                }
            },
            folder / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
        )
    return root


def test_deepspeed_zero2_shards_consolidate_to_the_trained_tensors(tmp_path):
    mae = _tiny_mae(seed=3)
    # Lightning's DeepSpeed wrapper puts `_forward_module.` before the LightningModule's names
    state = {f"_forward_module.model.{k}": v for k, v in mae.state_dict().items()}
    ckpt_dir = _deepspeed_zero2_dir(tmp_path / "last.ckpt", state, world_size=3)
    out = export(ckpt_dir, tmp_path / "export")
    loaded = load_encoder(out).state_dict()
    want = mae.encoder.state_dict()
    assert set(loaded) == set(want)
    for name, tensor in want.items():
        assert torch.equal(loaded[name], tensor.float()), name


def test_wrong_architecture_checkpoint_names_the_mismatch(tmp_path):
    mae = _tiny_mae()
    wider = {**TINY, "width": 128, "heads": 4}
    ckpt = _lightning_ckpt(tmp_path / "bad.ckpt", mae, model_cfg=ModelConfig(**wider).to_dict())
    with pytest.raises(ExportError, match=r"bad\.ckpt.*shape mismatch.*checkpoint \(64,\) vs model \(128,\)"):
        export(ckpt, tmp_path / "export")
    deeper = _lightning_ckpt(
        tmp_path / "deeper.ckpt", mae, model_cfg=ModelConfig(**{**TINY, "depth": 4}).to_dict()
    )
    with pytest.raises(ExportError, match=r"missing tensor\(s\), e\.g\. \['audio_blocks\.3\."):
        export(deeper, tmp_path / "export")
    # the CLI turns it into one line on stderr and exit code 1
    assert main([str(ckpt), str(tmp_path / "export2")]) == 1


def test_malformed_export_config_gives_a_clear_error(tmp_path):
    out = export(_lightning_ckpt(tmp_path / "last.ckpt", _tiny_mae()), tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    config["architecture"]["widht"] = 64
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match=r"config\.json.*unknown ModelConfig keys \['widht'\]"):
        load_encoder(out)
    config["architecture"].pop("widht")
    config["architecture"]["heads"] = 3  # 64 is not divisible by 3
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="width=64 must be divisible by heads=3"):
        load_encoder(out)
    (out / "config.json").write_text("{not json")
    with pytest.raises(ExportError, match="malformed JSON"):
        load_encoder(out)


def test_checkpoint_without_encoder_weights_is_rejected(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"net.weight": torch.zeros(2)}, "emomae": {"model": TINY}}, path)
    with pytest.raises(ExportError, match="no weights under 'model.encoder.'"):
        export(path, tmp_path / "export")
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ExportError, match=r"checkpoint\['emomae'\]\['model'\]"):
        export(path, tmp_path / "export")


def test_random_encoder_differs_from_export(tmp_path):
    """Guards the bit-identity test above: a fresh encoder of the same shape gives other outputs."""
    out = export(_lightning_ckpt(tmp_path / "last.ckpt", _tiny_mae(seed=0)), tmp_path / "export")
    torch.manual_seed(5)
    fresh = AVEncoder(ModelConfig(**TINY)).eval()
    video, fbank = _inputs()
    with torch.no_grad():
        assert not torch.equal(
            fresh.forward_features(video, fbank).fused_video,
            load_encoder(out).forward_features(video, fbank).fused_video,
        )


# --- the Hugging Face layout ---------------------------------------------------------------------


def _front_matter(readme) -> tuple[dict, str]:
    """(YAML front matter as a dict, the markdown after it) of a README.md."""
    text = readme.read_text()
    assert text.startswith("---\n"), text[:80]
    head, sep, body = text[len("---\n") :].partition("\n---\n")
    assert sep, "front matter block is not closed by a '---' line"
    return yaml.safe_load(head), body


def _safetensors(path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _outputs(encoder, video, fbank) -> list[torch.Tensor]:
    with torch.no_grad():
        out = encoder.forward_features(video, fbank)
    return out.video_layers + out.audio_layers + [out.fused_video, out.fused_audio]


def test_hf_layout_holds_the_same_export_and_loads_bit_identically(tmp_path):
    mae = _tiny_mae(seed=2).eval()
    ckpt = _lightning_ckpt(tmp_path / "last.ckpt", mae)
    ours, hf = export(ckpt, tmp_path / "emomae"), export(ckpt, tmp_path / "hf", layout="hf")
    assert sorted(p.name for p in hf.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    # same config.json content, same tensors and metadata under the hub's file name
    assert json.loads((hf / "config.json").read_text()) == json.loads((ours / "config.json").read_text())
    assert read_export_config(hf) == read_export_config(ours)
    hf_tensors, hf_meta = _safetensors(hf / "model.safetensors")
    our_tensors, our_meta = _safetensors(ours / "encoder.safetensors")
    assert hf_meta == our_meta == {"format": "emomae-encoder", "version": "1"}
    assert set(hf_tensors) == set(our_tensors) == set(mae.encoder.state_dict())
    assert all(torch.equal(hf_tensors[k], our_tensors[k]) for k in our_tensors)

    meta, body = _front_matter(hf / "README.md")
    assert meta == {
        "library_name": "emomae",
        "tags": ["audio-visual", "emotion-recognition", "masked-autoencoder"],
        "pipeline_tag": "feature-extraction",
    }  # no license unless one is given
    assert body.lstrip().startswith("# emomae audio-visual emotion encoder") and "## Source" not in body
    assert "## Architecture" in body and "| `width` | `64` |" in body
    # the hub's own card parser reads the same metadata
    from huggingface_hub.repocard import metadata_load

    assert metadata_load(hf / "README.md") == meta

    video, fbank = _inputs()
    want = _outputs(mae.encoder, video, fbank)
    from_hf, from_ours = (
        _outputs(load_encoder(hf), video, fbank),
        _outputs(load_encoder(str(hf)), video, fbank),
    )
    assert len(from_hf) == len(want) == 3 + 3 + 2
    for a, b, c in zip(want, _outputs(load_encoder(ours), video, fbank), from_hf):
        assert torch.equal(a, b) and torch.equal(b, c)
    assert all(torch.equal(a, b) for a, b in zip(from_hf, from_ours))


def test_save_export_license_and_card_note(tmp_path):
    cfg = ModelConfig(**TINY)
    torch.manual_seed(0)
    encoder, _ = build_encoder(cfg.to_dict())
    note = "Converted from the HiCMAE-base release (https://example.org/hicmae), MIT licence."
    hf = save_export(
        encoder,
        cfg.to_dict(),
        input_spec({}, cfg.to_dict()),
        tmp_path / "hf",
        source="hicmae.pth",
        extra={"license": "cc-by-nc-4.0"},
        layout="hf",
        card_note=note,
    )
    meta, body = _front_matter(hf / "README.md")
    assert meta["license"] == "cc-by-nc-4.0" and meta["library_name"] == "emomae"
    assert f"## Source\n\n{note}\n" in body
    assert read_export_config(hf)["license"] == "cc-by-nc-4.0"  # `extra` still lands in config.json
    ours = save_export(
        encoder,
        cfg.to_dict(),
        input_spec({}, cfg.to_dict()),
        tmp_path / "ours",
        source="hicmae.pth",
        card_note=note,
    )
    card = (ours / "MODEL_CARD.md").read_text()
    assert not card.startswith("---") and f"## Source\n\n{note}\n" in card
    assert card.index("## Source") < card.index("## Limitations")
    plain = save_export(encoder, cfg.to_dict(), input_spec({}, cfg.to_dict()), tmp_path / "plain", source="x")
    assert "## Source" not in (plain / "MODEL_CARD.md").read_text()
    with pytest.raises(ExportError, match="unknown export layout 'onnx'"):
        save_export(
            encoder, cfg.to_dict(), input_spec({}, cfg.to_dict()), tmp_path / "bad", source="x", layout="onnx"
        )
    assert not (tmp_path / "bad").exists()


def test_cli_layout_hf(tmp_path, capsys):
    mae = _tiny_mae(seed=4).eval()
    ckpt = _lightning_ckpt(tmp_path / "last.ckpt", mae)
    assert main([str(ckpt), str(tmp_path / "hf"), "--layout", "hf"]) == 0
    assert f"exported encoder to {tmp_path / 'hf'}" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    assert _front_matter(tmp_path / "hf" / "README.md")[0]["pipeline_tag"] == "feature-extraction"
    video, fbank = _inputs()
    for a, b in zip(
        _outputs(mae.encoder, video, fbank), _outputs(load_encoder(tmp_path / "hf"), video, fbank)
    ):
        assert torch.equal(a, b)
    # the default stays the emomae layout
    assert main([str(ckpt), str(tmp_path / "ours")]) == 0
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == [
        "MODEL_CARD.md",
        "config.json",
        "encoder.safetensors",
    ]
    with pytest.raises(SystemExit) as exit_info:
        main([str(ckpt), str(tmp_path / "x"), "--layout", "onnx"])
    assert exit_info.value.code == 2 and "invalid choice: 'onnx'" in capsys.readouterr().err


def test_every_exported_file_is_0644_in_both_layouts(tmp_path):
    """safetensors writes 0600; exports are for sharing. Under a umask of 002 a plain write would give
    0664, so 0644 here is the export's own doing. A stage-2 checkpoint adds text_heads.safetensors."""
    from pretrain.text import TextHeads

    mae = _tiny_mae()
    state = {f"model.{k}": v for k, v in mae.state_dict().items()}
    state |= {f"text_heads.{k}": v for k, v in TextHeads(64, 16).state_dict().items()}
    run_config = {**RUN_CONFIG, "stage": "inject", "inject": {"text_encoder": "tiny-text"}}
    ckpt = tmp_path / "s2.ckpt"
    torch.save(
        {"state_dict": state, "emomae": {"model": ModelConfig(**TINY).to_dict(), "config": run_config}}, ckpt
    )
    old = os.umask(0o002)
    try:
        outs = {layout: export(ckpt, tmp_path / layout, layout=layout) for layout in ("emomae", "hf")}
    finally:
        os.umask(old)
    assert sorted(p.name for p in outs["hf"].iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "text_heads.safetensors",
    ]
    assert sorted(p.name for p in outs["emomae"].iterdir()) == [
        "MODEL_CARD.md",
        "config.json",
        "encoder.safetensors",
        "text_heads.safetensors",
    ]
    modes = {
        f"{layout}/{p.name}": oct(stat.S_IMODE(p.stat().st_mode))
        for layout, out in outs.items()
        for p in out.iterdir()
    }
    assert modes == dict.fromkeys(modes, "0o644")


def test_hub_id_offline_raises_an_export_error_naming_it(tmp_path, monkeypatch):
    """The real huggingface_hub offline path: no cached copy, HF_HUB_OFFLINE=1 -> a clear ExportError."""
    import huggingface_hub.constants

    hub_id = "emomae-test-nobody/emomae-base"
    monkeypatch.chdir(tmp_path)  # so the id names no local folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these variables once, at import (other tests may have imported it already)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    for call in (load_encoder, resolve_export_dir, read_export_config):
        with pytest.raises(
            ExportError,
            match=r"'emomae-test-nobody/emomae-base'.*hub id needs network access.*"
            r"local export folder",
        ) as info:
            call(hub_id)
        assert "LocalEntryNotFoundError" in str(info.value) or "Offline" in str(info.value)
    # a path that does not exist and is not shaped like a hub id keeps the plain "not an export" error
    for missing in ("no/such/export/dir", "../nothere"):
        with pytest.raises(
            ExportError, match=r"no config\.json; is this a folder written by `emomae export`"
        ):
            load_encoder(missing)
    # an existing local folder shaped like a hub id is a folder, never a download
    ckpt = _lightning_ckpt(tmp_path / "last.ckpt", _tiny_mae())
    local = export(ckpt, tmp_path / "emomae-test-nobody" / "emomae-base", layout="hf")
    assert resolve_export_dir(hub_id) == local.relative_to(tmp_path)
    assert not any(m.training for m in load_encoder(hub_id).modules())
