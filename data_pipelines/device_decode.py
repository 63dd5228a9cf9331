"""Main-process side of decoding on the accelerator: a batch's `jpeg` dict (`jpeg_bytes.py`) ->
`video` (B, T, 3, S, S) uint8 on the device, channels-last in memory as the loader's batches are.

All frames of the batch go through one `torchvision.io.decode_jpeg(list, device=...)` call (nvjpeg's
batched decoder on CUDA); then each clip gets the crop box, flip and jitter its loader worker drew
(`VideoAugment.apply`, the code the CPU path runs), or, in evaluation, the resize + centre crop, one
call per group of clips of the same size. With `device="cpu"` this is the same code on the CPU, which
is how the tests compare it with the decoding loader pixel for pixel.

When the batch carries the shards' stored log-mels (float16, `jpeg["log_mel"]`) instead of `fbank`,
they are finished here too (`features.finish_log_mels`: gain, padding, normalisation), on `device`.

A batched decode fails as a whole. Then each clip is decoded alone to find the bad ones, which are
dropped from the batch (all its fields), logged with their key and counted in `dropped`: the worker
has already checked every JPEG's header and end marker (`jpeg_bytes.jpeg_frame_size`), so this
costs a second decode only for damage inside the compressed data, which is rare.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg

from data_pipelines.augment import ClipAugParams, VideoAugConfig, VideoAugment, eval_video_transform
from data_pipelines.features import FbankConfig, finish_log_mels
from data_pipelines.samples import stack_channels_last, stack_frames

log = logging.getLogger("emomae.data")

PER_CLIP_PARAMS = ("frame_hw", "crop", "flip", "jitter", "jitter_order")


class DeviceFrameDecoder:
    """`decoder(batch)` replaces `batch["jpeg"]` by `batch["video"]` on `device`; counts dropped clips."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.dropped: list[dict] = []  # {"key", "reason"} of every clip dropped so far
        # The last batch's host bytes, kept until the next batch: a loader worker refills a batch
        # buffer once nothing views it (batch_buffers.py), and this keeps that a whole step after
        # the device was handed the bytes, whatever the decoder still reads asynchronously.
        self.last_host_bytes: dict | None = None

    def __call__(self, batch: dict) -> dict:
        jpeg = batch.pop("jpeg")
        if "log_mel" in jpeg:  # the stored log-mels, finished here (before any clip is dropped)
            batch["fbank"] = finish_log_mels(
                jpeg["log_mel"].to(self.device),
                jpeg["log_mel_frames"].to(self.device),
                jpeg["fbank_shift"].to(self.device),
                FbankConfig(mean=jpeg["fbank_mean"], std=jpeg["fbank_std"]),
            )
        clips, failures = decode_clips(split_frames(jpeg), jpeg["num_frames"], self.device)
        if failures:
            kept = [b for b in range(len(clips)) if b not in failures]
            self.drop(batch, failures, kept)
            jpeg = {**jpeg, **{k: jpeg[k][kept] for k in PER_CLIP_PARAMS}}
            clips = [clips[b] for b in kept]
        videos = augment_clips(clips, jpeg) if jpeg["train"] else eval_clips(clips, jpeg["img_size"])
        batch["video"] = stack_channels_last(videos)
        self.last_host_bytes = jpeg
        return batch

    def drop(self, batch: dict, failures: dict[int, str], kept: list[int]) -> None:
        keys = batch["key"]
        for b, reason in sorted(failures.items()):
            log.warning(
                "dropped sample %s: its JPEG frames do not decode on %s: %s", keys[b], self.device, reason
            )
            self.dropped.append({"key": keys[b], "reason": reason})
        if len(failures) == len(keys):
            raise RuntimeError(f"no clip of the batch decodes on {self.device}: {sorted(keys)}")
        keep_rows(batch, kept)


def split_frames(jpeg: dict) -> list[Tensor]:
    """The batch's frames as CPU uint8 views of its one bytes tensor (decode_jpeg reads host memory)."""
    data, offsets = jpeg["data"], jpeg["offsets"].tolist()
    return [data[start:stop] for start, stop in zip(offsets[:-1], offsets[1:])]


def decode_clips(
    frames: list[Tensor], num_frames: int, device: torch.device
) -> tuple[list[list[Tensor]], dict[int, str]]:
    """Decode all frames at once -> (per clip its T (3, H, W) frames, {clip index: error} of clips
    that failed). Only when the batched call fails is each clip decoded alone."""
    clips = len(frames) // num_frames
    try:
        decoded = decode_jpeg(frames, mode=ImageReadMode.RGB, device=device)
        return [decoded[b * num_frames : (b + 1) * num_frames] for b in range(clips)], {}
    except RuntimeError:
        pass
    out: list[list[Tensor]] = []
    failures: dict[int, str] = {}
    for b in range(clips):
        try:
            out.append(
                decode_jpeg(
                    frames[b * num_frames : (b + 1) * num_frames], mode=ImageReadMode.RGB, device=device
                )
            )
        except RuntimeError as err:
            failures[b] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            out.append([])
    return out, failures


def augment_clips(clips: list[list[Tensor]], jpeg: dict) -> list[Tensor]:
    """Each clip's random resized crop, flip and jitter as drawn in the worker. Boxes differ per clip,
    so the resize runs per clip; nvjpeg's decode is the batched part."""
    augment = VideoAugment(VideoAugConfig(img_size=jpeg["img_size"]))
    return [augment.apply(stack_frames(frames), clip_params(jpeg, b)) for b, frames in enumerate(clips)]


def clip_params(jpeg: dict, b: int) -> ClipAugParams:
    jitter = jpeg["jitter"][b]
    drawn = (
        None
        if torch.isnan(jitter).any()
        else (tuple(jitter.tolist()), tuple(jpeg["jitter_order"][b].tolist()))
    )
    return ClipAugParams(tuple(jpeg["crop"][b].tolist()), bool(jpeg["flip"][b]), drawn)


def eval_clips(clips: list[list[Tensor]], img_size: int) -> list[Tensor]:
    """Resize + centre crop, one call for all clips of the same frame size (the batch dimension of
    the resize is independent per image, so this equals clip-by-clip)."""
    by_size: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for b, frames in enumerate(clips):
        by_size[tuple(frames[0].shape)].append(b)
    out: list[Tensor | None] = [None] * len(clips)
    for members in by_size.values():
        frames = [f for b in members for f in clips[b]]
        resized = eval_video_transform(stack_frames(frames), img_size)
        for i, b in enumerate(members):
            out[b] = resized[i * len(clips[b]) : (i + 1) * len(clips[b])]
    return out


def keep_rows(batch: dict, rows: list[int]) -> None:
    """Keep only `rows` of every per-sample field of a batch (tensors and lists of length B)."""
    size = len(batch["key"])
    index = torch.tensor(rows, dtype=torch.int64)
    for name, value in batch.items():
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == size:
            batch[name] = value[index]
        elif isinstance(value, list) and len(value) == size:
            batch[name] = [value[r] for r in rows]
