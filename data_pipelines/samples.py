"""One raw WebDataset sample (member bytes) -> tensors, and samples -> the batch dict.

Frames: all JPEG members of a sample go through one `decode_jpeg` call and stay channels-last in
memory (see `decode_video`). Audio: `wav` or `flac` via soundfile (torchaudio's file I/O is gone),
resampled if needed, then the Kaldi fbank of `features.py`. Training adds the clip augmentation of
`augment.py`, all seeded per sample. Any failure raises; `stream.decode_samples` counts and skips.
"""

from __future__ import annotations

import io
import json
import re
import wave
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf
import torch
import torchaudio
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg

from data_pipelines.augment import VideoAugment, eval_video_transform
from data_pipelines.features import SpecAugment, fast_fbank

if TYPE_CHECKING:
    from data_pipelines.stream import StreamConfig

FRAME_MEMBER = re.compile(r"^f(\d+)\.jpg$")


class CorruptSampleError(ValueError):
    """A sample that cannot be used; the message is the reason that goes to the corrupt log."""


class SampleDecoder:
    """Raw member bytes -> `{video (T,3,S,S) uint8, fbank (F,M) float32, label, target, key, ...}`."""

    def __init__(self, cfg: StreamConfig, train: bool) -> None:
        self.cfg, self.train = cfg, train
        self.augment = VideoAugment(cfg.video_aug) if train else None
        spec_augment = SpecAugment(cfg.fbank.freq_mask, cfg.fbank.time_mask)
        self.spec_augment = spec_augment if train and spec_augment.active else None
        self.frame_names = [f"f{t:02d}.jpg" for t in range(cfg.num_frames)]

    def __call__(self, raw: dict, seed: int = 0) -> dict:
        meta = raw.get("__meta__") or json.loads(raw["json"])
        generator = torch.Generator().manual_seed(seed) if self.train else None
        video = self.decode_video(raw)
        waveform = self.decode_audio(raw)
        if self.train:
            video = self.augment(video, generator)
            if self.cfg.audio_gain_db > 0:
                gain_db = (2 * torch.rand(1, generator=generator).item() - 1) * self.cfg.audio_gain_db
                waveform = waveform * 10 ** (gain_db / 20)
        else:
            video = eval_video_transform(video, self.cfg.img_size)
        fbank = fast_fbank(waveform, self.cfg.fbank, self.spec_augment, seed)
        label, target = parse_label(meta.get("label"))
        caption = raw["txt"].decode("utf-8") if "txt" in raw else ""
        return {"video": video, "fbank": fbank, "label": label, "target": target, "key": raw["__key__"],
                "clip_key": str(meta.get("clip_key", raw["__key__"])), "caption": caption,
                "__pos__": raw.get("__pos__", 0)}

    def decode_video(self, raw: dict) -> Tensor:
        """All `num_frames` JPEG members, decoded in one call -> (T, 3, H, W) uint8.

        decode_jpeg returns (3, H, W) views of interleaved (H, W, 3) pixels; stacking those memories
        as they are is a plain copy, so the clip stays channels-last in memory (a permuted view).
        Making it channels-first here would cost a strided copy per clip that the GPU does for free.
        """
        frames = sorted(k for k in raw if FRAME_MEMBER.match(k))
        if frames != self.frame_names:
            missing = sorted(set(self.frame_names) - set(frames))
            raise CorruptSampleError(
                f"wrong frame count: has {len(frames)} frame members, expected {self.cfg.num_frames}"
                + (f" (missing {missing[:3]})" if missing else "")
            )
        data = [torch.frombuffer(bytearray(raw[name]), dtype=torch.uint8) for name in frames]
        decoded = decode_jpeg(data, mode=ImageReadMode.RGB)
        if len({tuple(f.shape) for f in decoded}) != 1:
            raise CorruptSampleError(f"frames differ in size: {sorted({tuple(f.shape) for f in decoded})}")
        return torch.stack([f.permute(1, 2, 0) for f in decoded]).permute(0, 3, 1, 2)

    def decode_audio(self, raw: dict) -> Tensor:
        """`wav` or `flac` member -> (N,) float32 mono at the fbank sample rate."""
        member = "wav" if "wav" in raw else "flac" if "flac" in raw else None
        if member is None:
            raise CorruptSampleError("missing audio member (wav or flac)")
        audio, rate = read_pcm16_wav(raw[member]) if member == "wav" else (None, 0)
        if audio is None:
            audio, rate = sf.read(io.BytesIO(raw[member]), dtype="float32", always_2d=True)
        if audio.shape[0] == 0:
            raise CorruptSampleError(f"empty {member} member")
        waveform = torch.from_numpy(audio[:, 0] if audio.shape[1] == 1 else audio.mean(axis=1))
        if rate != self.cfg.fbank.sample_rate:
            waveform = torchaudio.functional.resample(waveform, rate, self.cfg.fbank.sample_rate)
        return waveform


def read_pcm16_wav(data: bytes) -> tuple[np.ndarray | None, int]:
    """16-bit PCM wav (what the shard writer stores) -> ((N, C) float32 in [-1, 1], rate), or
    (None, 0) for any other wav flavour, which soundfile then reads. `wave` parses the header in
    a few microseconds; opening the bytes with soundfile costs more than the fbank's FFT."""
    try:
        with wave.open(io.BytesIO(data)) as wav:
            if wav.getsampwidth() != 2:
                return None, 0
            pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").reshape(-1, wav.getnchannels())
            return pcm.astype(np.float32) / 32768.0, wav.getframerate()
    except (wave.Error, EOFError):
        return None, 0


def parse_label(label: object) -> tuple[int, list[float] | None]:
    """JSON label -> (class index or -1, regression target or None)."""
    if label is None or label == "":
        return -1, None
    if isinstance(label, bool):
        raise CorruptSampleError(f"label must be an int, a list of floats or null, got {label!r}")
    if isinstance(label, int):
        return label, None
    if isinstance(label, float) and label.is_integer():
        return int(label), None
    if isinstance(label, (list, tuple)):
        return -1, [float(v) for v in label]
    if isinstance(label, str):
        parts = label.split()
        return (int(parts[0]), None) if len(parts) == 1 and parts[0].lstrip("-").isdigit() else (-1, [float(v) for v in parts])
    raise CorruptSampleError(f"label must be an int, a list of floats or null, got {label!r}")


def stack_channels_last(videos: list[Tensor]) -> Tensor:
    """(T, C, H, W) clips -> (B, T, C, H, W), a view of (B, T, H, W, C) memory (one plain copy when
    the clips are channels-last already, as decoded ones are)."""
    return torch.stack([v.permute(0, 2, 3, 1) for v in videos]).permute(0, 1, 4, 2, 3)


def collate(samples: list[dict]) -> dict:
    """Samples -> the batch dict of docs/architecture.md (`target` only when some sample has one;
    rows without a target are NaN)."""
    batch = {
        "video": stack_channels_last([s["video"] for s in samples]),
        "fbank": torch.stack([s["fbank"] for s in samples]),
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
        "key": [s["key"] for s in samples],
        "clip_key": [s["clip_key"] for s in samples],
        "caption": [s["caption"] for s in samples],
        "has_caption": torch.tensor([bool(s["caption"]) for s in samples], dtype=torch.bool),
        "__last_pos__": samples[-1]["__pos__"],
    }
    targets = [s["target"] for s in samples]
    if any(t is not None for t in targets):
        width = max(len(t) for t in targets if t is not None)
        rows = [t if t is not None and len(t) == width else [float("nan")] * width for t in targets]
        batch["target"] = torch.tensor(rows, dtype=torch.float32)
    return batch
