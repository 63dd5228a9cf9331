"""PretrainModule: the Lightning step logic around a `MaskedAVAutoencoder` built from plain configs.

The model itself knows nothing of Lightning (it lives in pretrain/mae.py and is what gets exported);
this module adds the optimizer and schedule, the per-step masking seed, logging and the checkpoint
metadata. Side concerns (pictures, EMA, throughput, signals) are callbacks (pretrain/callbacks.py).
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from pretrain.encoders import ModelConfig
from pretrain.mae import MAEOutput, MaskedAVAutoencoder, ObjectiveConfig, upgrade_state_dict
from pretrain.optim import OptimConfig, build_optimizer
from pretrain.warm_start import load_initial_weights


def mask_seed(seed: int, rank: int, micro_batch: int) -> int:
    """Seed of the masks of one micro-batch: a pure function of (run seed, rank, micro-batch count),
    so a resumed run draws exactly the masks the uninterrupted run would have drawn, and ranks differ."""
    return ((seed * 1_000_003 + rank) * 2_147_483_647 + micro_batch) % (2**63 - 1)


class PretrainModule(pl.LightningModule):
    """Masked AV autoencoder training.

    Logged every `log_every_n_steps`: `loss/total`, each loss term (`loss/recon_video`,
    `loss/recon_audio`, `loss/contrastive`, `loss/contrastive_l<k>`), `train/lr`, and
    `train/audio_samples`: how many clips of the micro-batch had audio, the samples the audio and
    contrastive terms were computed over.
    Checkpoints carry `checkpoint["emomae"] = {"model": ModelConfig dict, "config": run config dict}`.
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        objective_cfg: ObjectiveConfig,
        optim_cfg: OptimConfig,
        run_config: dict | None = None,
        *,
        peak_lr: float,
        final_lr: float,
        max_steps: int,
        seed: int = 0,
        compile: bool = False,
        init: str | None = None,
    ) -> None:
        super().__init__()
        self.model = MaskedAVAutoencoder(model_cfg, objective_cfg)
        if init:  # weights only: a checkpoint to resume from would also restore optimizer and data
            load_initial_weights(self.model, model_cfg, init)
        self.model_cfg, self.optim_cfg = model_cfg, optim_cfg
        self.run_config = run_config or {}
        self.peak_lr, self.final_lr, self.max_steps, self.seed = peak_lr, final_lr, max_steps, seed
        self.flops_per_batch: float | None = None  # read by Lightning's ThroughputMonitor (MFU on GPU)
        self._micro_batches = 0  # micro-batches seen, the masking seed's clock (restored on resume)
        # FLOP counting dispatches every op in Python and cannot see inside a compiled graph
        self._count_flops = not compile
        if compile:
            self.model.compile()  # in place: state_dict keys stay free of `_orig_mod.`

    # -- steps -----------------------------------------------------------------------------------

    def forward(
        self,
        video: Tensor,
        fbank: Tensor,
        generator: torch.Generator | None = None,
        audio_present: Tensor | None = None,
    ) -> MAEOutput:
        """The model's `predict`, then the objective (`MaskedAVAutoencoder.forward`): one call, so a
        compiled model compiles both."""
        return self.model(video, fbank, generator=generator, audio_present=audio_present)

    def mask_generator(self) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(mask_seed(self.seed, self.global_rank, self._micro_batches))
        return gen

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """batch: `video` (B, T, 3, H, W) uint8, `fbank` (B, F, M) float32, `audio_present` (B,) bool
        (docs/architecture.md)."""
        video, fbank, audio_present = batch["video"], batch["fbank"], batch.get("audio_present")
        generator = self.mask_generator()
        self._micro_batches += 1
        if self.flops_per_batch is None and self._count_flops:
            # counted once, on the real first step; backward costs about twice the forward
            with FlopCounterMode(display=False) as counter:
                out = self(video, fbank, generator, audio_present)
            self.flops_per_batch = 3.0 * counter.get_total_flops()
        else:
            out = self(video, fbank, generator, audio_present)
        batch_size = video.shape[0]
        self.log("loss/total", out.loss.detach(), prog_bar=True, batch_size=batch_size)
        self.log_dict({f"loss/{k}": v for k, v in out.terms.items()}, batch_size=batch_size)
        if audio_present is not None:  # a tensor: logged without waiting for the device
            self.log("train/audio_samples", audio_present.sum().float(), batch_size=batch_size)
        self.log(
            "train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True, batch_size=batch_size
        )
        return out.loss

    def configure_optimizers(self) -> dict:
        optimizer, scheduler = build_optimizer(
            self.model, self.optim_cfg, self.peak_lr, self.final_lr, self.max_steps
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    # -- pictures ---------------------------------------------------------------------------------

    @torch.no_grad()
    def reconstruct(self, video: Tensor, fbank: Tensor) -> dict[str, Tensor]:
        """Inputs, masked inputs and reconstructions for a few clips (see callbacks.reconstruction_figure).

        Runs the model's `predict` only: the objective's contrastive loss gathers across ranks and
        must not run here. Masks come from a fixed seed so pictures of different steps are comparable.
        """
        model = self.model
        was_training = model.training
        model.eval()
        try:
            gen = torch.Generator(device=video.device)
            gen.manual_seed(self.seed)
            pred = model.predict(video, fbank, generator=gen)
            vmask, amask = pred.video_mask, pred.audio_mask
            video_recon, fbank_recon = model.reconstruct(video, fbank, pred)
            vp, ap = model.patchify(video.float() / 255.0, fbank.float())
            vp[vmask.mask] = 0.5  # grey where the encoder saw nothing
            ap[amask.mask] = fbank.float().amin()
            video_masked, fbank_masked = model.unpatchify(vp, ap)
        finally:
            model.train(was_training)
        return {
            "video": video.float() / 255.0,
            "video_masked": video_masked,
            "video_recon": video_recon,
            "fbank": fbank.float(),
            "fbank_masked": fbank_masked,
            "fbank_recon": fbank_recon,
        }

    # -- checkpoints ------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # plain types only: checkpoints must load with torch.load(weights_only=True)
        checkpoint["emomae"] = {"model": self.model_cfg.to_dict(), "config": self.run_config}
        checkpoint["emomae_state"] = {"micro_batches": self._micro_batches}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the EMA callback restores its average after this hook; `state_dict` the model maps itself
        if isinstance(checkpoint.get("ema_state_dict"), dict):
            upgrade_state_dict(checkpoint["ema_state_dict"], prefix="model.")
        state = checkpoint.get("emomae_state", {})
        self._micro_batches = int(state.get("micro_batches", 0))
