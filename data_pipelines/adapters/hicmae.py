"""HiCMAE's published annotation lists (`<video> <wav> <label>` lines)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from data_pipelines.adapters.common import unique_keys
from data_pipelines.manifests import ManifestError, ManifestRow, sanitize_key


def scan_hicmae(root: Path, rewrite_root: Sequence[str] = ()) -> list[ManifestRow]:
    """HiCMAE annotation lists: `<video or frame dir> <16 kHz wav> <label | 3 floats>` per line, no
    header. `root` is one list file, or a folder of them (train/val/test in the file name gives the
    split; lists under split0K/ give fold K-1 to the clips of their test list)."""
    root = Path(root).expanduser().resolve()
    rewrites = []
    for rule in rewrite_root:
        if "=" not in rule:
            raise ManifestError(f"--rewrite-root expects OLD=NEW, got {rule!r}")
        rewrites.append(tuple(rule.split("=", 1)))
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix in {".csv", ".txt"})
    if not files:
        raise ManifestError(f"no annotation lists (*.csv/*.txt with '<video> <wav> <label>' lines) at {root}")
    entries: dict[str, dict] = {}
    for f in files:
        split = next((s for s in ("train", "val", "test") if s in f.stem.lower()), "")
        m = re.fullmatch(r"split_?0*(\d+)", f.parent.name.lower())
        fold = int(m.group(1)) - 1 if m and split == "test" else None
        for n, line in enumerate(f.read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) not in (3, 5):
                raise ManifestError(
                    f"{f}:{n}: expected '<video> <wav> <label>' or '<video> <wav> v a d', got {line!r}"
                )
            video, audio = (_rewrite(p, rewrites) for p in parts[:2])
            e = entries.setdefault(
                video, {"audio": audio, "label": " ".join(parts[2:]), "splits": set(), "fold": None}
            )
            e["splits"].add(split)
            e["fold"] = fold if fold is not None else e["fold"]
    multi_fold = any(e["fold"] is not None for e in entries.values())
    rows = []
    for video, e in entries.items():
        splits = e["splits"]
        # The reference's val lists are copies of its test lists: such a clip is a test clip.
        split = "" if multi_fold else ("test" if "test" in splits else next(iter(sorted(splits))))
        label = e["label"]
        if " " not in label:
            label = str(int(label))
        p = Path(video)
        rows.append(
            ManifestRow(
                sanitize_key(f"{p.parent.name}-{p.stem}" if p.stem.isdigit() else p.stem),
                video,
                e["audio"],
                label,
                fold=e["fold"],
                split=split,
            )
        )
    missing = [r.video for r in rows if not Path(r.video).exists()]
    if missing:
        hint = " (use --rewrite-root OLD=NEW: the published lists hold the authors' absolute paths)"
        raise ManifestError(
            f"{len(missing)} of {len(rows)} videos in {root} do not exist, e.g. {missing[0]}{hint}"
        )
    return unique_keys(rows)


def _rewrite(path: str, rewrites: list[tuple[str, str]]) -> str:
    for old, new in rewrites:
        if path.startswith(old):
            return new + path[len(old) :]
    return path
