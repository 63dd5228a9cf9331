"""The masked audio-visual autoencoder of HiCMAE (docs/model.md), read top to bottom like the section:
mask (video tubes, audio patches) -> encode the visible tokens -> fuse -> decode each modality with
hierarchical skip connections from the encoder's intermediate layers. `predict` stops there and hands
back the predictions of the masked tokens, the masks, the encoder output and the pooled per-level
features; the loss (reconstruction + hierarchical cross-modal contrastive) is the parameter-free
objective's (pretrain/objective.py). The model keeps the learnable temperature (`logit_scale`) and a
`forward` that runs the two for a training step."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
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
from pretrain.losses import initial_logit_scale, note_fp32
from pretrain.masking import Mask, random_mask, tube_mask
from pretrain.objective import ObjectiveConfig, PretrainObjective, per_level_terms
from pretrain.patches import patchify_audio, patchify_video, unpatchify_audio, unpatchify_video
from pretrain.pooling import token_mean

__all__ = [  # the objective's config and the patch helpers are part of this module's API too
    "Decoder",
    "MAEOutput",
    "MaskedAVAutoencoder",
    "ObjectiveConfig",
    "Prediction",
    "Temperature",
    "patchify_audio",
    "patchify_video",
    "unpatchify_audio",
    "unpatchify_video",
    "upgrade_state_dict",
]

# state-dict names of checkpoints written while the contrastive loss held the temperature -> now
RENAMED_KEYS = {"contrastive.info_nce.logit_scale": "temperature.logit_scale"}


def upgrade_state_dict(state: dict, prefix: str = "") -> dict:
    """Rename, in place, the entries of an older MaskedAVAutoencoder layout under `prefix` (e.g.
    "model." in a Lightning state dict) to today's names; returns `state`."""
    for old, new in RENAMED_KEYS.items():
        if prefix + old in state:
            state[prefix + new] = state.pop(prefix + old)
    return state


@dataclass
class Prediction:
    """What `MaskedAVAutoencoder.predict` hands to the objective. video_pred, audio_pred: (B, N_masked,
    patch_dim) predictions for the masked tokens in the order of mask.ids_masked; video_mask,
    audio_mask: the masks that were applied; encoded: the encoder output on the visible tokens (what
    further objectives, e.g. stage-2 text alignment, build on); video_pooled, audio_pooled: (B, L, D)
    token means of the L contrastive `levels` (encoder layers, 1-based, and/or "fused"), None
    without levels."""

    video_pred: Tensor
    audio_pred: Tensor
    video_mask: Mask
    audio_mask: Mask
    encoded: EncoderOutput
    video_pooled: Tensor | None
    audio_pooled: Tensor | None
    levels: list


@dataclass
class MAEOutput:
    """loss: scalar to optimise; terms: detached scalars (recon_video, recon_audio, contrastive,
    contrastive_l<k>, ...); the rest as in `Prediction`."""

    loss: Tensor
    terms: dict[str, Tensor]
    video_pred: Tensor
    audio_pred: Tensor
    video_mask: Mask
    audio_mask: Mask
    encoded: EncoderOutput | None = None


