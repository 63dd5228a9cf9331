"""CREMA-D: actor blocks as the five official folds."""

from __future__ import annotations

import re
from pathlib import Path

from data_pipelines.adapters.common import class_label, find_videos, require_root, sibling_audio
from data_pipelines.manifests import DATASETS, ManifestError, ManifestRow


def scan_cremad(root: Path) -> list[ManifestRow]:
    """CREMA-D: `ActorID_Sentence_Emotion_Level.flv` (VideoFlash/) plus the matching AudioWAV/*.wav
    when present (the 16 kHz originals; otherwise the video's own track is used)."""
    root = require_root(root, "CREMA-D")
    info = DATASETS["crema-d"]
    pat = re.compile(r"^(\d{4})_([A-Z]{3})_([A-Z]{3})_([A-Z]{2})\.\w+$")
    videos = find_videos(root, pat)
    if not videos:
        raise ManifestError(
            f"no files matching ActorID_Sentence_Emotion_Level.flv under {root}; CREMA-D expects e.g. "
            "VideoFlash/1001_DFA_ANG_XX.flv (or .mp4), actors 1001-1091, emotions ANG DIS FEA HAP NEU SAD"
        )
    wavs = sibling_audio(root)
    blocks = [(1001, 1018), (1019, 1036), (1037, 1054), (1055, 1072), (1073, 1091)]
    rows = []
    for stem, path in sorted(videos.items()):
        actor, _, emo, _ = pat.match(path.name).groups()
        if emo not in info.classes:
            raise ManifestError(f"{path}: emotion {emo!r} is not one of {info.classes}")
        fold = next((f for f, (a, b) in enumerate(blocks) if a <= int(actor) <= b), None)
        if fold is None:
            raise ManifestError(f"{path}: actor {actor} outside CREMA-D's 1001-1091")
        label, name = class_label(info.classes, emo)
        audio = str(wavs[stem]) if stem in wavs else ""
        rows.append(ManifestRow(stem, str(path), audio, label, name, actor, fold))
    return rows
