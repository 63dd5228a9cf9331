"""Optimisation for pretraining: AdamW parameter groups, the learning rate rule and the schedule.

The recipe (docs/pretrain.md): AdamW (0.9, 0.95), weight decay 0.05 on matrices only, peak lr
`blr x effective_batch / 256`, linear warm-up from 0, cosine to `min_lr`, all counted in optimizer steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import torch
from timm.optim import param_groups_weight_decay
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


@dataclass
class OptimConfig:
    """AdamW + warm-up cosine schedule. `lr`/`min_lr` are absolute; when left empty they come from
    `blr`/`min_blr` scaled by the effective batch (per-device batch x devices x nodes x accumulation) / 256."""

    lr: float | None = None
    blr: float = 3.0e-4
    min_lr: float | None = None
    min_blr: float = 1.0e-5
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    warmup_steps: int = 100
    schedule_steps: int | None = None  # length of the cosine; None = trainer.max_steps (set it to stop early)
    grad_clip: float | None = None  # max global L2 norm; None = no clipping (the reference's choice)
    ema: bool = False
    ema_decay: float = 0.9998
    extra_no_weight_decay: list[str] = field(default_factory=list)  # more names/patterns without decay


def scaled_lr(cfg: OptimConfig, effective_batch: int) -> tuple[float, float]:
    """(peak lr, final lr): the absolute values if given, else the base values x effective_batch / 256."""
    if effective_batch < 1:
        raise ValueError(f"effective batch must be >= 1, got {effective_batch}")
    scale = effective_batch / 256
    peak = cfg.lr if cfg.lr is not None else cfg.blr * scale
    final = cfg.min_lr if cfg.min_lr is not None else cfg.min_blr * scale
    if final > peak:
        raise ValueError(f"optim.min_lr ({final:g}) is larger than the peak lr ({peak:g})")
    return peak, final


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


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, peak_lr: float, final_lr: float, max_steps: int
) -> tuple[torch.optim.Optimizer, LambdaLR]:
    """`adamw_with_schedule` over `param_groups` with a per-step warm-up cosine (a picklable partial,
    so the scheduler's state_dict holds only plain numbers)."""
    groups = param_groups(model, cfg.weight_decay, cfg.extra_no_weight_decay)
    factor = partial(
        warmup_cosine_factor,
        warmup_steps=cfg.warmup_steps,
        max_steps=max_steps,
        final_ratio=final_lr / peak_lr if peak_lr > 0 else 0.0,
    )
    return adamw_with_schedule(groups, peak_lr, cfg.betas, factor, fused=True)
