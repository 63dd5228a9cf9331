"""Stage 2 of VAEmo-style pretraining: knowledge injection from captions (docs/vaemo.md).

A stage-1 masked AV autoencoder is loaded (weights only) and keeps training on its own objectives
(reconstruction + hierarchical AV contrastive, weighted by `stage1_weight`) on every clip, while the
clips that carry a caption are also aligned with the caption's embedding from a frozen text encoder
by symmetric InfoNCE on three branches: video<->text, audio<->text and fused AV<->text. A clip without a
caption never enters a text loss. Batches mix a captioned stream and the full stream at
`caption_ratio` (captions usually cover a small subset, which would otherwise be rare in a batch).

Selected by `stage: inject` in a pretraining config (configs/pretrain/inject_*.yaml). Here: the
LightningModule and `build_stage2`, which wires it to its datamodule. The other parts live with their
kind: the `inject:` schema in pretrain/inject_config.py, the caption loss in pretrain/caption_loss.py,
the batch mix in data_pipelines/caption_mix.py, and the stage-1 weights load through `init=`
(pretrain/warm_start.py, as any warm start).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from data_pipelines.caption_mix import CaptionMixDataModule
from pretrain.caption_loss import caption_ids, caption_infonce
from pretrain.encoders import EncoderOutput, ModelConfig, normalize_video
from pretrain.inject_config import InjectConfig
from pretrain.module import PretrainModule
from pretrain.text import FrozenTextEncoder, TextHeads, pool_branches


class InjectModule(PretrainModule):
    """Stage-1 objectives on every clip + caption alignment on the captioned ones.

    Logged per step: `loss/total`, `loss/stage1`, the stage-1 terms (`loss/recon_video`, ...),
    `loss/text` and `loss/text_<branch>` per alignment branch, `text/captioned` (captioned clips in the
    local batch) and `text/logit_scale`. The frozen text encoder is not a submodule: it is absent
    from the optimizer, the gradients and the checkpoint; `text_heads.*` are saved with the model.
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        objective_cfg,
        optim_cfg,
        run_config: dict | None = None,
        *,
        inject_cfg: InjectConfig,
        init: str | None = None,
        text_cache_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model_cfg, objective_cfg, optim_cfg, run_config, init=init, **kwargs)
        inject_cfg.check()
        self.inject_cfg = inject_cfg
        self.text = FrozenTextEncoder(
            inject_cfg.text_encoder, cache_dir=inject_cfg.text_cache_dir or text_cache_dir
        )
        self.text_heads = TextHeads(
            model_cfg.width,
            self.text.dim,
            inject_cfg.temperature,
            inject_cfg.learnable_temperature,
            inject_cfg.branches,
        )

    def no_weight_decay(self) -> set[str]:
        return {f"model.{n}" for n in self.model.no_weight_decay()} | {"text_heads.logit_scale"}

    def configure_optimizers(self) -> dict:
        from pretrain.optim import build_optimizer

        # `self` holds both trainable parts (model.*, text_heads.*); the text encoder is not a submodule
        optimizer, scheduler = build_optimizer(
            self, self.optim_cfg, self.peak_lr, self.final_lr, self.max_steps
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    def on_fit_start(self) -> None:
        self.text.to(self.device)

    def on_train_end(self) -> None:
        self.text.flush()

    def align_features(
        self, video: Tensor, fbank: Tensor, enc: EncoderOutput, has_caption: Tensor
    ) -> dict[str, Tensor]:
        """Projected, normalised `(B, text_dim)` per branch. With `text_view=full` the captioned rows
        are re-encoded on all tokens; uncaptioned rows are zeros (they are masked out of the loss)."""
        if self.inject_cfg.text_view == "masked" or not bool(has_caption.any()):
            pooled = pool_branches(
                enc.video_layers[-1], enc.audio_layers[-1], enc.fused_video, enc.fused_audio
            )
            return self.text_heads({b: x for b, x in pooled.items() if b in self.inject_cfg.branches})
        rows = has_caption.nonzero().squeeze(1)
        full = self.model.encoder.forward_features(normalize_video(video[rows]), fbank[rows])
        pooled = pool_branches(
            full.video_layers[-1], full.audio_layers[-1], full.fused_video, full.fused_audio
        )
        out = self.text_heads({b: x for b, x in pooled.items() if b in self.inject_cfg.branches})
        return {b: z.new_zeros(video.shape[0], z.shape[1]).index_copy(0, rows, z) for b, z in out.items()}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """batch: the docs/architecture.md batch; `caption`/`has_caption` select the text-loss rows."""
        video, fbank, captions = batch["video"], batch["fbank"], batch["caption"]
        has_caption = batch["has_caption"].to(video.device).bool()
        generator = self.mask_generator()
        self._micro_batches += 1
        # the stage-1 objectives, unchanged; clips without audio stay out of its audio and contrastive terms
        out = self.model(video, fbank, generator, audio_present=batch.get("audio_present"))
        stage1_loss, terms, enc = out.loss, dict(out.terms), out.encoded

        cfg = self.inject_cfg
        rows = has_caption.nonzero().squeeze(1)
        text = video.new_zeros(video.shape[0], self.text.dim, dtype=torch.float32)
        if len(rows):
            embedded = self.text.encode([captions[i] for i in rows.tolist()], device=video.device)
            text = text.index_copy(0, rows, F.normalize(embedded, dim=-1))
        ids = caption_ids(captions, video.device)
        scale = self.text_heads.scale()
        text_loss = stage1_loss.new_zeros(())
        for branch, z in self.align_features(video, fbank, enc, has_caption).items():
            terms[f"text_{branch}"] = caption_infonce(
                z, text.to(z.dtype), ids, has_caption, scale, cfg.gather_negatives
            )
            text_loss = text_loss + cfg.branch_weights.get(branch, 1.0) * terms[f"text_{branch}"]
        terms["text"], terms["stage1"] = text_loss, stage1_loss
        loss = cfg.stage1_weight * stage1_loss + cfg.text_weight * text_loss

        b = video.shape[0]
        self.log("loss/total", loss.detach(), prog_bar=True, batch_size=b)
        self.log_dict({f"loss/{k}": v.detach() for k, v in terms.items()}, batch_size=b)
        self.log("text/captioned", has_caption.float().sum(), batch_size=b)
        self.log("text/logit_scale", scale.detach(), batch_size=b)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True, batch_size=b)
        return loss


def build_stage2(
    cfg: Any, run_config: dict, **module_kwargs: Any
) -> tuple[InjectModule, CaptionMixDataModule]:
    """Module and datamodule of a `stage: inject` run (`cfg`: pretrain.train.PretrainConfig)."""
    text_cache = str(Path(cfg.run_dir) / "text_cache")
    module = InjectModule(
        cfg.model,
        cfg.objective,
        cfg.optim,
        run_config,
        inject_cfg=cfg.inject,
        init=cfg.init,
        text_cache_dir=text_cache,
        **module_kwargs,
    )
    datamodule = CaptionMixDataModule(
        cfg.data, caption_ratio=cfg.inject.caption_ratio, caption_shards=cfg.inject.caption_shards
    )
    return module, datamodule
