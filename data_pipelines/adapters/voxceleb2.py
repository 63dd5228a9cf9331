"""VoxCeleb2: unlabelled pretraining clips, speaker = the id folder."""

from __future__ import annotations

import re
from pathlib import Path

from data_pipelines.adapters.common import (
    ScanResult,
    SkippedFile,
    found_instead,
    report_skipped,
    require_root,
)
from data_pipelines.manifests import ManifestError, ManifestRow, sanitize_key

_SPEAKER = re.compile(r"id\d+")


def scan_voxceleb2(root: Path) -> list[ManifestRow]:
    """VoxCeleb2: `id*/<youtube id>/<clip>.mp4` (dev/mp4 or test/mp4), unlabelled, speaker = id.
    Other .mp4 files under root are skipped and counted."""
    root = require_root(root, "VoxCeleb2")
    rows, skipped = [], []
    for path in sorted(root.rglob("*.mp4")):
        spk, vid = path.parent.parent.name, path.parent.name
        if not _SPEAKER.fullmatch(spk) or not path.is_file():
            skipped.append(SkippedFile(str(path), "not at id<digits>/<video id>/<clip>.mp4"))
            continue
        parts = {p.lower() for p in path.relative_to(root).parts}
        split = "test" if "test" in parts else "train" if "dev" in parts else ""
        rows.append(
            ManifestRow(sanitize_key(f"{spk}_{vid}_{path.stem}"), str(path), speaker=spk, split=split)
        )
    if not rows:
        raise ManifestError(
            f"no files matching id*/VIDEO_ID/CLIP.mp4 under {root}; VoxCeleb2 expects e.g. "
            f"dev/mp4/id00012/21Uxsk56VDQ/00001.mp4; {found_instead(skipped)}"
        )
    report_skipped("VoxCeleb2", skipped)
    return ScanResult(rows, skipped)
