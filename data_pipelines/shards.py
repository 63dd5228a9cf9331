"""Manifest -> WebDataset tar shards (format in docs/architecture.md), in parallel and resumable.

The manifest is cut, per group (fold / split / all), into chunks of clips; each pool task decodes one
chunk and writes one shard to a temporary name, renamed atomically when complete. The parent appends
each finished shard (with a hash of its chunk) to `progress.jsonl`, so a rerun skips shards whose
file exists and whose chunk is unchanged, and rewrites the rest. Undecodable clips are skipped,
counted and listed in `errors.jsonl`. The command line, `emomae shards`, is data_pipelines/shards_cli.py.
"""

from __future__ import annotations

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

from data_pipelines.decode import SILENCE_DBFS, DecodedClip, DecodeError, SamplingConfig, Window, decode_clip
from data_pipelines.face_track import MULTI_FACE_SHARE, FaceConfig
from data_pipelines.features import fbank_params
from data_pipelines.manifests import ManifestRow, read_manifest
from data_pipelines.shard_index import PROGRESS, finalize_index, provenance, read_progress, shard_urls

# Re-exported: importers use `data_pipelines.shards` for the whole shard API.
__all__ = ["ShardConfig", "clip_samples", "plan_shards", "provenance", "shard_urls", "write_shards"]


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
    # A track below decode.SILENCE_DBFS: keep it (flagged `audio_silent` in the json) or skip the clip.
    silent_audio: str = "keep"  # keep | skip
    # Clips without any audio: write them with zero audio (`audio_missing`) instead of skipping them.
    allow_missing_audio: bool = False
    # Face crops (docs/data.md): auto = detect, track and crop the face of every clip without a
    # manifest bbox; none = the bbox / centre crop as before. Clips with a face on fewer than
    # face_min_share of their sampled frames are skipped (kind no_face).
    face: str = "none"  # auto | none
    face_min_share: float = 0.5
    face_scale: float = 1.3
    face_smooth: int = 5

    def __post_init__(self) -> None:
        if self.face not in ("auto", "none"):
            raise ValueError(f"ShardConfig.face must be 'auto' or 'none', got {self.face!r}")
        self.face_config()  # checks the face_* settings
        if self.silent_audio not in ("keep", "skip"):
            raise ValueError(f"ShardConfig.silent_audio must be 'keep' or 'skip', got {self.silent_audio!r}")
        if self.audio_format not in ("wav", "flac"):
            raise ValueError(f"ShardConfig.audio_format must be 'wav' or 'flac', got {self.audio_format!r}")
        if self.group_by not in ("fold", "split", "none"):
            raise ValueError(f"ShardConfig.group_by must be 'fold', 'split' or 'none', got {self.group_by!r}")
        if self.crop_box is not None and len(self.crop_box) != 4:
            raise ValueError(f"ShardConfig.crop_box must be [x0, y0, x1, y1], got {self.crop_box}")
        if (
            min(
                self.num_frames, self.frame_stride, self.img_size, self.samples_per_shard, self.fbank_mel_bins
            )
            < 1
        ):
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

    def face_config(self) -> FaceConfig | None:
        """The face step's settings; None with face=none."""
        settings = FaceConfig(self.face_min_share, self.face_scale, self.face_smooth)
        return settings if self.face == "auto" else None

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


def parse_bbox(row: ManifestRow) -> tuple[float, float, float, float] | None:
    if not row.bbox:
        return None
    try:
        bbox = tuple(float(v) for v in row.bbox.split())
    except ValueError:
        bbox = ()
    if len(bbox) != 4:
        raise DecodeError(f"bbox of {row.key} must be 'x0 y0 x1 y1', got {row.bbox!r}")
    return bbox


def decode_row(row: ManifestRow, cfg: ShardConfig) -> DecodedClip:
    """Decode one manifest row; a clip the config says to skip raises DecodeError (with its kind)."""
    clip = decode_clip(
        Path(row.video),
        cfg.sampling(),
        Path(row.audio) if row.audio else None,
        parse_bbox(row),
        fps=row.fps,
        allow_missing_audio=cfg.allow_missing_audio,
        face=cfg.face_config(),
    )
    if clip.audio_silent and cfg.silent_audio == "skip":
        raise DecodeError(
            f"{row.video}: silent audio ({clip.audio_rms_dbfs:.0f} dBFS < {SILENCE_DBFS:g} dBFS) and "
            "silent_audio=skip (use --silent-audio keep to keep it)",
            kind="silent_audio",
        )
    return clip


