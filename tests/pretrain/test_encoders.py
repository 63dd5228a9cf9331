from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_model import TINY

from pretrain.encoders import AVEncoder, ModelConfig, normalize_video, sinusoid_table
from pretrain.masking import random_mask, tube_mask


def tiny_inputs(batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    video = torch.randint(0, 256, (batch, 4, 3, 32, 32), generator=g, dtype=torch.uint8)
    return normalize_video(video), torch.randn(batch, 32, 32, generator=g)


@pytest.mark.parametrize("kind", ["separate", "unified"])
def test_forward_features_returns_every_layer_and_fused_streams(kind):
    torch.manual_seed(0)
    enc = AVEncoder(ModelConfig(kind=kind, **TINY))
    video, fbank = tiny_inputs(3)
    out = enc.forward_features(video, fbank)
    assert len(out.video_layers) == len(out.audio_layers) == 4
    assert all(x.shape == (3, 8, 64) for x in out.video_layers)
    assert all(x.shape == (3, 4, 64) for x in out.audio_layers)
    assert out.fused_video.shape == (3, 8, 64) and out.fused_audio.shape == (3, 4, 64)
    keep_v, keep_a = tube_mask(3, 2, 4, 0.5).ids_keep, random_mask(3, 4, 0.5).ids_keep
    masked = enc.forward_features(video, fbank, keep_v, keep_a)
    assert masked.video_layers[0].shape == (3, 4, 64) and masked.fused_audio.shape == (3, 2, 64)


@pytest.mark.parametrize("kind", ["separate", "unified"])
def test_hidden_tokens_do_not_influence_the_encoder(kind):
    torch.manual_seed(0)
    enc = AVEncoder(ModelConfig(kind=kind, **TINY)).eval()
    video, fbank = tiny_inputs(1)
    # keep spatial patch 0 (top-left) in both time slices; keep audio patch 3 (last time, last freq)
    keep_v, keep_a = torch.tensor([[0, 4]]), torch.tensor([[3]])
    base = enc.forward_features(video, fbank, keep_v, keep_a)
    hidden_v, hidden_a = video.clone(), fbank.clone()
    hidden_v[..., 16:, :] += 5.0  # bottom half: hidden patches 2, 3 of every slice
    hidden_a[:, :16] -= 3.0  # first time rows: hidden patches 0, 1
    same = enc.forward_features(hidden_v, hidden_a, keep_v, keep_a)
    for a, b in zip(
        base.video_layers + base.audio_layers + [base.fused_video, base.fused_audio],
        same.video_layers + same.audio_layers + [same.fused_video, same.fused_audio],
    ):
        torch.testing.assert_close(a, b)
    visible_v = video.clone()
    visible_v[..., :16, :16] += 5.0  # the kept patch: outputs must move
    moved = enc.forward_features(visible_v, fbank, keep_v, keep_a)
    assert not torch.allclose(moved.fused_video, base.fused_video)


def test_every_layer_output_passes_the_final_norm():
    torch.manual_seed(0)
    out = AVEncoder(ModelConfig(**TINY)).forward_features(*tiny_inputs())
    for x in out.video_layers + out.audio_layers:  # LayerNorm at init: weight 1, bias 0
        torch.testing.assert_close(x.mean(-1), torch.zeros(x.shape[:2]), atol=1e-5, rtol=0)
        torch.testing.assert_close(x.var(-1, unbiased=False), torch.ones(x.shape[:2]), atol=1e-3, rtol=0)


def test_unified_encoder_is_at_least_40_percent_smaller_at_base_size():
    with torch.device("meta"):
        sizes = {
            k: sum(p.numel() for p in AVEncoder(ModelConfig(kind=k)).parameters())
            for k in ("separate", "unified")
        }
    assert sizes["unified"] <= 0.6 * sizes["separate"]


def test_unified_encoder_shares_one_block_stack_between_modalities():
    enc = AVEncoder(ModelConfig(kind="unified", **TINY))
    names = {n for n, _ in enc.named_parameters()}
    assert any(n.startswith("blocks.") for n in names)
    assert not any(n.startswith(("video_blocks.", "audio_blocks.")) for n in names)
    assert enc.no_weight_decay() == {"video_embed.modality_token", "audio_embed.modality_token"}
    assert enc.no_weight_decay() <= names


def test_gradient_checkpointing_gives_the_same_outputs_and_gradients():
    torch.manual_seed(0)
    cfg = ModelConfig(**TINY)
    plain, ckpt = AVEncoder(cfg), AVEncoder(ModelConfig(**{**TINY, "grad_checkpointing": True}))
    ckpt.load_state_dict(plain.state_dict())
    video, fbank = tiny_inputs()
    for enc in (plain, ckpt):
        out = enc.forward_features(video, fbank)
        (out.fused_video.square().mean() + out.audio_layers[1].sum()).backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_normalize_video_uses_imagenet_statistics_and_refuses_floats():
    video = torch.zeros(1, 1, 3, 2, 2, dtype=torch.uint8)
    video[:, :, :, 0, 0] = 255
    out = normalize_video(video)
    torch.testing.assert_close(
        out[0, 0, :, 1, 1], torch.tensor([-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225])
    )
    torch.testing.assert_close(
        out[0, 0, :, 0, 0], torch.tensor([0.515 / 0.229, 0.544 / 0.224, 0.594 / 0.225])
    )
    with pytest.raises(TypeError, match="uint8"):
        normalize_video(out)


def test_wrong_input_shapes_fail_with_the_expected_shape():
    enc = AVEncoder(ModelConfig(**TINY))
    video, fbank = tiny_inputs()
    with pytest.raises(ValueError, match=r"video must be \(B, 4, 3, 32, 32\)"):
        enc.forward_features(video[:, :2], fbank)
    with pytest.raises(ValueError, match=r"fbank must be \(B, 32, 32\)"):
        enc.forward_features(video, fbank[:, :16])


def test_model_config_names_unknown_keys_and_inconsistent_sizes():
    with pytest.raises(ValueError, match="widht"):
        ModelConfig.from_dict({"widht": 3})
    with pytest.raises(ValueError, match="img_size=40 must be a multiple of patch=16"):
        AVEncoder(ModelConfig(**{**TINY, "img_size": 40}))
    with pytest.raises(ValueError, match="decoder_depth"):
        ModelConfig.from_dict({**TINY, "decoder_depth": 2})
    cfg = ModelConfig.from_dict(ModelConfig(**TINY).to_dict())  # checkpoint round trip
    assert cfg == ModelConfig(**TINY)


def test_attention_omits_the_key_bias_as_the_reference():
    enc = AVEncoder(ModelConfig(**TINY))
    attn = enc.video_blocks[0].attn
    assert attn.qkv.bias is None and attn.q_bias.shape == attn.v_bias.shape == (64,)
    # reference block size: 12 D^2 (attention + MLP) + 12 D (norms and biases)
    assert sum(p.numel() for p in enc.video_blocks[0].parameters()) == 12 * 64**2 + 12 * 64


def test_position_table_is_the_fixed_sinusoid():
    table = sinusoid_table(5, 8)
    assert table.shape == (1, 5, 8)
    torch.testing.assert_close(table[0, 0], torch.tensor([0.0, 1.0] * 4))
    torch.testing.assert_close(
        table[0, 3, :2],
        torch.tensor([3.0]).sin().repeat(2) * torch.tensor([1.0, 0.0])
        + torch.tensor([3.0]).cos() * torch.tensor([0.0, 1.0]),
    )
    assert "video_embed.pos_embed" not in AVEncoder(ModelConfig(**TINY)).state_dict()  # not a weight


def test_position_table_is_computed_in_float64_then_cast_once():
    # HiCMAE builds the table in numpy float64 and casts to float32; a float32 computation of the
    # rates is ~1e-6 off at base size (800 tokens x 512), enough to move base outputs by ~3e-6
    num_tokens, dim = 800, 512
    pos = np.arange(num_tokens, dtype=np.float64)[:, None]
    angles = pos / np.power(10000.0, 2 * (np.arange(dim) // 2) / dim)[None, :]
    reference = np.where(np.arange(dim) % 2 == 0, np.sin(angles), np.cos(angles)).astype(np.float32)
    assert torch.equal(sinusoid_table(num_tokens, dim)[0], torch.from_numpy(reference))


@pytest.mark.parametrize("kind", ["separate", "unified"])
def test_drop_path_grows_linearly_from_zero_in_the_encoders_and_the_fusion_encoder(kind):
    enc = AVEncoder(ModelConfig(**{**TINY, "kind": kind, "fusion_depth": 3, "drop_path": 0.3}))
    fusion_blocks = enc.fusion.blocks if kind == "unified" else enc.fusion.video_blocks
    encoder_blocks = enc.blocks if kind == "unified" else enc.audio_blocks

    def rates(blocks):
        return [b.drop_path.drop_prob if hasattr(b.drop_path, "drop_prob") else 0.0 for b in blocks]

    assert rates(fusion_blocks) == pytest.approx([0.0, 0.15, 0.3])  # HiCMAE: linspace(0, rate, depth)
    assert rates(encoder_blocks) == pytest.approx([0.0, 0.1, 0.2, 0.3])
