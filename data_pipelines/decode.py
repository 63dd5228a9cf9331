"""Decode one clip into fixed-length audio-visual windows (DESIGN §1).

Frames are sampled by *time*, on a 25 fps grid: window `w` starts at `w * span` seconds with
`span = num_frames * frame_stride / 25`, and frame `i` of a window is the source frame shown at
`start + i * frame_stride / 25`. A 30 fps (or variable-rate) source therefore covers the same 2.56 s
as a 25 fps one. A clip shorter than one span gives a single window whose times past the end take the
last frame ("evenly spaced indices padded with the last frame"). The audio of a window is exactly
`span * sample_rate` samples starting at the window's start, zero-padded at the end when the track is
short (the padding is recorded).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

# The reference samples frames at this rate; windows are defined on its time grid.
GRID_FPS = 25.0
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
INTERPOLATION = "bilinear (PIL, antialiased, reducing_gap=3)"


class DecodeError(RuntimeError):
    """A clip that cannot be decoded; the message says why (it goes to errors.jsonl)."""


@dataclass(frozen=True)
class SamplingConfig:
    """What `decode_clip` cuts: `num_frames` frames `frame_stride` grid steps apart per window."""

    num_frames: int = 16
    frame_stride: int = 4
    img_size: int = 160
    crop_box: tuple[int, int, int, int] | None = None  # x0 y0 x1 y1 in source pixels
    max_windows: int | None = None
    sample_rate: int = 16000

    @property
    def span(self) -> float:
        """Seconds covered by one window."""
        return self.num_frames * self.frame_stride / GRID_FPS

    @property
    def audio_samples(self) -> int:
        return round(self.span * self.sample_rate)


@dataclass
class Window:
    """One sample: `frames` (T, S, S, 3) uint8 RGB, `audio` (L,) float32 in [-1, 1]."""

    index: int
    start: float
    frame_indices: list[int]
    frames: np.ndarray
    audio: np.ndarray
    frames_padded: int = 0
    audio_padded: int = 0


@dataclass
class DecodedClip:
    source_fps: float
    duration: float
    num_source_frames: int
    windows: list[Window] = field(default_factory=list)


def window_starts(duration: float, span: float, max_windows: int | None) -> list[float]:
    """Start times (s) of the non-overlapping windows kept for a clip of `duration` seconds.

    The tail shorter than a span is dropped, except for a clip shorter than one span, which gives
    one (padded) window. `max_windows=k` keeps k of the windows, evenly spread over the clip
    (k=1 keeps the middle one).
    """
    n_full = max(1, math.floor(duration / span + 1e-6))
    chosen = range(n_full)
    if max_windows is not None and max_windows < n_full:
        if max_windows < 1:
            raise ValueError(f"max_windows must be >= 1 or None, got {max_windows}")
        chosen = sorted({int((i + 0.5) * n_full / max_windows) for i in range(max_windows)})
    return [w * span for w in chosen]


def sample_frame_indices(
    frame_starts: np.ndarray, duration: float, start: float, num_frames: int, frame_stride: int
) -> tuple[list[int], int]:
    """Source frame shown at each grid time `start + i * frame_stride / 25`.

    frame_starts: (N,) presentation start time of each source frame, ascending.
    Returns (indices, number of times that fell past the end and took the last frame).
    """
    times = start + np.arange(num_frames) * frame_stride / GRID_FPS
    # A tiny tolerance so a frame that starts exactly on a grid time is chosen despite float noise.
    idx = np.searchsorted(frame_starts, times + 1e-4, side="right") - 1
    idx = np.clip(idx, 0, len(frame_starts) - 1)
    padded = int(np.sum(times >= duration - 1e-6))
    return idx.astype(int).tolist(), padded


def crop_resize(
    frame: np.ndarray,
    size: int,
    bbox: tuple[float, float, float, float] | None = None,
    crop_box: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8: bbox crop, then the fixed crop_box (relative to
    the bbox), then short side to `size` and a centre crop (antialiased PIL resize)."""
    h, w = frame.shape[:2]
    x0, y0, x1, y1 = 0.0, 0.0, float(w), float(h)
    if bbox is not None:
        x0, y0, x1, y1 = (
            max(0.0, bbox[0]),
            max(0.0, bbox[1]),
            min(float(w), bbox[2]),
            min(float(h), bbox[3]),
        )
    if crop_box is not None:
        cx0, cy0, cx1, cy1 = crop_box
        x0, y0, x1, y1 = x0 + cx0, y0 + cy0, min(x1, x0 + cx1), min(y1, y0 + cy1)
    if x1 - x0 < 1 or y1 - y0 < 1:
        raise DecodeError(
            f"empty crop region {x0, y0, x1, y1} in a {w}x{h} frame (bbox={bbox}, crop_box={crop_box})"
        )
    side = min(x1 - x0, y1 - y0)  # centre square of the region = short side resize + centre crop
    left, top = round((x0 + x1 - side) / 2), round((y0 + y1 - side) / 2)
    side = round(side)
    # Crop first so the resize filter never reaches pixels outside the region.
    img = Image.fromarray(frame).crop((left, top, left + side, top + side))
    if img.size != (size, size):
        # reducing_gap: box-reduce first for large downscales (4x faster at 844 -> 160 px); PIL
        # documents gaps >= 3 as indistinguishable from a full antialiased resize.
        img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(img)


