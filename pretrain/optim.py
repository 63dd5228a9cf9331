"""Optimisation for pretraining: its config, the learning rate rule and the optimizer it builds from
the shared pieces in emomae/optim.py (parameter groups, AdamW, warm-up + cosine schedule).

The recipe (docs/pretrain.md): AdamW (0.9, 0.95), weight decay 0.05 on matrices only, peak lr
`blr x effective_batch / 256`, linear warm-up from 0, cosine to `min_lr`, all counted in optimizer steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from emomae.optim import adamw_with_schedule, param_groups, warmup_cosine_factor


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
