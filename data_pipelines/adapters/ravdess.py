"""RAVDESS: the full-AV speech files, folds of four actors."""

from __future__ import annotations

import re
from pathlib import Path

from data_pipelines.adapters.common import (
    ClipName,
    ScanResult,
    class_label,
    find_videos,
    found_instead,
    report_skipped,
    require_root,
)
from data_pipelines.manifests import DATASETS, ManifestError, ManifestRow

# Modality-Channel-Emotion-Intensity-Statement-Repetition-Actor
RAVDESS_STEM = re.compile(r"^(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)$")


def ravdess_name(stem: str, where: str = "") -> ClipName | None:
    """Key, speaker (the actor, `05`) and class of a RAVDESS file name. The key names the full-AV
    (modality 01) file: RAVDESS cuts its full-AV, video-only (02) and audio-only (03) files from one
    performance, and HiCMAE reads the video-only file's frames, so all three give the same clip."""
    m = RAVDESS_STEM.match(stem)
    if m is None:
        return None
    fields = m.groups()
    emotion, actor = int(fields[2]), int(fields[6])
    if not 1 <= emotion <= 8 or not 1 <= actor <= 24:
        raise ManifestError(
            f"{where or stem}: emotion {emotion} or actor {actor} outside RAVDESS's 1-8 / 1-24"
        )
    return ClipName("-".join(("01", *fields[1:])), f"{actor:02d}", DATASETS["ravdess"].classes[emotion - 1])


def scan_ravdess(root: Path) -> list[ManifestRow]:
    """RAVDESS: `Modality-Channel-Emotion-Intensity-Statement-Repetition-Actor.mp4`; keeps full-AV
    (modality 01) speech (channel 01) files; label = emotion code - 1; fold = (actor - 1) // 4."""
    root = require_root(root, "RAVDESS")
    info = DATASETS["ravdess"]
    found, skipped = find_videos(root, RAVDESS_STEM, "MM-CC-EE-II-SS-RR-AA (01-01-03-02-01-01-12)", (".mp4",))
    rows = []
    for stem, path in sorted(found.items()):
        modality, channel = (int(g) for g in RAVDESS_STEM.match(stem).groups()[:2])
        if modality != 1 or channel != 1:
            continue  # video-only, audio-only and song files are not part of the AV speech protocol
        name = ravdess_name(stem, str(path))
        label, label_name = class_label(info.classes, name.label_name)
        rows.append(
            ManifestRow(
                name.key, str(path), "", label, label_name, name.speaker, (int(name.speaker) - 1) // 4
            )
        )
    if not rows:
        raise ManifestError(
            f"no full-AV speech files (01-01-EE-II-SS-RR-AA.mp4) under {root}; RAVDESS expects "
            "Actor_XX/01-01-03-02-01-01-12.mp4 from the Video_Speech_Actor_XX.zip archives"
            + (
                f" ({len(found)} other RAVDESS files were skipped)"
                if found
                else f"; {found_instead(skipped)}"
            )
        )
    report_skipped("RAVDESS", skipped)
    return ScanResult(rows, skipped)