def _open_video(path: Path) -> tuple[object, np.ndarray, float, float]:
    """-> (reader with get_batch, frame start times (N,), fps, duration)."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DecodeError(f"frame directory {path} holds no {'/'.join(IMAGE_SUFFIXES)} images")
        starts = np.arange(len(files)) / GRID_FPS  # frame folders carry no timing: assume 25 fps
        return _FrameDir(files), starts, GRID_FPS, len(files) / GRID_FPS
    import decord

    try:
        vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        n = len(vr)
        if n == 0:
            raise DecodeError(f"video {path} has no frames")
        ts = np.asarray(vr.get_frame_timestamp(range(n)), dtype=np.float64)
    except DecodeError:
        raise
    except Exception as err:  # decord raises RuntimeError / DECORDError with ffmpeg's reason
        raise DecodeError(f"decord cannot read video {path}: {_first_line(err)}") from err
    duration = (
        float(ts[-1, 1]) if ts[-1, 1] > ts[-1, 0] else float(ts[-1, 0]) + 1 / max(vr.get_avg_fps(), 1e-3)
    )
    return vr, ts[:, 0], float(vr.get_avg_fps()), duration


class _FrameDir:
    def __init__(self, files: list[Path]):
        self.files = files

    def get_batch(self, indices: list[int]) -> np.ndarray:
        return np.stack([np.asarray(Image.open(self.files[i]).convert("RGB")) for i in indices])


def _read_frames(reader: object, indices: list[int], path: Path) -> np.ndarray:
    """Frames `indices` (sorted) of `reader` as (K, H, W, 3) uint8 RGB.

    One batched decode for all windows (decord seeks once per run of indices). decord 0.6.0 takes the
    channel count from the row stride when the stride is a multiple of the width (videos 16, 24, 48
    or 72 pixels wide, any codec; no other even width to 2048, odd to 300): `get_batch` fails its size
    check or returns 4-6 "channels". Those files are read frame by frame and the row padding is cut
    off, which gives exactly the pixels PyAV decodes.
    """
    failure = f"decord cannot decode frames {indices[0]}..{indices[-1]} of {path}"
    try:
        batch = reader.get_batch(indices)
        batch = batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)
    except Exception as err:
        if not _has_padded_rows(reader, indices[0]):
            raise DecodeError(f"{failure}: {_first_line(err)}") from err
        batch = None
    if batch is not None and batch.shape[-1] == 3:
        return batch
    frames = []
    for i in indices:
        try:
            frame = reader[i].asnumpy()
        except Exception as err:
            raise DecodeError(f"{failure}: {_first_line(err)}") from err
        frames.append(_strip_row_padding(frame, path))
    return np.stack(frames)


def _has_padded_rows(reader: object, index: int) -> bool:
    """Whether decord hands out frame `index` with its row padding as extra channels."""
    if isinstance(reader, _FrameDir):
        return False
    try:
        return reader[index].shape[-1] > 3
    except Exception:
        return False  # the batched call's own error is the one to report


def _strip_row_padding(frame: np.ndarray, path: Path) -> np.ndarray:
    """(H, W, C) as decord returns it, C = row stride / W, -> (H, W, 3): each row's first 3 W bytes
    are the RGB pixels, the rest is padding."""
    if frame.ndim != 3 or frame.shape[-1] < 3:
        raise DecodeError(
            f"decord returned frames of shape {frame.shape} for {path}, expected (H, W, 3) RGB; "
            "re-encode it (ffmpeg -i IN -pix_fmt yuv420p OUT.mp4) and point the manifest at the new file"
        )
    h, w, c = frame.shape
    return np.ascontiguousarray(frame.reshape(h, w * c)[:, : w * 3].reshape(h, w, 3))


def load_audio(path: Path, sample_rate: int) -> np.ndarray:
    """The whole track of `path` as (L,) float32 mono at `sample_rate`, decoded and resampled by
    decord (ffmpeg). Raises DecodeError with decord's reason; there is no fallback decoder."""
    import decord

    try:
        ar = decord.AudioReader(str(path), ctx=decord.cpu(0), sample_rate=sample_rate, mono=True)
        audio = np.asarray(ar._array, dtype=np.float32).reshape(-1)
    except Exception as err:
        raise DecodeError(f"decord cannot read audio of {path}: {_first_line(err)}") from err
    if audio.size == 0:
        raise DecodeError(f"audio track of {path} is empty")
    return audio


