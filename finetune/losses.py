"""What fine-tuning and the probes minimise: a batch's targets, cross-entropy with hard or soft
(mixup, label smoothing) targets, and CCC or MSE for regression."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finetune.metrics import ccc


def batch_targets(batch: dict, task: str) -> torch.Tensor:
    """int64 `(B,)` class labels or float `(B, K)` regression targets of a batch."""
    if task == "regression":
        if "target" not in batch:
            raise KeyError("regression protocol, but the batch has no 'target' (shards need float labels)")
        return batch["target"].float()
    return batch["label"].long()


def task_loss(
    task: str, loss: str, logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0
) -> torch.Tensor:
    """Cross-entropy (hard or soft targets) for classification; CCC or MSE for regression."""
    if task == "classification":
        if target.ndim == 2:
            return soft_cross_entropy(logits, target)
        return F.cross_entropy(logits.float(), target, label_smoothing=smoothing)
    if loss in ("auto", "ccc"):
        return ccc_loss(logits, target)
    return F.mse_loss(logits.float(), target)


def soft_cross_entropy(logits: torch.Tensor, soft_target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft targets `(B, C)` (mixup + label smoothing)."""
    return torch.sum(-soft_target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def ccc_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - mean CCC over the regression dimensions; pred, target `(B, K)`."""
    return 1.0 - ccc(pred.float(), target.float()).mean()
