"""Loader throughput: shard writing, the full loader per worker, and raw JPEG decoding of the same frames.

Writes shards of 16 x 160 x 160 frames + 2.56 s of 16 kHz audio from real clips (../shared/realdata)
with `write_shards`, then, in one process with one thread (what one DataLoader worker has):

- loader (eval mode): read tar + decode 16 JPEGs + wav + Kaldi fbank + collate, clips/s;
- loader (pretrain mode): the same plus shuffle buffer, random resized crop and audio gain;
- raw JPEG decode: `torchvision.io.decode_jpeg` on the same frames already in memory, clips/s;
- fbank: `torchaudio.compliance.kaldi.fbank` vs the vectorised path (per clip, batch of 8), ms per clip.

Rates are clips per CPU-second of this one-thread process (see `timed`); wall-clock rates are
recorded too.

The target (DESIGN.md section 6) is loader / raw decode >= 0.7. Prints a table and writes
benchmarks/results/bench_loader.json.

    python benchmarks/bench_loader.py [--clips 8] [--seconds 3]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_pipelines.augment import VideoAugConfig  # noqa: E402
from data_pipelines.features import FbankConfig, batched_fbank, fast_fbank, waveform_to_fbank  # noqa: E402
from data_pipelines.shards import ShardConfig, shard_urls, write_shards  # noqa: E402
from data_pipelines.stream import StreamConfig, eval_pipeline, pretrain_pipeline  # noqa: E402

REALDATA = REPO / ".." / "shared" / "realdata"
# 224 x 224 face crops at 25 fps with 16 kHz audio: the VoxCeleb2-like clips pretraining sees.
CLIP_FOLDER = "voxceleb2_pcavs"


def write_bench_shards(out: Path, clips: int) -> dict:
    videos = sorted((REALDATA / CLIP_FOLDER).glob("*.mp4"))[:clips]
    if not videos:
        raise SystemExit(f"no clips found in {REALDATA / CLIP_FOLDER}")
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "video", "audio", "label", "label_name", "speaker", "fold", "split", "bbox"])
        for v in videos:
            writer.writerow([v.stem, str(v.resolve()), "", "", "", "", "", "", ""])
    cfg = ShardConfig(num_frames=16, frame_stride=4, img_size=160, samples_per_shard=16, group_by="none")
    return write_shards(manifest, out / "shards", cfg, workers=2, progress=False)


def timed(run, min_seconds: float) -> tuple[int, float, float]:
    """Repeat `run()` (returns items done) for at least `min_seconds` of CPU time.

    Returns (items, CPU seconds, wall seconds). Rates use the CPU time of this single-threaded
    process, which is what one loader worker spends per clip and stays meaningful on a shared
    machine where wall time also counts other people's work.
    """
    run()  # warm-up: imports, allocator, file cache
    items, cpu0, wall0 = 0, time.process_time(), time.perf_counter()
    while time.process_time() - cpu0 < min_seconds:
        items += run()
    return items, time.process_time() - cpu0, time.perf_counter() - wall0


def raw_jpeg_bytes(urls: list[str]) -> list[list[bytes]]:
    clips: dict[str, list[bytes]] = {}
    for url in urls:
        with tarfile.open(url) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".jpg"):
                    clips.setdefault(m.name.split(".")[0], []).append(tf.extractfile(m).read())
    return list(clips.values())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=11, help="real clips to shard (all 11 VoxCeleb2-style ones)")
    p.add_argument("--seconds", type=float, default=3.0, help="minimum timing per measurement")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_loader.json")
    args = p.parse_args(argv)

    from torchvision.io import ImageReadMode, decode_jpeg

    results: dict = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        index = write_bench_shards(Path(tmp), args.clips)
        timing = index["timing"]
        results["shard_writing"] = {"clips": index["totals"]["clips"], "samples": index["totals"]["samples"],
                                    "workers": 2, "seconds": timing["seconds"], "clips_per_s": timing["clips_per_s"],
                                    "samples_per_s": timing["samples_per_s"]}
        urls = shard_urls(Path(tmp) / "shards")
        n_samples = index["totals"]["samples"]

        torch.set_num_threads(1)  # a DataLoader worker runs with one thread
        cfg = StreamConfig(batch_size=8, num_frames=16, img_size=160, fbank=FbankConfig(),
                           video_aug=VideoAugConfig(img_size=160, crop_scale=(0.4, 1.0)), audio_gain_db=3.0,
                           shuffle_buffer=32, epoch_length=max(1, n_samples // 8))

        def eval_run() -> int:
            return sum(len(b["key"]) for b in eval_pipeline(urls, cfg, rank=0, world_size=1))

        # A long epoch, so filling the shuffle buffer at the start is amortised as in real training.
        pretrain_cfg = dataclasses.replace(cfg, epoch_length=40)

        def pretrain_run() -> int:
            return sum(len(b["key"]) for b in pretrain_pipeline(urls, pretrain_cfg, rank=0, world_size=1))

        jpegs = raw_jpeg_bytes(urls)

        def raw_run() -> int:
            for frames in jpegs:
                data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in frames]
                decode_jpeg(data, mode=ImageReadMode.RGB)
            return len(jpegs)

        rates, wall_rates = {}, {}
        for name, run in (("loader_eval", eval_run), ("loader_pretrain", pretrain_run), ("raw_jpeg_decode", raw_run)):
            items, cpu, wall = timed(run, args.seconds)
            rates[name], wall_rates[name] = items / cpu, items / wall
        results["per_worker_clips_per_s"] = {k: round(v, 2) for k, v in rates.items()}
        results["per_worker_clips_per_s_wall"] = {k: round(v, 2) for k, v in wall_rates.items()}
        results["ratio_eval_loader_to_raw_decode"] = round(rates["loader_eval"] / rates["raw_jpeg_decode"], 3)
        results["ratio_pretrain_loader_to_raw_decode"] = round(rates["loader_pretrain"] / rates["raw_jpeg_decode"], 3)

    wave = 0.1 * torch.randn(8, 40960, generator=torch.Generator().manual_seed(0))
    fbank_ms = {}
    for name, run in (("torchaudio_kaldi", lambda: [waveform_to_fbank(w) for w in wave] and 8),
                      ("vectorised_per_clip", lambda: [fast_fbank(w) for w in wave] and 8),
                      ("vectorised_batch_of_8", lambda: batched_fbank(wave) is not None and 8)):
        items, cpu, _ = timed(run, args.seconds / 2)
        fbank_ms[name] = round(1000 * cpu / items, 3)
    results["fbank_ms_per_clip"] = fbank_ms
    # Where the eval loader's CPU time per clip goes.
    eval_ms, jpeg_ms = 1000 / rates["loader_eval"], 1000 / rates["raw_jpeg_decode"]
    results["eval_loader_ms_per_clip"] = {"total": round(eval_ms, 3), "jpeg_decode": round(jpeg_ms, 3),
                                          "fbank": fbank_ms["vectorised_per_clip"],
                                          "tar_wav_stack_collate_python": round(eval_ms - jpeg_ms - fbank_ms["vectorised_per_clip"], 3)}
    results["target_ratio"] = 0.7

    rows = [
        ("shard writing (2 processes)", f"{results['shard_writing']['clips_per_s']} clips/s",
         f"{results['shard_writing']['samples_per_s']} samples/s"),
        ("loader, eval mode (1 worker)", f"{rates['loader_eval']:.1f} clips/s", "read+JPEG+wav+fbank"),
        ("loader, pretrain mode (1 worker)", f"{rates['loader_pretrain']:.1f} clips/s", "+shuffle, crop, gain"),
        ("raw JPEG decode (1 thread)", f"{rates['raw_jpeg_decode']:.1f} clips/s", "16 frames 160x160"),
        ("ratio eval loader / raw", f"{results['ratio_eval_loader_to_raw_decode']:.3f}", "target >= 0.7"),
        ("ratio pretrain loader / raw", f"{results['ratio_pretrain_loader_to_raw_decode']:.3f}", ""),
        ("fbank, torchaudio kaldi", f"{fbank_ms['torchaudio_kaldi']} ms/clip", ""),
        ("fbank, vectorised per clip", f"{fbank_ms['vectorised_per_clip']} ms/clip", "used by the loader"),
        ("fbank, vectorised batch of 8", f"{fbank_ms['vectorised_batch_of_8']} ms/clip", ""),
        ("eval loader CPU per clip", f"{results['eval_loader_ms_per_clip']['total']} ms",
         f"JPEG {results['eval_loader_ms_per_clip']['jpeg_decode']} + fbank {fbank_ms['vectorised_per_clip']} + "
         f"rest {results['eval_loader_ms_per_clip']['tar_wav_stack_collate_python']}"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>16}  {note}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
