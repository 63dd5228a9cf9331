"""MAFW: the official single-label, no-caption set_1..set_5 lists."""

from __future__ import annotations

from pathlib import Path

from data_pipelines.adapters.common import require_root
from data_pipelines.adapters.official_sets import index_videos, official_sets, rows_from_sets
from data_pipelines.manifests import DATASETS, ManifestError, ManifestRow


def scan_mafw(root: Path) -> list[ManifestRow]:
    """MAFW: `Train & Test Set/single/no_caption/set_{1..5}/{train,test}.txt` (lines
    `00025.mp4 anger`, 11 single-label class names) and clips in data/clips/."""
    root = require_root(root, "MAFW")
    classes = DATASETS["mafw"].classes
    split_dir = root / "Train & Test Set" / "single" / "no_caption"

    def read(path: Path) -> list[tuple[str, str]]:
        out = []
        for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or parts[1] not in classes:
                raise ManifestError(
                    f"MAFW: {path}:{n}: expected '<clip>.mp4 <class>' with a class in {classes}, got {line!r}"
                )
            out.append((str(int(Path(parts[0]).stem)), parts[1]))
        return out

    sets = official_sets(
        root,
        "MAFW",
        lambda k: (split_dir / f"set_{k}" / "train.txt", split_dir / f"set_{k}" / "test.txt"),
        read,
    )
    return rows_from_sets("mafw", sets, index_videos(root / "data" / "clips", "MAFW"))
