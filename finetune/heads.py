"""Heads on top of an `AVEncoder`: hierarchical feature fusion (linear probe and full fine-tuning) and
the attentive probe, with the per-sample inputs each reads.

Hierarchical feature fusion (docs/finetune.md): per modality a softmax-weighted sum (learnable,
uniform at start) of the token-means of all encoder layers, plus the token-means of the two fusion
encoder outputs; the four `(B, D)` vectors are concatenated to `(B, 4 D)`, LayerNormed and mapped
by one linear layer. The linear probe is the same head on frozen, cached features: the layer weights
are a handful of scalars, so it stays a linear read-out of the encoder's features.
"""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from torch import nn

from pretrain.layers import LN_EPS

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
