"""Decode one clip into fixed-length audio-visual windows (docs/data.md).

Frames are sampled by *time*, on a 25 fps grid: window `w` starts at `w * span` seconds with
`span = num_frames * frame_stride / 25`, and frame `i` of a window is the source frame shown at
`start + i * frame_stride / 25`. A 30 fps (or variable-rate) source therefore covers the same 2.56 s
as a 25 fps one. A clip shorter than one span gives a single window whose times past the end take the
last frame ("evenly spaced indices padded with the last frame"). The audio of a window is exactly
`span * sample_rate` samples starting at the window's start, zero-padded at the end when the track is
short (the padding is recorded).

Sources as people have them (docs/data.md): a frame folder's rate is the manifest's `fps`, else its
frame count / the paired audio's duration (HiCMAE's rule); a container cut short is used for the part
that decodes when that holds a whole window (`partial`), and skipped otherwise; an audio track below
SILENCE_DBFS is flagged; a clip without audio gets zero audio only when the caller allows it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipelines.face_track import FaceConfig, FaceTrack

# The reference samples frames at this rate; windows are defined on its time grid.
GRID_FPS = 25.0
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
INTERPOLATION = "bilinear (PIL, antialiased, reducing_gap=3)"
# Frame-folder rates outside this range mean the frames and the audio do not belong together.
FPS_RANGE = (5.0, 120.0)
# A whole track quieter than this (RMS re. full scale) is treated as silent: -60 dBFS is ~16 LSB of
# 16-bit audio, below the noise floor of any real recording of speech.
SILENCE_DBFS = -60.0
# A container whose frames end this much before its declared duration was cut short (a frame of
# jitter at 10 fps, well above container rounding).
PARTIAL_TOLERANCE_S = 0.1


class DecodeError(RuntimeError):
    """A clip that cannot be decoded; the message says why (it goes to errors.jsonl). `kind` names the
    counter it goes to: broken (unreadable or corrupt media), truncated (less than one window decodes),
    missing_audio, silent_audio, frame_rate, no_face."""

    def __init__(self, message: str, kind: str = "broken"):
        super().__init__(message)
        self.kind = kind


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
    face_boxes: list[list[float]] | None = None  # face=auto: each frame's crop square (source pixels)


@dataclass
class DecodedClip:
    source_fps: float
    duration: float  # seconds used: the part that decodes
    num_source_frames: int
    windows: list[Window] = field(default_factory=list)
    fps_source: str = "container"  # container | manifest | audio (frame folders: where the rate came from)
    declared_duration: float | None = None  # what the container says, when it says it
    audio_missing: bool = False  # no audio at all: every window's audio is zeros
    audio_rms_dbfs: float | None = None  # of the whole track; None when missing
    face_track: FaceTrack | None = None  # face=auto: the track over the clip's sampled frames

    @property
    def audio_silent(self) -> bool:
        return self.audio_rms_dbfs is not None and self.audio_rms_dbfs < SILENCE_DBFS

    @property
    def partial(self) -> bool:
        """Whether the container declares more than what decodes (a truncated file)."""
        return is_cut_short(self.duration, self.declared_duration)


def is_cut_short(decoded: float, declared: float | None) -> bool:
    return declared is not None and declared - decoded > PARTIAL_TOLERANCE_S


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


def natural_key(path: Path) -> list:
    """Sort key putting `2.jpg` before `10.jpg` (digit runs compare as numbers)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def frame_files(folder: Path) -> list[Path]:
    """The images of a frame folder in natural order."""
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=natural_key)
    if not files:
        raise DecodeError(f"frame directory {folder} holds no {'/'.join(IMAGE_SUFFIXES)} images")
    return files