def clip_meta(row: ManifestRow, clip: DecodedClip, w: Window, cfg: ShardConfig) -> dict:
    """The `json` member of one window's sample."""
    meta = {
        "key": f"{row.key}_w{w.index:03d}",
        "clip_key": row.key,
        "window": w.index,
        "label": _label_value(row.label),
        "label_name": row.label_name,
        "speaker": row.speaker,
        "fold": row.fold,
        "split": row.split,
        "path": row.video,
        "source_fps": round(clip.source_fps, 4),
        "fps_source": clip.fps_source,
        "duration": round(clip.duration, 4),
        "num_frames": cfg.num_frames,
        "frame_indices": w.frame_indices,
        "sample_rate": cfg.sample_rate,
        "audio_samples": len(w.audio),
        "start": w.start,
        "frames_padded": w.frames_padded,
        "audio_padded": w.audio_padded,
        "audio_missing": clip.audio_missing,
        "audio_silent": clip.audio_silent,
        "partial": clip.partial,
    }
    if clip.partial:
        meta["declared_duration"] = round(clip.declared_duration, 4)
    if cfg.precompute_fbank:
        meta["fbank"] = fbank_params(cfg.sample_rate, cfg.fbank_mel_bins)
    if clip.face_track is not None:
        meta["face"] = face_meta(clip, w)
    return meta


def face_meta(clip: DecodedClip, w: Window) -> dict:
    """The json's `face` entry: this window's crop square per frame, and the clip's face share."""
    track = clip.face_track
    return {
        "boxes": w.face_boxes,
        "clip_share": round(track.share, 4),
        "clip_frames": len(track.detected),
        "multi_face": track.multi_face,
        "detector": track.detector,
    }


def window_samples(
    row: ManifestRow, clip: DecodedClip, cfg: ShardConfig, caption: str | None = None
) -> list[dict]:
    """The WebDataset samples (one per window) of a decoded clip."""
    out = []
    for w in clip.windows:
        meta = clip_meta(row, clip, w, cfg)
        sample = {"__key__": meta["key"], "json": json.dumps(meta).encode()}
        for t, frame in enumerate(w.frames):
            sample[f"f{t:02d}.jpg"] = encode_jpeg(frame, cfg.jpeg_quality)
        sample[cfg.audio_format] = encode_audio(w.audio, cfg.sample_rate, cfg.audio_format)
        if cfg.precompute_fbank:
            sample["fbank.npy"] = encode_fbank(w.audio, cfg.sample_rate, cfg.fbank_mel_bins)
        if caption:
            sample["txt"] = caption.encode()
        out.append(sample)
    return out


def clip_samples(row: ManifestRow, cfg: ShardConfig, caption: str | None = None) -> list[dict]:
    """Decode one manifest row into WebDataset samples (one per window). Raises DecodeError."""
    return window_samples(row, decode_row(row, cfg), cfg, caption)


def clip_report(row: ManifestRow, clip: DecodedClip) -> dict | None:
    """What the run summary counts about a written clip (kept in progress.jsonl with its shard); None
    for a plain video file with its audio, so a million-clip run keeps a small journal."""
    face = clip.face_track if is_notable_face_track(clip.face_track) else None
    if clip.fps_source == "container" and not (
        clip.audio_silent or clip.audio_missing or clip.partial or face is not None
    ):
        return None
    report = {
        "key": row.key,
        "path": row.video,
        "fps": round(clip.source_fps, 4),
        "fps_source": clip.fps_source,
        "audio_silent": clip.audio_silent,
        "audio_missing": clip.audio_missing,
        "partial": clip.partial,
    }
    if face is not None:
        report["face_share"] = round(face.share, 4)
        report["multi_face"] = face.multi_face
        report["face_detector"] = face.detector
    if clip.partial:
        report["kept_s"] = round(clip.duration, 3)
        report["declared_s"] = round(clip.declared_duration, 3)
    return report


def is_notable_face_track(track) -> bool:
    """A track the summary lists by clip: a face on fewer than all frames, two faces, or found only by
    the full-range model (each sample's json has every clip's track; the journal stays small)."""
    return track is not None and (track.share < 1.0 or track.multi_face or "full-range" in track.detector)


# ---------------------------------------------------------------- one shard (a pool task)