def decode_clip(
    video: Path,
    cfg: SamplingConfig,
    audio: Path | None = None,
    bbox: tuple[float, float, float, float] | None = None,
) -> DecodedClip:
    """Decode `video` (a file or a folder of frames) and its audio (inside the video, or the
    separate file `audio`) into windows of `cfg.num_frames` frames of `cfg.img_size`^2 pixels."""
    video = Path(video)
    if not video.exists():
        raise DecodeError(f"video file not found: {video}")
    if video.is_dir() and audio is None:
        raise DecodeError(f"{video} is a frame directory: the manifest must name its audio file")
    reader, frame_starts, fps, duration = _open_video(video)
    track = load_audio(Path(audio) if audio else video, cfg.sample_rate)

    clip = DecodedClip(source_fps=fps, duration=duration, num_source_frames=len(frame_starts))
    plans = []
    for w, start in enumerate(window_starts(duration, cfg.span, cfg.max_windows)):
        idx, padded = sample_frame_indices(frame_starts, duration, start, cfg.num_frames, cfg.frame_stride)
        plans.append((w, start, idx, padded))
    wanted = sorted({i for _, _, idx, _ in plans for i in idx})
    batch = _read_frames(reader, wanted, video)
    frames = {i: crop_resize(batch[k], cfg.img_size, bbox, cfg.crop_box) for k, i in enumerate(wanted)}

    n_audio = cfg.audio_samples
    for w, start, idx, padded in plans:
        s0 = round(start * cfg.sample_rate)
        seg = track[s0 : s0 + n_audio]
        audio_padded = n_audio - len(seg)
        if audio_padded:
            seg = np.concatenate([seg, np.zeros(audio_padded, np.float32)])
        clip.windows.append(
            Window(
                index=w,
                start=round(start, 6),
                frame_indices=idx,
                frames=np.stack([frames[i] for i in idx]),
                audio=seg,
                frames_padded=padded,
                audio_padded=audio_padded,
            )
        )
    return clip


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    # decord prefixes "[12:00:00] /path/to/reader.cc:83: "; the ffmpeg reason after it is what helps.
    lines = [re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", ln).strip() for ln in text.splitlines() if ln.strip()]
    return " | ".join(lines[:2])[:300]
