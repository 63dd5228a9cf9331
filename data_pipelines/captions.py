"""Captions as `txt` members of shard samples.

Caption files: CSV with a header holding `key` and `caption` (or `text`), or JSONL with
`{"key": ..., "caption"|"text": ...}` per line. Keys are manifest (clip) keys, so every window of a
clip gets the clip's caption; a sample key (`<clip>_w000`) may also be given and wins.

`emomae merge-captions <shard_dir> <captions> [--out DIR]` adds or replaces `txt` members in existing
shards, copying every other tar member byte for byte (no media re-encoding), one shard at a time
through a temporary file and an atomic rename, and updates index.json with caption counts.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path

from data_pipelines.atomic import write_json


class CaptionError(ValueError):
    """A caption file that cannot be read as key -> caption."""


def load_captions(path: Path | str) -> dict[str, str]:
    """key -> caption from a .csv or .jsonl/.json file (empty captions are dropped)."""
    path = Path(path)
    if not path.is_file():
        raise CaptionError(f"caption file not found: {path}")
    pairs: list[tuple[str, str, str]] = []  # (key, caption, where)
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            text_col = "caption" if "caption" in fields else "text" if "text" in fields else None
            if "key" not in fields or text_col is None:
                raise CaptionError(
                    f"{path}: CSV captions need a header with 'key' and 'caption' (or 'text'); got {fields}"
                )
            for n, rec in enumerate(reader, 2):
                pairs.append(((rec["key"] or "").strip(), (rec[text_col] or "").strip(), f"{path}:{n}"))
    elif path.suffix.lower() in (".jsonl", ".json"):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise CaptionError(f"{path}:{n}: not a JSON object per line ({err.msg})") from None
            text = rec.get("caption", rec.get("text")) if isinstance(rec, dict) else None
            if not isinstance(rec, dict) or "key" not in rec or text is None:
                raise CaptionError(
                    f'{path}:{n}: expected {{"key": ..., "caption" or "text": ...}}, got {line[:80]!r}'
                )
            pairs.append((str(rec["key"]).strip(), str(text).strip(), f"{path}:{n}"))
    else:
        raise CaptionError(
            f"{path}: captions must be .csv (key,caption) or .jsonl ({{key, caption}}), not {path.suffix!r}"
        )
    out: dict[str, str] = {}
    for key, text, where in pairs:
        if not key:
            raise CaptionError(f"{where}: empty key")
        if key in out and out[key] != text:
            raise CaptionError(f"{where}: key {key!r} has two different captions")
        if text:
            out[key] = text
    return out


def _sample_key(name: str) -> str:
    # WebDataset's rule: the key is everything before the first dot of the file name.
    base = name.rsplit("/", 1)[-1]
    return name[: len(name) - len(base)] + base.split(".", 1)[0]


def merge_shard(src: Path, dst: Path, captions: dict[str, str]) -> int:
    """Copy shard `src` to `dst` with `txt` members set from `captions`; returns samples captioned.

    Members other than `txt` are copied with their original headers and bytes. A sample keeps its
    old caption when `captions` has none for it.
    """
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    captioned = 0
    with tarfile.open(src, "r") as tin, tarfile.open(tmp, "w") as tout:
        members = tin.getmembers()
        groups: dict[str, list[tarfile.TarInfo]] = {}
        for m in members:
            groups.setdefault(_sample_key(m.name), []).append(m)
        for key, group in groups.items():
            meta = next((m for m in group if m.name.endswith(".json")), None)
            clip_key = json.loads(tin.extractfile(meta).read()).get("clip_key", key) if meta else key
            text = captions.get(key, captions.get(clip_key))
            old_txt = None
            for m in group:
                if m.name == f"{key}.txt":
                    old_txt = m
                    continue
                tout.addfile(m, tin.extractfile(m) if m.isfile() else None)
            if text is not None:
                data = text.encode()
                info = tarfile.TarInfo(f"{key}.txt")
                info.size, info.mtime, info.mode = len(data), int(time.time()), 0o444
                tout.addfile(info, io.BytesIO(data))
                captioned += 1
            elif old_txt is not None:
                tout.addfile(old_txt, tin.extractfile(old_txt))
                captioned += 1
    os.replace(tmp, dst)
    return captioned


def merge_captions(shard_dir: Path, captions: Path | dict[str, str], out_dir: Path | None = None) -> dict:
    """Set `txt` members of every shard in `shard_dir` (in place, or into `out_dir`); returns the
    updated index (per-shard and total `captions` counts)."""
    shard_dir = Path(shard_dir)
    index_file = shard_dir / "index.json"
    if not index_file.is_file():
        raise CaptionError(
            f"{index_file} not found: merge-captions needs a shard directory written by `emomae shards`"
        )
    caps = load_captions(captions) if isinstance(captions, (str, Path)) else dict(captions)
    index = json.loads(index_file.read_text())
    dst_dir = Path(out_dir) if out_dir else shard_dir
    dst_dir.mkdir(parents=True, exist_ok=True)
    if dst_dir.resolve() != shard_dir.resolve():
        for name in ("provenance.json", "errors.jsonl"):
            if (shard_dir / name).is_file():
                shutil.copy2(shard_dir / name, dst_dir / name)
    total = 0
    for shard in index["shards"]:
        shard["captions"] = merge_shard(shard_dir / shard["name"], dst_dir / shard["name"], caps)
        total += shard["captions"]
    index["totals"]["captions"] = total
    for group, tot in index["totals"].get("groups", {}).items():
        tot["captions"] = sum(s["captions"] for s in index["shards"] if s["group"] == group)
    index["captions_merged"] = {
        "source": str(captions) if isinstance(captions, (str, Path)) else "dict",
        "keys": len(caps),
        "samples": total,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(dst_dir / "index.json", index)
    return index


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="emomae merge-captions", description="Add text captions to existing shards."
    )
    p.add_argument("shard_dir", type=Path)
    p.add_argument("captions", type=Path, help="CSV key,caption or JSONL {key, caption|text}")
    p.add_argument("--out", type=Path, default=None, help="write captioned shards here instead of in place")
    args = p.parse_args(argv)
    try:
        index = merge_captions(args.shard_dir, args.captions, args.out)
    except CaptionError as err:
        print(f"emomae merge-captions: {err}", file=sys.stderr)
        return 2
    t = index["totals"]
    print(f"captioned {t['captions']} of {t['samples']} samples in {len(index['shards'])} shards")
    return 0