def frame_folder_rate(
    folder: Path, num_frames: int, fps: float | None, audio_seconds: float | None
) -> tuple[float, str]:
    """-> (frames per second, where it came from: "manifest" or "audio").

    Frame folders carry no timing. The manifest's `fps` wins; otherwise the frames are taken to span
    the paired audio, as HiCMAE maps frame indices to relative positions in the audio."""
    if fps is not None:
        rate, source = float(fps), "manifest"
    elif audio_seconds:
        rate, source = num_frames / audio_seconds, "audio"
    else:
        raise DecodeError(
            f"frame directory {folder} has no paired audio and no frame rate: add an `fps` column to the "
            "manifest (or the `audio` file whose duration the frames span)",
            kind="frame_rate",
        )
    if not FPS_RANGE[0] <= rate <= FPS_RANGE[1]:
        how = (
            "manifest fps"
            if source == "manifest"
            else f"{num_frames} frames / {audio_seconds:.3f} s of audio"
        )
        raise DecodeError(
            f"frame directory {folder}: frame rate {rate:.2f} fps ({how}) is outside "
            f"{FPS_RANGE[0]:g}-{FPS_RANGE[1]:g} fps; check that the audio belongs to these frames, or set `fps`",
            kind="frame_rate",
        )
    return rate, source


def _open_video(path: Path) -> tuple[object, np.ndarray, float, float]:
    """A video file -> (reader with get_batch, frame start times (N,), fps, duration)."""
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
        raise DecodeError(f"cannot read video {path}: {explain(err, path)}") from err
    duration = (
        float(ts[-1, 1]) if ts[-1, 1] > ts[-1, 0] else float(ts[-1, 0]) + 1 / max(vr.get_avg_fps(), 1e-3)
    )
    return vr, ts[:, 0], float(vr.get_avg_fps()), duration


@dataclass(frozen=True)
class ContainerInfo:
    declared_duration: float | None  # seconds, as the container header states it
    has_audio: bool


def probe_container(path: Path) -> ContainerInfo:
    """What the container declares (PyAV reads the header only). An unreadable header says nothing:
    decord's own error then tells what is wrong."""
    import av

    try:
        with av.open(str(path)) as box:
            has_audio = any(s.type == "audio" for s in box.streams)
            declared = _declared_video_seconds(box)
    except Exception:
        return ContainerInfo(None, True)
    return ContainerInfo(declared, has_audio)


def _declared_video_seconds(box) -> float | None:
    """The video stream's declared duration when the container keeps one (mp4, flv), else the whole
    container's (Matroska): an audio track running past the last frame is not a missing frame."""
    video = next((s for s in box.streams if s.type == "video"), None)
    if video is not None and video.duration and video.time_base:
        return float(video.duration * video.time_base)
    return box.duration / 1e6 if box.duration else None


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
    failure = f"cannot decode frames {indices[0]}..{indices[-1]} of {path}"
    try:
        batch = reader.get_batch(indices)
        batch = batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)
    except Exception as err:
        if not _has_padded_rows(reader, indices[0]):
            raise DecodeError(f"{failure}: {explain(err, path)}") from err
        batch = None
    if batch is not None and batch.shape[-1] == 3:
        return batch
    frames = []
    for i in indices:
        try:
            frame = reader[i].asnumpy()
        except Exception as err:
            raise DecodeError(f"{failure}: {explain(err, path)}") from err
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
        raise DecodeError(f"cannot read audio of {path}: {explain(err, path)}") from err
    if audio.size == 0:
        raise DecodeError(f"audio track of {path} is empty")
    return audio


def rms_dbfs(audio: np.ndarray) -> float:
    """Loudness of a whole track, dB re. full scale (an all-zero track gives -240)."""
    return float(20 * np.log10(np.sqrt(np.mean(np.square(audio, dtype=np.float64))) + 1e-12))


def _load_track(
    video: Path, audio: Path | None, has_audio_stream: bool, sample_rate: int, allow_missing_audio: bool
) -> np.ndarray | None:
    """The clip's audio: the `audio` file, else the video's own track; None when there is neither
    and that is allowed."""
    if audio is not None:
        return load_audio(audio, sample_rate)
    if has_audio_stream:
        return load_audio(video, sample_rate)
    if allow_missing_audio:
        return None
    where = "the frame directory has no `audio` file" if video.is_dir() else "the video has no audio stream"
    raise DecodeError(
        f"{video}: no audio ({where}); pass --allow-missing-audio to keep video-only clips with zero audio",
        kind="missing_audio",
    )


