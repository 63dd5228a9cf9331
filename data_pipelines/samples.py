"""One raw WebDataset sample (member bytes) -> tensors, and samples -> the batch dict.

Frames: a sample's JPEG members decode into one channels-last (T, H, W, 3) array (`frame_decode.py`;
inside the streams one array reused from clip to clip); `BatchBuilder` copies or augments them
straight into the batch tensor as each sample arrives, so an eval clip that needs no resize is copied once. Audio: the shard's precomputed log-mel (`fbank.npy`) when its
parameters match the loader's, else `wav`/`flac` -> Kaldi fbank (`features.py`); the worker logs
which path it takes. Training adds the clip augmentation of `augment.py`, all seeded per sample. Any
failure raises; `stream.decode_samples` counts and skips.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
import wave
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf
import torch
import torchaudio
from torch import Tensor
from torch.utils.data import get_worker_info

from data_pipelines.augment import ClipAugParams, VideoAugment, eval_video_transform
from data_pipelines.batch_buffers import BatchBufferPool, BufferLease, shared_bytes
from data_pipelines.corrupt import CorruptSampleError
from data_pipelines.features import (
    SpecAugment,
    decode_log_mel,
    fast_fbank,
    fbank_params,
    num_fbank_frames,
    precomputed_fbank,
)
from data_pipelines.frame_decode import ClipFrameDecoder

if TYPE_CHECKING:
    from data_pipelines.stream import StreamConfig

log = logging.getLogger("emomae.data")

FRAME_MEMBER = re.compile(r"^f(\d+)\.jpg$")
FBANK_MEMBER = "fbank.npy"


@dataclass(frozen=True)
class PendingAugment:
    """A training clip's decoded frames and drawn augmentation; `BatchBuilder` writes the augmented
    clip straight into its batch slot (`VideoAugment.apply_into`), and `tensor()` gives it alone."""

    frames: Tensor  # (T, 3, H, W), a view of channels-last memory
    params: ClipAugParams
    augment: VideoAugment

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(T, 3, S, S) of the augmented clip."""
        size = self.augment.cfg.img_size
        return len(self.frames), self.frames.shape[1], size, size

    def write_into(self, out: Tensor) -> None:
        """Into `out`, (T, S, S, 3) uint8."""
        self.augment.apply_into(self.frames, self.params, out)

    def tensor(self) -> Tensor:
        """(T, 3, S, S) uint8, a view of channels-last memory."""
        frames, channels, height, width = self.shape
        out = torch.empty(frames, height, width, channels, dtype=torch.uint8)
        self.write_into(out)
        return out.permute(0, 3, 1, 2)


