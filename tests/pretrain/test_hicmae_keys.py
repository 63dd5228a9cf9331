"""Every tensor of HiCMAE's real base checkpoints has one home in emomae's `base`, with its shape.

`base_keys.json` (beside the parity fixture) lists the 540 tensors of HiCMAE-B's pretraining model
and the 370 of its fine-tuning model, which the released VoxCeleb2, CREMA-D and MAFW checkpoints
hold. The models are built on the meta device: shapes without memory or initialisation time.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from finetune.heads import FeatureFusionHead
from finetune.hicmae_import import HEAD_ONLY_EMOMAE
from pretrain.encoders import AVEncoder, ModelConfig
from pretrain.hicmae import HiCMAEKeyError, checkpoint_kind, convert_state, emomae_name
from pretrain.mae import MaskedAVAutoencoder

REPO = Path(__file__).resolve().parents[2]
BASE_KEYS = REPO / ".." / "shared" / "fixtures" / "hicmae" / "base_keys.json"


@pytest.fixture(scope="module")
def base_keys() -> dict:
    if not BASE_KEYS.is_file():
        pytest.fail(f"{BASE_KEYS} not found: the repository expects ../shared/fixtures/hicmae")
    return json.loads(BASE_KEYS.read_text())


def base_config() -> ModelConfig:
    return ModelConfig.from_dict(
        OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / "base.yaml"))
    )


def as_meta(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(v, device="meta") for k, v in shapes.items()}


def test_every_pretraining_key_of_hicmae_base_maps_onto_emomae_base(base_keys):
    with torch.device("meta"):
        model = MaskedAVAutoencoder(base_config())
    target = model.state_dict()
    hicmae = as_meta(base_keys["pretrain"])
    assert len(hicmae) == 540 and checkpoint_kind(hicmae) == "pretrain"
    converted = convert_state(hicmae, target)  # raises on any unmapped, missing or mis-shaped key
    assert set(converted) == set(target) and len(converted) == 540
    assert sum(t.numel() for t in converted.values()) == base_keys["pretrain_params"] == 99_609_344


def test_every_fine_tuning_key_of_hicmae_base_maps_onto_emomae_encoder_and_head(base_keys):
    cfg = base_config()
    with torch.device("meta"):
        encoder, head = AVEncoder(cfg), FeatureFusionHead(cfg.width, cfg.depth, cfg.depth, 6)
    target = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    target |= {f"head.{k}": v for k, v in head.state_dict().items() if not k.startswith(HEAD_ONLY_EMOMAE)}
    hicmae = as_meta(base_keys["finetune"])
    assert len(hicmae) == 370 and checkpoint_kind(hicmae) == "finetune"
    converted = convert_state(hicmae, target)
    assert set(converted) == set(target) and len(converted) == 370
    assert sum(t.numel() for t in converted.values()) == base_keys["finetune_params"] == 80_792_602


def test_a_missing_key_is_reported_not_skipped(base_keys):
    with torch.device("meta"):
        target = MaskedAVAutoencoder(base_config()).state_dict()
    hicmae = as_meta(base_keys["pretrain"])
    del hicmae["encoder.blocks.9.attn.v_bias"]
    with pytest.raises(HiCMAEKeyError, match=r"lacks: \['encoder.video_blocks.9.attn.v_bias'\]"):
        convert_state(hicmae, target, "vox2.pth")


def test_a_shape_mismatch_names_the_key_and_both_shapes(base_keys):
    with torch.device("meta"):
        target = MaskedAVAutoencoder(base_config()).state_dict()
    hicmae = as_meta(base_keys["pretrain"])
    hicmae["decoder.head.weight"] = torch.empty(768, 384, device="meta")
    with pytest.raises(
        HiCMAEKeyError,
        match=r"decoder.head.weight: checkpoint \(768, 384\) vs emomae video_decoder.head.weight \(1536, 384\)",
    ):
        convert_state(hicmae, target, "vox2.pth")


def test_foreign_keys_are_named(base_keys):
    with torch.device("meta"):
        target = MaskedAVAutoencoder(base_config()).state_dict()
    hicmae = as_meta(base_keys["pretrain"]) | {"encoder.cls_token": torch.empty(1, 1, 512, device="meta")}
    with pytest.raises(HiCMAEKeyError, match=r"not HiCMAE's: \['encoder.cls_token'\]"):
        convert_state(hicmae, target)
    assert emomae_name("text_projection.weight") is None
    with pytest.raises(HiCMAEKeyError, match="neither"):
        checkpoint_kind({"state_dict": torch.zeros(1)}, "model.ckpt")
