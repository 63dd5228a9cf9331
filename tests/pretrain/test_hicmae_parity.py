"""emomae computes what HiCMAE's own code computes, for the same weights, inputs and masks.

The fixture (`EMOMAE_HICMAE_FIXTURE`, default ../shared/fixtures/hicmae/small) holds checkpoints
written by HiCMAE's code and every tensor its forward pass and loss produced on them; `meta.json`
gives the sizes, so another fixture of the same form runs unchanged. Each reference tensor is a
test of its own, so a failure names the place where the two models part (encoder layer, pooling,
fusion, decoder, loss, fine-tuning head).

Tolerance: 1e-5 of the reference tensor's largest magnitude, in fp32. The two implementations
differ only in float rounding (SDPA vs explicit softmax attention); that is about 3e-7 here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.hicmae_import import finetuning_model, pretraining_model, read_hicmae_checkpoint
from pretrain import layers
from pretrain.encoders import EncoderOutput, ModelConfig, normalize_video
from pretrain.hicmae import model_config_from_kwargs
from pretrain.layers import gather_tokens
from pretrain.mae import Decoder, ObjectiveConfig
from pretrain.masking import Mask

REPO = Path(__file__).resolve().parents[2]
FIXTURE = Path(
    os.environ.get("EMOMAE_HICMAE_FIXTURE", REPO / ".." / "shared" / "fixtures" / "hicmae" / "small")
)
TOLERANCE = 1e-5


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """max |ours - reference| / max |reference|: elementwise, scaled by the tensor's magnitude."""
    assert ours.shape == reference.shape, f"shape {tuple(ours.shape)} vs reference {tuple(reference.shape)}"
    return float((ours.double() - reference.double()).abs().max() / reference.double().abs().max())


@pytest.fixture(scope="module")
def fixture():
    if not (FIXTURE / "meta.json").is_file():
        pytest.fail(f"HiCMAE parity fixture not found at {FIXTURE} (set EMOMAE_HICMAE_FIXTURE)")
    meta = json.loads((FIXTURE / "meta.json").read_text())
    tensors = load_file(str(FIXTURE / "tensors.safetensors"))
    num_frames = tensors["video"].shape[2]
    cfg = ModelConfig.from_dict(model_config_from_kwargs(meta["pretrain_config"], num_frames))
    return meta, tensors, cfg


def objective(meta: dict, args) -> ObjectiveConfig:
    """HiCMAE's loss as the fixture's run configured it (its saved `args`)."""
    return ObjectiveConfig(
        contrastive_weight=float(getattr(args, "loss_weight", 0.0025)),
        frame_diff_target=bool(getattr(args, "use_frame_diff_as_target", True)),
        temperature=meta["pretrain_config"]["inter_contrastive_temperature"],
        gather_negatives=False,  # HiCMAE's negatives are the local batch
    )


