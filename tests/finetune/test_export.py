"""Export: Lightning and DeepSpeed checkpoints -> safetensors + config.json, and `load_encoder`."""

from __future__ import annotations

import json
import math
from collections import OrderedDict

import pytest
import torch

from finetune import load_encoder
from finetune.export import ExportError, export, main, read_export_config
from pretrain.encoders import AVEncoder, ModelConfig
from pretrain.mae import MaskedAVAutoencoder

TINY = dict(num_frames=4, img_size=32, fbank_frames=64, mel_bins=32, width=64, heads=2, depth=3, fusion_depth=1,
            decoder_width=32, decoder_heads=2, decoder_depth=3, skip_layers=[1, 3])
RUN_CONFIG = {"data": {"num_frames": 4, "frame_stride": 4, "img_size": 32}}


def _tiny_mae(seed: int = 0) -> MaskedAVAutoencoder:
    torch.manual_seed(seed)
    return MaskedAVAutoencoder(ModelConfig(**TINY))


def _lightning_ckpt(path, mae: MaskedAVAutoencoder, model_cfg: dict | None = None):
    state = {f"model.{k}": v for k, v in mae.state_dict().items()}
    ckpt = {"state_dict": state, "epoch": 0, "global_step": 3,
            "emomae": {"model": model_cfg or ModelConfig(**TINY).to_dict(), "config": RUN_CONFIG}}
    torch.save(ckpt, path)
    return path


def _inputs(batch: int = 2):
    torch.manual_seed(1)
    c = ModelConfig(**TINY)
    return torch.randn(batch, c.num_frames, 3, c.img_size, c.img_size), torch.randn(batch, c.fbank_frames, c.mel_bins)


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
    for a, b in zip(want.video_layers + want.audio_layers + [want.fused_video, want.fused_audio],
                    got.video_layers + got.audio_layers + [got.fused_video, got.fused_audio]):
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
    torch.save({"module": {}, BUFFER_NAMES: [], PARAM_SHAPES: shapes, "shared_params": {}, DS_VERSION: "0.19.8",
                "emomae": {"model": ModelConfig(**TINY).to_dict(), "config": RUN_CONFIG}},
               folder / "mp_rank_00_model_states.pt")
    for rank, part in enumerate(parts):
        torch.save({OPTIMIZER_STATE_DICT: {ZERO_STAGE: 2, PARTITION_COUNT: world_size,
                                           SINGLE_PARTITION_OF_FP32_GROUPS: [part.clone()]}},
                   folder / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
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
    deeper = _lightning_ckpt(tmp_path / "deeper.ckpt", mae, model_cfg=ModelConfig(**{**TINY, "depth": 4}).to_dict())
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
        assert not torch.equal(fresh.forward_features(video, fbank).fused_video,
                               load_encoder(out).forward_features(video, fbank).fused_video)
