"""The fully fine-tuned model: encoder + hierarchical feature-fusion head on normalised inputs, its
forward for one modality or all three at once, and its window scores over an evaluation stream."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from finetune.distributed import all_ranks
from finetune.losses import batch_targets
from finetune.modality import drop_modality
from pretrain.encoders import normalize_video
from pretrain.pooling import pool_tokens


class FullFinetuneModel(nn.Module):
    """AVEncoder + hierarchical feature-fusion head on all tokens. `forward` takes normalised inputs."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, video: torch.Tensor, fbank: torch.Tensor, modality: str = "av") -> torch.Tensor:
        """video `(B, T, 3, H, W)` normalised float, fbank `(B, F, M)` -> `(B, num_outputs)`."""
        video, fbank = drop_modality(video, fbank, modality)
        return self.head(pool_tokens(self.encoder.forward_features(video, fbank)))

    def forward_modalities(self, video: torch.Tensor, fbank: torch.Tensor) -> dict[str, torch.Tensor]:
        """`forward` for `av`, `audio` and `video` at once, at little more than the cost of one: the
        video and audio encoders run once on the batch and once on a single blank (zeroed) input,
        and only the fusion encoder and the head run three times."""
        video_layers, audio_layers = self.encoder.encode_unimodal(video, fbank)
        blank_video, blank_audio = self.encoder.encode_unimodal(
            torch.zeros_like(video[:1]), torch.zeros_like(fbank[:1])
        )
        batch = video.shape[0]
        blank_video = [x.expand(batch, -1, -1) for x in blank_video]
        blank_audio = [x.expand(batch, -1, -1) for x in blank_audio]
        pairs = {
            "av": (video_layers, audio_layers),
            "audio": (blank_video, audio_layers),
            "video": (video_layers, blank_audio),
        }
        return {m: self.head(pool_tokens(self.encoder.fuse(v, a))) for m, (v, a) in pairs.items()}


@torch.inference_mode()
def predict(
    model: Callable[..., torch.Tensor],
    batches: Iterable[dict],
    task: str,
    modality: str,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Window-level scores of a full model over an evaluation stream: (scores, targets, clip_keys).
    On several ranks each scores its share of the stream and all get every rank's windows."""
    parts = []
    for batch in batches:
        video = normalize_video(batch["video"].to(device))
        out = model(video, batch["fbank"].to(device).float(), modality).float()
        parts.append(
            (
                (out.softmax(-1) if task == "classification" else out).cpu().numpy(),
                batch_targets(batch, task).cpu().numpy(),
                list(batch["clip_key"]),
            )
        )
    parts = all_ranks(parts)
    if not parts:
        raise RuntimeError("the evaluation stream gave no windows to score")
    return (
        np.concatenate([p[0] for p in parts]),
        np.concatenate([p[1] for p in parts]),
        [k for p in parts for k in p[2]],
    )
