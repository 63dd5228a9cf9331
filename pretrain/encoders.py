"""Audio-visual encoders (docs/model.md): a video ViT over 2x16x16 tubelets, an audio ViT over 16x16
fbank patches, and a cross-modal fusion encoder, as two separate stacks (HiCMAE) or one shared stack
(VAEmo's unified encoder). Imports only torch, timm and einops so exports and fine-tuning never need
training code.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
from einops import rearrange
from timm.layers import trunc_normal_
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

# Re-exported: the decoders (pretrain/mae.py) and older imports take the layers from here.
from pretrain.layers import (
    LN_EPS,
    Attention,  # noqa: F401 (re-exported)
    Block,
    CrossSelfBlock,
    gather_tokens,
    init_weights,
    sinusoid_table,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelConfig:
    """The architecture; defaults are HiCMAE-base. Stored in checkpoints as `asdict(cfg)`."""

    kind: str = "separate"  # "separate" (HiCMAE) | "unified" (VAEmo: one shared block stack)
    num_frames: int = 16
    img_size: int = 160
    tubelet: int = 2
    patch: int = 16
    fbank_frames: int = 256
    mel_bins: int = 128
    width: int = 512
    heads: int = 8
    depth: int = 10
    fusion_depth: int = 2
    decoder_width: int = 384
    decoder_heads: int = 6
    decoder_depth: int = 4
    mlp_ratio: float = 4.0
    skip_layers: list[int] = field(default_factory=lambda: [4, 7, 10])  # 1-based hierarchical levels
    drop_path: float = 0.0
    grad_checkpointing: bool = False
    qv_bias: bool = True  # q and v biases, no k bias (a k bias only shifts every logit of a row equally)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(
                f"unknown ModelConfig keys {unknown}; expected a subset of {[f.name for f in fields(cls)]}"
            )
        cfg = cls(**{k: (list(v) if k == "skip_layers" else v) for k, v in d.items()})
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"ModelConfig: {msg}")

        need(self.kind in ("separate", "unified"), f"kind must be 'separate' or 'unified', got {self.kind!r}")
        need(
            self.num_frames % self.tubelet == 0,
            f"num_frames={self.num_frames} must be a multiple of tubelet={self.tubelet}",
        )
        need(
            self.img_size % self.patch == 0,
            f"img_size={self.img_size} must be a multiple of patch={self.patch}",
        )
        need(
            self.fbank_frames % self.patch == 0 and self.mel_bins % self.patch == 0,
            f"fbank_frames={self.fbank_frames} and mel_bins={self.mel_bins} must be multiples of patch={self.patch}",
        )
        need(self.width % self.heads == 0, f"width={self.width} must be divisible by heads={self.heads}")
        need(
            self.decoder_width % self.decoder_heads == 0,
            f"decoder_width={self.decoder_width} must be divisible by decoder_heads={self.decoder_heads}",
        )
        need(
            all(1 <= k <= self.depth for k in self.skip_layers),
            f"skip_layers={list(self.skip_layers)} must lie in 1..depth={self.depth}",
        )
        need(
            self.decoder_depth == len(self.skip_layers) + 1,
            f"decoder_depth={self.decoder_depth} must be 1 + len(skip_layers)={len(self.skip_layers)} "
            "(one self-attention block, then one cross block per skip level)",
        )

    @property
    def video_grid(self) -> tuple[int, int, int]:
        g = self.img_size // self.patch
        return self.num_frames // self.tubelet, g, g

    @property
    def audio_grid(self) -> tuple[int, int]:
        return self.fbank_frames // self.patch, self.mel_bins // self.patch

    @property
    def num_video_tokens(self) -> int:
        return math.prod(self.video_grid)

    @property
    def num_audio_tokens(self) -> int:
        return math.prod(self.audio_grid)

    @property
    def video_patch_dim(self) -> int:
        return self.tubelet * self.patch * self.patch * 3

    @property
    def audio_patch_dim(self) -> int:
        return self.patch * self.patch


def normalize_video(video: Tensor) -> Tensor:
    """video: (B, T, 3, H, W) uint8 -> float32 normalised with ImageNet mean/std."""
    if video.dtype != torch.uint8:
        raise TypeError(f"normalize_video expects uint8 frames (B, T, 3, H, W), got {video.dtype}")
    mean = video.new_tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 1, 3, 1, 1)
    std = video.new_tensor(IMAGENET_STD, dtype=torch.float32).view(1, 1, 3, 1, 1)
    return (video.float() / 255.0 - mean) / std


def drop_path_rates(top: float, depth: int) -> list[float]:
    """Stochastic depth growing linearly from 0 at the first block to `top` at the last, within each
    stack (encoders and fusion encoder alike, as HiCMAE's `torch.linspace(0, rate, depth)`)."""
    return [top * i / max(depth - 1, 1) for i in range(depth)]


class VideoPatchEmbed(nn.Module):
    """Tubelets (tubelet x patch x patch) -> tokens + fixed positions (+ a modality token)."""

    def __init__(self, cfg: ModelConfig, modality_token: bool = False):
        super().__init__()
        size = (cfg.tubelet, cfg.patch, cfg.patch)
        self.proj = nn.Conv3d(3, cfg.width, kernel_size=size, stride=size)
        self.register_buffer("pos_embed", sinusoid_table(cfg.num_video_tokens, cfg.width), persistent=False)
        self.modality_token = nn.Parameter(torch.zeros(1, 1, cfg.width)) if modality_token else None

    def forward(self, video: Tensor) -> Tensor:
        """video: (B, T, 3, H, W) float -> (B, T/t * H/p * W/p, D), tokens in (t, h, w) order."""
        # DeepSpeed's bf16 engine holds bf16 weights and runs without autocast: follow the weights
        x = (
            self.proj(rearrange(video, "b t c h w -> b c t h w").to(self.proj.weight.dtype))
            .flatten(2)
            .transpose(1, 2)
        )
        x = x + self.pos_embed.to(x.dtype)
        return x if self.modality_token is None else x + self.modality_token


class AudioPatchEmbed(nn.Module):
    """16x16 fbank patches -> tokens + fixed positions (+ a modality token)."""

    def __init__(self, cfg: ModelConfig, modality_token: bool = False):
        super().__init__()
        self.proj = nn.Conv2d(1, cfg.width, kernel_size=cfg.patch, stride=cfg.patch)
        self.register_buffer("pos_embed", sinusoid_table(cfg.num_audio_tokens, cfg.width), persistent=False)
        self.modality_token = nn.Parameter(torch.zeros(1, 1, cfg.width)) if modality_token else None

    def forward(self, fbank: Tensor) -> Tensor:
        """fbank: (B, F, M) -> (B, F/p * M/p, D), tokens in (time, freq) order."""
        x = self.proj(fbank.unsqueeze(1).to(self.proj.weight.dtype)).flatten(2).transpose(1, 2)
        x = x + self.pos_embed.to(x.dtype)
        return x if self.modality_token is None else x + self.modality_token


class FusionEncoder(nn.Module):
    """Cross-modal fusion (HiCMAE): each layer updates both streams from the previous layer's outputs,
    video attending to audio and audio to video; separate final norms."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        rates = drop_path_rates(cfg.drop_path, cfg.fusion_depth)

        def stack() -> nn.ModuleList:
            return nn.ModuleList(
                CrossSelfBlock(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.qv_bias, r) for r in rates
            )

        self.video_blocks, self.audio_blocks = stack(), stack()
        self.video_norm = nn.LayerNorm(cfg.width, eps=LN_EPS)
        self.audio_norm = nn.LayerNorm(cfg.width, eps=LN_EPS)

    def forward(self, v: Tensor, a: Tensor, run=None) -> tuple[Tensor, Tensor]:
        run = run or (lambda block, *xs: block(*xs))
        for vb, ab in zip(self.video_blocks, self.audio_blocks):
            v, a = run(vb, v, a), run(ab, a, v)
        return self.video_norm(v), self.audio_norm(a)


class JointFusionEncoder(nn.Module):
    """Unified fusion (VAEmo-style): self-attention blocks over the concatenated video and audio
    tokens, so one set of weights serves both directions; separate final norms."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.qv_bias, r)
            for r in drop_path_rates(cfg.drop_path, cfg.fusion_depth)
        )
        self.video_norm = nn.LayerNorm(cfg.width, eps=LN_EPS)
        self.audio_norm = nn.LayerNorm(cfg.width, eps=LN_EPS)

    def forward(self, v: Tensor, a: Tensor, run=None) -> tuple[Tensor, Tensor]:
        run = run or (lambda block, *xs: block(*xs))
        x = torch.cat([v, a], dim=1)
        for block in self.blocks:
            x = run(block, x)
        v, a = x.split([v.shape[1], a.shape[1]], dim=1)
        return self.video_norm(v), self.audio_norm(a)


