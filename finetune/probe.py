"""Linear and attentive probes trained on cached frozen features, one fold at a time.

The cached features of a fold fit in memory and an epoch is a few small matmuls, so a plain torch
loop is used here: a Trainer's per-fit start-up would cost more than the training itself. The
optimiser, schedule, loss and honest epoch selection are the ones full fine-tuning uses.

On several ranks every rank holds the whole cache; each step's global batch (the one a single
process would draw) is split over the ranks, each backpropagates its share and the gradients are
averaged, as DDP would. Scoring the cached validation and test features is a few matmuls, so every
rank does it on all of them (the same figures everywhere, no communication).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from emomae.optim import param_groups
from finetune.cache import FeatureCache
from finetune.distributed import cpu_group, process_group
from finetune.losses import task_loss
from finetune.metrics import evaluate
from finetune.optim import build_optimizer
from finetune.protocols import FoldSplit
from finetune.selection import SelectionTracker, selection_metric


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


def _scores(
    head: torch.nn.Module, feats: dict[str, torch.Tensor], task: str, batch: int = 1024
) -> np.ndarray:
    n = next(iter(feats.values())).shape[0]
    outs = []
    with torch.inference_mode():
        for s in range(0, n, batch):
            out = head({k: v[s : s + batch] for k, v in feats.items()}).float()
            outs.append(out.softmax(-1) if task == "classification" else out)
    return torch.cat(outs).numpy()


def rank_share(global_batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's rows of a global batch of window indices: every `world_size`-th from `rank` on."""
    return global_batch[rank::world_size]


