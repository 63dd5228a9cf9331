"""Manifest -> WebDataset tar shards (format in docs/architecture.md), in parallel and resumable.

The manifest is cut, per group (fold / split / all), into chunks of clips; each pool task decodes one
chunk and writes one shard to a temporary name, renamed atomically when complete. The parent appends
each finished shard (with a hash of its chunk) to `progress.jsonl`, so a rerun skips shards whose
file exists and whose chunk is unchanged, and rewrites the rest. Undecodable clips are skipped,
counted and listed in `errors.jsonl`.

`emomae shards <manifest.csv> <out_dir> [--workers N] [--captions FILE] [key=value ...]`
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from data_pipelines.decode import DecodeError, SamplingConfig, decode_clip
from data_pipelines.features import fbank_params
from data_pipelines.manifests import ManifestError, ManifestRow, read_manifest
from data_pipelines.shard_index import PROGRESS, finalize_index, provenance, read_progress, shard_urls

# Re-exported: importers use `data_pipelines.shards` for the whole shard API.
__all__ = ["ShardConfig", "clip_samples", "main", "plan_shards", "provenance", "shard_urls", "write_shards"]


@dataclass
class ShardConfig:
    num_frames: int = 16
    frame_stride: int = 4
    img_size: int = 160
    crop_box: list[int] | None = None  # x0 y0 x1 y1, e.g. VoxCeleb2 [32, 0, 192, 160]
    max_windows: int | None = None  # windows per clip; None = every full window
    jpeg_quality: int = 90
    audio_format: str = "wav"  # wav (int16 PCM) | flac
    sample_rate: int = 16000
    samples_per_shard: int = 256
    group_by: str = "fold"  # fold | split | none
    # Store each window's log-mel (`fbank.npy`, float16, ~65 kB per 2.56 s) so loaders skip the fbank;
    # they use it when its parameters match theirs and compute it from the audio otherwise.
    precompute_fbank: bool = True
    fbank_mel_bins: int = 128

    def __post_init__(self) -> None:
        if self.audio_format not in ("wav", "flac"):
            raise ValueError(f"ShardConfig.audio_format must be 'wav' or 'flac', got {self.audio_format!r}")
        if self.group_by not in ("fold", "split", "none"):
            raise ValueError(f"ShardConfig.group_by must be 'fold', 'split' or 'none', got {self.group_by!r}")
        if self.crop_box is not None and len(self.crop_box) != 4:
            raise ValueError(f"ShardConfig.crop_box must be [x0, y0, x1, y1], got {self.crop_box}")
        if min(self.num_frames, self.frame_stride, self.img_size, self.samples_per_shard, self.fbank_mel_bins) < 1:
            raise ValueError(
                "ShardConfig sizes (num_frames, frame_stride, img_size, samples_per_shard, fbank_mel_bins) must be >= 1"
            )

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(
            self.num_frames,
            self.frame_stride,
            self.img_size,
            tuple(self.crop_box) if self.crop_box else None,
            self.max_windows,
            self.sample_rate,
        )

    @property
    def clips_per_shard(self) -> int:
        # Shards are cut by clips before decoding; with max_windows each clip gives at most that many.
        return max(1, math.ceil(self.samples_per_shard / (self.max_windows or 1)))


# ---------------------------------------------------------------- one sample


def group_of(row: ManifestRow, group_by: str) -> str:
    if group_by == "fold" and row.fold is not None:
        return f"fold{row.fold}"
    if group_by == "split" and row.split:
        return row.split
    return "all"


def _label_value(label: str) -> int | list[float] | None:
    if not label:
        return None
    return [float(x) for x in label.split()] if " " in label.strip() else int(label)


def to_pcm16(audio: np.ndarray) -> np.ndarray:
    """(L,) float32 in [-1, 1] -> int16, as stored in the audio member."""
    return np.clip(np.round(audio * 32767.0), -32768, 32767).astype(np.int16)


def encode_audio(audio: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """(L,) float32 in [-1, 1] -> 16-bit mono wav or flac bytes."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, to_pcm16(audio), sample_rate, format=fmt.upper(), subtype="PCM_16")
    return buf.getvalue()


def encode_fbank(audio: np.ndarray, sample_rate: int, mel_bins: int) -> bytes:
    """The `fbank.npy` member: Kaldi log-mel of the audio exactly as a loader reads it back from the
    int16 member (/ 32768), every frame, not normalised, float16."""
    import torch

    from data_pipelines.features import encode_log_mel, kaldi_fbank

    waveform = torch.from_numpy(to_pcm16(audio).astype(np.float32) / 32768.0)
    return encode_log_mel(kaldi_fbank(waveform, sample_rate, mel_bins))


