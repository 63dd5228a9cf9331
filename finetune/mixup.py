"""AV mixup / cutmix for full fine-tuning: both modalities mixed with one lambda and one pairing."""

from __future__ import annotations

import numpy as np
import torch
from timm.data.mixup import cutmix_bbox_and_lam, mixup_target


class AVMixup:
    """Mixup / cutmix applied to video AND audio with the same lambda and the same pairing.

    Mixup blends both inputs with lambda. Cutmix pastes one box (the same for every frame) into the
    video and a time span into the fbank, both covering the same fraction 1 - lambda of their input,
    so the mixed target's lambda is true for both modalities. Targets become soft (with label
    smoothing) for classification and are blended for regression.
    """

    def __init__(
        self,
        mixup: float,
        cutmix: float,
        prob: float,
        switch_prob: float,
        smoothing: float,
        num_classes: int | None,
    ):
        self.mixup, self.cutmix, self.prob, self.switch_prob = mixup, cutmix, prob, switch_prob
        self.smoothing, self.num_classes = smoothing, num_classes

    @property
    def active(self) -> bool:
        return self.prob > 0 and (self.mixup > 0 or self.cutmix > 0)

    def __call__(
        self, video: torch.Tensor, fbank: torch.Tensor, target: torch.Tensor, generator: np.random.Generator
    ):
        """video `(B, T, C, H, W)` float, fbank `(B, F, M)`, target `(B,)` int or `(B, K)` float ->
        mixed video, fbank and target (`(B, num_classes)` soft labels or `(B, K)`)."""
        lam, use_cutmix = 1.0, False
        if self.active and generator.random() < self.prob:
            use_cutmix = self.cutmix > 0 and (self.mixup <= 0 or generator.random() < self.switch_prob)
            alpha = self.cutmix if use_cutmix else self.mixup
            lam = float(generator.beta(alpha, alpha))
        perm = torch.from_numpy(generator.permutation(video.shape[0])).to(video.device)
        if lam < 1.0:
            video, fbank = video.clone(), fbank.clone()
            if use_cutmix:
                (y0, y1, x0, x1), lam = cutmix_bbox_and_lam(video.shape[-2:], lam, correct_lam=True)
                video[..., y0:y1, x0:x1] = video[perm][..., y0:y1, x0:x1]
                span = round((1 - lam) * fbank.shape[1])
                start = int(generator.integers(0, fbank.shape[1] - span + 1))
                fbank[:, start : start + span] = fbank[perm][:, start : start + span]
            else:
                video = video * lam + video[perm] * (1 - lam)
                fbank = fbank * lam + fbank[perm] * (1 - lam)
        return video, fbank, self.mix_target(target, perm, lam)

    def mix_target(self, target: torch.Tensor, perm: torch.Tensor, lam: float) -> torch.Tensor:
        if self.num_classes is None:  # regression
            return target * lam + target[perm] * (1 - lam)
        # timm's mixup_target pairs with the flipped batch; build ours from the same smoothing rule
        soft = mixup_target(target, self.num_classes, lam=1.0, smoothing=self.smoothing)
        return soft * lam + soft[perm] * (1 - lam)
