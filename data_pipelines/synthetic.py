"""`emomae synth`: a procedural audio-visual emotion dataset written as real mp4 files.

Six CREMA-D classes, drawn faces whose expression depends on the class and voices whose prosody
does, with speaker identities, per-clip intensity and noise. The classes are split across the
modalities on purpose (docs/synthetic.md): the face cannot tell ANG from DIS nor FEA from SAD, the
voice cannot tell ANG from HAP nor DIS from SAD, so a unimodal classifier tops out at 4/6 while an
audio-visual one can be right on every clip. The mouth opens with the speech envelope frame by
frame, which gives a contrastive AV objective something to find.

Outputs under `out_dir`: `clips/<key>.mp4` (H.264 or MPEG-4 video + AAC mono audio), `manifest.csv`
(docs/architecture.md), `params.jsonl` (every generator parameter per clip), `captions.jsonl`
(`{"key", "caption"}`, templated from those parameters) and `synth.yaml` (the config).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from fractions import Fraction
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from data_pipelines.manifests import ManifestRow, speaker_folds, write_manifest
from data_pipelines.synth.captions import caption
from data_pipelines.synth.face import render_face
from data_pipelines.synth.params import (
    AAC_RATES,
    CLASSES,
    FACE_GROUP,
    FACE_SCALE,
    FACES,
    HAIR,
    SKIN,
    VOICE_GROUP,
    VOICE_SCALE,
    VOICES,
    SynthConfig,
    clip_params,
    speaker_traits,
)
from data_pipelines.synth.progress import ClipProgress
from data_pipelines.synth.voice import VOWELS, frame_envelope, synth_voice

# The generator's parts, re-exported: `data_pipelines.synthetic` stays the one public import path.
__all__ = [
    "AAC_RATES",
    "CLASSES",
    "FACES",
    "FACE_GROUP",
    "FACE_SCALE",
    "HAIR",
    "SKIN",
    "VOICES",
    "VOICE_GROUP",
    "VOICE_SCALE",
    "VOWELS",
    "SynthConfig",
    "caption",
    "clip_params",
    "frame_envelope",
    "generate",
    "main",
    "make_clip",
    "render_face",
    "speaker_traits",
    "synth_voice",
    "write_mp4",
]


def write_mp4(
    path: Path,
    frames: np.ndarray,
    wave: np.ndarray,
    fps: float,
    sr: int,
    codec: str = "libx264",
    crf: int = 18,
) -> None:
    """frames (T, H, W, 3) uint8 RGB + wave (N,) float32 mono -> one mp4 (written to a temp name first)."""
    import av

    tmp = path.with_suffix(".part")
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(tmp), "w", format="mp4") as box:
        video = box.add_stream(codec, rate=rate)
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        video.thread_count = 1  # clips are small; parallelism comes from worker processes
        if codec == "libx264":
            video.options = {"crf": str(crf), "preset": "ultrafast"}
        else:
            video.bit_rate = int(max(2e5, 0.8 * frames.shape[1] * frames.shape[2] * fps))
        audio = box.add_stream("aac", rate=sr)
        audio.layout = "mono"
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = i, 1 / rate
            box.mux(video.encode(frame))
        box.mux(video.encode())
        # pts 0 makes the encoder's priming samples negative, so the muxer writes an edit list and
        # decoders (decord included) start the audio at t = 0, in sync with frame 0.
        sound = av.AudioFrame.from_ndarray(wave[None], format="fltp", layout="mono")
        sound.sample_rate, sound.pts, sound.time_base = sr, 0, Fraction(1, sr)
        box.mux(audio.encode(sound))
        box.mux(audio.encode())
    os.replace(tmp, path)


def make_clip(cfg: SynthConfig, s: int, label: int, i: int, clips_dir: Path) -> dict:
    """Generate and write one clip; returns its params record (with the caption)."""
    spk = speaker_traits(cfg, s)
    rng = np.random.default_rng([cfg.seed, 1, s, label, i])
    clip = clip_params(cfg, spk, label, rng)
    key = f"synth-s{s:03d}-{CLASSES[label]}-{i:03d}"
    num_frames = round(cfg.seconds * cfg.fps)
    wave, env = synth_voice(spk, clip, cfg.seconds, cfg.sample_rate, rng)
    mouth = frame_envelope(env, cfg.sample_rate, cfg.fps, num_frames)
    frames = render_face(spk, clip, mouth, cfg.frame_size, cfg.fps, cfg, rng)
    write_mp4(clips_dir / f"{key}.mp4", frames, wave, cfg.fps, cfg.sample_rate, cfg.video_codec, cfg.crf)
    text = caption(clip, np.random.default_rng([cfg.seed, 2, s, label, i]), cfg.caption_emotion_rate)
    return {
        "key": key,
        "speaker": spk["speaker"],
        **clip,
        "mouth_envelope": mouth.round(4).tolist(),
        "speaker_traits": spk,
        "caption": text,
    }


def _make_clip_job(job: tuple) -> dict:
    return make_clip(*job)


def generate(out_dir: Path, cfg: SynthConfig | None = None, progress: bool = False) -> Path:
    """Write the dataset under `out_dir`; returns the path of its `manifest.csv`. `progress`: report the
    written clips on stdout (a bar on a terminal, plain lines otherwise; data_pipelines/synth/progress.py)."""
    cfg = cfg or SynthConfig()
    cfg.__post_init__()  # again: fields may have been changed after construction
    out_dir = Path(out_dir)
    clips_dir = out_dir / "clips"
    clips_dir.mkdir(parents=True, exist_ok=True)
    jobs = [
        (cfg, s, c, i, clips_dir)
        for s in range(cfg.num_speakers)
        for c in range(len(CLASSES))
        for i in range(cfg.clips_per_speaker_class)
    ]
    # Auto: one process per core, but none for small jobs, where starting them costs more than it saves.
    workers = min(cfg.workers or min(os.cpu_count() or 1, 8, len(jobs) // 16), len(jobs))
    records = []
    with ClipProgress(len(jobs), enabled=progress) as bar:
        if workers > 1:
            # spawn: the parent may hold torch/OpenMP threads, which fork would copy in a broken state.
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
                for record in pool.map(_make_clip_job, jobs, chunksize=max(1, len(jobs) // (4 * workers))):
                    records.append(record)
                    bar.update()
        else:
            for job in jobs:
                records.append(make_clip(*job))
                bar.update()

    folds = speaker_folds([r["speaker"] for r in records], cfg.folds, seed=cfg.seed)
    rows = [
        ManifestRow(
            key=r["key"],
            video=f"clips/{r['key']}.mp4",
            label=str(r["label"]),
            label_name=r["label_name"],
            speaker=r["speaker"],
            fold=folds[r["speaker"]],
        )
        for r in records
    ]
    manifest = write_manifest(rows, out_dir / "manifest.csv")
    with (out_dir / "params.jsonl").open("w") as fp, (out_dir / "captions.jsonl").open("w") as fc:
        for r in records:
            text = r.pop("caption")
            fp.write(json.dumps({**r, "fold": folds[r["speaker"]]}) + "\n")
            fc.write(json.dumps({"key": r["key"], "caption": text}) + "\n")
    from omegaconf import OmegaConf

    OmegaConf.save(OmegaConf.structured(cfg), out_dir / "synth.yaml")
    return manifest


def main(argv: list[str] | None = None) -> int:
    """`emomae synth --out DIR [--config YAML] [key=value ...]`."""
    from omegaconf import OmegaConf

    from emomae.config import ConfigError, load_config

    p = argparse.ArgumentParser(
        prog="emomae synth",
        description="Generate the built-in procedural AV emotion "
        "dataset: mp4 clips, manifest.csv, params.jsonl, captions.jsonl (docs/synthetic.md).",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--config", type=Path, default=None, help="YAML with SynthConfig keys")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help=f"SynthConfig keys: {', '.join(SynthConfig.__dataclass_fields__)}",
    )
    args = p.parse_args(argv)
    try:
        cfg = OmegaConf.to_object(load_config(SynthConfig, args.config, args.overrides))
    except (ConfigError, ValueError) as err:
        print(f"emomae synth: {err}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    manifest = generate(args.out, cfg, progress=True)
    took = time.perf_counter() - start
    n = cfg.num_speakers * len(CLASSES) * cfg.clips_per_speaker_class
    print(
        f"wrote {n} clips ({cfg.num_speakers} speakers x {len(CLASSES)} classes x {cfg.clips_per_speaker_class}, "
        f"{cfg.frame_size}px, {cfg.seconds:g} s) in {took:.1f} s ({n / took:.1f} clips/s): {manifest}"
    )
    return 0
