"""Heads on top of an `AVEncoder`: hierarchical feature fusion (linear probe and full fine-tuning),
attentive probe, and the training-time pieces that belong to them (AV mixup/cutmix, CCC loss,
layer-wise lr decay groups).

Hierarchical feature fusion (docs/finetune.md): per modality a softmax-weighted sum (learnable,
uniform at start) of the token-means of all encoder layers, plus the token-means of the two fusion
encoder outputs; the four `(B, D)` vectors are concatenated to `(B, 4 D)`, LayerNormed and mapped
by one linear layer. The linear probe is the same head on frozen, cached features: the layer weights
are a handful of scalars, so it stays a linear read-out of the encoder's features.
"""

from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F
from timm.data.mixup import cutmix_bbox_and_lam, mixup_target
from timm.layers import trunc_normal_
from torch import nn

from finetune.metrics import ccc
from finetune.protocols import MODALITIES
from pretrain.layers import LN_EPS
from pretrain.pooling import pool_tokens  # noqa: F401  (the heads' input; imported from here too)

# what a probe caches per sample: token-means of every layer and of the fusion outputs
POOLED_KEYS = ("video_layers", "audio_layers", "fused_video", "fused_audio")
# what the attentive probe caches per sample: the fusion encoder's tokens
TOKEN_KEYS = ("fused_video", "fused_audio")


def fusion_tokens(out) -> dict[str, torch.Tensor]:
    """EncoderOutput -> the attentive probe's inputs: fused_video `(B, Nv, D)`, fused_audio `(B, Na, D)`."""
    return {"fused_video": out.fused_video, "fused_audio": out.fused_audio}


