"""CREMA-D: actor blocks as the five official folds."""

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
    sibling_audio,
)
from data_pipelines.manifests import DATASETS, ManifestError, ManifestRow

CREMAD_STEM = re.compile(r"^(\d{4})_([A-Z]{3})_([A-Z]{3})_([A-Z]{2})$")  # ActorID_Sentence_Emotion_Level


def cremad_name(stem: str) -> ClipName | None:
    """Key (the stem), speaker (the actor) and class (the emotion code) of a CREMA-D clip name."""
    m = CREMAD_STEM.match(stem)
    if m is None:
        return None
    actor, _, emotion, _ = m.groups()
    return ClipName(stem, actor, emotion)


def scan_cremad(root: Path) -> list[ManifestRow]:
    """CREMA-D: `ActorID_Sentence_Emotion_Level.flv` (VideoFlash/) plus the matching AudioWAV/*.wav
    when present (the 16 kHz originals; otherwise the video's own track is used)."""
    root = require_root(root, "CREMA-D")
    info = DATASETS["crema-d"]
    videos, skipped = find_videos(root, CREMAD_STEM, "ActorID_Sentence_Emotion_Level (1001_DFA_ANG_XX)")
    if not videos:
        raise ManifestError(
            f"no files matching ActorID_Sentence_Emotion_Level.flv under {root}; CREMA-D expects e.g. "
            "VideoFlash/1001_DFA_ANG_XX.flv (or .mp4), actors 1001-1091, emotions ANG DIS FEA HAP NEU SAD; "
            + found_instead(skipped)
        )
    wavs = sibling_audio(root)
    blocks = [(1001, 1018), (1019, 1036), (1037, 1054), (1055, 1072), (1073, 1091)]
    rows = []
    for stem, path in sorted(videos.items()):
        name = cremad_name(stem)
        if name.label_name not in info.classes:
            raise ManifestError(f"{path}: emotion {name.label_name!r} is not one of {info.classes}")
        fold = next((f for f, (a, b) in enumerate(blocks) if a <= int(name.speaker) <= b), None)
        if fold is None:
            raise ManifestError(f"{path}: actor {name.speaker} outside CREMA-D's 1001-1091")
        label, label_name = class_label(info.classes, name.label_name)
        audio = str(wavs[stem]) if stem in wavs else ""
        rows.append(ManifestRow(name.key, str(path), audio, label, label_name, name.speaker, fold))
    report_skipped("CREMA-D", skipped)
    return ScanResult(rows, skipped)
