"""Any folder of videos, optionally labelled by the parent folder's name."""

from __future__ import annotations

from pathlib import Path

from data_pipelines.adapters.common import class_label, require_root, unique_keys
from data_pipelines.manifests import VIDEO_SUFFIXES, ManifestError, ManifestRow, sanitize_key


def scan_folder(root: Path, labels_from_parent: bool = False) -> list[ManifestRow]:
    """Every video file under `root` (recursive), unlabelled unless `labels_from_parent` (class =
    name of the containing folder, classes in sorted order)."""
    root = require_root(root, "folder")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
    if not paths:
        raise ManifestError(f"no video files ({' '.join(VIDEO_SUFFIXES)}) under {root}")
    classes = sorted({p.parent.name for p in paths}) if labels_from_parent else []
    rows = []
    for p in paths:
        rel = p.relative_to(root).with_suffix("")
        row = ManifestRow(sanitize_key("-".join(rel.parts)), str(p))
        if labels_from_parent:
            row.label, row.label_name = class_label(classes, p.parent.name)
        rows.append(row)
    return unique_keys(rows)
