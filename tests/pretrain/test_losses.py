from __future__ import annotations

import math

import launch
import torch
import torch.nn.functional as F
from tiny_model import TINY

from pretrain.encoders import ModelConfig
from pretrain.losses import (
    GatheredInfoNCE,
    audio_target,
    frame_difference,
    initial_logit_scale,
    video_target,
)
from pretrain.objective import ObjectiveConfig, PretrainObjective
from pretrain.pooling import token_mean

WORLD, ROWS, LEVELS, DIM = 2, 3, 2, 8


def test_video_target_normalises_each_tubelet_and_channel_then_takes_frame_differences():
    g = torch.Generator().manual_seed(0)
    patches = torch.rand(2, 5, 2 * 4 * 4 * 3, generator=g)  # tubelet 2, patch 4
    plain = video_target(patches, tubelet=2, norm_pix=True, frame_diff=False).view(2, 5, 2 * 16, 3)
    torch.testing.assert_close(plain.mean(2), torch.zeros(2, 5, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(plain.std(2), torch.ones(2, 5, 3), atol=1e-4, rtol=0)
    diff = video_target(patches, tubelet=2, norm_pix=True, frame_diff=True).view(2, 5, 2, 16, 3)
    frames = plain.view(2, 5, 2, 16, 3)
    torch.testing.assert_close(diff[:, :, 0], frames[:, :, 0])
    torch.testing.assert_close(diff[:, :, 1], frames[:, :, 1] - frames[:, :, 0])
    raw = video_target(patches, tubelet=2, norm_pix=False, frame_diff=False)
    torch.testing.assert_close(raw, patches)


def test_frame_difference_keeps_the_first_frame_of_each_tubelet():
    x = torch.arange(2 * 3 * 2, dtype=torch.float).view(1, 2, 3, 2, 1).expand(-1, -1, -1, -1, 3)
    out = frame_difference(x)
    torch.testing.assert_close(out[:, :, 0], x[:, :, 0])
    torch.testing.assert_close(out[:, :, 2], x[:, :, 2] - x[:, :, 0])


def test_audio_target_normalises_each_patch():
    patches = torch.randn(2, 6, 256) * 3 + 1
    out = audio_target(patches)
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, 6), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(-1), torch.ones(2, 6), atol=1e-4, rtol=0)
    torch.testing.assert_close(audio_target(patches, norm_pix=False), patches)


def _manual_info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = a @ b.T / temperature
    labels = torch.arange(len(a))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def test_info_nce_is_symmetric_cross_entropy_with_temperature_per_level():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, LEVELS, DIM, generator=g), torch.randn(5, LEVELS, DIM, generator=g)
    losses = GatheredInfoNCE()(a, b, initial_logit_scale(0.07))
    assert losses.shape == (LEVELS,)
    for level in range(LEVELS):
        torch.testing.assert_close(losses[level], _manual_info_nce(a[:, level], b[:, level], 0.07))
    torch.testing.assert_close(
        GatheredInfoNCE()(a[:, 0], b[:, 0], initial_logit_scale(0.5)),
        _manual_info_nce(a[:, 0], b[:, 0], 0.5),
    )


def objective(gather_negatives: bool = True) -> PretrainObjective:
    return PretrainObjective(ObjectiveConfig(gather_negatives=gather_negatives), ModelConfig(**TINY))


def hierarchical(levels: dict, temperature: float, loss_fn: PretrainObjective) -> dict:
    """The objective's contrastive terms of `levels` (layer -> (video tokens, audio tokens)),
    mean-pooled as the model's `predict` pools them."""
    video, audio = token_mean([v for v, _ in levels.values()]), token_mean([a for _, a in levels.values()])
    return loss_fn.contrastive_terms(video, audio, list(levels), initial_logit_scale(temperature))


def test_hierarchical_loss_sums_levels_of_mean_pooled_tokens():
    g = torch.Generator().manual_seed(1)
    levels = {
        k: (torch.randn(4, 6, DIM, generator=g), torch.randn(4, 3, DIM, generator=g)) for k in (1, 2, 3)
    }
    terms = hierarchical(levels, 0.1, objective())
    total, per_level = terms.pop("contrastive"), terms
    assert list(per_level) == ["contrastive_l1", "contrastive_l2", "contrastive_l3"]
    for k, (v, a) in levels.items():
        torch.testing.assert_close(
            per_level[f"contrastive_l{k}"], _manual_info_nce(v.mean(1), a.mean(1), 0.1)
        )
    torch.testing.assert_close(total, sum(per_level.values()))


