"""The optimizer pieces pretraining and fine-tuning share: AdamW parameter groups with the
weight-decay rule, the warm-up + cosine lr factor, and the one builder of AdamW and its per-step schedule.

What each stage sets on top lives with it: pretraining's config and lr rule in pretrain/optim.py,
fine-tuning's layer-wise lr decay and LP-FT freezing in finetune/optim.py.
"""

from __future__ import annotations

import math

import torch
from timm.optim import param_groups_weight_decay
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


def param_groups(
    model: nn.Module, weight_decay: float, extra_no_weight_decay: list[str] | tuple = ()
) -> list[dict]:
    """Two AdamW groups: decay for matrices, none for 1-D params, biases and the model's own
    `no_weight_decay()` names (mask, modality and position tokens).

    timm's helper applies the 1-D/bias rule; the model declares the rest, as timm models do.
    """
    declared = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    return param_groups_weight_decay(
        model, weight_decay=weight_decay, no_weight_decay_list=declared | set(extra_no_weight_decay)
    )


def no_decay_names(model: nn.Module, groups: list[dict]) -> set[str]:
    """Names of the parameters that ended up in a group with weight_decay == 0 (for logs and tests)."""
    ids = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def warmup_cosine_factor(step: int, warmup_steps: int, max_steps: int, final_ratio: float) -> float:
    """lr / peak lr at optimizer step `step`: linear from 0 over `warmup_steps`, then half a cosine
    down to `final_ratio` at `max_steps` (and flat after it)."""
    if warmup_steps > 0 and step < warmup_steps:
        return step / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adamw_with_schedule(
    groups: list[dict], peak_lr: float, betas, factors, fused: bool = False
) -> tuple[torch.optim.Optimizer, LambdaLR]:
    """The one optimizer builder of pretraining and fine-tuning: AdamW over parameter `groups`, each at
    `peak_lr x lr_scale` (`lr_scale` optional, 1 by default: layer decay sets it), and a per-step
    LambdaLR with `factors` (one lr-factor function for every group, or one per group). `fused`: the
    fused CUDA kernels when every parameter is on CUDA (they exist for CUDA only; foreach is the fast
    path elsewhere)."""
    for g in groups:
        g["lr"] = peak_lr * g.get("lr_scale", 1.0)
    fused = fused and all(p.is_cuda for g in groups for p in g["params"])
    optimizer = torch.optim.AdamW(groups, lr=peak_lr, betas=tuple(betas), fused=fused or None)
    return optimizer, LambdaLR(optimizer, factors)
