"""Helpers the dataset adapters share: finding clips by name pattern, pairing them with separate wav
files, class indices and unique keys."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from data_pipelines.manifests import VIDEO_SUFFIXES, ManifestError, ManifestRow


def find_videos(root: Path, pattern: re.Pattern, suffixes: Iterable[str] = VIDEO_SUFFIXES) -> dict[str, Path]:
    """stem -> path of files under root whose name matches; for duplicated stems keep the format
    earliest in `suffixes` (a converted .mp4 wins over the original .flv)."""
    rank = {s: i for i, s in enumerate(suffixes)}
    found: dict[str, Path] = {}
    for path in root.rglob("*"):
        suf = path.suffix.lower()
        if suf in rank and pattern.match(path.name) and path.is_file():
            old = found.get(path.stem)
            if old is None or rank[suf] < rank[old.suffix.lower()]:
                found[path.stem] = path
    return found


def sibling_audio(root: Path) -> dict[str, Path]:
    """stem -> path of every .wav under root (datasets that ship their audio next to the video)."""
    return {p.stem: p for p in root.rglob("*.wav")}


def require_root(root: Path, dataset: str) -> Path:
    root = Path(root).expanduser().resolve()
    if not root.exists():
        raise ManifestError(f"{dataset}: root {root} does not exist")
    return root


def unique_keys(rows: list[ManifestRow]) -> list[ManifestRow]:
    """Suffix repeated keys with -1, -2, ... in row order (in place)."""
    seen: Counter[str] = Counter()
    for row in rows:
        base = row.key
        seen[base] += 1
        if seen[base] > 1:
            row.key = f"{base}-{seen[base] - 1}"
    return rows


def class_label(classes: Sequence[str], name: str) -> tuple[str, str]:
    """(label column, label_name column) of class `name`."""
    return str(classes.index(name)), name
