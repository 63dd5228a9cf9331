"""Token-mean pooling of encoder outputs: the one place that turns `(B, N, D)` tokens into clip vectors.

Used by the contrastive loss (`pretrain.losses`), the text-alignment branches (`pretrain.text`) and the
fine-tuning heads, probes and embeddings (`finetune`). Only torch is imported, so exported models and
`pretrain.text` stay free of Lightning and timm.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def token_mean(tokens: Tensor | Sequence[Tensor]) -> Tensor:
    """Mean over the token axis: `(B, N, D)` -> `(B, D)`; a sequence of L such tensors (one per layer
    or level, N may differ) -> `(B, L, D)`."""
    if isinstance(tokens, Tensor):
        return tokens.mean(1)
    return torch.stack([x.mean(1) for x in tokens], 1)


def pool_tokens(out) -> dict[str, Tensor]:
    """EncoderOutput -> token-means: video_layers `(B, Lv, D)`, audio_layers `(B, La, D)`,
    fused_video `(B, D)`, fused_audio `(B, D)`."""
    return {
        "video_layers": token_mean(out.video_layers),
        "audio_layers": token_mean(out.audio_layers),
        "fused_video": token_mean(out.fused_video),
        "fused_audio": token_mean(out.fused_audio),
    }
