"""Official 5-set protocols (DFEW, MAFW): per set a train and a test list; fold k-1 is the set whose
test list holds the clip."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from data_pipelines.adapters.common import class_label
from data_pipelines.manifests import DATASETS, VIDEO_SUFFIXES, ManifestError, ManifestRow, sanitize_key


def official_sets(
    root: Path,
    dataset: str,
    files: Callable[[int], tuple[Path, Path]],
    read: Callable[[Path], list[tuple[str, str]]],
) -> dict[str, tuple[str, int]]:
    """clip id -> (label name, fold) from 5 official (train, test) list pairs; fold k-1 is the set
    whose *test* list holds the clip. Checks each set's lists partition the same clips."""
    out: dict[str, tuple[str, int]] = {}
    all_clips: set[str] | None = None
    for k in range(1, 6):
        train_file, test_file = files(k)
        for f in (train_file, test_file):
            if not f.is_file():
                raise ManifestError(
                    f"{dataset}: official split file {f} not found (root {root}); see docs/data.md"
                )
        train, test = read(train_file), read(test_file)
        clips = {c for c, _ in train} | {c for c, _ in test}
        if all_clips is not None and clips != all_clips:
            raise ManifestError(
                f"{dataset}: set_{k} lists cover {len(clips)} clips, set_1 covers {len(all_clips)}"
            )
        all_clips = clips
        for clip, name in test:
            if clip in out:
                raise ManifestError(
                    f"{dataset}: clip {clip} is in the test lists of set_{out[clip][1] + 1} and set_{k}"
                )
            out[clip] = (name, k - 1)
    return out


def index_videos(folder: Path, dataset: str) -> dict[str, Path]:
    """Clip id (file stem without leading zeros) -> path of every video under `folder`."""
    if not folder.is_dir():
        raise ManifestError(
            f"{dataset}: video folder {folder} not found; see docs/data.md for the expected layout"
        )
    return {p.stem.lstrip("0") or "0": p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES}


def rows_from_sets(
    dataset: str, sets: dict[str, tuple[str, int]], videos: dict[str, Path]
) -> list[ManifestRow]:
    """Manifest rows of the clips of `official_sets`, each matched to its video."""
    info = DATASETS[dataset]
    missing = [c for c in sets if c.lstrip("0") not in videos]
    if missing:
        raise ManifestError(
            f"{dataset}: {len(missing)} clips of the split files have no video, e.g. {missing[:3]}"
        )
    rows = []
    for clip, (name, fold) in sorted(sets.items()):
        path = videos[clip.lstrip("0")]
        label, name = class_label(info.classes, name)
        rows.append(ManifestRow(sanitize_key(f"{dataset}_{path.stem}"), str(path), "", label, name, "", fold))
    return rows
