"""Helpers the dataset adapters share: finding clips by name pattern, pairing them with separate wav
files, class indices, unique keys, and the files an adapter passed over (counted, never silent)."""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from data_pipelines.manifests import VIDEO_SUFFIXES, ManifestError, ManifestRow


def find_videos(root: Path, pattern: re.Pattern, suffixes: Iterable[str] = VIDEO_SUFFIXES) -> dict[str, Path]:
    """stem -> path of files under root whose stem (name without suffix) matches; for duplicated stems
    keep the format earliest in `suffixes` (a converted .mp4 wins over the original .flv)."""
    rank = {s: i for i, s in enumerate(suffixes)}
    found: dict[str, Path] = {}
    for path in root.rglob("*"):
        suf = path.suffix.lower()
        if suf in rank and pattern.match(path.stem) and path.is_file():
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


@dataclass(frozen=True)
class ClipName:
    """What a dataset's file naming says about a clip; shared by the dataset's own adapter and the
    hicmae adapter so both give a clip the same key."""

    key: str
    speaker: str
    label_name: str = ""  # "" when the name does not carry the class


@dataclass(frozen=True)
class SkippedFile:
    """A file an adapter passed over: one `errors.jsonl` line (`path`, `key`, `reason`), the format
    the shard writer uses for clips it could not decode."""

    path: str
    reason: str
    key: str = ""


class ScanResult(list):
    """An adapter's manifest rows (a plain list of ManifestRow, so every caller keeps working) plus
    `skipped`, the files it passed over."""

    def __init__(self, rows: Iterable[ManifestRow] = (), skipped: Iterable[SkippedFile] = ()):
        super().__init__(rows)
        self.skipped: list[SkippedFile] = list(skipped)


SHOWN = 5  # skipped files named in a summary line or an error message


def report_skipped(dataset: str, skipped: Sequence[SkippedFile], what: str) -> None:
    """One summary line on stderr: how many files were passed over and the first few names."""
    if not skipped:
        return
    names = ", ".join(Path(s.path).name for s in skipped[:SHOWN])
    more = f" (+{len(skipped) - SHOWN} more)" if len(skipped) > SHOWN else ""
    print(f"{dataset}: skipped {len(skipped)} {what}: {names}{more}", file=sys.stderr)


def write_skipped(skipped: Iterable[SkippedFile], path: Path) -> Path:
    """`errors.jsonl`: one `{"path", "key", "reason"}` object per skipped file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for s in skipped:
            f.write(json.dumps({"path": s.path, "key": s.key, "reason": s.reason}) + "\n")
    return path