def test_the_logit_scale_is_an_argument_and_its_gradient_flows_back_to_it():
    logit_scale = initial_logit_scale(0.07).requires_grad_()
    assert math.isclose(float(1 / logit_scale.detach().exp()), 0.07, rel_tol=1e-6)
    GatheredInfoNCE()(torch.randn(4, DIM), torch.randn(4, DIM), logit_scale).backward()
    assert logit_scale.grad is not None and logit_scale.grad != 0
    assert not list(GatheredInfoNCE().parameters()) and not list(GatheredInfoNCE().buffers())


def _global_batch() -> tuple[torch.Tensor, torch.Tensor, torch.nn.Linear]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(WORLD * ROWS, LEVELS, 4, DIM, generator=g)  # (B, L, N, D) video-ish
    audio = torch.randn(WORLD * ROWS, LEVELS, 5, DIM, generator=g)
    proj = torch.nn.Linear(DIM, DIM)
    with torch.no_grad():
        proj.weight.copy_(torch.randn(DIM, DIM, generator=g))
        proj.bias.copy_(torch.randn(DIM, generator=g))
    return tokens, audio, proj


def _loss(proj, video, audio, loss_fn):
    levels = {k + 1: (proj(video[:, k]), audio[:, k]) for k in range(LEVELS)}
    return hierarchical(levels, 0.07, loss_fn)["contrastive"]


def _rank(rank: int) -> dict:
    video, audio, proj = _global_batch()
    rows = slice(rank * ROWS, (rank + 1) * ROWS)
    video, audio = video[rows].clone().requires_grad_(), audio[rows].clone().requires_grad_()
    # averages gradients over ranks; its reducer goes when this returns, before the process group
    ddp = torch.nn.parallel.DistributedDataParallel(proj)
    loss = _loss(ddp, video, audio, objective(gather_negatives=True))
    loss.backward()
    with torch.no_grad():
        local = _loss(proj, video, audio, objective(gather_negatives=False))
    return {
        "loss": loss.detach(),
        "local_loss": local,
        "video_grad": video.grad,
        "audio_grad": audio.grad,
        "weight_grad": proj.weight.grad,
        "bias_grad": proj.bias.grad,
    }


def test_gathered_loss_and_ddp_gradients_equal_the_single_process_batch_with_two_gloo_ranks(tmp_path):
    ranks = launch.gloo_ranks(_rank, WORLD, tmp_path)

    video, audio, proj = _global_batch()
    video.requires_grad_(), audio.requires_grad_()
    loss = _loss(proj, video, audio, objective())
    loss.backward()
    # the mean of the rank losses is the single-process loss on the concatenated batch
    torch.testing.assert_close(sum(r["loss"] for r in ranks) / WORLD, loss.detach())
    # per rank, gradients w.r.t. its own inputs are WORLD x the single-process ones (DDP divides them back)
    for rank, r in enumerate(ranks):
        rows = slice(rank * ROWS, (rank + 1) * ROWS)
        torch.testing.assert_close(r["video_grad"] / WORLD, video.grad[rows])
        torch.testing.assert_close(r["audio_grad"] / WORLD, audio.grad[rows])
        # after DDP's averaging the parameter gradient is exactly the single-process one
        torch.testing.assert_close(r["weight_grad"], proj.weight.grad)
        torch.testing.assert_close(r["bias_grad"], proj.bias.grad)
    # without gathering each rank sees only its own negatives: a different (easier) loss
    assert not torch.allclose(sum(r["local_loss"] for r in ranks) / WORLD, loss.detach())


def test_contrastive_logits_stay_float32_under_bf16_autocast():
    # bf16's 8-bit mantissa cannot tell apart logits that differ by < ~0.5 %, which at temperature
    # 0.07 is the whole range of an easy batch; the logits must leave autocast in float32
    g = torch.Generator().manual_seed(0)
    video, audio = torch.randn(4, 2, 16, generator=g), torch.randn(4, 2, 16, generator=g)
    loss_fn, logit_scale = GatheredInfoNCE(gather_negatives=False), initial_logit_scale(0.07)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        per_video, per_audio, _ = loss_fn.logits(video.bfloat16(), audio.bfloat16(), logit_scale)
    assert per_video.dtype == per_audio.dtype == torch.float32
    exact, _, _ = loss_fn.logits(video.bfloat16().float(), audio.bfloat16().float(), logit_scale)
    torch.testing.assert_close(per_video, exact)
