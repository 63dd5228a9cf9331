"""Full fine-tuning as a LightningModule: a training step with AV mixup/cutmix and modality dropout,
per-epoch validation and test scoring gathered over the ranks, honest epoch selection and the
layer-decay optimizer."""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch

from finetune.distributed import all_ranks
from finetune.full_model import FullFinetuneModel
from finetune.losses import batch_targets, task_loss
from finetune.metrics import evaluate
from finetune.mixup import AVMixup
from finetune.modality import drop_modality_per_sample
from finetune.optim import build_optimizer, layer_decay_param_groups
from finetune.selection import SelectionTracker, selection_metric
from pretrain.encoders import normalize_video


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
        # the epoch's mean: one step's loss swings with its batch, the mean shows whether training helps
        self.log(
            "train/epoch_loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=video.shape[0]
        )
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