class SampleDecoder:
    """Raw member bytes -> `{video, fbank (F,M) float32, audio_present, label, target, key, clip_key,
    caption}`; a sample whose json says `"audio_missing": true` has `audio_present` False and a zero fbank.

    `video` is (T, 3, S, S) uint8, a view of channels-last memory, or in training a `PendingAugment`:
    `BatchBuilder` copies or augments each into the batch. With `reuse_frame_buffer` the decoded
    frames live in one array reused by the next call (`frame_decode.ClipFrameDecoder`): the streams
    batch each sample before decoding the next, which is what makes that safe.
    """

    def __init__(self, cfg: StreamConfig, train: bool, reuse_frame_buffer: bool = False) -> None:
        self.cfg, self.train = cfg, train
        self.frame_decoder = ClipFrameDecoder(reuse_frame_buffer)
        self.augment = VideoAugment(cfg.video_aug) if train else None
        spec_augment = SpecAugment(cfg.fbank.freq_mask, cfg.fbank.time_mask)
        self.spec_augment = spec_augment if train and spec_augment.active else None
        self.frame_names = [f"f{t:02d}.jpg" for t in range(cfg.num_frames)]
        self.fbank_params = fbank_params(cfg.fbank.sample_rate, cfg.fbank.mel_bins)
        self.audio_paths_logged: set[str] = set()

    def __call__(self, raw: dict, seed: int = 0) -> dict:
        meta = raw.get("__meta__") or json.loads(raw["json"])
        generator = torch.Generator().manual_seed(seed) if self.train else None
        frames = self.decode_frames(raw)
        gain_db = 0.0
        if self.train:  # the pixels are augmented straight into the batch (`BatchBuilder.add`)
            params = self.augment.sample_params(*frames.shape[-2:], generator)
            video = PendingAugment(frames, params, self.augment)
            if self.cfg.audio_gain_db > 0:
                gain_db = (2 * torch.rand(1, generator=generator).item() - 1) * self.cfg.audio_gain_db
        else:  # a no-op at the shard's size: then the batch copies the decoded frames
            video = eval_video_transform(frames, self.cfg.img_size)
        audio_present = has_audio(meta)
        fbank = self.audio_features(raw, meta, gain_db, seed) if audio_present else self.blank_fbank()
        return {"video": video, "fbank": fbank, "audio_present": audio_present, **self.clip_fields(raw, meta)}

    @staticmethod
    def clip_fields(raw: dict, meta: dict) -> dict:
        """What a decoded sample carries besides its pictures and sound: label, target, keys, caption
        and stream position."""
        label, target = parse_label(meta.get("label"))
        return {
            "label": label,
            "target": target,
            "key": raw["__key__"],
            "clip_key": str(meta.get("clip_key", raw["__key__"])),
            "caption": raw["txt"].decode("utf-8") if "txt" in raw else "",
            "__pos__": raw.get("__pos__", 0),
        }

    def blank_fbank(self) -> Tensor:
        """The fbank of a clip without audio: zeros of the normalised input, the blank that
        missing-modality evaluation feeds (finetune/modality.py `drop_modality`), not the log-mel
        floor that the zero waveform in the shard would give."""
        return torch.zeros(self.cfg.fbank.fbank_frames, self.cfg.fbank.mel_bins)

    def decode_frames(self, raw: dict) -> Tensor:
        """All `num_frames` JPEG members -> (T, 3, H, W) uint8, a view of (T, H, W, 3) memory: how
        JPEGs decode, what the batch is made of and what the uint8 resize is fast on."""
        try:
            data = [raw[name] for name in self.frame_names]
        except KeyError:
            frames = sorted(k for k in raw if FRAME_MEMBER.match(k))
            missing = sorted(set(self.frame_names) - set(frames))
            raise CorruptSampleError(
                f"wrong frame count: has {len(frames)} frame members, expected {self.cfg.num_frames}"
                + (f" (missing {missing[:3]})" if missing else "")
            ) from None
        extra = sum(1 for k in raw if k[0] == "f" and k.endswith(".jpg")) - len(self.frame_names)
        if extra:
            raise CorruptSampleError(
                f"wrong frame count: has {len(self.frame_names) + extra} frame members, expected {self.cfg.num_frames}"
            )
        return self.frame_decoder(data)

    def audio_features(self, raw: dict, meta: dict, gain_db: float = 0.0, seed: int = 0) -> Tensor:
        """(fbank_frames, mel_bins) normalised fbank: from `fbank.npy` when the shard stored one with
        this loader's parameters, else computed from the audio member."""
        cfg = self.cfg.fbank
        log_mel = self.stored_log_mel(raw, meta)
        if log_mel is not None:
            return precomputed_fbank(log_mel, cfg, gain_db, self.spec_augment, seed)
        real = real_samples(meta)  # the fbank covers the real audio only and is zero-padded after (HiCMAE)
        if FBANK_MEMBER not in raw:
            self.log_audio_path(
                "wav", f"computing it from the audio member: the shards have no {FBANK_MEMBER}"
            )
        else:
            self.log_audio_path(
                "mismatch",
                f"computing it from the audio member: the shards' {FBANK_MEMBER} "
                f"was made with {meta.get('fbank')}, this loader needs {self.fbank_params}",
            )
        waveform = self.decode_audio(raw)
        if real is not None:  # in the loader's sample rate
            waveform = waveform[: round(len(waveform) * real / int(meta["audio_samples"]))]
        if gain_db:
            waveform = waveform * 10 ** (gain_db / 20)
        return fast_fbank(waveform, cfg, self.spec_augment, seed)

    def stored_log_mel(self, raw: dict, meta: dict) -> Tensor | None:
        """The shard's `fbank.npy` (F, M) float16 over the real audio, when it was made with this
        loader's parameters; None when the fbank must be computed from the audio member."""
        cfg = self.cfg.fbank
        if FBANK_MEMBER not in raw or meta.get("fbank") != self.fbank_params:
            return None
        try:
            log_mel = decode_log_mel(raw[FBANK_MEMBER], cfg.mel_bins)
        except ValueError as err:
            raise CorruptSampleError(f"bad {FBANK_MEMBER} member: {err}") from None
        expected = num_fbank_frames(int(meta.get("audio_samples", -1)), cfg.sample_rate)
        if "audio_samples" in meta and log_mel.shape[0] != expected:
            raise CorruptSampleError(
                f"{FBANK_MEMBER} has {log_mel.shape[0]} frames, expected {expected} "
                f"for {meta['audio_samples']} audio samples"
            )
        self.log_audio_path("precomputed", f"{FBANK_MEMBER} from the shards ({self.fbank_params})")
        real = real_samples(meta)  # the fbank covers the real audio only and is zero-padded after (HiCMAE)
        return log_mel if real is None else log_mel[: num_fbank_frames(real, cfg.sample_rate)]

    def log_audio_path(self, path: str, message: str) -> None:
        if path not in self.audio_paths_logged:
            self.audio_paths_logged.add(path)
            info = get_worker_info()
            log.info(
                "audio features (%s, worker %d): %s",
                "train" if self.train else "eval",
                0 if info is None else info.id,
                message,
            )

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