def _average_gradients(head: torch.nn.Module, world_size: int) -> None:
    """Mean of every parameter's gradient over the ranks (a rank whose share was empty adds zeros)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in head.parameters()]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat, group=cpu_group())
    flat /= world_size
    for p, g in zip(head.parameters(), torch.split(flat, [g.numel() for g in grads])):
        p.grad = g.view_as(p)


def _fit(
    head: torch.nn.Module,
    feats: dict[str, torch.Tensor],
    targets: torch.Tensor,
    recipe,
    task: str,
    seed: int,
    after_epoch: Callable[[int, float], None],
    rank: int = 0,
    world_size: int = 1,
) -> None:
    """AdamW + warm-up/cosine over `recipe.epochs` on in-memory features `(N, ...)`; after every epoch
    `after_epoch(epoch, mean training loss)` runs with the head in eval mode.

    Each epoch trains on the first `steps x batch` windows of a seeded permutation (the last `N mod
    batch` wait for another epoch's draw). With `world_size` ranks every rank draws the same
    permutation, trains on `rank_share` of each global batch and the gradients are averaged; a share's
    loss is weighted by its size, so the update is the global batch's whatever the split (exactly so
    for per-window losses; the CCC loss of a regression is a batch statistic, computed per share)."""
    if hasattr(head, "fit_standardizer"):  # z-score with statistics of these (training) windows only
        head.fit_standardizer(feats)
    gen = torch.Generator().manual_seed(seed)
    n = targets.shape[0]
    batch = min(recipe.batch_size, n)
    steps_per_epoch = max(1, n // batch)
    peak_lr = recipe.blr * batch / 256
    groups = param_groups(head, recipe.weight_decay)
    optimizer, scheduler = build_optimizer(groups, recipe, peak_lr, steps_per_epoch)
    for epoch in range(recipe.epochs):
        head.train()
        order = torch.randperm(n, generator=gen)
        loss_sum = torch.zeros(())
        for step in range(steps_per_epoch):
            sel = order[step * batch : (step + 1) * batch]
            mine = rank_share(sel, rank, world_size)
            optimizer.zero_grad(set_to_none=True)
            if len(mine):
                logits = head({k: v[mine].float() for k, v in feats.items()})
                loss = task_loss(task, recipe.loss, logits, targets[mine], recipe.label_smoothing)
                if world_size > 1:
                    loss = loss * (len(mine) * world_size / len(sel))
                loss.backward()
                loss_sum += loss.detach()
            if world_size > 1:
                _average_gradients(head, world_size)
            if recipe.grad_clip:
                torch.nn.utils.clip_grad_norm_(head.parameters(), recipe.grad_clip)
            optimizer.step()
            scheduler.step()
        if world_size > 1:
            torch.distributed.all_reduce(loss_sum, group=cpu_group())
            loss_sum /= world_size
        head.eval()
        after_epoch(epoch, float(loss_sum) / steps_per_epoch)


def pick_epoch(val_metric: list[float], window: int = 1) -> int:
    """Epoch with the best moving average (over `window` epochs centred on it, fewer at the ends) of
    the validation metric; ties -> the earlier epoch. A few validation speakers give a jagged curve
    whose single best epoch is mostly luck; the average favours where it is high for a while."""
    values = np.asarray(val_metric, dtype=float)
    half = max(0, window - 1) // 2
    smooth = [values[max(0, e - half) : e + half + 1].mean() for e in range(len(values))]
    return int(np.argmax(smooth))


@dataclass
class PickedEpoch(SelectionTracker):
    """Selection record of a refit run whose epoch was picked beforehand (by `pick_epoch` on the
    selection run's validation curve); keeps the weights of that epoch."""

    picked: int = 0

    def update(self, epoch: int, val: dict, test: dict, state: Callable[[], dict]) -> None:
        self.history.append({"epoch": epoch, "val": val, "test": test})
        if epoch == self.picked:
            self.best_state = {k: v.detach().clone().cpu() for k, v in state().items()}

    @property
    def best_val(self) -> dict | None:
        return self.history[self.picked] if len(self.history) > self.picked else None


def train_probe(
    head: torch.nn.Module,
    cache: FeatureCache,
    index: dict[str, np.ndarray],
    recipe,
    task: str,
    classes: list[str],
    target_names: list[str],
    modalities: list[str],
    seed: int = 0,
    on_epoch: Callable[[int, dict], None] | None = None,
) -> dict:
    """Train `head` on the fold's training windows, pick the epoch on validation clips, and return the
    fold's results with the selected epoch's test metrics for every modality.

    With `recipe.refit`, the validation run only picks the epoch (`pick_epoch` with
    `recipe.select_window`): the head is then trained again from the same initial weights on training
    AND validation speakers (every non-test fold, as the papers train) and its state at the picked
    epoch is the one tested. The test fold never picks anything.

    On several ranks (an initialised process group) the training batches are split over them (`_fit`).
    `on_epoch(epoch, figures)` gets each epoch's figures as they come: `train_loss`, `val_<metric>`,
    `test_<metric>`; with refit, the selection run's `train_loss` and `val_<metric>`, then the refit
    run's `refit_train_loss` and `refit_test_<metric>`.
    """
    rank, world_size = process_group()
    report = on_epoch or (lambda epoch, figures: None)
    torch.manual_seed(seed)
    initial = {k: v.detach().clone() for k, v in head.state_dict().items()}
    views = {part: cache.select("av", index[part]) for part in ("val", "test")}

    def targets_of(idx: np.ndarray) -> torch.Tensor:
        t = torch.as_tensor(cache.targets[idx])
        return t.long() if task == "classification" else t.float()

    def score(part: str, feats: dict[str, torch.Tensor]) -> dict:
        idx = index[part]
        return evaluate(
            _scores(head, feats, task),
            cache.targets[idx],
            [cache.clip_keys[i] for i in idx],
            task,
            classes,
            target_names,
        )

    train, metric = index["train"], selection_metric(task)
    ranks = {"rank": rank, "world_size": world_size}
    if not recipe.refit:
        tracker = SelectionTracker(metric)

        def select(e: int, loss: float) -> None:
            tracker.update(e, score("val", views["val"]), score("test", views["test"]), head.state_dict)
            last = tracker.history[-1]
            report(
                e,
                {
                    "train_loss": loss,
                    f"val_{metric}": last["val"][metric],
                    f"test_{metric}": last["test"][metric],
                },
            )

        _fit(head, cache.select("av", train), targets_of(train), recipe, task, seed, select, **ranks)
    else:
        val_curve: list[dict] = []

        def pick(e: int, loss: float) -> None:
            val_curve.append(score("val", views["val"]))
            report(e, {"train_loss": loss, f"val_{metric}": val_curve[-1][metric]})

        _fit(head, cache.select("av", train), targets_of(train), recipe, task, seed, pick, **ranks)
        tracker = PickedEpoch(metric, picked=pick_epoch([v[metric] for v in val_curve], recipe.select_window))
        head.load_state_dict(initial)
        train = np.concatenate([index["train"], index["val"]])

        # validation figures come from the selection run: the refit model has seen those speakers
        def refit(e: int, loss: float) -> None:
            tracker.update(e, val_curve[e], score("test", views["test"]), head.state_dict)
            report(e, {"refit_train_loss": loss, f"refit_test_{metric}": tracker.history[-1]["test"][metric]})

        _fit(head, cache.select("av", train), targets_of(train), recipe, task, seed, refit, **ranks)

    head.load_state_dict(tracker.best_state)
    head.eval()
    test = {m: score("test", cache.select(m, index["test"])) for m in modalities}
    sizes = {k: len(v) for k, v in index.items()}
    if len(train) != sizes["train"]:
        sizes["refit"] = len(train)
    return fold_result(tracker, test, sizes)


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
        "curve": [
            {"epoch": h["epoch"], f"val_{metric}": h["val"][metric], f"test_{metric}": h["test"][metric]}
            for h in tracker.history
        ],
    }
