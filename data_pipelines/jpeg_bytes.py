"""Loader-worker side of decoding on the accelerator: samples -> batches of undecoded JPEG bytes.

With `StreamConfig.jpeg_bytes` a worker reads the tar members, checks each frame's JPEG header,
draws the clip's augmentation from the same per-sample seeded generator as the decoding path (crop
box from the frame size in the header, then flip, jitter, audio gain: the same draws in the same
order) and builds the fbank as before. The batch carries, instead of `video`, a `jpeg` dict:

- `data`: every frame's bytes concatenated, uint8 (shared memory in a worker, like `BatchBuilder`);
- `offsets`: int64 `(B * T + 1,)`, frame `b * T + t` is `data[offsets[i]:offsets[i + 1]]`;
- `frame_hw`: int64 `(B, 2)` source frame size; `crop`: int64 `(B, 4)` `(top, left, h, w)`;
- `flip`: bool `(B,)`; `jitter`: float32 `(B, 3)` factors (NaN: none); `jitter_order`: int64 `(B, 3)`;
- `num_frames`, `img_size`: ints; `train`: bool (train: random resized crop, eval: resize + centre crop);
- when every sample of the batch has a usable stored log-mel (and SpecAugment is off): `log_mel`
  float16 `(B, fbank_frames, M)` zero-padded, `log_mel_frames` int64 `(B,)`, `fbank_shift` float32
  `(B,)` (the gain), `fbank_mean`, `fbank_std`: floats; the batch then has no `fbank` until
  `device_decode` finishes it (half the bytes through shared memory, no normalisation in the worker).

`device_decode.decode_jpeg_batch` turns it into `video` on the device.
"""

from __future__ import annotations

import json

import torch
from torch import Tensor

from data_pipelines.augment import ClipAugParams
from data_pipelines.batch_buffers import BatchBufferPool
from data_pipelines.corrupt import CorruptSampleError
from data_pipelines.features import FbankConfig, gain_shift, precomputed_fbank
from data_pipelines.samples import (
    FRAME_MEMBER,
    BatchBuilder,
    SampleDecoder,
    has_audio,
    tensors_in_one_buffer,
)

# Start-of-frame markers (baseline, progressive, lossless, arithmetic); not DHT (C4), JPG (C8), DAC (CC).
SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM and RST0-7.
STANDALONE_MARKERS = frozenset([0x01, *range(0xD0, 0xD8)])


def jpeg_frame_size(data: bytes) -> tuple[int, int]:
    """(height, width) from a JPEG's start-of-frame header, without decoding it.

    Raises CorruptSampleError for what a worker can see cheaply: no SOI, no SOF before the scan, a
    header cut short, or no EOI at the end (a truncated file). Damage inside the entropy-coded data
    shows only when decoding; `device_decode` handles that per clip.
    """
    height, width, _ = jpeg_frame_header(data)
    return height, width