def has_audio(meta: dict) -> bool:
    """False for a window of a clip without audio (`emomae shards --allow-missing-audio` writes
    `"audio_missing": true` and a zero waveform); samples without the key have audio."""
    return not bool(meta.get("audio_missing", False))


def real_samples(meta: dict) -> int | None:
    """Samples of real audio in a window whose track ended early, or None when nothing was padded.

    decode.py zero-pads a short window's waveform to the full span; HiCMAE takes the fbank of the real
    audio and zero-pads the *fbank*. Kaldi frames over digital silence sit at the log floor (-15.9,
    -1.28 normalised) while fbank padding reads 0 (+0.47 normalised), so the loader drops the padding
    before the fbank (tests/data_pipelines/test_hicmae_inputs.py)."""
    padded, total = int(meta.get("audio_padded") or 0), int(meta.get("audio_samples") or 0)
    return total - padded if 0 < padded <= total else None


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
        return (
            (int(parts[0]), None)
            if len(parts) == 1 and parts[0].lstrip("-").isdigit()
            else (-1, [float(v) for v in parts])
        )
    raise CorruptSampleError(f"label must be an int, a list of floats or null, got {label!r}")


def stack_frames(frames: list[Tensor]) -> Tensor:
    """T x (C, H, W) channels-last frames -> (T, C, H, W), a view of (T, H, W, C) memory."""
    return torch.stack([f.permute(1, 2, 0) for f in frames]).permute(0, 3, 1, 2)


def stack_channels_last(videos: list[Tensor]) -> Tensor:
    """(T, C, H, W) clips -> (B, T, C, H, W), a view of (B, T, H, W, C) memory (one plain copy when
    the clips are channels-last already, as decoded ones are)."""
    return torch.stack([v.permute(0, 2, 3, 1) for v in videos]).permute(0, 1, 4, 2, 3)


def batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """An uninitialised batch tensor; in a DataLoader worker it lives in shared memory already, as
    `default_collate` does it, so sending the batch to the main process copies nothing."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    return shared_bytes(math.prod(shape) * dtype.itemsize).view(dtype).view(shape)


def tensors_in_one_buffer(
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
    pool: BatchBufferPool | None = None,
    shared: bool = True,
) -> tuple[dict[str, Tensor], BufferLease | None]:
    """`{name: (shape, dtype)}` -> tensors that are views of one buffer (shared memory in a loader
    worker, `batch_tensor`, unless not `shared`: small fields that leave the worker by value): a batch
    then sends one segment instead of one per tensor, and each segment costs the worker ~0.15 ms to
    share and send (benchmarks/bench_loader.py). From `pool`, the buffer comes with the lease the
    batch must carry (`batch_buffers.py`)."""
    starts, end = {}, 0
    for name, (shape, dtype) in specs.items():
        end = -(-end // 8) * 8  # 8-byte aligned, so any dtype can view its slice
        starts[name] = end
        end += math.prod(shape) * dtype.itemsize
    if pool is not None:
        buffer, lease = pool.take(end)
    else:
        buffer, lease = (batch_tensor if shared else torch.empty)((end,), dtype=torch.uint8), None
    return {
        name: buffer[starts[name] : starts[name] + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
        for name, (shape, dtype) in specs.items()
    }, lease


def row_field_specs(rows: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The per-sample scalars every batch carries, for `tensors_in_one_buffer`."""
    return {
        "label": ((rows,), torch.int64),
        "has_caption": ((rows,), torch.bool),
        "audio_present": ((rows,), torch.bool),
    }


