"""The caption-only text loss of stage 2 (docs/vaemo.md): symmetric InfoNCE between clips and their
captions over the captioned rows of a batch, gathered across ranks like the AV contrastive loss."""

from __future__ import annotations

import torch
from torch import Tensor

from pretrain.losses import paired_logits, symmetric_infonce
from pretrain.text import text_key


def caption_ids(captions: list[str], device: torch.device | str = "cpu") -> Tensor:
    """(B,) int64 identity of each caption text (equal texts, equal ids), comparable across ranks."""
    return torch.tensor([int(text_key(c)[:15], 16) for c in captions], dtype=torch.int64, device=device)


def caption_infonce(
    av: Tensor, text: Tensor, ids: Tensor, valid: Tensor, scale: Tensor, gather: bool = True
) -> Tensor:
    """Symmetric InfoNCE between AV and caption embeddings over the captioned rows only: the
    contrastive loss's `paired_logits` + `symmetric_infonce` (pretrain/losses.py) with `valid` as the
    presence flags and the caption ids as the same-text exclusion.

    av, text: (B, D) L2-normalised; ids: (B,) caption identity; valid: (B,) bool has-caption; every
    rank passes the same B. Rows with `valid=False` are neither queries nor keys. Other clips with
    the very same caption text are left out of a query's negatives (templated or class-level
    descriptions would otherwise push identically described clips apart). With W ranks, each rank
    scores its own valid rows against all ranks' valid rows and divides by the global valid count / W,
    so the DDP-averaged gradient is the single-process gradient of the mean over all captioned clips;
    with no captioned row anywhere the loss is 0 with zero gradients (the heads stay in the graph).
    """
    valid = valid.bool().to(av.device)
    logits = paired_logits(av[:, None], text[:, None], scale, valid, gather, ids=ids)
    return symmetric_infonce(*logits, valid)[0]