class Temperature(nn.Module):
    """The contrastive temperature as CLIP keeps it: `logit_scale` = log(1 / temperature), a parameter
    when learnable, else a buffer outside the state dict (a fixed temperature is configuration, not
    a weight)."""

    def __init__(self, temperature: float, learnable: bool):
        super().__init__()
        scale = initial_logit_scale(temperature)
        if learnable:
            self.logit_scale = nn.Parameter(scale)
        else:
            self.register_buffer("logit_scale", scale, persistent=False)

    @property
    def learnable(self) -> bool:
        return isinstance(self.logit_scale, nn.Parameter)

    @property
    def value(self) -> float:
        return float(1.0 / self.logit_scale.detach().exp())


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
    encoder->decoder projections and the contrastive temperature (`.temperature`, registered last so
    the parameter order is the one of checkpoints written before the objective moved out).
    `.objective` is the parameter-free loss that `forward` applies to `predict`'s output."""

    def __init__(self, model_cfg: ModelConfig | Mapping, objective_cfg: ObjectiveConfig | None = None):
        super().__init__()
        if not isinstance(model_cfg, ModelConfig):
            model_cfg = ModelConfig.from_dict(dict(model_cfg))
        self.cfg, self.objective_cfg = model_cfg, objective_cfg or ObjectiveConfig()
        self.contrastive_levels = self.objective_cfg.levels(model_cfg)
        self.encoder = AVEncoder(model_cfg)
        # one projection per modality serves the fused tokens and every skip level (no bias, as HiCMAE)
        self.video_to_decoder = nn.Linear(model_cfg.width, model_cfg.decoder_width, bias=False)
        self.audio_to_decoder = nn.Linear(model_cfg.width, model_cfg.decoder_width, bias=False)
        self.video_decoder = Decoder(model_cfg, model_cfg.num_video_tokens, model_cfg.video_patch_dim)
        self.audio_decoder = Decoder(model_cfg, model_cfg.num_audio_tokens, model_cfg.audio_patch_dim)
        obj = self.objective_cfg
        self.temperature = Temperature(obj.temperature, obj.learnable_temperature)
        self.objective = PretrainObjective(obj, model_cfg)
        for module in (self.video_to_decoder, self.audio_to_decoder, self.video_decoder, self.audio_decoder):
            module.apply(init_weights)
        trunc_normal_(self.video_decoder.mask_token, std=0.02)
        trunc_normal_(self.audio_decoder.mask_token, std=0.02)
        self.register_load_state_dict_pre_hook(self._older_layouts)

    @property
    def logit_scale(self) -> Tensor:
        """log(1 / temperature) of the contrastive loss: the objective's `logit_scale` argument."""
        return self.temperature.logit_scale

    def _older_layouts(self, module, state_dict, prefix, *_) -> None:
        """Any state dict of this model loads, whichever objective it was trained with: older names
        are renamed; a learned temperature is dropped for a model whose temperature is fixed
        (configuration wins), and a model that learns its temperature starts from the configured one
        when the state dict has none (a fixed-temperature run, an imported HiCMAE model)."""
        upgrade_state_dict(state_dict, prefix)
        key = prefix + "temperature.logit_scale"
        if not self.temperature.learnable:
            state_dict.pop(key, None)
        elif key not in state_dict:
            state_dict[key] = self.temperature.logit_scale.detach().clone()

    def no_weight_decay(self) -> set[str]:
        names = {f"encoder.{n}" for n in self.encoder.no_weight_decay()}
        names |= {"video_decoder.mask_token", "audio_decoder.mask_token"}
        if self.temperature.learnable:
            names.add("temperature.logit_scale")
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
        video_mask = tube_mask(batch, t, h * w, self.objective_cfg.video_mask_ratio, generator, where)
        audio_mask = random_mask(
            batch, self.cfg.num_audio_tokens, self.objective_cfg.audio_mask_ratio, generator, where
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

    def pool_levels(self, enc: EncoderOutput) -> tuple[Tensor | None, Tensor | None]:
        """Token means of the visible tokens at each contrastive level: video (B, L, D), audio (B, L, D)."""
        if not self.contrastive_levels:
            return None, None
        pairs = [
            (enc.fused_video, enc.fused_audio)
            if level == "fused"
            else (enc.video_layers[level - 1], enc.audio_layers[level - 1])
            for level in self.contrastive_levels
        ]
        return token_mean([v for v, _ in pairs]), token_mean([a for _, a in pairs])

    def predict(
        self,
        video: Tensor,
        fbank: Tensor,
        video_mask: Mask | None = None,
        audio_mask: Mask | None = None,
        generator: torch.Generator | None = None,
    ) -> Prediction:
        """video: (B, T, 3, H, W) uint8; fbank: (B, F, M) normalised -> Prediction.

        Given masks are applied as they are, e.g. `Mask.from_bool(bool_masked_pos)` to reproduce a
        given masked reconstruction; a missing one is drawn (from `generator` when given)."""
        if video_mask is None or audio_mask is None:
            drawn = self.random_masking(video.shape[0], video.device, generator)
            video_mask = drawn[0] if video_mask is None else video_mask
            audio_mask = drawn[1] if audio_mask is None else audio_mask
        enc = self.forward_encoder(normalize_video(video), fbank, video_mask, audio_mask)
        video_pred, audio_pred = self.forward_decoder(enc, video_mask, audio_mask)
        video_pooled, audio_pooled = self.pool_levels(enc)
        return Prediction(
            video_pred,
            audio_pred,
            video_mask,
            audio_mask,
            enc,
            video_pooled,
            audio_pooled,
            list(self.contrastive_levels),
        )

    def forward(
        self,
        video_uint8: Tensor,
        fbank: Tensor,
        generator: torch.Generator | None = None,
        masks: tuple[Mask, Mask] | None = None,
        audio_present: Tensor | None = None,
    ) -> MAEOutput:
        """One training step's forward: `predict`, then the objective with this model's temperature.

        masks: (video mask, audio mask) to apply instead of drawing new ones. audio_present: (B,)
        bool, the batch's flag; clips without audio are left out of the audio reconstruction and the
        contrastive loss (pretrain/losses.py). None, or all True, gives the loss of a batch without
        the flag, bit for bit."""
        p = self.predict(video_uint8, fbank, *(masks or (None, None)), generator=generator)
        loss, terms = self.objective(p, video_uint8, fbank, self.logit_scale, audio_present)
        return MAEOutput(loss, terms, p.video_pred, p.audio_pred, p.video_mask, p.audio_mask, p.encoded)

    # -- the objective's steps on this model, one at a time (for step-by-step comparisons) ----------

    def targets(self, video_uint8: Tensor, fbank: Tensor) -> tuple[Tensor, Tensor]:
        """Reconstruction targets of every token: (B, Nv, video_patch_dim), (B, Na, audio_patch_dim)."""
        return self.objective.targets(video_uint8, fbank)

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
        """The reconstruction terms (recon_video, recon_audio) of given predictions."""
        return self.objective.reconstruction_terms(
            video_uint8, fbank, (video_pred, audio_pred), (video_mask, audio_mask), audio_present
        )

    def forward_contrastive(
        self, enc: EncoderOutput, audio_present: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Hierarchical cross-modal InfoNCE of an encoder output at each contrastive level, and their sum."""
        return self.objective.contrastive_terms(
            *self.pool_levels(enc), self.contrastive_levels, self.logit_scale, audio_present
        )

    def contrastive_logits(
        self, enc: EncoderOutput, audio_present: Tensor | None = None
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """Per level: (logits per video (B, W*B), logits per audio (B, W*B)), temperature applied;
        the columns of clips without audio are -inf."""
        per_video, per_audio, _ = self.objective.info_nce.logits(
            *self.pool_levels(enc), self.logit_scale, audio_present
        )
        return per_level_terms(self.contrastive_levels, zip(per_video, per_audio))

    @torch.no_grad()
    def reconstruct(
        self, video_uint8: Tensor, fbank: Tensor, out: Prediction | MAEOutput
    ) -> tuple[Tensor, Tensor]:
        """Pictures for inspection: the inputs with masked patches replaced by the predictions, mapped
        back to pixel/fbank units with the true patches' statistics (targets are normalised per patch).
        -> video (B, T, 3, H, W) in [0, 1], fbank (B, F, M)."""
        obj, t = self.objective_cfg, self.cfg.tubelet
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
