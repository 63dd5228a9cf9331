"""Patches as tokens: clips and fbanks cut into the patch embedding's token order and put back. The
reconstruction targets (pretrain/objective.py) and the reconstruction pictures (pretrain/mae.py)
both read the inputs through these, so a target row is the token the encoder saw in that place."""

from __future__ import annotations

from einops import rearrange
from torch import Tensor

from pretrain.encoders import ModelConfig


def patchify_video(video: Tensor, tubelet: int, patch: int) -> Tensor:
    """(B, T, C, H, W) -> (B, T/t * H/p * W/p, t * p * p * C), tokens in the patch embedding's order."""
    return rearrange(
        video, "b (t p0) c (h p1) (w p2) -> b (t h w) (p0 p1 p2 c)", p0=tubelet, p1=patch, p2=patch
    )


def unpatchify_video(patches: Tensor, cfg: ModelConfig) -> Tensor:
    """Inverse of patchify_video: (B, N, t * p * p * 3) -> (B, T, 3, H, W)."""
    t, h, w = cfg.video_grid
    p = cfg.patch
    return rearrange(
        patches,
        "b (t h w) (p0 p1 p2 c) -> b (t p0) c (h p1) (w p2)",
        t=t,
        h=h,
        w=w,
        p0=cfg.tubelet,
        p1=p,
        p2=p,
    )


def patchify_audio(fbank: Tensor, patch: int) -> Tensor:
    """(B, F, M) -> (B, F/p * M/p, p * p), tokens in (time, freq) order."""
    return rearrange(fbank, "b (f p1) (m p2) -> b (f m) (p1 p2)", p1=patch, p2=patch)


def unpatchify_audio(patches: Tensor, cfg: ModelConfig) -> Tensor:
    """Inverse of patchify_audio: (B, N, p * p) -> (B, F, M)."""
    f, m = cfg.audio_grid
    return rearrange(patches, "b (f m) (p1 p2) -> b (f p1) (m p2)", f=f, m=m, p1=cfg.patch, p2=cfg.patch)
