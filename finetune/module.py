"""Full fine-tuning as a LightningModule, and what every head shares: missing-modality inputs,
clip-level prediction, losses and honest epoch selection.

Missing modality: the absent input is replaced by zeros AFTER normalisation (video: the ImageNet-mean
image; fbank: the AudioSet-mean spectrum). Encoder, fusion and head run unchanged, so one trained
model reports audio-visual, audio-only and video-only figures.

On several ranks every rank scores its own exact-once share of an evaluation stream, and the window
scores are gathered (`all_ranks`) before any metric: clip averaging and UAR need the whole set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from finetune.heads import (
    AVMixup,
    ccc_loss,
    drop_modality,
    drop_modality_per_sample,
    layer_decay_param_groups,
    soft_cross_entropy,
)
from finetune.metrics import average_clips, classification_metrics, regression_metrics
from pretrain.encoders import normalize_video
from pretrain.optim import adamw_with_schedule, warmup_cosine_factor
from pretrain.pooling import pool_tokens


def process_group() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


_CPU_GROUP: dict[str, object] = {}


def cpu_group():
    """A gloo group over every rank, for host-side collectives (gathered scores, cached features, probe
    gradients): the default group when it is gloo; with NCCL, pickled objects would be staged on the
    GPU and CPU tensors cannot be reduced at all. Made once, at the first call, which every rank makes
    at the same point (the first gather)."""
    if torch.distributed.get_backend() == "gloo":
        return None
    if "gloo" not in _CPU_GROUP:
        _CPU_GROUP["gloo"] = torch.distributed.new_group(backend="gloo")
    return _CPU_GROUP["gloo"]


def all_ranks(items: list) -> list:
    """Every rank's `items` (picklable), concatenated in rank order, on every rank; `items` itself in
    a single process. Every rank must call it at the same point, with an empty list if it has nothing."""
    _, world = process_group()
    if world == 1:
        return list(items)
    gathered: list = [None] * world
    torch.distributed.all_gather_object(gathered, list(items), group=cpu_group())
    return [item for part in gathered for item in part]


def from_rank0(value):
    """Rank 0's `value` on every rank (picklable); `value` itself in a single process."""
    if process_group()[1] == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0, group=cpu_group())
    return box[0]


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


def selection_metric(task: str) -> str:
    return "uar" if task == "classification" else "ccc"


@dataclass
class SelectionTracker:
    """Honest model selection: the epoch with the best VALIDATION metric (ties -> earlier epoch) is
    the reported one, with a copy of its weights; the best epoch on TEST is kept only to report the
    papers' protocol beside it."""

    metric: str
    history: list[dict] = field(default_factory=list)
    best_state: dict | None = None

    def update(self, epoch: int, val: dict, test: dict, state: Callable[[], dict]) -> None:
        previous = self.best_val
        self.history.append({"epoch": epoch, "val": val, "test": test})
        if previous is None or val[self.metric] > previous["val"][self.metric]:
            self.best_state = {k: v.detach().clone().cpu() for k, v in state().items()}

    @property
    def best_val(self) -> dict | None:
        if not self.history:
            return None
        return max(self.history, key=lambda h: (h["val"][self.metric], -h["epoch"]))

    @property
    def best_test(self) -> dict | None:
        if not self.history:
            return None
        return max(self.history, key=lambda h: (h["test"][self.metric], -h["epoch"]))


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
    """`pretrain.optim.adamw_with_schedule` over parameter groups carrying `lr_scale` (layer decay),
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


class FullFinetuneModel(nn.Module):
    """AVEncoder + hierarchical feature-fusion head on all tokens. `forward` takes normalised inputs."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, video: torch.Tensor, fbank: torch.Tensor, modality: str = "av") -> torch.Tensor:
        """video `(B, T, 3, H, W)` normalised float, fbank `(B, F, M)` -> `(B, num_outputs)`."""
        video, fbank = drop_modality(video, fbank, modality)
        return self.head(pool_tokens(self.encoder.forward_features(video, fbank)))

    def forward_modalities(self, video: torch.Tensor, fbank: torch.Tensor) -> dict[str, torch.Tensor]:
        """`forward` for `av`, `audio` and `video` at once, at little more than the cost of one: the
        video and audio encoders run once on the batch and once on a single blank (zeroed) input,
        and only the fusion encoder and the head run three times."""
        video_layers, audio_layers = self.encoder.encode_unimodal(video, fbank)
        blank_video, blank_audio = self.encoder.encode_unimodal(
            torch.zeros_like(video[:1]), torch.zeros_like(fbank[:1])
        )
        batch = video.shape[0]
        blank_video = [x.expand(batch, -1, -1) for x in blank_video]
        blank_audio = [x.expand(batch, -1, -1) for x in blank_audio]
        pairs = {
            "av": (video_layers, audio_layers),
            "audio": (blank_video, audio_layers),
            "video": (video_layers, blank_audio),
        }
        return {m: self.head(pool_tokens(self.encoder.fuse(v, a))) for m, (v, a) in pairs.items()}


