"""HiCMAE's published annotation lists (`<video> <wav> <label>` lines)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from data_pipelines.adapters.common import (
    ClipName,
    ScanResult,
    SkippedFile,
    report_skipped,
    unique_keys,
)
from data_pipelines.adapters.cremad import cremad_name
from data_pipelines.adapters.msp_improv import msp_improv_name
from data_pipelines.adapters.ravdess import ravdess_name
from data_pipelines.manifests import DATASETS, VIDEO_SUFFIXES, ManifestError, ManifestRow, sanitize_key

# HiCMAE's CREMA-D list script (github sunlicai/HiCMAE, preprocess/creamd_av.py) leaves these clips
# out as broken, citing the dataset's own repository (github CheyneyComputerScience/CREMA-D).
CREMAD_BROKEN = frozenset({"1076_MTI_NEU_XX", "1076_MTI_SAD_XX", "1064_TIE_SAD_XX", "1064_IEO_DIS_MD"})

_SPLIT_DIR = re.compile(r"split_?0*(\d+)")  # split01/ ... split06/: one fold per folder


@dataclass
class ListedClip:
    """One clip as the lists give it (a clip appears in several lists)."""

    video: str
    audio: str
    label: str
    where: str  # `file:line` of its first line, for error messages
    kinds: set[str] = field(default_factory=set)  # train / val / test lists holding it
    held_out_in: list[int] = field(default_factory=list)  # split folders (0-based) holding it out


@dataclass(frozen=True)
class NamedClip:
    """A clip whose name follows a dataset's naming scheme."""

    dataset: str
    name: ClipName


def scan_hicmae(root: Path, rewrite_root: Sequence[str] = ()) -> list[ManifestRow]:
    """HiCMAE annotation lists: `<video or frame dir> <16 kHz wav> <label | 3 floats>` per line, no
    header. `root` is one list file, or a folder of them. Under two or more split0K/ folders a clip's
    fold is K-1 of the folder whose held-out list (test, else val) holds it; otherwise the list names
    give the split (the held-out list's clips are `test`). CREMA-D, RAVDESS and MSP-IMPROV clip names
    give the speaker, the class name and the key of that dataset's own adapter."""
    root = Path(root).expanduser().resolve()
    rewrites = _parse_rewrites(rewrite_root)
    files = _list_files(root)
    clips = _read_lists(files, rewrites)
    multi_fold = len({_split_folder(f) for f in files} - {None}) > 1
    rows, skipped = [], []
    for clip in clips.values():
        named = _recognise(clip.video)
        if named and named.dataset == "crema-d" and named.name.key in CREMAD_BROKEN:
            skipped.append(SkippedFile(clip.video, "in HiCMAE's CREMA-D broken-sample list", named.name.key))
            continue
        rows.append(_row(clip, named, multi_fold))
    _check_videos_exist(rows, root)
    report_skipped("hicmae", skipped, "clip")
    return ScanResult(unique_keys(rows), skipped)


def _parse_rewrites(rules: Sequence[str]) -> list[tuple[str, str]]:
    rewrites = []
    for rule in rules:
        if "=" not in rule:
            raise ManifestError(f"--rewrite-root expects OLD=NEW, got {rule!r}")
        rewrites.append(tuple(rule.split("=", 1)))
    return rewrites


def _list_files(root: Path) -> list[Path]:
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix in {".csv", ".txt"})
    if not files:
        raise ManifestError(f"no annotation lists (*.csv/*.txt with '<video> <wav> <label>' lines) at {root}")
    return files


def _split_folder(path: Path) -> int | None:
    """K-1 of a list under split0K/, else None."""
    m = _SPLIT_DIR.fullmatch(path.parent.name.lower())
    return int(m.group(1)) - 1 if m else None


def _list_kind(path: Path) -> str:
    return next((s for s in ("train", "val", "test") if s in path.stem.lower()), "")


def _held_out_kind(files: list[Path], folder: Path) -> str:
    """The list of a folder that holds clips out: test, or val where a folder has no test list (as
    HiCMAE's MSP-IMPROV split01/ holds session 1 out in val.csv)."""
    kinds = {_list_kind(f) for f in files if f.parent == folder}
    return "test" if "test" in kinds else "val"


