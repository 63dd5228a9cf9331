"""The files beside the shards: `progress.jsonl` (resuming), `index.json`, `provenance.json`,
`errors.jsonl` (formats in docs/data.md), and `shard_urls`, which lists shards from the index."""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from data_pipelines.atomic import write_json
from data_pipelines.decode import GRID_FPS, INTERPOLATION
from data_pipelines.features import fbank_params

if TYPE_CHECKING:
    from data_pipelines.shards import ShardConfig

PROGRESS = "progress.jsonl"


def read_progress(out_dir: Path) -> dict[str, dict]:
    """Finished shards recorded by earlier runs, by name (the last record of a name wins)."""
    done = {}
    path = out_dir / PROGRESS
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
                done[rec["name"]] = rec
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut short by an interrupted run
    return done


def finalize_index(
    out_dir: Path,
    tasks: list[dict],
    records: dict[str, dict],
    cfg: ShardConfig,
    manifest: Path,
    written: set[str],
    seconds: float,
    argv: list[str] | None,
) -> dict:
    shards, totals = [], defaultdict(lambda: {"samples": 0, "clips": 0, "shards": 0, "captions": 0})
    errors = []
    for t in tasks:
        rec = records[t["name"]]
        shards.append(
            {
                "name": rec["name"],
                "group": rec["group"],
                "samples": rec["samples"],
                "clips": rec["clips"],
                "captions": rec.get("captions", 0),
                "chunk": rec["chunk"],
            }
        )
        for k in ("samples", "clips", "captions"):
            totals[rec["group"]][k] += rec.get(k, 0)
        totals[rec["group"]]["shards"] += 1
        errors.extend(rec["errors"])
    n_samples = sum(s["samples"] for s in shards)
    n_clips = sum(s["clips"] for s in shards)
    new_clips = sum(s["clips"] for s in shards if s["name"] in written)
    new_samples = sum(s["samples"] for s in shards if s["name"] in written)
    index = {
        "shards": shards,
        "totals": {
            "samples": n_samples,
            "clips": n_clips,
            "errors": len(errors),
            "shards": len(shards),
            "captions": sum(s["captions"] for s in shards),
            "groups": dict(totals),
        },
        "config": asdict(cfg),
        # Rates count only the clips decoded in this run (resumed shards cost nothing).
        "timing": {
            "seconds": round(seconds, 3),
            "shards_written": len(written),
            "shards_skipped": len(tasks) - len(written),
            "clips_per_s": round(new_clips / seconds, 3) if written else None,
            "samples_per_s": round(new_samples / seconds, 3) if written else None,
        },
    }
    stale = sorted({p.name for p in out_dir.glob("*.tar")} - {s["name"] for s in shards})
    if stale:
        print(
            f"note: {len(stale)} .tar files in {out_dir} are not part of this manifest and are not indexed, e.g. {stale[:3]}",
            file=sys.stderr,
        )
    write_json(out_dir / "index.json", index)
    write_json(out_dir / "provenance.json", provenance(cfg, manifest, argv))
    with (out_dir / "errors.jsonl").open("w") as f:
        for e in errors:
            f.write(json.dumps(e) + "\n")
    print(
        f"wrote {n_samples} samples in {len(shards)} shards; skipped {len(errors)} files (see errors.jsonl)"
        + (
            f"; {len(written)} shards written in {seconds:.1f} s ({new_clips / seconds:.2f} clips/s)"
            if written
            else "; all shards were up to date"
        )
    )
    return index