@dataclass
class _Source:
    """An opened clip: frames to read, their start times, and its audio."""

    reader: object  # has get_batch(indices)
    frame_starts: np.ndarray  # (N,) seconds
    fps: float
    fps_source: str
    duration: float  # seconds that decode
    declared: float | None  # seconds the container declares
    track: np.ndarray | None  # (L,) float32 at the sample rate; None: no audio


def _open_frame_folder(
    folder: Path, audio: Path | None, fps: float | None, sample_rate: int, allow_missing_audio: bool
) -> _Source:
    if audio is None and fps is None:
        frame_folder_rate(folder, 0, None, None)  # raises: the folder's rate cannot be known
    track = _load_track(folder, audio, False, sample_rate, allow_missing_audio)
    files = frame_files(folder)
    audio_seconds = len(track) / sample_rate if track is not None else None
    rate, fps_source = frame_folder_rate(folder, len(files), fps, audio_seconds)
    return _Source(
        _FrameDir(files), np.arange(len(files)) / rate, rate, fps_source, len(files) / rate, None, track
    )


def _open_video_file(video: Path, audio: Path | None, sample_rate: int, allow_missing_audio: bool) -> _Source:
    # The video first: for a broken file its error is the one that says what is wrong.
    reader, frame_starts, rate, duration = _open_video(video)
    info = probe_container(video)
    track = _load_track(video, audio, info.has_audio, sample_rate, allow_missing_audio)
    return _Source(reader, frame_starts, rate, "container", duration, info.declared_duration, track)


def _require_one_window(video: Path, src: _Source, span: float) -> None:
    """A cut-short file is used only when at least one whole window decodes (docs/data.md)."""
    if is_cut_short(src.duration, src.declared) and src.duration < span - 1e-6:
        raise DecodeError(
            f"{video} is truncated: {src.duration:.2f} s of the declared {src.declared:.2f} s decode, less "
            f"than one window ({span:g} s)",
            kind="truncated",
        )


def decode_clip(
    video: Path,
    cfg: SamplingConfig,
    audio: Path | None = None,
    bbox: tuple[float, float, float, float] | None = None,
    fps: float | None = None,
    allow_missing_audio: bool = False,
    face: FaceConfig | None = None,
) -> DecodedClip:
    """Decode `video` (a file or a folder of frames) and its audio (inside the video, or the
    separate file `audio`) into windows of `cfg.num_frames` frames of `cfg.img_size`^2 pixels.

    fps: a frame folder's rate (else frames / audio duration); ignored for video files, whose
    timestamps say when each frame is shown. allow_missing_audio: a clip without audio gets windows
    of zero audio (`audio_missing`) instead of a DecodeError. face: detect, track and crop the face
    (data_pipelines.face_track) unless a `bbox` is given; a clip with too few face frames raises
    DecodeError(kind="no_face")."""
    video = Path(video)
    audio = Path(audio) if audio else None
    if not video.exists():
        raise DecodeError(f"video file not found: {video}")
    if video.is_dir():
        src = _open_frame_folder(video, audio, fps, cfg.sample_rate, allow_missing_audio)
    else:
        src = _open_video_file(video, audio, cfg.sample_rate, allow_missing_audio)
    _require_one_window(video, src, cfg.span)

    clip = DecodedClip(
        source_fps=src.fps,
        duration=src.duration,
        num_source_frames=len(src.frame_starts),
        fps_source=src.fps_source,
        declared_duration=src.declared,
        audio_missing=src.track is None,
        audio_rms_dbfs=rms_dbfs(src.track) if src.track is not None else None,
    )
    plans = []
    for w, start in enumerate(window_starts(src.duration, cfg.span, cfg.max_windows)):
        idx, padded = sample_frame_indices(
            src.frame_starts, src.duration, start, cfg.num_frames, cfg.frame_stride
        )
        plans.append((w, start, idx, padded))
    wanted = sorted({i for _, _, idx, _ in plans for i in idx})
    batch = _read_frames(src.reader, wanted, video)
    boxes = [bbox] * len(wanted)
    if face is not None and bbox is None:
        clip.face_track = track_or_skip(video, batch, face)
        boxes = [tuple(b) for b in clip.face_track.crops.round(1).tolist()]
    frames = {i: crop_resize(batch[k], cfg.img_size, boxes[k], cfg.crop_box) for k, i in enumerate(wanted)}
    box_of = dict(zip(wanted, boxes))

    for w, start, idx, padded in plans:
        seg, audio_padded = window_audio(src.track, start, cfg)
        clip.windows.append(
            Window(
                index=w,
                start=round(start, 6),
                frame_indices=idx,
                frames=np.stack([frames[i] for i in idx]),
                audio=seg,
                frames_padded=padded,
                audio_padded=audio_padded,
                face_boxes=[list(box_of[i]) for i in idx] if clip.face_track is not None else None,
            )
        )
    return clip


