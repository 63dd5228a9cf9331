"""MSP-IMPROV: 4-class consensus labels, one session per fold."""

from __future__ import annotations

import re
import sys
from collections import Counter
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
from data_pipelines.manifests import DATASETS, ManifestError, ManifestRow, sanitize_key

# MSP-IMPROV-<clip id>: S01A (session 1, target emotion A), F01 (speaker: gender and session), P
# (scenario), FM01 (dialogue pair and number).
MSP_IMPROV_STEM = re.compile(r"^MSP-IMPROV-(S\d\d[A-Z]-([MF])(\d\d)-[A-Z]-[MF]{2}\d\d)$")


def msp_improv_name(stem: str) -> ClipName | None:
    """Key and speaker (`F01`) of an MSP-IMPROV file name; the class is not in the name."""
    m = MSP_IMPROV_STEM.match(stem)
    if m is None:
        return None
    _, gender, session = m.groups()
    return ClipName(sanitize_key(stem), f"{gender}{session}")


def scan_msp_improv(root: Path) -> list[ManifestRow]:
    """MSP-IMPROV: session*/S01A/P/MSP-IMPROV-S01A-F01-P-FM01.avi (+ .wav beside it) and the
    consensus labels of Evaluation.txt (`UTD-IMPROV-S01A-F01-P-FM01.avi; A; A:..; V:..; D:..; N:..;`).
    Keeps consensus A/H/N/S; fold = session - 1 (the speaker token F01/M01 names the session)."""
    root = require_root(root, "MSP-IMPROV")
    info = DATASETS["msp-improv"]
    labels_file = next((root / n for n in ("Evaluation.txt", "Evalution.txt") if (root / n).is_file()), None)
    if labels_file is None:
        raise ManifestError(f"MSP-IMPROV: consensus label file Evaluation.txt not found in {root}")
    code = {"A": "anger", "H": "happiness", "N": "neutral", "S": "sadness"}
    consensus = {}
    for line in labels_file.read_text(errors="replace").splitlines():
        m = re.match(r"^(?:UTD|MSP)-IMPROV-([A-Z0-9-]+)\.avi;\s*([A-Z])\s*;", line)
        if m:
            consensus[m.group(1)] = m.group(2)
    videos, skipped = find_videos(root, MSP_IMPROV_STEM, "MSP-IMPROV-S01A-F01-P-FM01", (".mp4", ".avi"))
    if not videos:
        raise ManifestError(
            f"MSP-IMPROV: no files named MSP-IMPROV-S01A-F01-P-FM01.avi under {root}; {found_instead(skipped)}"
        )
    wavs = sibling_audio(root)
    rows, dropped = [], Counter()
    for stem, path in sorted(videos.items()):
        clip_id = MSP_IMPROV_STEM.match(stem).group(1)
        label_code = consensus.get(clip_id)
        if label_code not in code:
            dropped[label_code or "no label"] += 1
            continue
        label, name = class_label(info.classes, code[label_code])
        audio = str(wavs[stem]) if stem in wavs else ""
        clip = msp_improv_name(stem)
        rows.append(
            ManifestRow(clip.key, str(path), audio, label, name, clip.speaker, int(clip.speaker[1:]) - 1)
        )
    if dropped:
        print(
            f"MSP-IMPROV: left out {sum(dropped.values())} clips without a 4-class consensus: {dict(dropped)}",
            file=sys.stderr,
        )
    report_skipped("MSP-IMPROV", skipped)
    return ScanResult(rows, skipped)
