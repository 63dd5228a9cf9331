"""Emotion-recognition metrics: UAR, WAR, macro-F1 (classification), CCC and PCC (regression), and
multi-clip test-time averaging over the windows of one clip.

UAR (mean per-class recall) is the headline figure for the unbalanced emotion datasets; WAR is plain
accuracy. A class absent from the targets of an evaluation set has no recall: it is left out of the
UAR and macro-F1 means instead of counting as 0 (a 5-fold split can miss a rare class in one fold).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts `(num_classes, num_classes)`, rows = true class, columns = predicted class."""
    pred, target = np.asarray(pred, dtype=np.int64), np.asarray(target, dtype=np.int64)
    if pred.shape != target.shape:
        raise ValueError(f"pred {pred.shape} and target {target.shape} differ in shape")
    if target.size and (target.min() < 0 or target.max() >= num_classes):
        raise ValueError(f"targets must lie in [0, {num_classes}), got {target.min()}..{target.max()}")
    flat = np.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def per_class_recall(cm: np.ndarray) -> np.ndarray:
    """Recall of every class; NaN for a class with no true samples."""
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)


def uar(cm: np.ndarray) -> float:
    """Unweighted average recall over the classes present in the targets."""
    return float(np.nanmean(per_class_recall(cm)))


def war(cm: np.ndarray) -> float:
    """Weighted average recall = accuracy."""
    return float(np.trace(cm) / max(cm.sum(), 1))


def macro_f1(cm: np.ndarray) -> float:
    """Mean F1 over the classes present in the targets (F1 = 2 tp / (2 tp + fp + fn))."""
    tp = np.diag(cm).astype(np.float64)
    fp, fn = cm.sum(axis=0) - tp, cm.sum(axis=1) - tp
    present = cm.sum(axis=1) > 0
    f1 = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
    return float(f1[present].mean()) if present.any() else float("nan")


def classification_metrics(probs: np.ndarray, target: np.ndarray, num_classes: int) -> dict:
    """probs: `(N, C)` scores, target: `(N,)` int -> uar, war, macro_f1 (fractions), confusion, recall."""
    cm = confusion_matrix(np.asarray(probs).argmax(axis=1), target, num_classes)
    return {
        "uar": uar(cm),
        "war": war(cm),
        "macro_f1": macro_f1(cm),
        "confusion": cm.tolist(),
        "per_class_recall": [None if np.isnan(r) else float(r) for r in per_class_recall(cm)],
        "num_samples": int(cm.sum()),
    }


def ccc(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Concordance correlation per column: 2 cov / (var_p + var_t + (mu_p - mu_t)^2), population
    statistics. pred, target: `(N,)` or `(N, K)` -> scalar or `(K,)`. Differentiable (used as a loss)."""
    pred = pred if pred.dtype == torch.float64 else pred.float()
    target = target.to(pred.dtype)
    mu_p, mu_t = pred.mean(0), target.mean(0)
    var_p = ((pred - mu_p) ** 2).mean(0)
    var_t = ((target - mu_t) ** 2).mean(0)
    cov = ((pred - mu_p) * (target - mu_t)).mean(0)
    return 2 * cov / (var_p + var_t + (mu_p - mu_t) ** 2).clamp_min(1e-12)


def pcc(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pearson correlation per column. pred, target: `(N,)` or `(N, K)` -> scalar or `(K,)`."""
    pred = pred if pred.dtype == torch.float64 else pred.float()
    target = target.to(pred.dtype)
    dp, dt = pred - pred.mean(0), target - target.mean(0)
    denom = (dp.pow(2).sum(0) * dt.pow(2).sum(0)).sqrt().clamp_min(1e-12)
    return (dp * dt).sum(0) / denom


def regression_metrics(pred: np.ndarray, target: np.ndarray, names: list[str] | None = None) -> dict:
    """pred, target: `(N, K)` -> per-dimension and mean CCC / PCC."""
    p = torch.as_tensor(np.asarray(pred, dtype=np.float64)).reshape(len(pred), -1)
    t = torch.as_tensor(np.asarray(target, dtype=np.float64)).reshape(len(target), -1)
    c, r = ccc(p, t), pcc(p, t)
    names = names or [f"dim{i}" for i in range(p.shape[1])]
    out = {"ccc": float(c.mean()), "pcc": float(r.mean()), "num_samples": int(p.shape[0])}
    for i, name in enumerate(names):
        out[f"ccc_{name}"], out[f"pcc_{name}"] = float(c[i]), float(r[i])
    return out


def average_clips(
    clip_keys: list[str], scores: np.ndarray, targets: np.ndarray
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Multi-clip test-time averaging: mean of the window scores (softmax probabilities or regression
    outputs) of each clip. scores: `(N, C)`, targets: `(N, ...)` -> one row per clip, in first-seen
    order. Windows of one clip must share a target; a disagreement means a broken manifest."""
    groups: OrderedDict[str, list[int]] = OrderedDict()
    for i, key in enumerate(clip_keys):
        groups.setdefault(key, []).append(i)
    scores, targets = np.asarray(scores), np.asarray(targets)
    mean_scores = np.stack([scores[idx].mean(axis=0) for idx in groups.values()]) if groups else scores[:0]
    clip_targets = []
    for key, idx in groups.items():
        first = targets[idx[0]]
        if not all(np.array_equal(targets[i], first) for i in idx[1:]):
            raise ValueError(f"windows of clip {key!r} carry different labels: {targets[idx].tolist()}")
        clip_targets.append(first)
    return list(groups), mean_scores, np.asarray(clip_targets) if clip_targets else targets[:0]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population std over folds (NaN-free inputs expected)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std())


def evaluate(
    scores: np.ndarray,
    targets: np.ndarray,
    clip_keys: list[str],
    task: str,
    classes: list[str],
    target_names: list[str] | None = None,
) -> dict:
    """Clip-level metrics: window scores (softmax or regression outputs) averaged per clip first."""
    _, clip_scores, clip_targets = average_clips(clip_keys, scores, targets)
    if task == "classification":
        return classification_metrics(clip_scores, clip_targets, len(classes))
    return regression_metrics(clip_scores, clip_targets, target_names)