def track_or_skip(video: Path, frames: np.ndarray, face: FaceConfig) -> FaceTrack:
    """The face track of a clip's sampled frames; DecodeError(kind="no_face") when the face is on
    fewer than `face.min_share` of them."""
    from data_pipelines.face_track import face_track
    from data_pipelines.faces import FULL_RANGE, SHORT_RANGE, FaceModelError, default_detector

    try:
        track = face_track(frames, default_detector(SHORT_RANGE), face)
        if track.share < face.min_share:  # faces too far away for short range: a sixth of the frame or less
            far = face_track(frames, default_detector(FULL_RANGE), face)
            track = far if far.share > track.share else track
    except FaceModelError as err:
        raise DecodeError(f"{video}: {err}", kind="face_model") from err
    if track.share < face.min_share or not track.detected.any():
        raise DecodeError(
            f"{video}: a face on {track.detected.sum()} of {len(track.detected)} sampled frames "
            f"({track.share:.0%} < face_min_share {face.min_share:.0%})",
            kind="no_face",
        )
    return track


def window_audio(track: np.ndarray | None, start: float, cfg: SamplingConfig) -> tuple[np.ndarray, int]:
    """-> (exactly `cfg.audio_samples` samples from `start`, how many are zero padding). No track
    (a video-only clip): all zeros and no padding: the zeros stand in for the whole track (the json's
    `audio_missing` says so), and loaders that cut padding off before the fbank get the normal shape."""
    n_audio = cfg.audio_samples
    if track is None:
        return np.zeros(n_audio, np.float32), 0
    s0 = round(start * cfg.sample_rate)
    seg = track[s0 : s0 + n_audio]
    audio_padded = n_audio - len(seg)
    if audio_padded:
        seg = np.concatenate([seg, np.zeros(audio_padded, np.float32)])
    return seg, audio_padded


# decord's messages for broken files, in words a user can act on (first match wins).
_DECODER_MESSAGES = (
    ("no such file", "file not found"),
    ("av_read_frame failed", "the stream breaks off: the file is truncated or corrupt"),
    ("unable to handle eof", "frames near the end do not decode: the file is truncated or corrupt"),
    (
        "error reading",
        "the container cannot be parsed: truncated before its index, corrupt, or not a media file",
    ),
    ("end of file", "the file ends early: it is truncated"),
    ("invalid data found", "the container cannot be parsed: truncated, corrupt, or not a media file"),
    ("can not find audio stream", "no audio stream"),
)


def explain(err: BaseException, path: Path | None = None) -> str:
    """One line for a decoder exception: a plain statement of what failed when the message is a known
    one, followed by ffmpeg's reason; never a C++ location or backtrace. `path` (already named by the
    caller) is cut from the reason."""
    reason = _first_line(err)
    if path is not None:
        reason = re.sub(r"\s*" + re.escape(str(path)) + r"[,.:]*\s*", " ", reason).strip(" ,:")
    low = reason.lower()
    for needle, words in _DECODER_MESSAGES:
        if needle in low:
            return f"{words} (decoder: {reason})"
    return reason


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    # decord prefixes "[12:00:00] /path/to/reader.cc:83: "; the ffmpeg reason after it is what helps.
    # Backtraces ("Stack trace:", "  [bt] (0) ...") and decord's tuning hints are dropped.
    lines = []
    for ln in text.splitlines():
        ln = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", ln).strip()
        if not ln or ln.lower().startswith(("stack trace", "[bt]")) or re.match(r"^\d+: ", ln):
            continue
        lines.append(re.sub(r"\s*You may override the limit.*$", "", ln))
    return " | ".join(lines[:1])[:300] or type(err).__name__
