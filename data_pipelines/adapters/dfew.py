"""DFEW: the official single-labelled set_1..set_5 CSV lists."""

from __future__ import annotations

import csv
from pathlib import Path

from data_pipelines.adapters.common import require_root
from data_pipelines.adapters.official_sets import index_videos, official_sets, rows_from_sets
from data_pipelines.manifests import DATASETS, ManifestError, ManifestRow


def scan_dfew(root: Path) -> list[ManifestRow]:
    """DFEW: EmoLabel_DataSplit/{train,test}(single-labeled)/set_{1..5}.csv (`video_name,label`,
    label 1..7 = happy sad neutral angry surprise disgust fear) and clips under Clip/ named by the
    zero-padded video_name (e.g. Clip/clip_224x224/00001.mp4)."""
    root = require_root(root, "DFEW")
    classes = DATASETS["dfew"].classes
    split_dir = root / "EmoLabel_DataSplit"

    def read(path: Path) -> list[tuple[str, str]]:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"video_name", "label"} <= set(reader.fieldnames):
                raise ManifestError(
                    f"DFEW: {path} must have the header video_name,label; got {reader.fieldnames}"
                )
            out = []
            for r in reader:
                code = int(r["label"])
                if not 1 <= code <= 7:
                    raise ManifestError(f"DFEW: {path}: label {code} of {r['video_name']} outside 1..7")
                out.append((str(int(r["video_name"])), classes[code - 1]))
            return out

    sets = official_sets(
        root,
        "DFEW",
        lambda k: (
            split_dir / "train(single-labeled)" / f"set_{k}.csv",
            split_dir / "test(single-labeled)" / f"set_{k}.csv",
        ),
        read,
    )
    return rows_from_sets("dfew", sets, index_videos(root / "Clip", "DFEW"))