def _read_lists(files: list[Path], rewrites: list[tuple[str, str]]) -> dict[str, ListedClip]:
    """video path -> ListedClip over all list files."""
    clips: dict[str, ListedClip] = {}
    for f in files:
        kind, fold = _list_kind(f), _split_folder(f)
        held_out = kind == _held_out_kind(files, f.parent)
        for n, line in enumerate(f.read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) not in (3, 5):
                raise ManifestError(
                    f"{f}:{n}: expected '<video> <wav> <label>' or '<video> <wav> v a d', got {line!r}"
                )
            video, audio = (_rewrite(p, rewrites) for p in parts[:2])
            clip = clips.setdefault(
                video, ListedClip(video, audio, _label(parts[2:], f"{f}:{n}"), f"{f}:{n}")
            )
            clip.kinds.add(kind)
            if held_out and fold is not None and fold not in clip.held_out_in:
                clip.held_out_in.append(fold)
    return clips


def _label(values: list[str], where: str) -> str:
    """A class index, or space-separated floats (valence arousal dominance), as the list spells them."""
    try:
        numbers = [int(values[0])] if len(values) == 1 else [float(v) for v in values]
    except ValueError:
        raise ManifestError(
            f"{where}: label must be an integer or three floats, got {' '.join(values)!r}"
        ) from None
    return str(numbers[0]) if len(values) == 1 else " ".join(values)


def _recognise(video: str) -> NamedClip | None:
    """The dataset whose naming scheme the clip's file or frame-folder name follows, if any."""
    path = Path(video)
    stem = path.stem if path.suffix.lower() in VIDEO_SUFFIXES else path.name
    stem = stem.removesuffix("_aligned")  # OpenFace writes a clip's frames to <clip>_aligned/
    for dataset, parse in (
        ("crema-d", cremad_name),
        ("ravdess", ravdess_name),
        ("msp-improv", msp_improv_name),
    ):
        name = parse(stem)
        if name is not None:
            return NamedClip(dataset, name)
    return None


def _row(clip: ListedClip, named: NamedClip | None, multi_fold: bool) -> ManifestRow:
    if len(clip.held_out_in) > 1:
        folds = ", ".join(f"split{k + 1:02d}" for k in clip.held_out_in)
        raise ManifestError(f"{clip.video} is held out by the lists of {folds}; a clip belongs to one fold")
    row = ManifestRow(_fallback_key(clip.video), clip.video, clip.audio, clip.label)
    if multi_fold:
        row.fold = clip.held_out_in[0] if clip.held_out_in else None
    else:
        row.split = _split_name(clip)
    if named is not None:
        row.key, row.speaker = named.name.key, named.name.speaker
        row.label_name = _class_name(named, clip)
    return row


def _split_name(clip: ListedClip) -> str:
    # A clip held out by its folder's lists is a test clip (HiCMAE's val lists copy its test lists).
    if clip.held_out_in or "test" in clip.kinds:
        return "test"
    return next((k for k in ("val", "train") if k in clip.kinds), "")


def _class_name(named: NamedClip, clip: ListedClip) -> str:
    """The class name of a listed label; where the clip's name carries the class too, both must agree."""
    if " " in clip.label:
        return ""  # regression targets
    classes = DATASETS[named.dataset].classes
    index = int(clip.label)
    if not 0 <= index < len(classes):
        raise ManifestError(f"{clip.where}: label {index} outside {named.dataset}'s classes {classes}")
    if named.name.label_name and named.name.label_name != classes[index]:
        raise ManifestError(
            f"{clip.where}: {Path(clip.video).name} is {named.name.label_name} by its name, but the list's "
            f"label {index} is {classes[index]} (classes in index order: {' '.join(classes)})"
        )
    return classes[index]


def _fallback_key(video: str) -> str:
    """Key of a clip no dataset scheme recognises: its name, with the folder for bare numbers."""
    p = Path(video)
    return sanitize_key(f"{p.parent.name}-{p.stem}" if p.stem.isdigit() else p.stem)


def _check_videos_exist(rows: list[ManifestRow], root: Path) -> None:
    missing = [r.video for r in rows if not Path(r.video).exists()]
    if missing:
        hint = " (use --rewrite-root OLD=NEW: the published lists hold the authors' absolute paths)"
        raise ManifestError(
            f"{len(missing)} of {len(rows)} videos in {root} do not exist, e.g. {missing[0]}{hint}"
        )


def _rewrite(path: str, rewrites: list[tuple[str, str]]) -> str:
    for old, new in rewrites:
        if path.startswith(old):
            return new + path[len(old) :]
    return path
