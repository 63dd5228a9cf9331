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

# A second copy as downloaders and file managers name it: `<clip>_1.mp4`, `<clip> (1).mp4`.
_COPY_MARK = re.compile(r"^(.+?)(?:_(\d+)| \((\d+)\))$")


def find_videos(
    root: Path, pattern: re.Pattern, scheme: str, suffixes: Iterable[str] = VIDEO_SUFFIXES
) -> tuple[dict[str, Path], list[SkippedFile]]:
    """(clip id -> path, skipped files) for the files under root with one of `suffixes`.

    A file whose stem matches `pattern` is its clip; a stem that matches once a copy mark (`_1`,
    ` (1)`) is cut off is a copy of that clip, used only when no plain-named file exists (the lowest
    copy number wins; the other copies are skipped as duplicates). One clip in several formats keeps
    the format earliest in `suffixes` (a converted .mp4 wins over the original .flv). Every other
    file with such a suffix is skipped as not following `scheme`."""
    rank = {s: i for i, s in enumerate(suffixes)}
    candidates: dict[str, list[tuple[int, int, Path]]] = {}
    skipped = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in rank or not path.is_file():
            continue
        clip, copy = _clip_id(path.stem, pattern)
        if clip is None:
            skipped.append(SkippedFile(str(path), f"name does not follow {scheme}"))
            continue
        candidates.setdefault(clip, []).append((copy, rank[path.suffix.lower()], path))
    found = {}
    for clip, options in candidates.items():
        options.sort()
        found[clip] = chosen = options[0][2]
        for copy, _, path in options[1:]:
            if copy != options[0][0]:  # the same file in a second format is no duplicate
                skipped.append(
                    SkippedFile(str(path), f"another copy of clip {clip}; {chosen.name} is used", clip)
                )
    return found, skipped


def _clip_id(stem: str, pattern: re.Pattern) -> tuple[str | None, int]:
    """(clip id, copy number: 0 for the plain name) of a file stem, or (None, 0)."""
    if pattern.match(stem):
        return stem, 0
    m = _COPY_MARK.match(stem)
    if m and pattern.match(m.group(1)):
        return m.group(1), int(m.group(2) or m.group(3))
    return None, 0


def found_instead(skipped: Sequence[SkippedFile]) -> str:
    """For a 'nothing matches' error: what the root held instead (a few names)."""
    others = [Path(s.path).name for s in skipped]
    if not others:
        return "no video files were found"
    return f"found {len(others)} other video file(s), e.g. {', '.join(others[:SHOWN])}"


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


def report_skipped(dataset: str, skipped: Sequence[SkippedFile], noun: str = "file") -> None:
    """One summary line on stderr: how many were passed over, the first few names and why."""
    if not skipped:
        return
    shown = "; ".join(f"{Path(s.path).name} ({s.reason})" for s in skipped[:SHOWN])
    more = f"; +{len(skipped) - SHOWN} more" if len(skipped) > SHOWN else ""
    print(f"{dataset}: skipped {len(skipped)} {noun}(s): {shown}{more}", file=sys.stderr)


def write_skipped(skipped: Iterable[SkippedFile], path: Path) -> Path:
    """`errors.jsonl`: one `{"path", "key", "reason"}` object per skipped file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for s in skipped:
            f.write(json.dumps({"path": s.path, "key": s.key, "reason": s.reason}) + "\n")
    return path