def provenance(cfg: ShardConfig, manifest: Path, argv: list[str] | None = None) -> dict:
    """How the shards were made: decoder and library versions, sampling, crop, resize, audio, command."""
    import decord
    import PIL
    import webdataset

    versions = {
        "python": platform.python_version(),
        "decord": decord.__version__,
        "PIL": PIL.__version__,
        "numpy": np.__version__,
        "webdataset": getattr(webdataset, "__version__", "unknown"),
    }
    for mod in ("torch", "torchaudio", "soundfile"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = None
    span = cfg.num_frames * cfg.frame_stride / GRID_FPS
    return {
        "decoder": "decord VideoReader + AudioReader (ffmpeg)",
        "versions": versions,
        "frame_sampling": (
            f"{cfg.num_frames} frames every {cfg.frame_stride} steps of a {GRID_FPS:g} fps time grid "
            f"({span:g} s per window, frames chosen by timestamp); non-overlapping windows from t=0, "
            f"tail shorter than a window dropped; max_windows={cfg.max_windows} (evenly spread); "
            "clips shorter than a window: one window padded with the last frame"
        ),
        "crop": {"bbox": "manifest bbox column when given", "crop_box": cfg.crop_box},
        "resize": f"short side to {cfg.img_size} then centre crop {cfg.img_size}x{cfg.img_size}",
        "interpolation": INTERPOLATION,
        "audio": {
            "sample_rate": cfg.sample_rate,
            "channels": 1,
            "format": cfg.audio_format,
            "subtype": "PCM_16",
            "resampler": "decord AudioReader (ffmpeg swresample)",
            "span": "exactly the sampled frames' window, zero-padded at the end when the track is short",
        },
        "fbank": (
            {
                "member": "fbank.npy",
                "params": fbank_params(cfg.sample_rate, cfg.fbank_mel_bins),
                "source": "the stored int16 audio / 32768, torchaudio.compliance.kaldi.fbank, all frames (no pad/crop), "
                "not normalised",
            }
            if cfg.precompute_fbank
            else None
        ),
        "jpeg_quality": cfg.jpeg_quality,
        "config": asdict(cfg),
        "manifest": {"path": str(Path(manifest).resolve()), "sha256": _sha256(Path(manifest))},
        "argv": list(sys.argv if argv is None else argv),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_commit": _git_commit(),
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def shard_urls(shard_dir: Path, groups: list[str] | None = None) -> list[str]:
    """Paths of the shards in `shard_dir` (from index.json), optionally only those of `groups`."""
    shard_dir = Path(shard_dir)
    index_file = shard_dir / "index.json"
    if not index_file.is_file():
        raise FileNotFoundError(
            f"{index_file} not found: is {shard_dir} a shard directory written by `emomae shards`?"
        )
    shards = json.loads(index_file.read_text())["shards"]
    if groups is not None:
        known = sorted({s["group"] for s in shards})
        missing = [g for g in groups if g not in known]
        if missing:
            raise ValueError(f"no shards of group(s) {missing} in {shard_dir}; groups there: {known}")
        shards = [s for s in shards if s["group"] in set(groups)]
    return [str(shard_dir / s["name"]) for s in shards]


# ---------------------------------------------------------------- what readers learn from the files


def local_shard_folder(url: str) -> Path | None:
    """The folder of a shard URL that is a local path; None for `pipe:`, http and other remote URLs."""
    if url.startswith("pipe:") or "://" in url:
        return None
    return Path(url).parent


@functools.lru_cache(maxsize=64)
def _index_counts(index_file: str, mtime_ns: int) -> dict[str, int]:
    # keyed by mtime too: a rewritten index (new shards, merged captions) is read afresh
    shards = json.loads(Path(index_file).read_text()).get("shards", [])
    return {str(s["name"]): int(s["samples"]) for s in shards}


def indexed_sample_count(url: str) -> int | None:
    """Samples `index.json` beside a local shard lists for it; None when unknown (no index, not listed,
    remote URL). Read once per index file and process, so a worker may ask for every shard it opens."""
    folder = local_shard_folder(url)
    index_file = folder / "index.json" if folder is not None else None
    if index_file is None or not index_file.is_file():
        return None
    try:
        counts = _index_counts(str(index_file), index_file.stat().st_mtime_ns)
    except (
        OSError,
        ValueError,
        KeyError,
        TypeError,
    ):  # unreadable or not an emomae index: no count to hold to
        return None
    return counts.get(Path(url).name)


def shard_config(folder: Path) -> tuple[dict, Path] | None:
    """(ShardConfig dict, the file it came from) of a shard folder: `index.json`'s `config`, else
    `provenance.json`'s; None when neither is there."""
    for name in ("index.json", "provenance.json"):
        path = Path(folder) / name
        if path.is_file():
            config = json.loads(path.read_text()).get("config")
            if isinstance(config, dict):
                return config, path
    return None


SAMPLING_KEYS = ("num_frames", "frame_stride", "img_size", "sample_rate")


def shard_sampling(urls: list[str]) -> dict | None:
    """How the local shards among `urls` were cut, from the files beside them: `num_frames`,
    `frame_stride` (steps of the `grid_fps` time grid), `img_size`, `sample_rate`, `fbank_mel_bins`
    (None when no fbank is stored) and `source` (the file read). None when no shard folder has an
    index.json or provenance.json; a ValueError naming both files when two folders disagree."""
    found: list[tuple[dict, Path]] = []
    for folder in sorted({f for f in map(local_shard_folder, urls) if f is not None}):
        config = shard_config(folder)
        if config is not None:
            found.append(config)
    if not found:
        return None
    (first, first_file), *others = found
    for config, path in others:
        differ = [k for k in SAMPLING_KEYS if config.get(k) != first.get(k)]
        if differ:
            raise ValueError(
                f"the shards were cut differently: {first_file} has "
                f"{ {k: first.get(k) for k in differ} }, {path} has { {k: config.get(k) for k in differ} }"
            )
    sampling = {k: first.get(k) for k in SAMPLING_KEYS}
    sampling["grid_fps"] = GRID_FPS
    sampling["fbank_mel_bins"] = first.get("fbank_mel_bins") if first.get("precompute_fbank") else None
    sampling["source"] = str(first_file)
    return sampling
