"""The masked audio-visual autoencoder of HiCMAE (docs/model.md), read top to bottom like the section:
mask (video tubes, audio patches) -> encode the visible tokens -> fuse -> decode each modality with
hierarchical skip connections from the encoder's intermediate layers -> reconstruction loss on the
masked tokens + hierarchical cross-modal contrastive loss."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from einops import rearrange
from timm.layers import trunc_normal_
from torch import Tensor, nn

from pretrain.encoders import (
    AVEncoder,
    Block,
    CrossSelfBlock,
    EncoderOutput,
    ModelConfig,
    gather_tokens,
    init_weights,
    normalize_video,
    sinusoid_table,
)
from pretrain.losses import (
    HierarchicalContrastiveLoss,
    audio_target,
    mse_over_present,
    note_fp32,
    video_target,
)
from pretrain.masking import Mask, random_mask, tube_mask


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


@dataclass
class MAEOutput:
    """loss: scalar to optimise; terms: detached scalars (recon_video, recon_audio, contrastive,
    contrastive_l<k>, ...); *_pred: (B, N_masked, patch_dim) predictions for the masked tokens in the
    order of mask.ids_masked; *_mask: the masks that were applied; encoded: the encoder output on the
    visible tokens (what further objectives, e.g. stage-2 text alignment, build on)."""

    loss: Tensor
    terms: dict[str, Tensor]
    video_pred: Tensor
    audio_pred: Tensor
    video_mask: Mask
    audio_mask: Mask
    encoded: EncoderOutput | None = None


def patchify_video(video: Tensor, tubelet: int, patch: int) -> Tensor:
    """(B, T, C, H, W) -> (B, T/t * H/p * W/p, t * p * p * C), tokens in the patch embedding's order."""
    return rearrange(
        video, "b (t p0) c (h p1) (w p2) -> b (t h w) (p0 p1 p2 c)", p0=tubelet, p1=patch, p2=patch
    )


def unpatchify_video(patches: Tensor, cfg: ModelConfig) -> Tensor:
    """Inverse of patchify_video: (B, N, t * p * p * 3) -> (B, T, 3, H, W)."""
    t, h, w = cfg.video_grid
    p = cfg.patch
    return rearrange(
        patches,
        "b (t h w) (p0 p1 p2 c) -> b (t p0) c (h p1) (w p2)",
        t=t,
        h=h,
        w=w,
        p0=cfg.tubelet,
        p1=p,
        p2=p,
    )


def patchify_audio(fbank: Tensor, patch: int) -> Tensor:
    """(B, F, M) -> (B, F/p * M/p, p * p), tokens in (time, freq) order."""
    return rearrange(fbank, "b (f p1) (m p2) -> b (f m) (p1 p2)", p1=patch, p2=patch)


def unpatchify_audio(patches: Tensor, cfg: ModelConfig) -> Tensor:
    """Inverse of patchify_audio: (B, N, p * p) -> (B, F, M)."""
    f, m = cfg.audio_grid
    return rearrange(patches, "b (f m) (p1 p2) -> b (f p1) (m p2)", f=f, m=m, p1=cfg.patch, p2=cfg.patch)