class FinetuneModule(pl.LightningModule):
    """Training step with AV mixup/cutmix, layer-wise lr decay, per-epoch validation AND test
    evaluation (dataloader 0 = validation split of training speakers, 1 = test fold)."""

    def __init__(
        self,
        model: FullFinetuneModel,
        task: str,
        classes: list[str],
        target_names: list[str],
        recipe,
        peak_lr: float,
        steps_per_epoch: int,
        seed: int = 0,
    ):
        super().__init__()
        # train mode before fit: Lightning checks (and warns about) module modes before on_train_start
        self.model = model.train()
        self.task, self.classes, self.target_names = task, list(classes), list(target_names)
        self.recipe, self.peak_lr, self.steps_per_epoch = recipe, peak_lr, steps_per_epoch
        num_classes = len(classes) if task == "classification" else None
        self.mixup = AVMixup(
            recipe.mixup,
            recipe.cutmix,
            recipe.mix_prob,
            recipe.switch_prob,
            recipe.label_smoothing,
            num_classes,
        )
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.tracker = SelectionTracker(selection_metric(task))
        self._outputs: dict[int, list] = {}

    def on_fit_start(self) -> None:
        # the other ranks draw their own mixup pairs, modality dropout and drop path (one seed for all
        # would give every rank's share of a batch the same pattern); rank 0 keeps a 1-process run's
        if self.global_rank:
            self.rng = np.random.default_rng([self.seed, self.global_rank])
            torch.manual_seed(self.seed + 1_000_003 * self.global_rank)

    def on_train_start(self) -> None:
        # load_encoder returns eval mode and Lightning keeps each module's mode: without this, drop
        # path and dropout would silently stay off for the whole fine-tuning run
        self.model.train()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        video, fbank = normalize_video(batch["video"]), batch["fbank"].float()
        target = batch_targets(batch, self.task)
        video, fbank, mixed = self.mixup(video, fbank, target, self.rng)
        video, fbank = drop_modality_per_sample(video, fbank, self.recipe.modality_dropout, self.rng)
        if not self.mixup.active and self.task == "classification":
            mixed = target
        weight = self.recipe.unimodal_loss
        if weight > 0:
            logits = self.model.forward_modalities(video, fbank)
            losses = {
                m: task_loss(self.task, self.recipe.loss, x, mixed, self.recipe.label_smoothing)
                for m, x in logits.items()
            }
            loss = (losses["av"] + weight * (losses["audio"] + losses["video"])) / (1 + 2 * weight)
            for m in ("audio", "video"):
                self.log(f"train/loss_{m}", losses[m], batch_size=video.shape[0])
        else:
            loss = task_loss(
                self.task, self.recipe.loss, self.model(video, fbank), mixed, self.recipe.label_smoothing
            )
        self.log("train/loss", loss, prog_bar=True, batch_size=video.shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        logits = self.model(normalize_video(batch["video"]), batch["fbank"].float())
        scores = logits.float().softmax(-1) if self.task == "classification" else logits.float()
        self._outputs.setdefault(dataloader_idx, []).append(
            (scores.cpu().numpy(), batch_targets(batch, self.task).cpu().numpy(), list(batch["clip_key"]))
        )

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self._outputs.clear()
            return
        results = {}
        for idx, name in ((0, "val"), (1, "test")):
            parts = all_ranks(self._outputs.get(idx, []))  # a rank's exact-once share can be empty
            if not parts:
                raise RuntimeError(f"no {name} batches were evaluated; the {name} split is empty")
            scores = np.concatenate([p[0] for p in parts])
            targets = np.concatenate([p[1] for p in parts])
            keys = [k for p in parts for k in p[2]]
            results[name] = evaluate(scores, targets, keys, self.task, self.classes, self.target_names)
        self._outputs.clear()
        metric = self.tracker.metric
        self.tracker.update(self.current_epoch, results["val"], results["test"], self.model.state_dict)
        # the figures are the gathered ones, equal on every rank: sync_dist only tells Lightning so
        self.log_dict(
            {f"val/{metric}": results["val"][metric], f"test/{metric}": results["test"][metric]},
            sync_dist=True,
        )

    def configure_optimizers(self):
        enc_cfg = self.model.encoder.cfg
        groups = layer_decay_param_groups(
            self.model.encoder,
            self.model.head,
            enc_cfg.depth,
            enc_cfg.fusion_depth,
            self.recipe.layer_decay,
            self.recipe.weight_decay,
            self.model.encoder.no_weight_decay(),
        )
        optimizer, scheduler = build_optimizer(groups, self.recipe, self.peak_lr, self.steps_per_epoch)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@torch.inference_mode()
def predict(
    model: Callable[..., torch.Tensor],
    batches: Iterable[dict],
    task: str,
    modality: str,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Window-level scores of a full model over an evaluation stream: (scores, targets, clip_keys).
    On several ranks each scores its share of the stream and all get every rank's windows."""
    parts = []
    for batch in batches:
        video = normalize_video(batch["video"].to(device))
        out = model(video, batch["fbank"].to(device).float(), modality).float()
        parts.append(
            (
                (out.softmax(-1) if task == "classification" else out).cpu().numpy(),
                batch_targets(batch, task).cpu().numpy(),
                list(batch["clip_key"]),
            )
        )
    parts = all_ranks(parts)
    if not parts:
        raise RuntimeError("the evaluation stream gave no windows to score")
    return (
        np.concatenate([p[0] for p in parts]),
        np.concatenate([p[1] for p in parts]),
        [k for p in parts for k in p[2]],
    )
