"""A clip's face track: detect on the frames sampled for its windows, keep the largest face, smooth,
and turn each frame's box into the square that the crop takes (docs/data.md, "Face crops").

Rules, and why:
- BlazeFace short range first; a clip where it finds a face on fewer than `min_share` of the frames
  is detected again with the full-range model (faces under about a sixth of the frame's long side),
  and the track with more face frames is kept.
- Detection runs on the frames the windows use anyway (every `frame_stride` grid step, 6.25 per
  second by default): no extra decoding, and every written frame has its own box.
- Two or more faces: the largest is kept (in talking-head data the speaker is nearest the camera);
  a clip where MULTI_FACE_SHARE of the frames show two or more is counted as multi-face.
- A frame without a detection takes the box of the nearest frame with one; a clip with a face on
  fewer than `min_share` of its frames is skipped (kind `no_face`).
- Centre and size are each a running median over `smooth` sampled frames (0.8 s at the default
  stride): one missed or stray detection does not move the crop, a head that moves is followed.
- The crop is a square `scale` x the detector's box side (BlazeFace's box runs from the brows to the
  chin; 1.3 x adds about what OpenFace's aligned faces show around it), moved inside the frame when
  it sticks out, and shrunk only when it is larger than the frame.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

MULTI_FACE_SHARE = 0.25


@dataclass(frozen=True)
class FaceConfig:
    """Settings of the face step (ShardConfig's face_* fields)."""

    min_share: float = 0.5  # skip a clip with a face on fewer of its sampled frames
    scale: float = 1.3  # crop side / detector box side
    smooth: int = 5  # sampled frames in the running medians (odd)

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_share <= 1.0:
            raise ValueError(f"face_min_share must be in [0, 1], got {self.min_share}")
        if self.scale <= 0:
            raise ValueError(f"face_scale must be > 0, got {self.scale}")
        if self.smooth < 1:
            raise ValueError(f"face_smooth must be >= 1, got {self.smooth}")


@dataclass
class FaceTrack:
    """One clip's track over its K sampled frames."""

    crops: np.ndarray  # (K, 4) float x0 y0 x1 y1 of the square crop, source pixels
    detected: np.ndarray  # (K,) bool: the detector found a face on the frame
    faces_per_frame: np.ndarray  # (K,) int
    detector: str = ""  # the model that made it

    @property
    def share(self) -> float:
        """Share of the sampled frames with a face."""
        return float(self.detected.mean()) if len(self.detected) else 0.0

    @property
    def multi_face(self) -> bool:
        return len(self.faces_per_frame) > 0 and float((self.faces_per_frame >= 2).mean()) >= MULTI_FACE_SHARE


def largest_boxes(frames: np.ndarray, detector) -> tuple[np.ndarray, np.ndarray]:
    """(K, H, W, 3) uint8 -> ((K, 4) largest face box per frame, NaN where none; (K,) face counts)."""
    boxes = np.full((len(frames), 4), np.nan)
    counts = np.zeros(len(frames), dtype=int)
    for k, frame in enumerate(frames):
        faces = detector.detect(frame)
        counts[k] = len(faces)
        if faces:
            boxes[k] = faces[0].box  # detect() sorts largest first
    return boxes, counts


def fill_gaps(values: np.ndarray) -> np.ndarray:
    """(K, D) with NaN rows -> each NaN row replaced by the nearest row that has values."""
    have = np.flatnonzero(~np.isnan(values[:, 0]))
    nearest = have[np.abs(np.arange(len(values))[:, None] - have[None, :]).argmin(axis=1)]
    return values[nearest]


def running_median(values: np.ndarray, width: int) -> np.ndarray:
    """(K, D) -> median over a centred window of `width` rows (shorter at the ends)."""
    half = width // 2
    return np.stack([np.median(values[max(0, k - half) : k + half + 1], axis=0) for k in range(len(values))])


def square_in_frame(cx: float, cy: float, side: float, width: int, height: int) -> tuple[float, ...]:
    """The square of `side` centred at (cx, cy), moved (not cut) to lie inside a width x height frame."""
    side = min(side, width, height)
    x0 = min(max(cx - side / 2, 0.0), width - side)
    y0 = min(max(cy - side / 2, 0.0), height - side)
    return (x0, y0, x0 + side, y0 + side)


def face_track(frames: np.ndarray, detector, cfg: FaceConfig) -> FaceTrack:
    """(K, H, W, 3) uint8 frames in time order -> their face track. When no frame has a face the crops
    are NaN (the caller skips the clip by its share)."""
    boxes, counts = largest_boxes(frames, detector)
    detected = ~np.isnan(boxes[:, 0])
    name = detector.model.name if hasattr(detector, "model") else type(detector).__name__
    if not detected.any():
        return FaceTrack(boxes, detected, counts, name)
    boxes = fill_gaps(boxes)
    geometry = np.stack(
        [
            (boxes[:, 0] + boxes[:, 2]) / 2,
            (boxes[:, 1] + boxes[:, 3]) / 2,
            np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]),
        ],
        axis=1,
    )
    cx, cy, side = running_median(geometry, cfg.smooth).T
    height, width = frames.shape[1:3]
    crops = np.array([square_in_frame(x, y, s * cfg.scale, width, height) for x, y, s in zip(cx, cy, side)])
    return FaceTrack(crops, detected, counts, name)


def face_spec(shard_dir: Path) -> dict:
    """The face step the shards in `shard_dir` were cut with, as an export's input spec records it
    (`{"mode": "none"}` when they had none or their index.json cannot be read)."""
    index = Path(shard_dir) / "index.json"
    known = Path(shard_dir).name and index.is_file()  # Path("") is no shard folder (the run named none)
    config = json.loads(index.read_text()).get("config", {}) if known else {}
    if config.get("face", "none") != "auto":
        return {"mode": "none"}
    from data_pipelines.faces import detector_info

    settings = FaceConfig(
        config.get("face_min_share", 0.5), config.get("face_scale", 1.3), config.get("face_smooth", 5)
    )
    detector = detector_info()
    return {"mode": "auto", **asdict(settings), "detector": detector["model"], "sha256": detector["sha256"]}


def face_config_of_spec(spec: dict | None) -> FaceConfig | None:
    """The FaceConfig an export's `input.face` asks for; None for `mode: none` or an export without it."""
    if not spec or spec.get("mode") != "auto":
        return None
    return FaceConfig(**{k: spec[k] for k in ("min_share", "scale", "smooth") if k in spec})
