"""Fine-tuning's optimizer: layer-wise lr decay parameter groups, and AdamW with a per-step warm-up +
cosine schedule (emomae/optim.py) whose encoder groups can stay frozen for the first epochs (LP-FT)."""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from emomae.optim import adamw_with_schedule, warmup_cosine_factor

_BLOCK = re.compile(r"(?:^|[._])blocks\.(\d+)\.")


def encoder_layer_id(name: str, depth: int, fusion_depth: int) -> int:
    """Rank of an encoder parameter in the layer-wise lr decay (docs/finetune.md): patch and position
    embeddings 0, encoder block k (0-based, video and audio alike) k + 1, fusion layer j depth + 1 + j,
    everything after (final norms) depth + fusion_depth + 1 = the top, lr x 1.0."""
    top = depth + fusion_depth + 1
    match = _BLOCK.search(name)
    if "fusion" in name:
        return depth + 1 + int(match.group(1)) if match else top
    if match:
        return int(match.group(1)) + 1
    if "_embed." in name:  # video_embed / audio_embed: patch projections and modality tokens
        return 0
    return top


def layer_decay_param_groups(
    encoder: nn.Module,
    head: nn.Module,
    depth: int,
    fusion_depth: int,
    layer_decay: float,
    weight_decay: float,
    no_weight_decay: set[str] = frozenset(),
) -> list[dict]:
    """AdamW groups with `lr_scale = layer_decay ** (top - layer_id)`; no weight decay on 1-D
    parameters, biases and the names in `no_weight_decay`. The head sits at the top (scale 1) in
    groups of its own, marked `head=True`."""
    top = depth + fusion_depth + 1
    groups: dict[tuple[int, bool, bool], dict] = {}

    def add(name: str, param: nn.Parameter, layer: int, is_head: bool = False) -> None:
        decay = (
            param.ndim > 1
            and not name.endswith(".bias")
            and name.split(".")[-1] not in no_weight_decay
            and name not in no_weight_decay
        )
        group = groups.setdefault(
            (layer, is_head, decay),
            {
                "params": [],
                "names": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": layer_decay ** (top - layer),
                "layer_id": layer,
                "head": is_head,
            },
        )
        group["params"].append(param)
        group["names"].append(name)

    for name, p in encoder.named_parameters():
        if p.requires_grad:
            add(name, p, encoder_layer_id(name, depth, fusion_depth))
    for name, p in head.named_parameters():
        if p.requires_grad:
            add("head." + name, p, top, is_head=True)
    return [groups[k] for k in sorted(groups)]


def lr_lambda(peak_lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        return warmup_cosine_factor(step, warmup_steps, max_steps, min_lr / peak_lr if peak_lr > 0 else 0.0)

    return factor


def frozen_then(factor: Callable[[int], float], frozen_steps: int) -> Callable[[int], float]:
    """lr factor of a group that stays frozen (lr 0) for `frozen_steps`, then follows `factor`
    counted from the unfreezing step, warm-up included."""
    return lambda step: 0.0 if step < frozen_steps else factor(step - frozen_steps)


def build_optimizer(
    groups: list[dict], recipe, peak_lr: float, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, LambdaLR]:
    """`emomae.optim.adamw_with_schedule` over parameter groups carrying `lr_scale` (layer decay),
    per-step warm-up + cosine.
    With `recipe.freeze_epochs` (LP-FT) the encoder groups keep lr 0 while the head trains alone,
    then get their own warm-up and cosine over the remaining epochs. Freezing by lr rather than
    `requires_grad` keeps the parameter set fixed, which DDP needs."""
    max_steps = max(1, recipe.epochs * steps_per_epoch)
    warmup = recipe.warmup_epochs * steps_per_epoch
    head_factor = lr_lambda(peak_lr, recipe.min_lr, warmup, max_steps)
    frozen = min(recipe.freeze_epochs * steps_per_epoch, max_steps - 1)
    encoder_factor = frozen_then(lr_lambda(peak_lr, recipe.min_lr, warmup, max_steps - frozen), frozen)
    factors = [head_factor if g.get("head", True) else encoder_factor for g in groups]
    return adamw_with_schedule(groups, peak_lr, recipe.betas, factors)