def jpeg_frame_header(data: bytes) -> tuple[int, int, int]:
    """`jpeg_frame_size` and where its start-of-frame segment ends: `data[:end]` is every marker up
    to and including the frame size, which `clip_frame_size` compares between a clip's frames."""
    if data[:2] != b"\xff\xd8":
        raise CorruptSampleError("not a JPEG (no start-of-image marker)")
    if data[-2:] != b"\xff\xd9":
        raise CorruptSampleError("truncated JPEG (no end-of-image marker)")
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise CorruptSampleError(f"bad JPEG marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in STANDALONE_MARKERS:
            pos += 2
            continue
        if marker in SOF_MARKERS:
            if pos + 9 > len(data):
                break
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            return height, int.from_bytes(data[pos + 7 : pos + 9], "big"), pos + 9
        if marker == 0xDA:  # start of scan before any frame header
            break
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    raise CorruptSampleError("JPEG has no readable frame header")


def clip_frame_size(frames: list[bytes]) -> tuple[int, int]:
    """The (height, width) all of a clip's frames share; CorruptSampleError as `jpeg_frame_size`, or
    when the sizes differ.

    A clip's frames come from one encoder with one quality, so their headers up to the frame size are
    the same bytes: a frame that starts with the first frame's header has its size and its valid
    markers, and needs only its end marker checked (~0.3 us instead of ~6 us of parsing per frame).
    Any other frame is parsed in full.
    """
    height, width, end = jpeg_frame_header(frames[0])
    header = frames[0][:end]
    sizes = {(height, width)}
    for frame in frames[1:]:
        if frame.startswith(header) and frame.endswith(b"\xff\xd9"):
            continue
        sizes.add(jpeg_frame_size(frame))
    if len(sizes) != 1:
        raise CorruptSampleError(f"frames differ in size: {sorted(sizes)}")
    return height, width


class JpegBytesDecoder(SampleDecoder):
    """Raw sample -> `{jpeg_frames, frame_hw, aug, fbank, label, ...}`: no pixel is decoded here."""

    def __call__(self, raw: dict, seed: int = 0) -> dict:
        meta = raw.get("__meta__") or json.loads(raw["json"])
        frames = self.frame_bytes(raw)
        height, width = clip_frame_size(frames)
        aug, gain_db = None, 0.0
        if self.train:
            generator = torch.Generator().manual_seed(seed)
            aug = self.augment.sample_params(height, width, generator)
            if self.cfg.audio_gain_db > 0:  # drawn after the video's parameters, as the decoding path does
                gain_db = (2 * torch.rand(1, generator=generator).item() - 1) * self.cfg.audio_gain_db
        audio_present = has_audio(meta)
        # The stored log-mel travels as it is (float16) and is finished where the frames decode;
        # SpecAugment, seeded per sample, and the fbank computed from audio stay here.
        log_mel = self.stored_log_mel(raw, meta) if audio_present and self.spec_augment is None else None
        fbank = None
        if log_mel is None:
            fbank = self.audio_features(raw, meta, gain_db, seed) if audio_present else self.blank_fbank()
        return {
            "jpeg_frames": frames,
            "frame_hw": (height, width),
            "aug": aug,
            "fbank": fbank,
            "log_mel": log_mel,
            "gain_db": gain_db,
            "audio_present": audio_present,
            **self.clip_fields(raw, meta),
        }

    def frame_bytes(self, raw: dict) -> list[bytes]:
        """The `num_frames` JPEG members in order; a missing or extra frame is corrupt, as when decoding."""
        frames = [raw.get(name) for name in self.frame_names]
        if None not in frames and sum(1 for k in raw if k.startswith("f") and k.endswith(".jpg")) == len(
            frames
        ):
            return frames  # no other member can match FRAME_MEMBER: the regex runs only to explain a failure
        present = sorted(k for k in raw if FRAME_MEMBER.match(k))
        if None in frames or len(present) != len(frames):
            missing = sorted(set(self.frame_names) - set(present))
            raise CorruptSampleError(
                f"wrong frame count: has {len(present)} frame members, expected {self.cfg.num_frames}"
                + (f" (missing {missing[:3]})" if missing else "")
            )
        return frames


class JpegBatchBuilder(BatchBuilder):
    """`BatchBuilder` for `JpegBytesDecoder` samples: the batch's `jpeg` dict instead of `video`.

    The bytes' total is known only when the batch is complete, so its one buffer is allocated then
    and every frame and fbank is copied into it once, at `build`. When every sample brought its stored
    log-mel, the batch carries those (float16, half the bytes of the fbank) in `jpeg["log_mel"]` with
    `log_mel_frames` and `fbank_shift` (`features.gain_shift`), and `device_decode` finishes them
    into `fbank`; otherwise the worker finishes them here (`precomputed_fbank`)."""

    def __init__(
        self,
        batch_size: int,
        num_frames: int,
        img_size: int,
        train: bool,
        fbank: FbankConfig = FbankConfig(),
        pool: BatchBufferPool | None = None,
    ) -> None:
        super().__init__(batch_size, pool)
        self.num_frames, self.img_size, self.train, self.fbank_cfg = num_frames, img_size, train, fbank
        self.frames: list[bytes] = []
        self.audio: list[tuple[Tensor | None, Tensor | None, float]] = []  # (fbank, log_mel, gain_db)
        self.frame_hw: list[tuple[int, int]] = []
        self.augs: list[ClipAugParams | None] = []

    def add(self, sample: dict) -> None:
        self.audio.append((sample.pop("fbank"), sample.pop("log_mel"), sample.pop("gain_db")))
        self.frames += sample.pop("jpeg_frames")
        self.frame_hw.append(sample.pop("frame_hw"))
        self.augs.append(sample.pop("aug"))
        self.rows.append(sample)

    def build(self) -> dict:
        rows, lengths, cfg = len(self.rows), [len(f) for f in self.frames], self.fbank_cfg
        ship_log_mel = all(log_mel is not None for _, log_mel, _ in self.audio)
        if ship_log_mel:
            mel_bins = self.audio[0][1].shape[1]
            audio_specs = {
                "log_mel": ((rows, cfg.fbank_frames, mel_bins), torch.float16),
                "log_mel_frames": ((rows,), torch.int64),
                "fbank_shift": ((rows,), torch.float32),
            }
        else:
            fbanks = [
                precomputed_fbank(log_mel, cfg, gain_db) if fbank is None else fbank
                for fbank, log_mel, gain_db in self.audio
            ]
            audio_specs = {"fbank": ((rows, *fbanks[0].shape), torch.float32)}
        out, lease = tensors_in_one_buffer(
            {
                **audio_specs,
                "data": ((sum(lengths),), torch.uint8),
                "offsets": ((len(lengths) + 1,), torch.int64),
                "frame_hw": ((rows, 2), torch.int64),
                "crop": ((rows, 4), torch.int64),
                "flip": ((rows,), torch.bool),
                "jitter": ((rows, 3), torch.float32),
                "jitter_order": ((rows, 3), torch.int64),
            },
            self.pool,
        )
        batch = {} if lease is None else {"__lease__": lease}
        if ship_log_mel:
            self.fill_log_mels(out)
            out["fbank_mean"], out["fbank_std"] = cfg.mean, cfg.std
        else:
            batch["fbank"] = torch.stack(fbanks, out=out.pop("fbank"))
        batch.update(self.row_fields())
        self.fill_jpeg(out, lengths)
        batch["jpeg"] = {**out, "num_frames": self.num_frames, "img_size": self.img_size, "train": self.train}
        return batch

    def fill_log_mels(self, out: dict[str, Tensor]) -> None:
        frames, shifts = [], []
        for b, (_, log_mel, gain_db) in enumerate(self.audio):
            n = min(log_mel.shape[0], self.fbank_cfg.fbank_frames)
            out["log_mel"][b, :n].copy_(log_mel[:n])
            out["log_mel"][b, n:].zero_()
            frames.append(n)
            shifts.append(gain_shift(gain_db) if gain_db else 0.0)
        out["log_mel_frames"].copy_(torch.tensor(frames))
        out["fbank_shift"].copy_(torch.tensor(shifts, dtype=torch.float32))

    def fill_jpeg(self, out: dict[str, Tensor], lengths: list[int]) -> None:
        """The frames' bytes, their offsets and every clip's drawn augmentation."""
        data, pos = memoryview(out["data"].numpy()), 0
        for frame, length in zip(self.frames, lengths):  # straight into the buffer: ~10 kB per frame
            data[pos : pos + length] = frame
            pos += length
        out["offsets"][0] = 0
        torch.cumsum(torch.tensor(lengths), 0, out=out["offsets"][1:])
        out["frame_hw"].copy_(torch.tensor(self.frame_hw))
        no_jitter = ((float("nan"),) * 3, (0, 0, 0))  # NaN factors: none drawn (eval, or color_jitter=0)
        jitters = [no_jitter if aug is None or aug.jitter is None else aug.jitter for aug in self.augs]
        out["crop"].copy_(torch.tensor([(0, 0, 0, 0) if aug is None else aug.crop for aug in self.augs]))
        out["flip"].copy_(torch.tensor([aug is not None and bool(aug.flip) for aug in self.augs]))
        out["jitter"].copy_(torch.tensor([factors for factors, _ in jitters]))
        out["jitter_order"].copy_(torch.tensor([order for _, order in jitters]))