def pretraining_outputs(
    meta: dict, t: dict, cfg: ModelConfig, swap_levels: tuple[int, int] | None = None
) -> dict:
    """Everything the fixture holds, computed by emomae from the converted pretraining checkpoint.
    `swap_levels` exchanges two encoder layers' outputs (a mutation the comparison must catch)."""
    state, args = read_hicmae_checkpoint(FIXTURE / "pretrain_checkpoint.pth")
    model = pretraining_model(state, cfg, objective=objective(meta, args))
    video_uint8 = t["video_uint8"].permute(0, 2, 1, 3, 4)  # HiCMAE (B, C, T, H, W) -> ours (B, T, C, H, W)
    fbank = t["audio"][:, 0]
    masks = (Mask.from_bool(t["mask_video"]), Mask.from_bool(t["mask_audio"]))
    levels = [k - 1 for k in cfg.skip_layers]
    out = {}
    with torch.no_grad():
        enc = model.forward_encoder(normalize_video(video_uint8), fbank, *masks)
        if swap_levels is not None:
            i, j = (levels[s] for s in swap_levels)
            video_layers = list(enc.video_layers)
            video_layers[i], video_layers[j] = video_layers[j], video_layers[i]
            enc = EncoderOutput(video_layers, enc.audio_layers, enc.fused_video, enc.fused_audio)
        out["encoder_video"], out["encoder_audio"] = enc.video_layers[-1], enc.audio_layers[-1]
        for n, layer in enumerate(levels):
            for modality, layer_outputs in (("video", enc.video_layers), ("audio", enc.audio_layers)):
                out[f"layer_{modality}_l{n}"] = layer_outputs[layer]
                out[f"pooled_{modality}_l{n}"] = torch.nn.functional.normalize(
                    layer_outputs[layer].mean(1), dim=-1
                )
        out["fused_video"], out["fused_audio"] = enc.fused_video, enc.fused_audio
        for n, (per_video, per_audio) in enumerate(model.contrastive_logits(enc).values()):
            out[f"logits_per_video_l{n}"], out[f"logits_per_audio_l{n}"] = per_video, per_audio
        out["recon_video"], out["recon_audio"] = model.forward_decoder(enc, *masks)
        video_target, audio_target = model.targets(video_uint8, fbank)
        out["target_video"] = gather_tokens(video_target, masks[0].ids_masked)
        out["target_audio"] = gather_tokens(audio_target, masks[1].ids_masked)
        terms = model.forward_loss(video_uint8, fbank, out["recon_video"], out["recon_audio"], *masks)
        terms |= model.forward_contrastive(enc)
        # the public forward with the same masks: the loss a training step optimises
        out["loss"] = model(video_uint8, fbank, masks=masks).loss
    out["terms"] = terms
    return out


def finetuning_outputs(t: dict, cfg: ModelConfig) -> dict:
    state, _ = read_hicmae_checkpoint(FIXTURE / "finetune_checkpoint.pth")
    encoder, head = finetuning_model(state, cfg)
    from pretrain.pooling import pool_tokens

    with torch.no_grad():
        pooled = pool_tokens(encoder.forward_features(t["video"].permute(0, 2, 1, 3, 4), t["audio"][:, 0]))
        return {"finetune_feature": head.forward_features(pooled), "finetune_logits": head(pooled)}


@pytest.fixture(scope="module")
def ours(fixture):
    meta, tensors, cfg = fixture
    return pretraining_outputs(meta, tensors, cfg) | finetuning_outputs(tensors, cfg)


REFERENCE_TENSORS = (
    [
        "encoder_video",
        "encoder_audio",
        "fused_video",
        "fused_audio",
        "recon_video",
        "recon_audio",
        "target_video",
        "target_audio",
        "finetune_feature",
        "finetune_logits",
    ]
    + [f"{kind}_{m}_l{n}" for kind in ("layer", "pooled") for m in ("video", "audio") for n in range(3)]
    + [f"logits_per_{m}_l{n}" for m in ("video", "audio") for n in range(3)]
)


@pytest.mark.parametrize("name", REFERENCE_TENSORS)
def test_emomae_reproduces_the_hicmae_tensor(name, fixture, ours):
    _, tensors, cfg = fixture
    if name.endswith(("_l0", "_l1", "_l2")):
        assert int(name[-1]) < len(cfg.skip_layers), f"{name}: the fixture has more levels than the model"
    error = relative_error(ours[name], tensors[name])
    assert error < TOLERANCE, f"{name}: relative error {error:.2e} >= {TOLERANCE:.0e}"


def test_the_loss_terms_are_hicmae_s(fixture, ours):
    meta, _, cfg = fixture
    ref, terms = meta["losses"], ours["terms"]
    levels = [f"contrastive_l{k}" for k in cfg.skip_layers]
    pairs = {
        "recon_video": ref["loss_video"],
        "recon_audio": ref["loss_audio"],
        "contrastive": ref["loss_hcmcl"],
        **dict(zip(levels, ref["loss_hcmcl_levels"], strict=True)),
    }
    for name, expected in pairs.items():
        assert abs(float(terms[name]) - expected) <= TOLERANCE * abs(expected), (
            name,
            float(terms[name]),
            expected,
        )
    total = float(ours["loss"])
    assert abs(total - ref["loss"]) <= TOLERANCE * abs(ref["loss"]), (total, ref["loss"])