class BatchBuilder:
    """Fills one batch as samples arrive: each clip's frames are copied into the preallocated
    (B, T, H, W, 3) batch tensor as soon as it is decoded and then dropped, so a worker holds one
    clip's frames at a time rather than a batch of them (less memory traffic, fewer page faults).
    Video and fbank are views of one buffer, the per-sample scalars of another (`tensors_in_one_buffer`);
    with a `pool` the first is a reused one, and in a loader worker the batch carries its lease."""

    def __init__(self, batch_size: int, pool: BatchBufferPool | None = None) -> None:
        self.batch_size, self.pool = batch_size, pool
        self.lease: BufferLease | None = None
        self.video: Tensor | None = None
        self.fbank: Tensor | None = None
        self.rows: list[dict] = []

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def full(self) -> bool:
        return len(self.rows) == self.batch_size

    def add(self, sample: dict) -> None:
        clip, b = sample.pop("video"), len(self.rows)
        if self.video is None:
            frames, channels, height, width = clip.shape
            shared, self.lease = tensors_in_one_buffer(
                {
                    "video": ((self.batch_size, frames, height, width, channels), torch.uint8),
                    "fbank": ((self.batch_size, *sample["fbank"].shape), torch.float32),
                },
                self.pool,
            )
            self.video, self.fbank = shared["video"], shared["fbank"]
        if isinstance(clip, PendingAugment):
            clip.write_into(self.video[b])
        else:
            self.video[b].copy_(clip.permute(0, 2, 3, 1))
        self.fbank[b].copy_(sample.pop("fbank"))
        self.rows.append(sample)

    def build(self) -> dict:
        """The batch dict of docs/architecture.md (`target` only when some sample has one; rows
        without a target are NaN); `video` is the (B, T, 3, H, W) view of channels-last memory."""
        n = len(self.rows)
        return {
            "video": self.video[:n].permute(0, 1, 4, 2, 3),
            "fbank": self.fbank[:n],
            **self.row_fields(),
            **({"__lease__": self.lease} if self.lease is not None else {}),
        }

    def row_fields(self) -> dict:
        """Everything per sample but video and fbank. Its tensors share a buffer of their own, not the
        video's: code that keeps labels across batches must not keep every batch's frames alive.
        They are small, so they leave a loader worker by value (`batch_buffers.wire_batch`)."""
        rows = self.rows
        out, _ = tensors_in_one_buffer(row_field_specs(len(rows)), shared=False)  # small: sent by value
        out["label"].copy_(torch.tensor([s["label"] for s in rows], dtype=torch.int64))
        out["has_caption"].copy_(torch.tensor([bool(s["caption"]) for s in rows], dtype=torch.bool))
        out["audio_present"].copy_(torch.tensor([s["audio_present"] for s in rows], dtype=torch.bool))
        batch = {
            "label": out["label"],
            "key": [s["key"] for s in rows],
            "clip_key": [s["clip_key"] for s in rows],
            "caption": [s["caption"] for s in rows],
            "has_caption": out["has_caption"],
            "audio_present": out["audio_present"],
            "__last_pos__": rows[-1]["__pos__"],
        }
        targets = [s["target"] for s in rows]
        if any(t is not None for t in targets):
            width = max(len(t) for t in targets if t is not None)
            batch["target"] = torch.tensor(
                [t if t is not None and len(t) == width else [float("nan")] * width for t in targets],
                dtype=torch.float32,
            )
        return batch


def collate(samples: list[dict]) -> dict:
    """Decoded samples -> the batch dict (see `BatchBuilder`)."""
    builder = BatchBuilder(len(samples))
    for sample in samples:
        builder.add(dict(sample))
    return builder.build()