class Decoder(nn.Module):
    """One modality's decoder. Visible tokens (already projected to decoder width) get the decoder
    position table; mask tokens with their positions are appended. Block 1 is self-attention; block
    k >= 2 is cross-then-self with the (k-1)-th skip feature as context: the hierarchical skip
    connections, deepest encoder layer first (U-Net order)."""

    def __init__(self, cfg: ModelConfig, num_tokens: int, out_dim: int):
        super().__init__()
        d, h = cfg.decoder_width, cfg.decoder_heads
        self.register_buffer("pos_embed", sinusoid_table(num_tokens, d), persistent=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.blocks = nn.ModuleList(
            [Block(d, h, cfg.mlp_ratio, cfg.qv_bias)]
            + [CrossSelfBlock(d, h, cfg.mlp_ratio, cfg.qv_bias) for _ in range(cfg.decoder_depth - 1)]
        )
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.Linear(d, out_dim)

    def forward(self, x: Tensor, skips: list[Tensor], mask: Mask) -> Tensor:
        """x: (B, K, Dd) visible tokens; skips: (B, K, Dd) each, deepest first -> (B, N - K, out_dim)."""
        pos = self.pos_embed.to(x.dtype).expand(x.shape[0], -1, -1)
        visible_pos = gather_tokens(pos, mask.ids_keep)
        masked = self.mask_token.to(x.dtype) + gather_tokens(pos, mask.ids_masked)
        x = torch.cat([x + visible_pos, masked], dim=1)
        x = self.blocks[0](x)
        # each skip feature carries the positions of its visible tokens too (HiCMAE:
        # `encoder_to_decoder(feature) + pos_emd_vis`): without them the cross-attention's keys
        # cannot tell which face region or time span a skip token came from
        for block, context in zip(self.blocks[1:], skips, strict=True):
            x = block(x, context + visible_pos)
        return self.head(self.norm(x[:, -mask.num_masked :]))


class MaskedAVAutoencoder(nn.Module):
    """HiCMAE pretraining model: `.encoder` (AVEncoder, what gets exported), two decoders, the
    encoder->decoder projections and the hierarchical contrastive loss."""

    def __init__(self, model_cfg: ModelConfig | Mapping, objective_cfg: ObjectiveConfig | None = None):
        super().__init__()
        if not isinstance(model_cfg, ModelConfig):
            model_cfg = ModelConfig.from_dict(dict(model_cfg))
        self.cfg, self.objective = model_cfg, objective_cfg or ObjectiveConfig()
        self.contrastive_levels = self.objective.levels(model_cfg)
        self.encoder = AVEncoder(model_cfg)
        # one projection per modality serves the fused tokens and every skip level (no bias, as HiCMAE)
        self.video_to_decoder = nn.Linear(model_cfg.width, model_cfg.decoder_width, bias=False)
        self.audio_to_decoder = nn.Linear(model_cfg.width, model_cfg.decoder_width, bias=False)
        self.video_decoder = Decoder(model_cfg, model_cfg.num_video_tokens, model_cfg.video_patch_dim)
        self.audio_decoder = Decoder(model_cfg, model_cfg.num_audio_tokens, model_cfg.audio_patch_dim)
        obj = self.objective
        self.contrastive = HierarchicalContrastiveLoss(
            obj.temperature, obj.learnable_temperature, obj.gather_negatives
        )
        for module in (self.video_to_decoder, self.audio_to_decoder, self.video_decoder, self.audio_decoder):
            module.apply(init_weights)
        trunc_normal_(self.video_decoder.mask_token, std=0.02)
        trunc_normal_(self.audio_decoder.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        names = {f"encoder.{n}" for n in self.encoder.no_weight_decay()}
        names |= {"video_decoder.mask_token", "audio_decoder.mask_token", "contrastive.info_nce.logit_scale"}
        return names

    def patchify(self, video: Tensor, fbank: Tensor) -> tuple[Tensor, Tensor]:
        """video (B, T, 3, H, W), fbank (B, F, M) -> (B, Nv, 1536), (B, Na, 256) at base size."""
        return patchify_video(video, self.cfg.tubelet, self.cfg.patch), patchify_audio(fbank, self.cfg.patch)

    def unpatchify(self, video_patches: Tensor, audio_patches: Tensor) -> tuple[Tensor, Tensor]:
        return unpatchify_video(video_patches, self.cfg), unpatchify_audio(audio_patches, self.cfg)

    def random_masking(self, batch: int, device: torch.device, generator: torch.Generator | None = None):
        """Video tube mask over (T/t, H/p * W/p) and audio random mask over all fbank patches."""
        t, h, w = self.cfg.video_grid
        where = generator.device if generator is not None else device
        video_mask = tube_mask(batch, t, h * w, self.objective.video_mask_ratio, generator, where)
        audio_mask = random_mask(
            batch, self.cfg.num_audio_tokens, self.objective.audio_mask_ratio, generator, where
        )
        return video_mask.to(device), audio_mask.to(device)

    def forward_encoder(
        self, video: Tensor, fbank: Tensor, video_mask: Mask, audio_mask: Mask
    ) -> EncoderOutput:
        return self.encoder.forward_features(video, fbank, video_mask.ids_keep, audio_mask.ids_keep)

    def forward_decoder(
        self, enc: EncoderOutput, video_mask: Mask, audio_mask: Mask
    ) -> tuple[Tensor, Tensor]:
        """Fused visible tokens + hierarchical skips -> predictions for the masked tokens of each modality."""
        deepest_first = sorted(self.cfg.skip_layers, reverse=True)
        video_skips = [self.video_to_decoder(enc.video_layers[k - 1]) for k in deepest_first]
        audio_skips = [self.audio_to_decoder(enc.audio_layers[k - 1]) for k in deepest_first]
        video_pred = self.video_decoder(self.video_to_decoder(enc.fused_video), video_skips, video_mask)
        audio_pred = self.audio_decoder(self.audio_to_decoder(enc.fused_audio), audio_skips, audio_mask)
        return video_pred, audio_pred

    def targets(self, video_uint8: Tensor, fbank: Tensor) -> tuple[Tensor, Tensor]:
        """Reconstruction targets of every token: (B, Nv, video_patch_dim), (B, Na, audio_patch_dim)."""
        obj = self.objective
        video_patches, audio_patches = self.patchify(video_uint8.float() / 255.0, fbank)
        return (
            video_target(video_patches, self.cfg.tubelet, obj.norm_pix, obj.frame_diff_target),
            audio_target(audio_patches, obj.norm_pix),
        )

    def forward_loss(
        self,
        video_uint8: Tensor,
        fbank: Tensor,
        video_pred: Tensor,
        audio_pred: Tensor,
        video_mask: Mask,
        audio_mask: Mask,
        audio_present: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """MSE between predictions and targets over the masked tokens, per modality; the audio
        term over the samples with audio only (`audio_present` (B,) bool, None: all)."""
        video_tgt, audio_tgt = self.targets(video_uint8, fbank)
        return {
            "recon_video": mse_over_present(video_pred, gather_tokens(video_tgt, video_mask.ids_masked)),
            "recon_audio": mse_over_present(
                audio_pred, gather_tokens(audio_tgt, audio_mask.ids_masked), audio_present
            ),
        }

    def contrastive_pairs(self, enc: EncoderOutput) -> dict[str, tuple[Tensor, Tensor]]:
        """(video tokens, audio tokens) of each contrastive level, by loss-term name."""
        levels = {}
        for level in self.contrastive_levels:
            if level == "fused":
                levels["contrastive_fused"] = (enc.fused_video, enc.fused_audio)
            else:
                levels[f"contrastive_l{level}"] = (enc.video_layers[level - 1], enc.audio_layers[level - 1])
        return levels

    def forward_contrastive(
        self, enc: EncoderOutput, audio_present: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Hierarchical cross-modal InfoNCE at each contrastive level, and their sum; clips without
        audio (`audio_present` False) are neither anchors nor negatives."""
        total, per_level = self.contrastive(self.contrastive_pairs(enc), audio_present)
        return {"contrastive": total, **per_level}

    def contrastive_logits(
        self, enc: EncoderOutput, audio_present: Tensor | None = None
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """Per level: (logits per video (B, W*B), logits per audio (B, W*B)), temperature applied;
        the columns of clips without audio are -inf."""
        return self.contrastive.logits(self.contrastive_pairs(enc), audio_present)

    def forward(
        self,
        video_uint8: Tensor,
        fbank: Tensor,
        generator: torch.Generator | None = None,
        masks: tuple[Mask, Mask] | None = None,
        audio_present: Tensor | None = None,
    ) -> MAEOutput:
        """video_uint8: (B, T, 3, H, W) uint8; fbank: (B, F, M) normalised -> MAEOutput.

        masks: (video mask, audio mask) to apply instead of drawing new ones, e.g.
        `Mask.from_bool(bool_masked_pos)` to reproduce a given masked reconstruction.
        audio_present: (B,) bool, the batch's flag; clips without audio are left out of the audio
        reconstruction and the contrastive loss (pretrain/losses.py). None, or all True, gives the
        loss of a batch without the flag, bit for bit."""
        if masks is None:
            masks = self.random_masking(video_uint8.shape[0], video_uint8.device, generator)
        video_mask, audio_mask = masks
        enc = self.forward_encoder(normalize_video(video_uint8), fbank, video_mask, audio_mask)
        video_pred, audio_pred = self.forward_decoder(enc, video_mask, audio_mask)
        terms = self.forward_loss(
            video_uint8, fbank, video_pred, audio_pred, video_mask, audio_mask, audio_present
        )
        loss = terms["recon_video"] + terms["recon_audio"]
        if self.contrastive_levels:
            terms |= self.forward_contrastive(enc, audio_present)
            loss = loss + self.objective.contrastive_weight * terms["contrastive"]
        terms = {name: value.detach() for name, value in terms.items()}
        return MAEOutput(loss, terms, video_pred, audio_pred, video_mask, audio_mask, enc)

    @torch.no_grad()
    def reconstruct(self, video_uint8: Tensor, fbank: Tensor, out: MAEOutput) -> tuple[Tensor, Tensor]:
        """Pictures for inspection: the inputs with masked patches replaced by the predictions, mapped
        back to pixel/fbank units with the true patches' statistics (targets are normalised per patch).
        -> video (B, T, 3, H, W) in [0, 1], fbank (B, F, M)."""
        obj, t = self.objective, self.cfg.tubelet
        note_fp32(
            "reconstruction pictures",
            "predictions are mapped back to pixels with fp32 patch statistics",
            out.video_pred,
            out.audio_pred,
        )
        video_patches, audio_patches = self.patchify(video_uint8.float() / 255.0, fbank.float())
        b, nm = out.video_pred.shape[:2]
        truth = gather_tokens(video_patches, out.video_mask.ids_masked).view(b, nm, t, -1, 3)
        pred = out.video_pred.float().view(b, nm, t, -1, 3)
        if obj.frame_diff_target:
            pred = torch.cat([pred[:, :, :1], pred[:, :, 1:] + pred[:, :, :1]], dim=2)
        if obj.norm_pix:
            flat = truth.flatten(2, 3)
            mean, std = flat.mean(2, keepdim=True), flat.var(2, keepdim=True).sqrt() + 1e-6
            pred = (pred.flatten(2, 3) * std + mean).view_as(pred)
        video_patches.scatter_(
            1, out.video_mask.ids_masked[..., None].expand(-1, -1, video_patches.shape[-1]), pred.flatten(2)
        )
        audio_pred = out.audio_pred.float()
        if obj.norm_pix:
            truth = gather_tokens(audio_patches, out.audio_mask.ids_masked)
            audio_pred = audio_pred * (truth.var(-1, keepdim=True).sqrt() + 1e-6) + truth.mean(
                -1, keepdim=True
            )
        audio_patches.scatter_(
            1, out.audio_mask.ids_masked[..., None].expand(-1, -1, audio_patches.shape[-1]), audio_pred
        )
        video, audio = self.unpatchify(video_patches, audio_patches)
        return video.clamp(0, 1), audio
