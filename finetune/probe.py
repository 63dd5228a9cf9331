"""Linear and attentive probes trained on cached frozen features, one fold at a time.

The cached features of a fold fit in memory and an epoch is a few small matmuls, so a plain torch
loop is used here: a Trainer's per-fit start-up would cost more than the training itself. The
optimiser, schedule, loss and honest epoch selection are the ones full fine-tuning uses.
"""

from __future__ import annotations

import numpy as np
import torch
from timm.optim import param_groups_weight_decay

from finetune.cache import FeatureCache
from finetune.module import SelectionTracker, build_optimizer, evaluate, selection_metric, task_loss
from finetune.protocols import FoldSplit


def fold_indices(cache: FeatureCache, split: FoldSplit, clip_meta: dict[str, dict]) -> dict[str, np.ndarray]:
    """Window indices of the train / val / test parts of a fold (by the clip's speaker and fold)."""
    parts: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for i, clip in enumerate(cache.clip_keys):
        if clip not in clip_meta:
            raise KeyError(f"clip {clip!r} of the shards is not in the protocol's manifest")
        part = split.part(clip_meta[clip])
        if part is not None:
            parts[part].append(i)
    for name, idx in parts.items():
        if not idx:
            raise RuntimeError(f"fold {split.test_fold}: the {name} part is empty")
    return {k: np.asarray(v) for k, v in parts.items()}


def _scores(head: torch.nn.Module, feats: dict[str, torch.Tensor], task: str, batch: int = 1024) -> np.ndarray:
    n = next(iter(feats.values())).shape[0]
    outs = []
    with torch.inference_mode():
        for s in range(0, n, batch):
            out = head({k: v[s : s + batch] for k, v in feats.items()}).float()
            outs.append(out.softmax(-1) if task == "classification" else out)
    return torch.cat(outs).numpy()


def train_probe(head: torch.nn.Module, cache: FeatureCache, index: dict[str, np.ndarray], recipe, task: str,
                classes: list[str], target_names: list[str], modalities: list[str], seed: int = 0) -> dict:
    """Train `head` on the fold's training windows; per epoch score validation and test clips; return
    the fold's results with the validation-selected epoch's test metrics for every modality."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    train = cache.select("av", index["train"])
    if hasattr(head, "fit_standardizer"):  # z-score with TRAINING statistics only (stored in the head)
        head.fit_standardizer(train)
    targets = torch.as_tensor(cache.targets[index["train"]])
    if task == "classification":
        targets = targets.long()
    else:
        targets = targets.float()
    n = len(index["train"])
    batch = min(recipe.batch_size, n)
    steps_per_epoch = max(1, n // batch)
    peak_lr = recipe.blr * batch / 256
    groups = param_groups_weight_decay(head, recipe.weight_decay)
    optimizer, scheduler = build_optimizer(groups, recipe, peak_lr, steps_per_epoch)
    tracker = SelectionTracker(selection_metric(task))
    views = {part: cache.select("av", index[part]) for part in ("val", "test")}

    def score(part: str, feats: dict[str, torch.Tensor]) -> dict:
        idx = index[part]
        return evaluate(_scores(head, feats, task), cache.targets[idx], [cache.clip_keys[i] for i in idx],
                        task, classes, target_names)

    for epoch in range(recipe.epochs):
        head.train()
        order = torch.randperm(n, generator=gen)
        for step in range(steps_per_epoch):
            sel = order[step * batch : (step + 1) * batch]
            logits = head({k: v[sel].float() for k, v in train.items()})
            loss = task_loss(task, recipe.loss, logits, targets[sel], recipe.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if recipe.grad_clip:
                torch.nn.utils.clip_grad_norm_(head.parameters(), recipe.grad_clip)
            optimizer.step()
            scheduler.step()
        head.eval()
        tracker.update(epoch, score("val", views["val"]), score("test", views["test"]), head.state_dict)

    head.load_state_dict(tracker.best_state)
    head.eval()
    test = {m: score("test", cache.select(m, index["test"])) for m in modalities}
    return fold_result(tracker, test, {k: len(v) for k, v in index.items()})


def fold_result(tracker: SelectionTracker, test: dict, sizes: dict) -> dict:
    """One fold's record: validation-selected test figures per modality, the papers' protocol figure,
    and the per-epoch curve."""
    metric = tracker.metric
    best_val, best_test = tracker.best_val, tracker.best_test
    return {
        "selected_epoch": best_val["epoch"],
        "val": best_val["val"],
        "test": test,
        "best_on_test": {**best_test["test"], "epoch": best_test["epoch"]},
        "windows": sizes,
        "curve": [{"epoch": h["epoch"], f"val_{metric}": h["val"][metric], f"test_{metric}": h["test"][metric]}
                  for h in tracker.history],
    }