@dataclass
class EncoderOutput:
    """Per-block outputs after the final norm, `(B, N, D)` each (index k-1 is layer k), and the
    fusion encoder's outputs. N is the number of visible tokens when ids_keep were given."""

    video_layers: list[Tensor]
    audio_layers: list[Tensor]
    fused_video: Tensor
    fused_audio: Tensor


class AVEncoder(nn.Module):
    """Video + audio encoders and the fusion encoder. `kind="separate"`: one ViT per modality;
    `kind="unified"`: modality-specific patch embeddings and modality tokens, one shared block stack
    and a joint fusion encoder (about half the parameters)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.grad_checkpointing = cfg.grad_checkpointing
        unified = cfg.kind == "unified"
        self.video_embed = VideoPatchEmbed(cfg, modality_token=unified)
        self.audio_embed = AudioPatchEmbed(cfg, modality_token=unified)
        rates = drop_path_rates(cfg.drop_path, cfg.depth)

        def stack() -> nn.ModuleList:
            return nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.qv_bias, r) for r in rates)

        if unified:
            self.blocks = stack()
        else:
            self.video_blocks, self.audio_blocks = stack(), stack()
        self.video_norm = nn.LayerNorm(cfg.width, eps=LN_EPS)
        self.audio_norm = nn.LayerNorm(cfg.width, eps=LN_EPS)
        self.fusion = JointFusionEncoder(cfg) if unified else FusionEncoder(cfg)
        self.apply(init_weights)
        for embed in (self.video_embed, self.audio_embed):
            w = embed.proj.weight.data  # a patch embedding is a linear map of the flattened patch
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            if embed.modality_token is not None:
                trunc_normal_(embed.modality_token, std=0.02)

    @property
    def width(self) -> int:
        return self.cfg.width

    def no_weight_decay(self) -> set[str]:
        return {f"{m}_embed.modality_token" for m in ("video", "audio") if self.cfg.kind == "unified"}

    def _run(self, block: nn.Module, *xs: Tensor) -> Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *xs, use_reentrant=False)
        return block(*xs)

    def _encode(self, x: Tensor, blocks: nn.ModuleList, norm: nn.LayerNorm) -> list[Tensor]:
        layers = []
        for block in blocks:
            x = self._run(block, x)
            layers.append(norm(x))
        return layers

    def _check_inputs(self, video: Tensor, fbank: Tensor) -> None:
        c = self.cfg
        want_v = (c.num_frames, 3, c.img_size, c.img_size)
        if video.ndim != 5 or tuple(video.shape[1:]) != want_v:
            raise ValueError(f"video must be (B, {', '.join(map(str, want_v))}), got {tuple(video.shape)}")
        if fbank.ndim != 3 or tuple(fbank.shape[1:]) != (c.fbank_frames, c.mel_bins):
            raise ValueError(f"fbank must be (B, {c.fbank_frames}, {c.mel_bins}), got {tuple(fbank.shape)}")
        if not video.is_floating_point():
            raise TypeError(
                "forward_features takes normalised float video; call normalize_video on uint8 frames"
            )

    def forward_features(
        self,
        video: Tensor,
        fbank: Tensor,
        video_ids_keep: Tensor | None = None,
        audio_ids_keep: Tensor | None = None,
    ) -> EncoderOutput:
        """video: (B, T, 3, H, W) normalised float; fbank: (B, F, M); ids_keep: (B, K) token indices
        of the visible tokens (only those enter the encoders)."""
        return self.fuse(*self.encode_unimodal(video, fbank, video_ids_keep, audio_ids_keep))

    def encode_unimodal(
        self,
        video: Tensor,
        fbank: Tensor,
        video_ids_keep: Tensor | None = None,
        audio_ids_keep: Tensor | None = None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """The video and audio encoders alone: per-layer outputs `(B, N, D)` of each modality. Neither
        sees the other modality, so `fuse` can pair them with another input's layers."""
        self._check_inputs(video, fbank)
        v, a = self.video_embed(video), self.audio_embed(fbank)
        if video_ids_keep is not None:
            v = gather_tokens(v, video_ids_keep)
        if audio_ids_keep is not None:
            a = gather_tokens(a, audio_ids_keep)
        shared = self.cfg.kind == "unified"
        video_layers = self._encode(v, self.blocks if shared else self.video_blocks, self.video_norm)
        audio_layers = self._encode(a, self.blocks if shared else self.audio_blocks, self.audio_norm)
        return video_layers, audio_layers

    def fuse(self, video_layers: list[Tensor], audio_layers: list[Tensor]) -> EncoderOutput:
        """The fusion encoder on the last layers of `encode_unimodal`."""
        fused_video, fused_audio = self.fusion(video_layers[-1], audio_layers[-1], run=self._run)
        return EncoderOutput(video_layers, audio_layers, fused_video, fused_audio)

    def forward(self, video: Tensor, fbank: Tensor) -> EncoderOutput:
        return self.forward_features(video, fbank)
