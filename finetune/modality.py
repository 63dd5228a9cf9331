"""Missing modalities: zeroing the absent input of a batch (evaluation per modality, clips without
audio) and modality dropout in training.

The absent input is replaced by zeros AFTER normalisation (video: the ImageNet-mean
image; fbank: the AudioSet-mean spectrum). Encoder, fusion and head run unchanged, so one trained
model reports audio-visual, audio-only and video-only figures.
"""

from __future__ import annotations

import numpy as np
import torch

from finetune.protocols import MODALITIES


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