def encode_jpeg(frame: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def clip_samples(row: ManifestRow, cfg: ShardConfig, caption: str | None = None) -> list[dict]:
    """Decode one manifest row into WebDataset samples (one per window). Raises DecodeError."""
    bbox = None
    if row.bbox:
        try:
            bbox = tuple(float(v) for v in row.bbox.split())
            assert len(bbox) == 4
        except (ValueError, AssertionError):
            raise DecodeError(f"bbox of {row.key} must be 'x0 y0 x1 y1', got {row.bbox!r}") from None
    clip = decode_clip(Path(row.video), cfg.sampling(), Path(row.audio) if row.audio else None, bbox)
    out = []
    for w in clip.windows:
        key = f"{row.key}_w{w.index:03d}"
        meta = {
            "key": key,
            "clip_key": row.key,
            "window": w.index,
            "label": _label_value(row.label),
            "label_name": row.label_name,
            "speaker": row.speaker,
            "fold": row.fold,
            "split": row.split,
            "path": row.video,
            "source_fps": round(clip.source_fps, 4),
            "duration": round(clip.duration, 4),
            "num_frames": cfg.num_frames,
            "frame_indices": w.frame_indices,
            "sample_rate": cfg.sample_rate,
            "audio_samples": len(w.audio),
            "start": w.start,
            "frames_padded": w.frames_padded,
            "audio_padded": w.audio_padded,
        }
        if cfg.precompute_fbank:
            meta["fbank"] = fbank_params(cfg.sample_rate, cfg.fbank_mel_bins)
        sample = {"__key__": key, "json": json.dumps(meta).encode()}
        for t, frame in enumerate(w.frames):
            sample[f"f{t:02d}.jpg"] = encode_jpeg(frame, cfg.jpeg_quality)
        sample[cfg.audio_format] = encode_audio(w.audio, cfg.sample_rate, cfg.audio_format)
        if cfg.precompute_fbank:
            sample["fbank.npy"] = encode_fbank(w.audio, cfg.sample_rate, cfg.fbank_mel_bins)
        if caption:
            sample["txt"] = caption.encode()
        out.append(sample)
    return out


# ---------------------------------------------------------------- one shard (a pool task)


def _write_shard(task: dict) -> dict:
    """Decode a chunk of rows and write it as one shard; returns its progress record."""
    import webdataset as wds

    t0 = time.perf_counter()
    cfg = ShardConfig(**task["cfg"])
    out_dir = Path(task["out_dir"])
    final = out_dir / task["name"]
    tmp = out_dir / f".{task['name']}.{os.getpid()}.tmp"
    errors, samples, clips, captions = [], 0, 0, 0
    # A whole-second mtime keeps headers plain ustar: float mtimes add a pax header to every member,
    # which doubles the headers a loader parses.
    with one_torch_thread(), wds.TarWriter(str(tmp), mtime=int(time.time())) as sink:
        for rec in task["rows"]:
            row = ManifestRow(**rec)
            caption = task["captions"].get(row.key)
            try:
                items = clip_samples(row, cfg, caption)
            except DecodeError as err:
                errors.append({"path": row.video, "key": row.key, "reason": str(err)})
                continue
            except Exception as err:  # an odd file must not kill a day-long run; it is listed, not hidden
                errors.append({"path": row.video, "key": row.key, "reason": f"{type(err).__name__}: {err}"})
                continue
            for s in items:
                sink.write(s)
            samples += len(items)
            clips += 1
            captions += len(items) if caption else 0
    os.replace(tmp, final)
    return {
        "name": task["name"],
        "group": task["group"],
        "chunk": task["chunk"],
        "samples": samples,
        "clips": clips,
        "captions": captions,
        "errors": errors,
        "seconds": round(time.perf_counter() - t0, 3),
    }


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch ops of one clip (the fbank) on one thread, also when the parent writes a shard itself:
    on a busy machine torch's thread pool spins and turns a 1.5 ms fbank into 200 ms."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _init_worker() -> None:
    # Each worker decodes one clip at a time; extra threads would only fight over the cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


def plan_shards(rows: list[ManifestRow], cfg: ShardConfig, captions: dict[str, str]) -> list[dict]:
    """Group rows, cut groups into chunks and describe each shard to write (name, rows, chunk hash)."""
    groups: dict[str, list[ManifestRow]] = defaultdict(list)
    for row in rows:
        groups[group_of(row, cfg.group_by)].append(row)
    cfg_dict = asdict(cfg)
    content_cfg = {k: v for k, v in cfg_dict.items() if k not in ("samples_per_shard", "group_by")}
    tasks = []
    for group in sorted(groups):
        members = groups[group]
        n = cfg.clips_per_shard
        for i in range(0, len(members), n):
            chunk = [asdict(r) for r in members[i : i + n]]
            caps = {r["key"]: captions[r["key"]] for r in chunk if r["key"] in captions}
            digest = hashlib.sha1(
                json.dumps([chunk, content_cfg, caps], sort_keys=True).encode()
            ).hexdigest()[:16]
            tasks.append(
                {
                    "name": f"{group}-{i // n:06d}.tar",
                    "group": group,
                    "rows": chunk,
                    "captions": caps,
                    "chunk": digest,
                    "cfg": cfg_dict,
                }
            )
    return tasks


# ---------------------------------------------------------------- the writer


def write_shards(
    manifest: Path,
    out_dir: Path,
    cfg: ShardConfig | None = None,
    workers: int = 1,
    captions: Path | dict[str, str] | None = None,
    progress: bool = True,
    argv: list[str] | None = None,
) -> dict:
    """Write shards of every clip in `manifest` into `out_dir`; returns the index (also written to
    index.json), with `timing` (seconds, clips/s and samples/s of this run, shards written/skipped).

    workers > 1 uses a spawn pool: a calling script needs the usual `if __name__ == "__main__":` guard.
    """
    from tqdm import tqdm

    from data_pipelines.captions import load_captions

    cfg = cfg or ShardConfig()
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = read_manifest(Path(manifest))
    caps = load_captions(captions) if isinstance(captions, (str, Path)) else dict(captions or {})
    unknown = set(caps) - {r.key for r in rows}
    if unknown:
        print(
            f"captions: {len(unknown)} keys are not in the manifest (e.g. {sorted(unknown)[:3]}); ignored",
            file=sys.stderr,
        )

    tasks = plan_shards(rows, cfg, caps)
    done = read_progress(out_dir)
    todo, records = [], {}
    for t in tasks:
        if (out_dir / t["name"]).is_file() and done.get(t["name"], {}).get("chunk") == t["chunk"]:
            records[t["name"]] = done[t["name"]]
        else:
            todo.append({**t, "out_dir": str(out_dir)})
    bar = tqdm(
        total=len(tasks), initial=len(tasks) - len(todo), desc="shards", unit="shard", disable=not progress
    )
    with (out_dir / PROGRESS).open("a") as journal:

        def finish(rec: dict) -> None:
            records[rec["name"]] = rec
            journal.write(json.dumps(rec) + "\n")
            journal.flush()
            bar.update(1)

        if workers > 1 and len(todo) > 1:
            # spawn: the parent may hold threads (torch, loaders); forking those can deadlock workers.
            with mp.get_context("spawn").Pool(min(workers, len(todo)), initializer=_init_worker) as pool:
                for rec in pool.imap_unordered(_write_shard, todo):
                    finish(rec)
        else:
            for task in todo:
                finish(_write_shard(task))
    bar.close()
    written = {t["name"] for t in todo}
    return finalize_index(out_dir, tasks, records, cfg, manifest, written, time.perf_counter() - t0, argv)


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="emomae shards", description="Decode the clips of a manifest into WebDataset shards."
    )
    p.add_argument("manifest", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--captions", type=Path, default=None, help="CSV key,caption or JSONL {key, caption|text}")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="ShardConfig key=value, e.g. img_size=160 max_windows=2")
    args = p.parse_intermixed_args(argv)
    from omegaconf import OmegaConf

    from pretrain.config import ConfigError, load_config

    try:
        cfg = ShardConfig(**OmegaConf.to_container(load_config(ShardConfig, None, args.overrides)))
        write_shards(
            args.manifest,
            args.out_dir,
            cfg,
            args.workers,
            args.captions,
            not args.no_progress,
            argv=["emomae", "shards", *(argv if argv is not None else sys.argv[1:])],
        )
    except (ConfigError, ManifestError, ValueError, FileNotFoundError) as err:
        print(f"emomae shards: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
