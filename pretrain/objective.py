"""The pretraining objective, apart from the model (open_clip's shape): from what the autoencoder
predicted (`pretrain.mae.Prediction`) and the batch, the reconstruction targets and terms and the
hierarchical cross-modal contrastive terms. It holds no parameter and no buffer: the learnable
temperature belongs to the model and comes in as `logit_scale`; the cross-rank gather of the
contrastive negatives is the objective's own (`ObjectiveConfig.gather_negatives`).

Term names (what gets logged): `recon_video`, `recon_audio`, `contrastive` (the sum over levels) and
one `contrastive_l<k>` (encoder layer k, 1-based) or `contrastive_fused` per level.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor, nn

from pretrain.encoders import ModelConfig
from pretrain.layers import gather_tokens
from pretrain.losses import GatheredInfoNCE, audio_target, mse_over_present, video_target
from pretrain.patches import patchify_audio, patchify_video

if TYPE_CHECKING:  # the model imports this module; the prediction only flows in at run time
    from pretrain.mae import Prediction
    from pretrain.masking import Mask


@dataclass
class ObjectiveConfig:
    """What the autoencoder is trained to do; defaults are HiCMAE's."""

    video_mask_ratio: float = 0.9
    audio_mask_ratio: float = 0.8
    frame_diff_target: bool = True
    norm_pix: bool = True
    # 1-based encoder layers and/or "fused" (the fusion encoder's outputs); None: the model's
    # skip_layers ([4, 7, 10] for HiCMAE sizes), [] turns the contrastive loss off
    contrastive_levels: list | None = None
    contrastive_weight: float = 0.0025
    temperature: float = 0.07
    learnable_temperature: bool = False
    gather_negatives: bool = True

    def levels(self, model_cfg: ModelConfig) -> list:
        """The contrastive levels for this model, checked against its depth."""
        levels = list(model_cfg.skip_layers if self.contrastive_levels is None else self.contrastive_levels)
        for level in levels:
            if level != "fused" and not (isinstance(level, int) and 1 <= level <= model_cfg.depth):
                raise ValueError(
                    f"ObjectiveConfig.contrastive_levels: {level!r} is neither a layer in 1..{model_cfg.depth} nor 'fused'"
                )
        return levels


def level_term(level: int | str) -> str:
    """The loss-term name of one contrastive level: `contrastive_l<k>` or `contrastive_fused`."""
    return "contrastive_fused" if level == "fused" else f"contrastive_l{level}"


def per_level_terms(levels: list, values) -> dict:
    """{term name of each level: its value}, `values` in the order of `levels`."""
    return dict(zip(map(level_term, levels), values))


class PretrainObjective(nn.Module):
    """Reconstruction + hierarchical contrastive loss of one micro-batch; no parameters, no buffers.

    `objective(prediction, video_uint8, fbank, logit_scale, audio_present)` -> (loss, detached terms).
    `audio_present` (B,) bool: clips without audio leave the audio reconstruction and every contrastive
    level (pretrain/losses.py); None, or all True, gives the unflagged loss bit for bit."""

    def __init__(self, cfg: ObjectiveConfig, model_cfg: ModelConfig):
        super().__init__()
        self.cfg, self.tubelet, self.patch = cfg, model_cfg.tubelet, model_cfg.patch
        self.info_nce = GatheredInfoNCE(gather_negatives=cfg.gather_negatives)

    def targets(self, video_uint8: Tensor, fbank: Tensor) -> tuple[Tensor, Tensor]:
        """Reconstruction targets of every token: (B, Nv, video_patch_dim), (B, Na, audio_patch_dim)."""
        video_patches = patchify_video(video_uint8.float() / 255.0, self.tubelet, self.patch)
        return (
            video_target(video_patches, self.tubelet, self.cfg.norm_pix, self.cfg.frame_diff_target),
            audio_target(patchify_audio(fbank, self.patch), self.cfg.norm_pix),
        )

    def reconstruction_terms(
        self,
        video_uint8: Tensor,
        fbank: Tensor,
        predicted: tuple[Tensor, Tensor],
        masks: tuple[Mask, Mask],
        audio_present: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """MSE between the (video, audio) predictions of the masked tokens and their targets, per
        modality; the audio term over the samples with audio only."""
        (video_pred, audio_pred), (video_mask, audio_mask) = predicted, masks
        video_tgt, audio_tgt = self.targets(video_uint8, fbank)
        return {
            "recon_video": mse_over_present(video_pred, gather_tokens(video_tgt, video_mask.ids_masked)),
            "recon_audio": mse_over_present(
                audio_pred, gather_tokens(audio_tgt, audio_mask.ids_masked), audio_present
            ),
        }

    def contrastive_terms(
        self,
        video_pooled: Tensor,
        audio_pooled: Tensor,
        levels: list,
        logit_scale: Tensor,
        audio_present: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """video_pooled, audio_pooled: (B, L, D) token means of the L `levels` -> `contrastive` (their
        sum) and one term per level; one gather serves every level."""
        per_level = self.info_nce(video_pooled, audio_pooled, logit_scale, audio_present)
        return {"contrastive": per_level.sum(), **per_level_terms(levels, per_level.unbind(0))}

    def forward(
        self,
        prediction: Prediction,
        video_uint8: Tensor,
        fbank: Tensor,
        logit_scale: Tensor,
        audio_present: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """-> (loss to optimise, {term name: detached scalar})."""
        p = prediction
        terms = self.reconstruction_terms(
            video_uint8, fbank, (p.video_pred, p.audio_pred), (p.video_mask, p.audio_mask), audio_present
        )
        loss = terms["recon_video"] + terms["recon_audio"]
        if p.levels:
            terms |= self.contrastive_terms(
                p.video_pooled, p.audio_pooled, p.levels, logit_scale, audio_present
            )
            loss = loss + self.cfg.contrastive_weight * terms["contrastive"]
        return loss, {name: value.detach() for name, value in terms.items()}