def test_the_uint8_frames_normalise_to_hicmae_s_video_input(fixture):
    _, t, _ = fixture
    ours = normalize_video(t["video_uint8"].permute(0, 2, 1, 3, 4))
    assert relative_error(ours, t["video"].permute(0, 2, 1, 3, 4)) < 1e-6


def test_parameter_counts_match_hicmae_s(fixture):
    meta, _, cfg = fixture
    from finetune.heads import FeatureFusionHead
    from pretrain.mae import MaskedAVAutoencoder

    pretrain_params = sum(p.numel() for p in MaskedAVAutoencoder(cfg).parameters())
    head = FeatureFusionHead(cfg.width, cfg.depth, cfg.depth, meta["num_classes"])
    encoder_params = sum(p.numel() for p in MaskedAVAutoencoder(cfg).encoder.parameters())
    assert pretrain_params == meta["pretrain_params"]
    assert encoder_params + sum(p.numel() for p in head.parameters()) == meta["finetune_params"]


# -- the comparison's power: each known way of differing from HiCMAE makes it fail ------------------


def _worst(ours: dict, tensors: dict, names: list[str]) -> float:
    return max(relative_error(ours[n], tensors[n]) for n in names)


def test_dropping_the_skip_position_embedding_is_caught(fixture, monkeypatch):
    meta, tensors, cfg = fixture

    def forward_without_skip_positions(self, x, skips, mask):  # the mutant: skips enter without positions
        pos = self.pos_embed.to(x.dtype).expand(x.shape[0], -1, -1)
        masked = self.mask_token + gather_tokens(pos, mask.ids_masked)
        x = self.blocks[0](torch.cat([x + gather_tokens(pos, mask.ids_keep), masked], dim=1))
        for block, context in zip(self.blocks[1:], skips, strict=True):
            x = block(x, context)
        return self.head(self.norm(x[:, -mask.num_masked :]))

    monkeypatch.setattr(Decoder, "forward", forward_without_skip_positions)
    mutant = pretraining_outputs(meta, tensors, cfg)
    assert _worst(mutant, tensors, ["recon_video"]) > 100 * TOLERANCE
    assert _worst(mutant, tensors, ["recon_audio"]) > 100 * TOLERANCE


def test_swapping_two_levels_is_caught(fixture):
    meta, tensors, cfg = fixture
    mutant = pretraining_outputs(meta, tensors, cfg, swap_levels=(0, 1))
    assert _worst(mutant, tensors, ["logits_per_video_l0", "logits_per_video_l1"]) > 100 * TOLERANCE
    assert _worst(mutant, tensors, ["recon_video"]) > 100 * TOLERANCE


def test_a_q_bias_applied_to_k_is_caught(fixture, monkeypatch):
    meta, tensors, cfg = fixture
    original = layers.F.linear

    def linear_with_q_bias_on_k(x, weight, bias=None):  # the mutant: [0, q_bias, v_bias] for self-attention
        if bias is not None and bias.shape[0] % 3 == 0 and not bias.chunk(3)[1].any():  # [q_bias, 0, v_bias]
            q_bias, k_bias, v_bias = bias.chunk(3)
            bias = torch.cat([k_bias, q_bias, v_bias])
        return original(x, weight, bias)

    monkeypatch.setattr(layers.F, "linear", linear_with_q_bias_on_k)
    mutant = pretraining_outputs(meta, tensors, cfg)
    assert _worst(mutant, tensors, ["encoder_video", "encoder_audio"]) > 100 * TOLERANCE


def test_the_fine_tuning_norm_eps_of_layernorm_s_default_is_caught(fixture):
    _, tensors, cfg = fixture
    state, _ = read_hicmae_checkpoint(FIXTURE / "finetune_checkpoint.pth")
    encoder, head = finetuning_model(state, cfg)
    head.norm.eps = 1e-5  # nn.LayerNorm's default, which emomae's head used before
    from pretrain.pooling import pool_tokens

    with torch.no_grad():
        pooled = pool_tokens(
            encoder.forward_features(tensors["video"].permute(0, 2, 1, 3, 4), tensors["audio"][:, 0])
        )
        logits = head(pooled)
    assert relative_error(logits, tensors["finetune_logits"]) > TOLERANCE
