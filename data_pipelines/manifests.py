"""The manifest CSV (docs/architecture.md): its row schema, reading and writing, the dataset registry
(class names, fold schemes) and speaker-independent folds.

The dataset adapters (data_pipelines/adapters/) build on this schema, so this module never imports
them; `emomae manifest` (data_pipelines/manifest_cli.py) puts the two together.
"""

from __future__ import annotations

import csv
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

COLUMNS = ("key", "video", "audio", "label", "label_name", "speaker", "fold", "split", "bbox", "fps")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".flv", ".webm", ".mpg", ".mpeg", ".m4v")
_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")


class ManifestError(ValueError):
    """A dataset root or manifest that does not match what the adapter expects."""


@dataclass
class ManifestRow:
    key: str
    video: str
    audio: str = ""
    label: str = ""  # class index, or space-separated floats for regression, or "" (unlabelled)
    label_name: str = ""
    speaker: str = ""
    fold: int | None = None
    split: str = ""
    bbox: str = ""  # "x0 y0 x1 y1" in source pixels
    fps: float | None = None  # a frame folder's rate; None: frames / paired audio duration


@dataclass(frozen=True)
class DatasetInfo:
    """What `finetune` needs to know about a dataset: class names (index order) and folds."""

    name: str
    classes: tuple[str, ...]
    num_folds: int | None  # None: no official folds (use speaker_folds)
    fold_scheme: str
    task: str = "classification"  # classification | regression | none


DATASETS: dict[str, DatasetInfo] = {
    d.name: d
    for d in [
        DatasetInfo(
            "crema-d",
            ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD"),
            5,
            "actor blocks 1001-1018, 1019-1036, 1037-1054, 1055-1072, 1073-1091",
        ),
        DatasetInfo(
            "ravdess",
            ("neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised"),
            6,
            "actors 1-4, 5-8, ..., 21-24",
        ),
        DatasetInfo(
            "mafw",
            (
                "anger",
                "disgust",
                "fear",
                "happiness",
                "neutral",
                "sadness",
                "surprise",
                "contempt",
                "anxiety",
                "helplessness",
                "disappointment",
            ),
            5,
            "official set_1..set_5 test lists",
        ),
        DatasetInfo(
            "dfew",
            ("happy", "sad", "neutral", "angry", "surprise", "disgust", "fear"),
            5,
            "official set_1..set_5 test lists",
        ),
        DatasetInfo("msp-improv", ("anger", "happiness", "neutral", "sadness"), 6, "one session per fold"),
        DatasetInfo("voxceleb2", (), None, "none (unlabelled pretraining data)", task="none"),
        DatasetInfo("folder", (), None, "none, or speaker_folds with --folds", task="none"),
        DatasetInfo("hicmae", (), None, "from split0K/test (or val) lists, else speaker_folds with --folds"),
    ]
}


def dataset_info(name: str) -> DatasetInfo:
    """Look a dataset up by name, forgiving case and -/_ (`CREMA_D`, `cremad`, `crema-d`)."""
    norm = {re.sub(r"[-_ ]", "", k): v for k, v in DATASETS.items()}
    found = norm.get(re.sub(r"[-_ ]", "", name.lower()))
    if found is None:
        raise ManifestError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return found


# ---------------------------------------------------------------- folds


def speaker_folds(speakers: Sequence[str], k: int, seed: int = 0) -> dict[str, int]:
    """Speaker-independent folds: speaker -> fold in [0, k), folds balanced by clip count.

    speakers: one entry per clip (repeats count). Greedy: speakers in decreasing clip count (ties in
    a seeded random order) each go to the fold with the fewest clips so far.
    """
    counts = Counter(speakers)
    if "" in counts:
        raise ManifestError(
            f"{counts['']} clips have no speaker id; speaker-independent folds need one per clip"
        )
    if k < 2 or k > len(counts):
        raise ManifestError(f"cannot make {k} speaker-independent folds from {len(counts)} speakers")
    order = sorted(counts)
    random.Random(seed).shuffle(order)
    order.sort(key=lambda s: -counts[s])  # stable: the shuffle breaks ties
    load = [0] * k
    out: dict[str, int] = {}
    for spk in order:
        fold = min(range(k), key=lambda f: (load[f], f))
        out[spk] = fold
        load[fold] += counts[spk]
    return out


# ---------------------------------------------------------------- keys


def sanitize_key(text: str) -> str:
    """A WebDataset-safe key: [A-Za-z0-9_-] only (a dot would split the key)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "clip"


# ---------------------------------------------------------------- CSV I/O


def write_manifest(rows: Sequence[ManifestRow], path: Path) -> Path:
    """Write rows as the manifest CSV; video/audio paths relative to the CSV's folder when below it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent.resolve()
    _check_keys([r.key for r in rows], path)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            d = asdict(row)
            d["fold"] = "" if row.fold is None else row.fold
            d["fps"] = "" if row.fps is None else f"{row.fps:g}"
            for col in ("video", "audio"):
                if d[col] and Path(d[col]).is_absolute() and Path(d[col]).is_relative_to(base):
                    d[col] = str(Path(d[col]).relative_to(base))
            writer.writerow(d)
    return path


def read_manifest(path: Path) -> list[ManifestRow]:
    """Read and check a manifest CSV; paths come back absolute (relative ones are resolved against
    the CSV's folder)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("key", "video") if c not in (reader.fieldnames or [])]
        if missing:
            raise ManifestError(f"{path}: missing column(s) {missing}; expected header {','.join(COLUMNS)}")
        rows = []
        for n, rec in enumerate(reader, 2):
            rec = {c: (rec.get(c) or "").strip() for c in COLUMNS}
            try:
                fold = int(rec["fold"]) if rec["fold"] else None
            except ValueError:
                raise ManifestError(
                    f"{path}:{n}: fold must be an integer or empty, got {rec['fold']!r}"
                ) from None
            fps = _parse_fps(rec["fps"], f"{path}:{n}", rec["key"])
            if not rec["video"]:
                raise ManifestError(f"{path}:{n}: empty video path for key {rec['key']!r}")
            for col in ("video", "audio"):
                if rec[col] and not Path(rec[col]).is_absolute():
                    rec[col] = str((path.parent / rec[col]).resolve())
            rows.append(ManifestRow(**{**rec, "fold": fold, "fps": fps}))
    if not rows:
        raise ManifestError(f"{path}: no rows")
    _check_keys([r.key for r in rows], path)
    return rows


def _parse_fps(text: str, where: str, key: str) -> float | None:
    """The optional `fps` column: empty, or a positive number of frames per second."""
    if not text:
        return None
    try:
        fps = float(text)
    except ValueError:
        fps = float("nan")
    if not fps > 0 or fps == float("inf"):
        raise ManifestError(
            f"{where}: fps of {key!r} must be a positive number of frames per second or empty, got {text!r}"
        )
    return fps


def _check_keys(keys: list[str], where: Path) -> None:
    bad = [k for k in keys if not _KEY_RE.match(k)]
    if bad:
        raise ManifestError(
            f"{where}: keys must match [A-Za-z0-9_-]+ (WebDataset splits keys at dots), e.g. {bad[:3]}"
        )
    dup = [k for k, c in Counter(keys).items() if c > 1]
    if dup:
        raise ManifestError(f"{where}: duplicate keys, e.g. {dup[:3]}")
