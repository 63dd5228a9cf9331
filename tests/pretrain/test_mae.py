from __future__ import annotations

import pytest
import torch
from einops import rearrange
from tiny_model import TINY

from pretrain.encoders import ModelConfig, gather_tokens
from pretrain.mae import (
    MAEOutput,
    MaskedAVAutoencoder,
    ObjectiveConfig,
    patchify_audio,
    patchify_video,
    unpatchify_audio,
    unpatchify_video,
)

# a slightly larger grid for the overfitting test: 2 x 4 x 4 = 32 video tokens, 16 audio tokens
SMALL_GRID = {**TINY, "img_size": 64, "fbank_frames": 64, "mel_bins": 64}


def clip_batch(batch: int = 2, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth moving blobs and a harmonic fbank: structured enough to be learnable."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(4).view(1, 4, 1, 1, 1)
    y = torch.arange(size).view(1, 1, 1, size, 1)
    x = torch.arange(size).view(1, 1, 1, 1, size)
    centre = torch.rand(batch, 1, 3, 1, 1, generator=g) * size
    video = 127 + 120 * torch.cos((x + 2 * t - centre) / 6) * torch.sin((y - centre) / 7)
    f = torch.arange(size).view(1, 1, size)
    fbank = torch.sin(f / (2 + torch.rand(batch, 1, 1, generator=g) * 4)) + 0.1 * torch.randn(
        batch, size, size, generator=g
    )
    return video.to(torch.uint8), fbank


def test_forward_returns_loss_terms_and_predictions_for_the_masked_tokens():
    torch.manual_seed(0)
    model = MaskedAVAutoencoder(
        ModelConfig(**TINY), ObjectiveConfig(video_mask_ratio=0.75, audio_mask_ratio=0.5)
    )
    video, fbank = clip_batch(3)
    out = model(video, fbank)
    assert isinstance(out, MAEOutput) and out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.video_pred.shape == (3, 6, 2 * 16 * 16 * 3)  # 3 of 4 spatial patches hidden in 2 slices
    assert out.audio_pred.shape == (3, 2, 256)
    assert out.video_mask.mask.shape == (3, 8) and out.audio_mask.mask.shape == (3, 4)
    assert set(out.terms) == {
        "recon_video",
        "recon_audio",
        "contrastive",
        "contrastive_l2",
        "contrastive_l3",
        "contrastive_l4",
    }
    assert not any(v.requires_grad for v in out.terms.values())
    expected = out.terms["recon_video"] + out.terms["recon_audio"] + 0.0025 * out.terms["contrastive"]
    torch.testing.assert_close(out.loss.detach(), expected)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_patchify_matches_the_patch_embedding_token_order_and_inverts():
    cfg = ModelConfig(**TINY)
    model = MaskedAVAutoencoder(cfg)
    video, fbank = torch.randn(2, 4, 3, 32, 32), torch.randn(2, 32, 32)
    vp, ap = model.patchify(video, fbank)
    assert vp.shape == (2, 8, 1536) and ap.shape == (2, 4, 256)
    v2, a2 = model.unpatchify(vp, ap)
    assert torch.equal(v2, video) and torch.equal(a2, fbank)
    # token i of the target is the tubelet that the patch embedding turns into token i
    embed = model.encoder.video_embed
    weight = rearrange(embed.proj.weight, "d c t h w -> d (t h w c)")
    tokens = embed(video) - embed.pos_embed
    torch.testing.assert_close(tokens, vp @ weight.T + embed.proj.bias, atol=1e-4, rtol=1e-4)
    audio_embed = model.encoder.audio_embed
    tokens = audio_embed(fbank) - audio_embed.pos_embed
    torch.testing.assert_close(
        tokens, ap @ audio_embed.proj.weight.flatten(1).T + audio_embed.proj.bias, atol=1e-4, rtol=1e-4
    )
    assert torch.equal(unpatchify_video(patchify_video(video, 2, 16), cfg), video)
    assert torch.equal(unpatchify_audio(patchify_audio(fbank, 16), cfg), fbank)


def test_decoder_blocks_receive_the_skip_features_deepest_first_with_their_positions():
    torch.manual_seed(0)
    model = MaskedAVAutoencoder(ModelConfig(**TINY)).eval()
    video, fbank = clip_batch(2)
    contexts = []
    for block in model.video_decoder.blocks[1:]:
        block.register_forward_hook(lambda mod, args, out: contexts.append(args[1]))
    g = torch.Generator().manual_seed(3)
    out = model(video, fbank, generator=g)
    from pretrain.encoders import normalize_video

    enc = model.forward_encoder(normalize_video(video), fbank, out.video_mask, out.audio_mask)
    # HiCMAE: encoder_to_decoder(feature) + the decoder positions of the visible tokens
    positions = gather_tokens(model.video_decoder.pos_embed.expand(2, -1, -1), out.video_mask.ids_keep)
    for context, layer in zip(contexts, [4, 3, 2]):
        torch.testing.assert_close(context, model.video_to_decoder(enc.video_layers[layer - 1]) + positions)


def test_reconstruct_inverts_normalised_frame_difference_targets():
    torch.manual_seed(0)
    model = MaskedAVAutoencoder(
        ModelConfig(**TINY), ObjectiveConfig(video_mask_ratio=0.5, audio_mask_ratio=0.5)
    )
    video, fbank = clip_batch(2)
    out = model(video, fbank, generator=torch.Generator().manual_seed(0))
    vt, at = model.targets(video, fbank)
    perfect = MAEOutput(
        out.loss,
        out.terms,
        gather_tokens(vt, out.video_mask.ids_masked),
        gather_tokens(at, out.audio_mask.ids_masked),
        out.video_mask,
        out.audio_mask,
    )
    rec_video, rec_fbank = model.reconstruct(video, fbank, perfect)
    torch.testing.assert_close(rec_video, video.float() / 255, atol=1e-4, rtol=0)
    torch.testing.assert_close(rec_fbank, fbank, atol=1e-4, rtol=0)
    rec_video, _ = model.reconstruct(video, fbank, out)  # untrained predictions differ on hidden patches
    assert not torch.allclose(rec_video, video.float() / 255, atol=1e-2)


def test_contrastive_levels_can_include_the_fused_outputs_or_be_off():
    torch.manual_seed(0)
    video, fbank = clip_batch(2)
    out = MaskedAVAutoencoder(ModelConfig(**TINY), ObjectiveConfig(contrastive_levels=[2, "fused"]))(
        video, fbank
    )
    assert {"contrastive_l2", "contrastive_fused"} <= set(out.terms) and "contrastive_l4" not in out.terms
    out = MaskedAVAutoencoder(ModelConfig(**TINY), ObjectiveConfig(contrastive_levels=[]))(video, fbank)
    assert "contrastive" not in out.terms
    torch.testing.assert_close(out.loss.detach(), out.terms["recon_video"] + out.terms["recon_audio"])
    with pytest.raises(ValueError, match="contrastive_levels: 7"):
        MaskedAVAutoencoder(ModelConfig(**TINY), ObjectiveConfig(contrastive_levels=[7]))


def test_initialisation_follows_the_reference():
    torch.manual_seed(0)
    model = MaskedAVAutoencoder(ModelConfig(**TINY))
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module.bias is not None:
            assert not module.bias.any(), name
        if isinstance(module, torch.nn.LayerNorm):
            assert (module.weight == 1).all() and not module.bias.any(), name
    for token in (model.video_decoder.mask_token, model.audio_decoder.mask_token):
        assert 0.01 < token.std() < 0.04  # trunc-normal, std 0.02
    # every name is a parameter: the fixed temperature is a buffer and is not listed
    assert model.no_weight_decay() <= {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("kind", ["separate", "unified"])
def test_loss_decreases_when_overfitting_one_batch(kind):
    torch.manual_seed(0)
    model = MaskedAVAutoencoder(
        ModelConfig(kind=kind, **SMALL_GRID), ObjectiveConfig(video_mask_ratio=0.75, audio_mask_ratio=0.5)
    )
    video, fbank = clip_batch(4, size=64)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    history = []
    for _ in range(40):  # the same batch and the same masks every step
        out = model(video, fbank, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        history.append(out.terms | {"loss": out.loss.detach()})
    first, last = history[0], history[-1]
    assert last["loss"] < 0.7 * first["loss"], [round(h["loss"].item(), 3) for h in history]
    for term in ("recon_video", "recon_audio"):
        assert last[term] < 0.95 * first[term], term
    assert last["contrastive"] < 0.5 * first["contrastive"]  # 4 clips: the pairs become easy to tell apart


def test_a_model_held_in_bf16_runs_without_autocast():
    # DeepSpeed's bf16 engine casts the weights to bf16 and runs the forward without autocast, while
    # the loader hands fp32 frames and fbanks: the patch embeddings follow the weights' dtype
    model = MaskedAVAutoencoder(ModelConfig(**TINY)).to(torch.bfloat16)
    video, fbank = clip_batch(2)
    out = model(video, fbank.float(), generator=torch.Generator().manual_seed(0))
    assert out.video_pred.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    assert torch.isfinite(out.loss)