def _write_shard(task: dict) -> dict:
    """Decode a chunk of rows and write it as one shard; returns its progress record."""
    import webdataset as wds

    t0 = time.perf_counter()
    cfg = ShardConfig(**task["cfg"])
    out_dir = Path(task["out_dir"])
    final = out_dir / task["name"]
    tmp = out_dir / f".{task['name']}.{os.getpid()}.tmp"
    errors, media, samples, clips, captions, face_clips = [], [], 0, 0, 0, 0
    # A whole-second mtime keeps headers plain ustar: float mtimes add a pax header to every member,
    # which doubles the headers a loader parses.
    with one_torch_thread(), wds.TarWriter(str(tmp), mtime=int(time.time())) as sink:
        for rec in task["rows"]:
            row = ManifestRow(**rec)
            caption = task["captions"].get(row.key)
            try:
                clip = decode_row(row, cfg)
                items = window_samples(row, clip, cfg, caption)
            except DecodeError as err:
                errors.append({"path": row.video, "key": row.key, "reason": str(err), "kind": err.kind})
                continue
            except Exception as err:  # an odd file must not kill a day-long run; it is listed, not hidden
                errors.append(
                    {
                        "path": row.video,
                        "key": row.key,
                        "reason": f"{type(err).__name__}: {err}",
                        "kind": "broken",
                    }
                )
                continue
            report = clip_report(row, clip)
            if report is not None:
                media.append(report)
            for s in items:
                sink.write(s)
            samples += len(items)
            clips += 1
            face_clips += clip.face_track is not None
            captions += len(items) if caption else 0
    os.replace(tmp, final)
    return {
        "name": task["name"],
        "group": task["group"],
        "chunk": task["chunk"],
        "samples": samples,
        "clips": clips,
        "captions": captions,
        "face_clips": face_clips,
        "errors": errors,
        "media": media,
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
    try:
        import cv2  # face=auto: OpenCV's own thread pool would fight the other workers too

        cv2.setNumThreads(1)
    except ImportError:
        pass


def plan_shards(rows: list[ManifestRow], cfg: ShardConfig, captions: dict[str, str]) -> list[dict]:
    """Group rows, cut groups into chunks and describe each shard to write (name, rows, chunk hash)."""
    groups: dict[str, list[ManifestRow]] = defaultdict(list)
    for row in rows:
        groups[group_of(row, cfg.group_by)].append(row)
    cfg_dict = asdict(cfg)
    content_cfg = {k: v for k, v in cfg_dict.items() if k not in ("samples_per_shard", "group_by")}
    if cfg.face == "none":  # shards written before the face step keep their hash
        content_cfg = {k: v for k, v in content_cfg.items() if not k.startswith("face")}
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

    if cfg.face == "auto":
        from data_pipelines.faces import default_detector

        default_detector()  # FaceModelError (no OpenCV, no model) before any shard is written
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
    index = finalize_index(out_dir, tasks, records, cfg, manifest, written, time.perf_counter() - t0, argv)
    return add_media_report(out_dir, index, [records[t["name"]] for t in tasks], cfg)


# ---------------------------------------------------------------- media report (partial, silent, missing audio)

MEDIA_POLICY = {
    "partial": "a container whose frames end more than 0.1 s before its declared duration is truncated: it is "
    "used for the part that decodes when that holds one whole window (counted in partial_clips, kept vs declared "
    "seconds), otherwise skipped (kind truncated); a file decord cannot open or decode is skipped (kind broken)",
    "silent_audio": f"whole-track RMS below {SILENCE_DBFS:g} dBFS; flagged audio_silent, kept or skipped per "
    "ShardConfig.silent_audio",
    "missing_audio": "no audio stream and no audio file: skipped (kind missing_audio) unless allow_missing_audio, "
    "then every window's audio is zeros of the normal length and audio_missing is true",
    "frame_folder_rate": "the manifest's fps, else frame count / duration of the paired audio; 5-120 fps",
}

FACE_POLICY = (
    "face=auto: BlazeFace short range on every frame sampled for a window (full range for a clip where short range "
    "finds a face on fewer than face_min_share of them; the track with more face frames is kept); the largest "
    "face per frame; frames without a "
    "face take the nearest detected box; centre and size smoothed by a running median over face_smooth sampled "
    "frames; square crop of face_scale x the box side, moved inside the frame; a manifest bbox overrides it; "
    "clips with a face on fewer than face_min_share of their sampled frames are skipped (kind no_face); a clip "
    f"with two or more faces on {MULTI_FACE_SHARE:.0%} of its frames is counted as multi_face"
)


def face_summary(records: list[dict], cfg: ShardConfig) -> dict:
    """provenance.json's `face`: the detectors, the settings, the clips cropped to their face, and those
    with a face on fewer than all sampled frames (share), two faces, or found by the full-range model."""
    if cfg.face == "none":
        return {"mode": "none"}
    from data_pipelines.faces import detector_info

    reports = [m for rec in records for m in rec.get("media", []) if "face_share" in m]
    skipped = sum(err.get("kind") == "no_face" for rec in records for err in rec["errors"])
    return {
        "mode": "auto",
        "detector": detector_info(),
        "settings": asdict(cfg.face_config()),
        "policy": FACE_POLICY,
        "clips": sum(rec.get("face_clips", 0) for rec in records),
        "multi_face": sorted(m["key"] for m in reports if m["multi_face"]),
        "no_face_skipped": skipped,
        "share_below_1": {m["key"]: m["face_share"] for m in reports if m["face_share"] < 1.0},
        "full_range": sorted(m["key"] for m in reports if "full-range" in m.get("face_detector", "")),
    }


def media_summary(records: list[dict], cfg: ShardConfig) -> dict:
    """Counts over every shard's clips: partial, silent and missing audio, skipped clips by kind, and
    each frame folder's rate. Records of shards written before these counters count as zero."""
    reports = [m for rec in records for m in rec.get("media", [])]
    partial = [m for m in reports if m["partial"]]
    skipped: dict[str, int] = defaultdict(int)
    for rec in records:
        for err in rec["errors"]:
            skipped[err.get("kind", "broken")] += 1
    return {
        "partial_clips": len(partial),
        "partial_seconds_kept": round(sum(m["kept_s"] for m in partial), 3),
        "partial_seconds_declared": round(sum(m["declared_s"] for m in partial), 3),
        "silent_audio": sum(m["audio_silent"] for m in reports) + skipped.get("silent_audio", 0),
        "silent_audio_policy": cfg.silent_audio,
        "missing_audio": sum(m["audio_missing"] for m in reports) + skipped.get("missing_audio", 0),
        "skipped": dict(sorted(skipped.items())),
        "partial": [{k: m[k] for k in ("key", "path", "kept_s", "declared_s")} for m in partial],
        "frame_rates": {
            m["key"]: {"fps": m["fps"], "source": m["fps_source"]}
            for m in reports
            if m["fps_source"] != "container"
        },
    }


def add_media_report(out_dir: Path, index: dict, records: list[dict], cfg: ShardConfig) -> dict:
    """Adds the media counters to index.json's totals, provenance.json and errors.jsonl (partial clips,
    `"skipped": false`), and prints them under the summary line."""
    from data_pipelines.atomic import write_json

    media = media_summary(records, cfg)
    counters = ("partial_clips", "silent_audio", "missing_audio", "skipped")
    index["totals"].update({k: media[k] for k in counters})
    face = face_summary(records, cfg)
    if cfg.face == "auto":
        index["totals"]["multi_face"] = len(face["multi_face"])
    write_json(out_dir / "index.json", index)
    prov_path = out_dir / "provenance.json"
    prov = json.loads(prov_path.read_text())
    prov["media"] = {"policy": MEDIA_POLICY, **media}
    prov["face"] = face
    write_json(prov_path, prov)
    with (out_dir / "errors.jsonl").open("a") as f:
        for m in media["partial"]:
            reason = (
                f"truncated: kept the {m['kept_s']:g} s that decode of the declared {m['declared_s']:g} s"
            )
            f.write(
                json.dumps(
                    {
                        "path": m["path"],
                        "key": m["key"],
                        "reason": reason,
                        "kind": "partial",
                        "skipped": False,
                    }
                )
                + "\n"
            )
    silent_verb = "skipped" if cfg.silent_audio == "skip" else "kept, flagged audio_silent"
    missing_verb = (
        "kept with zero audio" if cfg.allow_missing_audio else "skipped; --allow-missing-audio keeps them"
    )
    print(
        f"media: {media['partial_clips']} partial clips (kept {media['partial_seconds_kept']:g} s of "
        f"{media['partial_seconds_declared']:g} s declared); {media['silent_audio']} silent audio tracks "
        f"({silent_verb}); {media['missing_audio']} clips without audio ({missing_verb}); skipped by kind: "
        f"{media['skipped'] or 'none'}"
    )
    if cfg.face == "auto":
        print(
            f"faces: {face['clips']} clips cropped to their face, {len(face['multi_face'])} of them multi-face "
            f"(largest kept); {face['no_face_skipped']} skipped without a face on {cfg.face_min_share:.0%} of "
            "their frames"
        )
    return index