class FeatureStandardizer(nn.Module):
    """Per-dimension z-scoring `(x - mean) / std` with statistics of the training split, kept as buffers
    so validation, test and a saved head use the same ones (MAE's linear probe: BatchNorm without
    affine). Identity until `fit` is called. Input `(B, *shape)`."""

    def __init__(self, shape: tuple[int, ...], eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("std", torch.ones(shape))

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> None:
        """Statistics of `x` `(N, *shape)`; a dimension constant in training is centred but not scaled,
        so it cannot blow up on unseen data."""
        x = x.float()
        std = x.std(0) if x.shape[0] > 1 else torch.ones_like(x[0])
        self.mean.copy_(x.mean(0))
        self.std.copy_(torch.where(std > self.eps, std, torch.ones_like(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


class FeatureFusionHead(nn.Module):
    """Hierarchical feature fusion + LayerNorm + linear. Input: `pool_tokens` dict -> `(B, num_outputs)`.

    The inputs first pass per-key `FeatureStandardizer`s (per layer and dimension). They stay the
    identity for full fine-tuning, where the features move; the linear probe fits them on the training
    split's frozen features (`fit_standardizer`), which a plain logistic regression needs as much: raw
    token-means differ in scale by orders of magnitude across dimensions and layers.
    """

    def __init__(
        self, dim: int, num_video_layers: int, num_audio_layers: int, num_outputs: int, dropout: float = 0.0
    ):
        super().__init__()
        self.standardize = nn.ModuleDict(
            {
                "video_layers": FeatureStandardizer((num_video_layers, dim)),
                "audio_layers": FeatureStandardizer((num_audio_layers, dim)),
                "fused_video": FeatureStandardizer((dim,)),
                "fused_audio": FeatureStandardizer((dim,)),
            }
        )
        # zeros -> softmax gives the uniform start of the reference
        self.video_layer_weights = nn.Parameter(torch.zeros(num_video_layers))
        self.audio_layer_weights = nn.Parameter(torch.zeros(num_audio_layers))
        self.norm = nn.LayerNorm(4 * dim, eps=LN_EPS)  # HiCMAE's fc_norm
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(4 * dim, num_outputs)
        trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def fit_standardizer(self, pooled: dict[str, torch.Tensor]) -> None:
        """Fit the input standardisation on the training split's `pool_tokens` features `(N, ...)`."""
        for key, standardizer in self.standardize.items():
            standardizer.fit(pooled[key])

    def feature_fusion(self, pooled: dict[str, torch.Tensor]) -> torch.Tensor:
        """`(B, 4 D)`: [weighted video layers, weighted audio layers, fused video, fused audio]."""
        pooled = {key: standardizer(pooled[key]) for key, standardizer in self.standardize.items()}
        wv = self.video_layer_weights.softmax(0)
        wa = self.audio_layer_weights.softmax(0)
        video = torch.einsum("bld,l->bd", pooled["video_layers"], wv)
        audio = torch.einsum("bld,l->bd", pooled["audio_layers"], wa)
        return torch.cat([video, audio, pooled["fused_video"], pooled["fused_audio"]], dim=-1)

    def forward_features(self, pooled: dict[str, torch.Tensor]) -> torch.Tensor:
        """`(B, 4 D)`: the normalised fused feature the linear layer reads (HiCMAE's `save_feature`)."""
        return self.norm(self.feature_fusion(pooled))

    def forward(self, pooled: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.fc(self.dropout(self.forward_features(pooled)))


class AttentiveProbe(nn.Module):
    """Cross-attention pooling: one learned query attends over the fusion tokens of both modalities
    (each tagged by a learned modality embedding), then LayerNorm + linear.
    Input: `fusion_tokens` dict -> `(B, num_outputs)`."""

    def __init__(self, dim: int, num_outputs: int, num_heads: int = 4, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            num_heads = 1  # tiny test widths; attention still pools over all tokens
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.modality = nn.Parameter(torch.zeros(2, dim))
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, num_outputs)
        trunc_normal_(self.query, std=0.02)
        trunc_normal_(self.modality, std=0.02)
        trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def forward(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        video = tokens["fused_video"].float() + self.modality[0]
        audio = tokens["fused_audio"].float() + self.modality[1]
        kv = self.norm_kv(torch.cat([video, audio], dim=1))
        pooled, _ = self.attn(self.query.expand(kv.shape[0], -1, -1), kv, kv, need_weights=False)
        return self.fc(self.dropout(self.norm(pooled[:, 0])))


# --- training-time pieces -------------------------------------------------------------------------


class AVMixup:
    """Mixup / cutmix applied to video AND audio with the same lambda and the same pairing.

    Mixup blends both inputs with lambda. Cutmix pastes one box (the same for every frame) into the
    video and a time span into the fbank, both covering the same fraction 1 - lambda of their input,
    so the mixed target's lambda is true for both modalities. Targets become soft (with label
    smoothing) for classification and are blended for regression.
    """

    def __init__(
        self,
        mixup: float,
        cutmix: float,
        prob: float,
        switch_prob: float,
        smoothing: float,
        num_classes: int | None,
    ):
        self.mixup, self.cutmix, self.prob, self.switch_prob = mixup, cutmix, prob, switch_prob
        self.smoothing, self.num_classes = smoothing, num_classes

    @property
    def active(self) -> bool:
        return self.prob > 0 and (self.mixup > 0 or self.cutmix > 0)

    def __call__(
        self, video: torch.Tensor, fbank: torch.Tensor, target: torch.Tensor, generator: np.random.Generator
    ):
        """video `(B, T, C, H, W)` float, fbank `(B, F, M)`, target `(B,)` int or `(B, K)` float ->
        mixed video, fbank and target (`(B, num_classes)` soft labels or `(B, K)`)."""
        lam, use_cutmix = 1.0, False
        if self.active and generator.random() < self.prob:
            use_cutmix = self.cutmix > 0 and (self.mixup <= 0 or generator.random() < self.switch_prob)
            alpha = self.cutmix if use_cutmix else self.mixup
            lam = float(generator.beta(alpha, alpha))
        perm = torch.from_numpy(generator.permutation(video.shape[0])).to(video.device)
        if lam < 1.0:
            video, fbank = video.clone(), fbank.clone()
            if use_cutmix:
                (y0, y1, x0, x1), lam = cutmix_bbox_and_lam(video.shape[-2:], lam, correct_lam=True)
                video[..., y0:y1, x0:x1] = video[perm][..., y0:y1, x0:x1]
                span = round((1 - lam) * fbank.shape[1])
                start = int(generator.integers(0, fbank.shape[1] - span + 1))
                fbank[:, start : start + span] = fbank[perm][:, start : start + span]
            else:
                video = video * lam + video[perm] * (1 - lam)
                fbank = fbank * lam + fbank[perm] * (1 - lam)
        return video, fbank, self.mix_target(target, perm, lam)

    def mix_target(self, target: torch.Tensor, perm: torch.Tensor, lam: float) -> torch.Tensor:
        if self.num_classes is None:  # regression
            return target * lam + target[perm] * (1 - lam)
        # timm's mixup_target pairs with the flipped batch; build ours from the same smoothing rule
        soft = mixup_target(target, self.num_classes, lam=1.0, smoothing=self.smoothing)
        return soft * lam + soft[perm] * (1 - lam)


def zero_rows(x: torch.Tensor, keep: np.ndarray) -> torch.Tensor:
    """`x` `(B, ...)` with the rows where `keep` `(B,)` (or `(1,)`: every row) is False replaced by zeros."""
    if keep.all():
        return x
    if not keep.any():
        return torch.zeros_like(x)
    rows = torch.from_numpy(keep).to(x.device).view(-1, *[1] * (x.ndim - 1))
    return torch.where(rows, x, torch.zeros_like(x))


def drop_modality(video: torch.Tensor, fbank: torch.Tensor, modality) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the normalised input of the missing modality: `av` keeps both, `audio` drops the video,
    `video` drops the audio. `modality`: one of them for the whole batch, or a sequence of them, one
    per sample."""
    modes = np.asarray([modality] if isinstance(modality, str) else modality, dtype=object)
    unknown = set(modes.tolist()) - set(MODALITIES)
    if unknown:
        got = modality if isinstance(modality, str) else sorted(unknown)
        raise ValueError(f"modality must be av, audio or video, got {got!r}")
    return zero_rows(video, modes != "audio"), zero_rows(fbank, modes != "video")


def drop_modality_per_sample(
    video: torch.Tensor, fbank: torch.Tensor, prob: float, generator: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Modality dropout: each sample loses one of its two normalised inputs (zeroed, as at a
    missing-modality evaluation) with probability `prob`, audio or video equally likely. A model
    trained this way has seen both single-modality inputs, so its audio-only and video-only figures
    measure what each modality carries rather than how badly an unseen all-zero input throws it off."""
    if prob <= 0:
        return video, fbank
    batch = video.shape[0]
    dropped = generator.random(batch) < prob
    drop_video = dropped & (generator.random(batch) < 0.5)
    return drop_modality(video, fbank, np.where(dropped, np.where(drop_video, "audio", "video"), "av"))


def soft_cross_entropy(logits: torch.Tensor, soft_target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft targets `(B, C)` (mixup + label smoothing)."""
    return torch.sum(-soft_target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def ccc_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - mean CCC over the regression dimensions; pred, target `(B, K)`."""
    return 1.0 - ccc(pred.float(), target.float()).mean()


# --- layer-wise lr decay -------------------------------------------------------------------------

_BLOCK = re.compile(r"(?:^|[._])blocks\.(\d+)\.")


def encoder_layer_id(name: str, depth: int, fusion_depth: int) -> int:
    """Rank of an encoder parameter in the layer-wise lr decay (docs/finetune.md): patch and position
    embeddings 0, encoder block k (0-based, video and audio alike) k + 1, fusion layer j depth + 1 + j,
    everything after (final norms) depth + fusion_depth + 1 = the top, lr x 1.0."""
    top = depth + fusion_depth + 1
    match = _BLOCK.search(name)
    if "fusion" in name:
        return depth + 1 + int(match.group(1)) if match else top
    if match:
        return int(match.group(1)) + 1
    if "_embed." in name:  # video_embed / audio_embed: patch projections and modality tokens
        return 0
    return top


def layer_decay_param_groups(
    encoder: nn.Module,
    head: nn.Module,
    depth: int,
    fusion_depth: int,
    layer_decay: float,
    weight_decay: float,
    no_weight_decay: set[str] = frozenset(),
) -> list[dict]:
    """AdamW groups with `lr_scale = layer_decay ** (top - layer_id)`; no weight decay on 1-D
    parameters, biases and the names in `no_weight_decay`. The head sits at the top (scale 1) in
    groups of its own, marked `head=True`."""
    top = depth + fusion_depth + 1
    groups: dict[tuple[int, bool, bool], dict] = {}

    def add(name: str, param: nn.Parameter, layer: int, is_head: bool = False) -> None:
        decay = (
            param.ndim > 1
            and not name.endswith(".bias")
            and name.split(".")[-1] not in no_weight_decay
            and name not in no_weight_decay
        )
        group = groups.setdefault(
            (layer, is_head, decay),
            {
                "params": [],
                "names": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": layer_decay ** (top - layer),
                "layer_id": layer,
                "head": is_head,
            },
        )
        group["params"].append(param)
        group["names"].append(name)

    for name, p in encoder.named_parameters():
        if p.requires_grad:
            add(name, p, encoder_layer_id(name, depth, fusion_depth))
    for name, p in head.named_parameters():
        if p.requires_grad:
            add("head." + name, p, top, is_head=True)
    return [groups[k] for k in sorted(groups)]
