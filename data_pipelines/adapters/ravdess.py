"""RAVDESS: the full-AV speech files, folds of four actors."""

from __future__ import annotations

import re
from pathlib import Path

from data_pipelines.adapters.common import class_label, find_videos, require_root
from data_pipelines.manifests import DATASETS, ManifestError, ManifestRow


def scan_ravdess(root: Path) -> list[ManifestRow]:
    """RAVDESS: `Modality-Channel-Emotion-Intensity-Statement-Repetition-Actor.mp4`; keeps full-AV
    (modality 01) speech (channel 01) files; label = emotion code - 1; fold = (actor - 1) // 4."""
    root = require_root(root, "RAVDESS")
    info = DATASETS["ravdess"]
    pat = re.compile(r"^(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)\.mp4$", re.IGNORECASE)
    found = find_videos(root, pat, (".mp4",))
    rows = []
    for stem, path in sorted(found.items()):
        modality, channel, emotion, _, _, _, actor = (int(g) for g in pat.match(path.name).groups())
        if modality != 1 or channel != 1:
            continue  # video-only, audio-only and song files are not part of the AV speech protocol
        if not 1 <= emotion <= 8 or not 1 <= actor <= 24:
            raise ManifestError(f"{path}: emotion {emotion} or actor {actor} outside RAVDESS's 1-8 / 1-24")
        label, name = class_label(info.classes, info.classes[emotion - 1])
        rows.append(ManifestRow(stem, str(path), "", label, name, f"{actor:02d}", (actor - 1) // 4))
    if not rows:
        raise ManifestError(
            f"no full-AV speech files (01-01-EE-II-SS-RR-AA.mp4) under {root}; RAVDESS expects "
            "Actor_XX/01-01-03-02-01-01-12.mp4 from the Video_Speech_Actor_XX.zip archives"
            + (f" ({len(found)} other RAVDESS files were skipped)" if found else "")
        )
    return rows
