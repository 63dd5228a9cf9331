"""VoxCeleb2: unlabelled pretraining clips, speaker = the id folder."""

from __future__ import annotations

import re
from pathlib import Path

from data_pipelines.adapters.common import require_root
from data_pipelines.manifests import ManifestError, ManifestRow, sanitize_key


def scan_voxceleb2(root: Path) -> list[ManifestRow]:
    """VoxCeleb2: `id*/<youtube id>/<clip>.mp4` (dev/mp4 or test/mp4), unlabelled, speaker = id."""
    root = require_root(root, "VoxCeleb2")
    rows = []
    for path in sorted(root.rglob("id*/*/*.mp4")):
        spk, vid = path.parent.parent.name, path.parent.name
        if not re.fullmatch(r"id\d+", spk):
            continue
        parts = {p.lower() for p in path.relative_to(root).parts}
        split = "test" if "test" in parts else "train" if "dev" in parts else ""
        rows.append(
            ManifestRow(sanitize_key(f"{spk}_{vid}_{path.stem}"), str(path), speaker=spk, split=split)
        )
    if not rows:
        raise ManifestError(
            f"no files matching id*/VIDEO_ID/CLIP.mp4 under {root}; VoxCeleb2 expects e.g. dev/mp4/id00012/21Uxsk56VDQ/00001.mp4"
        )
    return rows
