"""Video augmentations on uint8 clips `(T, C, H, W)`, one set of parameters per clip.

Every frame of a clip gets the same crop, flip and colour change: the masked autoencoder reconstructs
tubelets across time, and per-frame jitter would turn into fake motion. Parameters are drawn from an
explicit `torch.Generator`, so a clip's augmentation is a function of its seed only (the loader seeds
it per sample, which keeps resumed runs identical). The pixel work is `torchvision.transforms.v2`
functional ops, which treat the leading T dimension as a batch of images.

Pretraining (docs/loader.md) uses the multi-scale crop only; fine-tuning adds flip and jitter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as TF


@dataclass(frozen=True)
class VideoAugConfig:
    """Training-time clip augmentation. `crop_scale` is the area fraction of the random crop."""

    img_size: int = 160
    crop_scale: tuple[float, float] = (0.4, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.0  # probability
    color_jitter: float = 0.0  # brightness / contrast / saturation factors drawn from [1 - s, 1 + s]


def sample_crop(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """Random area-and-aspect crop box `(top, left, h, w)` (Inception-style random resized crop).

    Falls back to the largest centred box with an aspect ratio inside `ratio` when no sampled box
    fits, so the result is always a valid crop.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        u = torch.rand(4, generator=generator).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(u[2] * (height - h + 1)), int(u[3] * (width - w + 1)), h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


class VideoAugment:
    """Random resized crop -> optional horizontal flip -> optional colour jitter, shared by all frames."""

    def __init__(self, cfg: VideoAugConfig) -> None:
        if not 0 < cfg.crop_scale[0] <= cfg.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {cfg.crop_scale}")
        if not 0 < cfg.crop_ratio[0] <= cfg.crop_ratio[1]:
            raise ValueError(f"crop_ratio must satisfy 0 < low <= high, got {cfg.crop_ratio}")
        if not 0 <= cfg.hflip <= 1 or cfg.color_jitter < 0:
            raise ValueError(
                f"hflip must be a probability and color_jitter >= 0, got {cfg.hflip}, {cfg.color_jitter}"
            )
        self.cfg = cfg

    def __call__(self, video: Tensor, generator: torch.Generator) -> Tensor:
        """video: (T, C, H, W) uint8 -> (T, C, img_size, img_size) uint8."""
        return self.apply(video, self.sample_params(video.shape[-2], video.shape[-1], generator))

    def sample_params(self, height: int, width: int, generator: torch.Generator) -> ClipAugParams:
        """One clip's parameters, drawn in a fixed order (crop, flip, jitter): the JPEG-bytes loader
        draws them from the frame size alone and gets what the decoding loader gets."""
        cfg = self.cfg
        crop = sample_crop(height, width, cfg.crop_scale, cfg.crop_ratio, generator)
        flip = cfg.hflip > 0 and torch.rand(1, generator=generator).item() < cfg.hflip
        jitter = sample_jitter(cfg.color_jitter, generator) if cfg.color_jitter > 0 else None
        return ClipAugParams(crop, flip, jitter)

    def apply(self, video: Tensor, params: ClipAugParams) -> Tensor:
        """The pixel work for drawn parameters, on whatever device `video` is."""
        top, left, h, w = params.crop
        video = TF.resized_crop(
            video, top, left, h, w, [self.cfg.img_size, self.cfg.img_size], antialias=True
        )
        if params.flip:
            video = TF.horizontal_flip(video)
        if params.jitter is not None:
            video = apply_jitter(video, *params.jitter)
        return video

    def apply_into(self, frames: Tensor, params: ClipAugParams, out: Tensor) -> None:
        """`apply` of decoded (T, 3, H, W) frames, a view of channels-last memory, written into `out`,
        a (T, S, S, 3) channels-last slot of a batch: the same pixels, with the resize reading the crop
        box in place and writing into the slot (no copy of the clip or of its crop).

        With colour jitter, or when the crop needs no resize, it is `apply` and a copy.
        """
        top, left, h, w = params.crop
        size = self.cfg.img_size
        if params.jitter is not None or (h, w) == (size, size):
            out.copy_(self.apply(frames, params).permute(0, 2, 3, 1))
            return
        # TF.resized_crop's resize of uint8 (bilinear, antialias, align_corners=False), straight into `out`
        torch.ops.aten._upsample_bilinear2d_aa.out(
            frames[..., top : top + h, left : left + w],
            [size, size],
            False,
            None,
            None,
            out=out.permute(0, 3, 1, 2),
        )
        if params.flip:
            out.copy_(out.flip(2))


@dataclass(frozen=True)
class ClipAugParams:
    """A clip's drawn augmentation: crop box `(top, left, h, w)` in source pixels, flip, and the
    jitter's (factors, order) or None."""

    crop: tuple[int, int, int, int]
    flip: bool = False
    jitter: tuple[tuple[float, float, float], tuple[int, int, int]] | None = None


def sample_jitter(strength: float, generator: torch.Generator) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """Brightness, contrast and saturation factors in [1 - s, 1 + s] and the order to apply them."""
    factors = (1 - strength + 2 * strength * torch.rand(3, generator=generator)).clamp(min=0).tolist()
    return tuple(factors), tuple(torch.randperm(3, generator=generator).tolist())


def apply_jitter(video: Tensor, factors: tuple[float, ...], order: tuple[int, ...]) -> Tensor:
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for i in order:
        video = ops[i](video, factors[i])
    return video


def color_jitter(video: Tensor, strength: float, generator: torch.Generator) -> Tensor:
    """Brightness, contrast and saturation by factors in [1 - s, 1 + s], applied in a random order."""
    return apply_jitter(video, *sample_jitter(strength, generator))


def eval_video_transform(video: Tensor, img_size: int) -> Tensor:
    """Deterministic view: resize the shorter side to `img_size`, then centre crop a square.

    video: (T, C, H, W) uint8 -> (T, C, img_size, img_size) uint8; a no-op when already that size.
    """
    height, width = video.shape[-2:]
    if height == width == img_size:
        return video
    if min(height, width) != img_size:
        video = TF.resize(video, [img_size], antialias=True)
    return TF.center_crop(video, [img_size, img_size])
