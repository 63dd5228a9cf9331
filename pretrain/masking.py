"""Token masking for the masked autoencoder (docs/model.md): tube masking for video, unstructured random
masking for audio. Batched argsort of uniform noise, as in MAE: no Python loop over samples, and every
sample keeps the same number of tokens so batches stay rectangular."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Mask:
    """ids_keep: (B, K) visible token indices; ids_masked: (B, N - K) hidden ones; ids_restore: (B, N)
    position of each token in cat([ids_keep, ids_masked], 1); mask: (B, N) bool, True = hidden."""

    ids_keep: Tensor
    ids_masked: Tensor
    ids_restore: Tensor
    mask: Tensor

    def to(self, device: torch.device | str) -> Mask:
        return Mask(*(t.to(device) for t in (self.ids_keep, self.ids_masked, self.ids_restore, self.mask)))

    @classmethod
    def from_bool(cls, mask: Tensor) -> Mask:
        """A given mask (B, N) bool, True = hidden (HiCMAE's convention) -> Mask whose visible and
        hidden ids are each in ascending position order, the order of `x[~mask]` and `x[mask]`.
        Every row must hide the same number of tokens, so batches stay rectangular."""
        if mask.ndim != 2 or mask.dtype != torch.bool:
            raise ValueError(
                f"a mask must be (B, N) bool with True = hidden, got {tuple(mask.shape)} {mask.dtype}"
            )
        hidden = mask.sum(1)
        if mask.shape[0] and not bool((hidden == hidden[0]).all()):
            raise ValueError(
                f"every row of a mask must hide the same number of tokens, got {hidden.tolist()}"
            )
        # a stable sort on the flag lists visible positions first, each group in ascending order
        order = torch.sort(mask.to(torch.uint8), dim=1, stable=True).indices
        keep = mask.shape[1] - int(hidden[0]) if mask.shape[0] else mask.shape[1]
        return _from_order(order[:, :keep], order[:, keep:])

    @property
    def num_visible(self) -> int:
        return self.ids_keep.shape[1]

    @property
    def num_masked(self) -> int:
        return self.ids_masked.shape[1]


def num_masked_tokens(num_tokens: int, ratio: float) -> int:
    """floor(ratio * N), robust to float error (0.29 * 100 = 28.999...), keeping >= 1 visible token."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    masked = math.floor(ratio * num_tokens + 1e-6)
    if masked >= num_tokens:
        raise ValueError(f"mask ratio {ratio} hides all {num_tokens} tokens; at least one must stay visible")
    return masked


def _from_order(ids_keep: Tensor, ids_masked: Tensor) -> Mask:
    order = torch.cat([ids_keep, ids_masked], dim=1)
    ids_restore = torch.argsort(order, dim=1)
    mask = torch.zeros(order.shape, dtype=torch.bool, device=order.device)
    mask.scatter_(1, ids_masked, True)
    return Mask(ids_keep, ids_masked, ids_restore, mask)


def random_mask(
    batch: int,
    num_tokens: int,
    ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Mask:
    """Hide floor(ratio * num_tokens) tokens per sample, chosen uniformly at random."""
    keep = num_tokens - num_masked_tokens(num_tokens, ratio)
    device = generator.device if generator is not None and device is None else device
    noise = torch.rand(batch, num_tokens, generator=generator, device=device)
    order = torch.argsort(noise, dim=1)
    return _from_order(order[:, :keep], order[:, keep:])


def tube_mask(
    batch: int,
    t_slices: int,
    spatial: int,
    ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Mask:
    """One random spatial mask per sample, repeated over the t_slices temporal slices (tokens in
    (t, spatial) order, N = t_slices * spatial): a tube hides a face region for the whole clip, so the
    model cannot copy it from a neighbouring frame."""
    flat = random_mask(batch, spatial, ratio, generator, device)
    offsets = torch.arange(t_slices, device=flat.ids_keep.device).view(1, t_slices, 1) * spatial

    def tubes(ids: Tensor) -> Tensor:
        return (offsets + ids.unsqueeze(1)).flatten(1)

    return _from_order(tubes(flat.ids_keep), tubes(flat.ids_masked))
