"""Loader throughput: shard writing, the full loader per worker, and raw JPEG decoding of the same frames.

Writes shards of 16 x 160 x 160 frames + 2.56 s of 16 kHz audio from real clips (../shared/realdata)
with `write_shards`, twice: with the precomputed log-mel (`fbank.npy`, the default) and without it.
Then, in one process with one thread (what one DataLoader worker has), for both kinds of shards:

- loader (eval mode): read tar + decode 16 JPEGs + fbank (stored, or computed from wav) + collate;
- loader (pretrain mode): the same plus shuffle buffer, random resized crop and audio gain;
- raw JPEG decode: `torchvision.io.decode_jpeg` on the same frames already in memory (the reference
  the ratios divide by), and the loaders' own in-place decode (`frame_decode.ClipFrameDecoder`);
- fbank: `torchaudio.compliance.kaldi.fbank` vs the vectorised path vs reading the stored one;
- the random-resized-crop resize alone (part of pretrain mode's cost, not overhead);
- a batch's shared-memory buffer alone (a new segment per batch, its pages allocated and zeroed by
  the kernel as the worker writes them), per decoded clip and per JPEG-bytes clip;
- the eval and pretrain loaders through a real `DataLoader(num_workers=1)`: the worker's CPU time
  per clip, where batches are built in shared memory and sent to the main process, with the
  worker's batch buffers reused (the default) and, for comparison, without (`batch_buffers=0`);
- the JPEG-bytes loaders that feed decoding on the GPU (`data.decode_device`, StreamConfig.jpeg_bytes):
  read tar + check JPEG headers + draw the augmentation + fbank + batch the bytes, no pixel decoded;
- CPU cores needed per GPU for each path, at the clips/s one GPU trains: bench_pretrain.json's
  measured CUDA rate when it has a cuda row, else its FLOPs per clip (forward + backward, `base`) at an
  assumed MFU of a named GPU (`--gpu-tflops`, `--mfu`; default 40 % of an H100 SXM's 989 dense bf16
  TFLOP/s). The GPU's own decode cost is not in these figures;
- decoding on the device (`--decode-device`, default cuda when there is one): batches of 40 JPEG-bytes
  clips, kept in memory, through `DeviceFrameDecoder` (batched `decode_jpeg` + crop/resize + stored
  log-mels finished, the code `data.decode_device=cuda` runs): clips/s of device time (wall clock,
  synchronised) and the main process's CPU time per clip. `--decode-device cpu` runs the same code on
  the CPU (a check of the code path, not a speed anyone trains at).

Rates are clips per CPU-second of the process doing the work (see `timed`); each figure is the
median of `--rounds` interleaved rounds, so a burst of load on a shared machine hits every path alike.
Wall-clock rates are recorded too.

Targets: loader / raw decode >= 0.7 (docs/loader.md); JPEG-bytes worker >= 2,000 clips/s
(issue 15). Prints a table and writes benchmarks/results/bench_loader.json.

    python benchmarks/bench_loader.py [--clips 11] [--seconds 2] [--rounds 3] [--gpu-tflops 989 --mfu 0.4]
        [--decode-device cuda|cpu|none] [--pretrain-results benchmarks/results/bench_pretrain.json]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import platform
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from child_process import write_results  # noqa: E402

from data_pipelines.augment import VideoAugConfig, VideoAugment  # noqa: E402
from data_pipelines.features import (  # noqa: E402
    FbankConfig,
    batched_fbank,
    decode_log_mel,
    encode_log_mel,
    fast_fbank,
    kaldi_fbank,
    precomputed_fbank,
    waveform_to_fbank,
)
from data_pipelines.frame_decode import ClipFrameDecoder  # noqa: E402
from data_pipelines.shards import ShardConfig, shard_urls, write_shards  # noqa: E402
from data_pipelines.stream import StreamConfig, as_built, eval_pipeline, pretrain_pipeline  # noqa: E402

REALDATA = REPO / ".." / "shared" / "realdata"
PRETRAIN_RESULTS = REPO / "benchmarks" / "results" / "bench_pretrain.json"
BYTES_TARGET = 2000  # clips/s per worker on the JPEG-bytes path (issue 15)
# 224 x 224 face crops at 25 fps with 16 kHz audio: the VoxCeleb2-like clips pretraining sees.
CLIP_FOLDER = "voxceleb2_pcavs"


def write_bench_shards(
    out: Path, clips: int, precompute_fbank: bool = True, videos_dir: Path = REALDATA / CLIP_FOLDER
) -> dict:
    """Shards of the first `clips` .mp4 files of `videos_dir` (their own audio track) at 16 x 160 px."""
    videos = sorted(videos_dir.glob("*.mp4"))[:clips]
    if not videos:
        raise SystemExit(f"no .mp4 clips found in {videos_dir} (--videos)")
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "video", "audio", "label", "label_name", "speaker", "fold", "split", "bbox"])
        for v in videos:
            writer.writerow([v.stem, str(v.resolve()), "", "", "", "", "", "", ""])
    cfg = ShardConfig(
        num_frames=16,
        frame_stride=4,
        img_size=160,
        samples_per_shard=16,
        group_by="none",
        precompute_fbank=precompute_fbank,
    )
    return write_shards(manifest, out / "shards", cfg, workers=2, progress=False)


def timed(run: Callable[[], int], min_seconds: float) -> tuple[int, float, float]:
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


class CPUStamped(torch.utils.data.IterableDataset):
    """Tags each batch with the CPU time of the process that built it (the DataLoader worker)."""

    def __init__(self, stream: torch.utils.data.IterableDataset) -> None:
        self.stream = stream

    def __iter__(self):
        for batch in self.stream:
            batch["worker_cpu"] = time.process_time()
            yield batch


def worker_timed(
    make_stream: Callable[[], torch.utils.data.IterableDataset], min_clips: int, read_pages: bool = True
) -> tuple[int, float, int, float]:
    """Clips and CPU seconds of DataLoader workers (`num_workers=1`, a new one per epoch) building
    batches until `min_clips` have arrived, counted from each worker's first batch (start-up is a
    per-epoch cost that real epochs of thousands of batches amortise); then batches and CPU seconds of
    this, the main process, receiving them over the same span. The main process reads one byte per
    4 kB page of every tensor, as the copy to pinned memory or nvjpeg would read them all: a page
    first mapped here costs a fault. Without `read_pages` it only receives them, which leaves the
    worker the machine to itself: the difference is what a consumer's reads cost the worker."""
    from torch.utils.data import DataLoader

    clips, cpu, batches, main_cpu = 0, 0.0, 0, 0.0
    while clips < min_clips:
        stamps, main_start = [], None
        for b in DataLoader(CPUStamped(make_stream()), batch_size=None, num_workers=1, collate_fn=as_built):
            if main_start is None:
                main_start = time.process_time()
            else:
                batches += 1
            if read_pages:
                touch_pages(b)
            stamps.append((len(b["key"]), b["worker_cpu"]))
            del b
        main_cpu += time.process_time() - main_start
        clips += sum(n for n, _ in stamps[1:])
        cpu += stamps[-1][1] - stamps[0][1]
    return clips, cpu, batches, main_cpu


def touch_pages(batch: dict) -> None:
    for value in batch.values():
        if isinstance(value, dict):
            touch_pages(value)
        elif isinstance(value, torch.Tensor):
            memory = torch.empty(0, dtype=torch.uint8).set_(value.untyped_storage())
            memory[::4096].sum(dtype=torch.int64)


def raw_jpeg_bytes(urls: list[str]) -> list[list[bytes]]:
    clips: dict[str, list[bytes]] = {}
    for url in urls:
        with tarfile.open(url) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".jpg"):
                    clips.setdefault(m.name.split(".")[0], []).append(tf.extractfile(m).read())
    return list(clips.values())


def gpu_demand(results_file: Path, size: str, gpu_tflops: float, mfu: float) -> dict:
    """Clips/s one GPU trains at `size`: a measured CUDA row of bench_pretrain.json, else its FLOPs
    per clip (forward + backward, counted by op) at `mfu` of `gpu_tflops`."""
    if not results_file.is_file():
        raise SystemExit(f"{results_file} not found: run benchmarks/bench_pretrain.py first")
    rows = [r for r in json.loads(results_file.read_text())["rows"] if r["size"] == size]
    cuda = [r for r in rows if str(r["device"]).startswith("cuda")]
    if cuda:
        return {
            "clips_per_s": cuda[0]["clips_per_s"],
            "source": f"measured on {cuda[0]['device']}, batch "
            f"{cuda[0]['batch']}, {cuda[0]['dtype']} (bench_pretrain.json)",
        }
    if not rows:
        raise SystemExit(f"{results_file} has no row for size {size!r}: run bench_pretrain.py --sizes {size}")
    gflops = rows[0]["gflops_per_clip"]
    return {
        "clips_per_s": mfu * gpu_tflops * 1e3 / gflops,
        "gflops_per_clip_fwd_bwd": gflops,
        "source": f"assumed: {mfu:.0%} MFU of {gpu_tflops:g} TFLOP/s (H100 SXM dense bf16 by default) / "
        f"{gflops:.1f} GFLOPs per clip forward + backward ({size}, bench_pretrain.json, counted on CPU)",
    }


def device_decode_rates(batches: list[dict], device: str, min_seconds: float) -> dict:
    """`DeviceFrameDecoder` on kept JPEG-bytes batches, over and over for at least `min_seconds`:
    clips per second of wall clock (the device's rate, synchronised after each pass) and the CPU time
    this process spends per clip (launching the work, the host side of the decoder)."""
    from data_pipelines.device_decode import DeviceFrameDecoder

    decoder = DeviceFrameDecoder(device)
    synchronise = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def one_pass() -> int:
        for batch in batches:
            decoder({**batch})  # a shallow copy: the decoder pops the batch's "jpeg"
        synchronise()
        return sum(len(b["key"]) for b in batches)

    one_pass()  # warm-up: nvjpeg handles, allocator, kernels
    clips, cpu0, wall0 = 0, time.process_time(), time.perf_counter()
    while time.perf_counter() - wall0 < min_seconds:
        clips += one_pass()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {
        "device": device,
        "batch": len(batches[0]["key"]),
        "clips_per_s": round(clips / wall, 1),
        "host_cpu_ms_per_clip": round(1000 * cpu / clips, 3),
        "dropped": len(decoder.dropped),
    }


def cores_per_gpu(demand: float, worker_rates: dict[str, float]) -> dict[str, float]:
    """Loader workers (one CPU core each) that one GPU needs on each path."""
    return {name: round(demand / rate, 1) for name, rate in worker_rates.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=11, help="real clips to shard (all 11 VoxCeleb2-style ones)")
    p.add_argument(
        "--videos",
        type=Path,
        default=REALDATA / CLIP_FOLDER,
        help="folder of .mp4 clips with audio to shard (default: ../shared/realdata's VoxCeleb2-style clips)",
    )
    p.add_argument("--seconds", type=float, default=2.0, help="minimum CPU time per measurement and round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each figure is their median")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_loader.json")
    p.add_argument("--size", default="base", help="model size whose GPU step rate sets the demand")
    p.add_argument("--gpu-tflops", type=float, default=989.0, help="GPU peak (default: H100 SXM dense bf16)")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation on that GPU")
    p.add_argument(
        "--decode-device",
        default="cuda" if torch.cuda.is_available() else "none",
        help="where to time decoding of JPEG-bytes batches (DeviceFrameDecoder): cuda, cpu, or none",
    )
    p.add_argument("--pretrain-results", type=Path, default=PRETRAIN_RESULTS, help="bench_pretrain.py's JSON")
    args = p.parse_args(argv)

    from torchvision.io import ImageReadMode, decode_jpeg

    results: dict = {
        "command": " ".join(["python", "benchmarks/bench_loader.py", *(argv or sys.argv[1:])]),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": 1,
        "rounds": args.rounds,
        "load_average_at_start": os.getloadavg()[0],
        "videos": os.path.relpath(args.videos, REPO),
    }
    with tempfile.TemporaryDirectory() as tmp:
        writing, urls = {}, {}
        for name, precompute in (("fbank_npy", True), ("wav_only", False)):
            index = write_bench_shards(Path(tmp) / name, args.clips, precompute, args.videos)
            timing = index["timing"]
            shard_bytes = sum(p.stat().st_size for p in (Path(tmp) / name / "shards").glob("*.tar"))
            writing[name] = {
                "clips": index["totals"]["clips"],
                "samples": index["totals"]["samples"],
                "workers": 2,
                "seconds": timing["seconds"],
                "clips_per_s": timing["clips_per_s"],
                "samples_per_s": timing["samples_per_s"],
                "kB_per_sample": round(shard_bytes / 1024 / index["totals"]["samples"], 1),
            }
            urls[name] = shard_urls(Path(tmp) / name / "shards")
        results["shard_writing"] = writing
        n_samples = writing["fbank_npy"]["samples"]

        torch.set_num_threads(1)  # a DataLoader worker runs with one thread
        cfg = StreamConfig(
            batch_size=8,
            num_frames=16,
            img_size=160,
            fbank=FbankConfig(),
            video_aug=VideoAugConfig(img_size=160, crop_scale=(0.4, 1.0)),
            audio_gain_db=3.0,
            shuffle_buffer=32,
            epoch_length=max(1, n_samples // 8),
        )
        # A long epoch, so filling the shuffle buffer at the start is amortised as in real training.
        pretrain_cfg = dataclasses.replace(cfg, epoch_length=40)

        def eval_run(shards: list[str]) -> Callable[[], int]:
            # Ten passes over the shards per epoch, so per-epoch set-up is amortised as in real evaluation.
            return lambda: sum(len(b["key"]) for b in eval_pipeline(shards * 10, cfg, rank=0, world_size=1))

        def pretrain_run(shards: list[str], stream_cfg: StreamConfig = pretrain_cfg) -> Callable[[], int]:
            return lambda: sum(
                len(b["key"]) for b in pretrain_pipeline(shards, stream_cfg, rank=0, world_size=1)
            )

        bytes_cfg = dataclasses.replace(cfg, jpeg_bytes=True)
        bytes_pretrain_cfg = dataclasses.replace(pretrain_cfg, jpeg_bytes=True)

        def eval_bytes_run(shards: list[str]) -> Callable[[], int]:
            return lambda: sum(
                len(b["key"]) for b in eval_pipeline(shards * 10, bytes_cfg, rank=0, world_size=1)
            )

        jpegs = raw_jpeg_bytes(urls["fbank_npy"])

        def raw_run() -> int:
            for frames in jpegs:
                data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in frames]
                decode_jpeg(data, mode=ImageReadMode.RGB)
            return len(jpegs)

        in_place = ClipFrameDecoder(reuse_buffer=True)

        def raw_in_place_run() -> int:
            for frames in jpegs:
                in_place(frames)
            return len(jpegs)

        clip = torch.stack(
            [
                f.permute(1, 2, 0)
                for f in decode_jpeg(
                    [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs[0]],
                    mode=ImageReadMode.RGB,
                )
            ]
        )
        clip = clip.permute(0, 3, 1, 2)
        augment, gen = VideoAugment(cfg.video_aug), torch.Generator().manual_seed(0)

        def crop_resize_run() -> int:
            for _ in range(8):
                augment(clip, gen)
            return 8

        def shared_buffer_run(nbytes: int) -> Callable[[], int]:
            # What a loader worker pays per batch for its shared-memory buffer: a new segment whose
            # pages the kernel allocates and zeroes as the batch is written (8 clips per run).
            source = torch.ones(nbytes * 8, dtype=torch.uint8)

            def run() -> int:
                storage = torch.UntypedStorage._new_shared(source.numel())
                torch.empty(0, dtype=torch.uint8).set_(storage, 0, source.shape).copy_(source)
                return 8

            return run

        clip_bytes = 16 * 160 * 160 * 3 + 256 * 128 * 4  # a decoded clip and its fbank
        bytes_clip = sum(len(f) for f in jpegs[0]) + 256 * 128 * 2  # its JPEGs and float16 log-mel
        runs = {
            "loader_eval": eval_run(urls["fbank_npy"]),
            "loader_pretrain": pretrain_run(urls["fbank_npy"]),
            "loader_eval_wav_only": eval_run(urls["wav_only"]),
            "loader_pretrain_wav_only": pretrain_run(urls["wav_only"]),
            "loader_pretrain_jpeg_bytes": pretrain_run(urls["fbank_npy"], bytes_pretrain_cfg),
            "loader_eval_jpeg_bytes": eval_bytes_run(urls["fbank_npy"]),
            "raw_jpeg_decode": raw_run,
            "raw_jpeg_decode_in_place": raw_in_place_run,
            "random_resized_crop": crop_resize_run,
            "shared_buffer_decoded_clip": shared_buffer_run(clip_bytes),
            "shared_buffer_jpeg_bytes_clip": shared_buffer_run(bytes_clip),
        }
        # The same through a real DataLoader worker (batches in shared memory, pickled to this process).
        eval_urls = urls["fbank_npy"] * 10
        pretrain40_cfg = dataclasses.replace(pretrain_cfg, batch_size=40, epoch_length=8)
        bytes40_cfg = dataclasses.replace(pretrain40_cfg, jpeg_bytes=True)
        no_reuse = {"batch_buffers": 0}  # every batch in new shared memory, as default_collate does
        worker_runs = {
            "loader_eval": lambda: eval_pipeline(eval_urls, cfg, rank=0, world_size=1),
            "loader_pretrain": lambda: pretrain_pipeline(
                urls["fbank_npy"], pretrain_cfg, rank=0, world_size=1
            ),
            # the recipe's 40 clips per GPU: per-batch costs (pickling, sending the buffers, the
            # queue) spread over 5x the clips
            "loader_pretrain_batch40": lambda: pretrain_pipeline(
                urls["fbank_npy"], pretrain40_cfg, rank=0, world_size=1
            ),
            # the consumer only receives (no reads of the pages): with the rest equal, the worker path's
            # own cost against the in-process loader
            "loader_pretrain_idle_consumer": lambda: pretrain_pipeline(
                urls["fbank_npy"], pretrain_cfg, rank=0, world_size=1
            ),
            "loader_pretrain_no_buffer_reuse": lambda: pretrain_pipeline(
                urls["fbank_npy"], dataclasses.replace(pretrain_cfg, **no_reuse), rank=0, world_size=1
            ),
            "loader_pretrain_jpeg_bytes": lambda: pretrain_pipeline(
                urls["fbank_npy"], bytes_pretrain_cfg, rank=0, world_size=1
            ),
            "loader_pretrain_jpeg_bytes_batch40": lambda: pretrain_pipeline(
                urls["fbank_npy"], bytes40_cfg, rank=0, world_size=1
            ),
            "loader_pretrain_jpeg_bytes_batch40_no_buffer_reuse": lambda: pretrain_pipeline(
                urls["fbank_npy"], dataclasses.replace(bytes40_cfg, **no_reuse), rank=0, world_size=1
            ),
        }
        # One loop: every round times each in-process run, then each worker run, so a ratio compares
        # runs made minutes apart at most (this VM's speed drifts by 10-30 % within the hour).
        rounds: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
        worker_rounds: dict[str, list[float]] = {k: [] for k in worker_runs}
        main_rounds: dict[str, list[float]] = {k: [] for k in worker_runs}
        for _ in range(args.rounds):
            for name, run in runs.items():
                items, cpu, wall = timed(run, args.seconds)
                rounds[name].append((items / cpu, items / wall))
            for name, make in worker_runs.items():
                clips, cpu, batches, main_cpu = worker_timed(make, 400, read_pages="idle" not in name)
                worker_rounds[name].append(clips / cpu)
                main_rounds[name].append(1000 * main_cpu / batches)
        rates = {k: statistics.median(r[0] for r in v) for k, v in rounds.items()}
        wall_rates = {k: statistics.median(r[1] for r in v) for k, v in rounds.items()}
        results["per_worker_clips_per_s"] = {k: round(v, 2) for k, v in rates.items()}
        results["per_worker_clips_per_s_rounds"] = {k: [round(r[0], 1) for r in v] for k, v in rounds.items()}
        results["per_worker_clips_per_s_wall"] = {k: round(v, 2) for k, v in wall_rates.items()}
        worker_rates = {k: round(statistics.median(v), 2) for k, v in worker_rounds.items()}
        results["main_process_ms_per_batch"] = {
            k: round(statistics.median(v), 3) for k, v in main_rounds.items()
        }
        results["dataloader_worker_clips_per_s_rounds"] = {
            k: [round(r, 1) for r in v] for k, v in worker_rounds.items()
        }
        results["dataloader_worker_clips_per_s"] = worker_rates

        def ratio(per_round: list[float], reference: str) -> float:
            """Median over rounds of a rate over the reference's rate in the same round."""
            return round(statistics.median(x / r[0] for x, r in zip(per_round, rounds[reference])), 3)

        def in_process(name: str) -> list[float]:
            return [r[0] for r in rounds[name]]

        raw = rates["raw_jpeg_decode"]
        results["ratio_to_raw_decode"] = {
            "eval_fbank_npy": ratio(in_process("loader_eval"), "raw_jpeg_decode"),
            "pretrain_fbank_npy": ratio(in_process("loader_pretrain"), "raw_jpeg_decode"),
            "eval_wav_only": ratio(in_process("loader_eval_wav_only"), "raw_jpeg_decode"),
            "pretrain_wav_only": ratio(in_process("loader_pretrain_wav_only"), "raw_jpeg_decode"),
            "eval_dataloader_worker": ratio(worker_rounds["loader_eval"], "raw_jpeg_decode"),
            "pretrain_dataloader_worker": ratio(worker_rounds["loader_pretrain"], "raw_jpeg_decode"),
            "pretrain_dataloader_worker_batch40": ratio(
                worker_rounds["loader_pretrain_batch40"], "raw_jpeg_decode"
            ),
            "pretrain_dataloader_worker_idle_consumer": ratio(
                worker_rounds["loader_pretrain_idle_consumer"], "raw_jpeg_decode"
            ),
        }
        # The loaders decode in place (frame_decode.py), faster than the reference decode above;
        # against that same in-place decode the ratio is pure loader overhead.
        results["ratio_to_in_place_decode"] = {
            "eval_fbank_npy": ratio(in_process("loader_eval"), "raw_jpeg_decode_in_place"),
            "pretrain_fbank_npy": ratio(in_process("loader_pretrain"), "raw_jpeg_decode_in_place"),
        }
        # a DataLoader worker against the same loader in this process, round by round
        results["worker_over_in_process"] = {
            "pretrain": ratio(worker_rounds["loader_pretrain"], "loader_pretrain"),
            "pretrain_idle_consumer": ratio(
                worker_rounds["loader_pretrain_idle_consumer"], "loader_pretrain"
            ),
            "eval": ratio(worker_rounds["loader_eval"], "loader_eval"),
        }

        if args.decode_device != "none":
            stream = pretrain_pipeline(
                urls["fbank_npy"], dataclasses.replace(bytes40_cfg, epoch_length=6), rank=0, world_size=1
            )
            results["device_decode"] = device_decode_rates(list(stream), args.decode_device, args.seconds)

    demand = gpu_demand(args.pretrain_results, args.size, args.gpu_tflops, args.mfu)
    per_worker = {
        "cpu_pretrain": worker_rates["loader_pretrain"],
        "cpu_pretrain_batch40": worker_rates["loader_pretrain_batch40"],
        "cpu_eval": worker_rates["loader_eval"],
        "jpeg_bytes_pretrain": worker_rates["loader_pretrain_jpeg_bytes"],
        "jpeg_bytes_pretrain_batch40": worker_rates["loader_pretrain_jpeg_bytes_batch40"],
    }
    results["gpu_demand"] = {"size": args.size, **demand, "clips_per_s": round(demand["clips_per_s"], 1)}
    results["cpu_cores_per_gpu"] = cores_per_gpu(demand["clips_per_s"], per_worker)
    results["jpeg_bytes_target_clips_per_s"] = BYTES_TARGET

    wave = 0.1 * torch.randn(8, 40960, generator=torch.Generator().manual_seed(0))
    stored = [encode_log_mel(kaldi_fbank(w)) for w in wave]
    fbank_ms = {}
    for name, run in (
        ("torchaudio_kaldi", lambda: [waveform_to_fbank(w) for w in wave] and 8),
        ("vectorised_per_clip", lambda: [fast_fbank(w) for w in wave] and 8),
        ("vectorised_batch_of_8", lambda: batched_fbank(wave) is not None and 8),
        (
            "stored_fbank_npy",
            lambda: [precomputed_fbank(decode_log_mel(b, 128), gain_db=1.0) for b in stored] and 8,
        ),
    ):
        items, cpu, _ = timed(run, args.seconds / 2)
        fbank_ms[name] = round(1000 * cpu / items, 3)
    results["fbank_ms_per_clip"] = fbank_ms
    # Where the loaders' CPU time per clip goes.
    ms = {k: 1000 / v for k, v in rates.items()}
    results["ms_per_clip"] = {
        "eval_loader": round(ms["loader_eval"], 3),
        "pretrain_loader": round(ms["loader_pretrain"], 3),
        "jpeg_decode": round(ms["raw_jpeg_decode"], 3),
        "jpeg_decode_in_place": round(ms["raw_jpeg_decode_in_place"], 3),
        "random_resized_crop": round(ms["random_resized_crop"], 3),
        "shared_buffer_decoded_clip": round(ms["shared_buffer_decoded_clip"], 3),
        "shared_buffer_jpeg_bytes_clip": round(ms["shared_buffer_jpeg_bytes_clip"], 3),
        # what the loaders spend besides their own (in-place) decode and the crop's resize
        "eval_rest": round(ms["loader_eval"] - ms["raw_jpeg_decode_in_place"], 3),
        "pretrain_rest": round(
            ms["loader_pretrain"] - ms["raw_jpeg_decode_in_place"] - ms["random_resized_crop"], 3
        ),
    }
    results["target_ratio"] = 0.7

    ratio = results["ratio_to_raw_decode"]
    per_clip = results["ms_per_clip"]
    rows = [
        (
            "shard writing, with fbank.npy (2 processes)",
            f"{writing['fbank_npy']['clips_per_s']} clips/s",
            f"{writing['fbank_npy']['kB_per_sample']} kB/sample",
        ),
        (
            "shard writing, wav only (2 processes)",
            f"{writing['wav_only']['clips_per_s']} clips/s",
            f"{writing['wav_only']['kB_per_sample']} kB/sample",
        ),
        ("raw JPEG decode (1 thread)", f"{raw:.1f} clips/s", "16 frames 160x160, torchvision decode_jpeg"),
        (
            "raw JPEG decode in place (the loaders')",
            f"{rates['raw_jpeg_decode_in_place']:.1f} clips/s",
            f"simplejpeg into one reused array; pretrain loader / this "
            f"{results['ratio_to_in_place_decode']['pretrain_fbank_npy']:.3f}",
        ),
        (
            "loader, eval, fbank.npy",
            f"{rates['loader_eval']:.1f} clips/s",
            f"ratio {ratio['eval_fbank_npy']:.3f}",
        ),
        (
            "loader, eval, wav -> fbank",
            f"{rates['loader_eval_wav_only']:.1f} clips/s",
            f"ratio {ratio['eval_wav_only']:.3f}",
        ),
        (
            "loader, pretrain, fbank.npy",
            f"{rates['loader_pretrain']:.1f} clips/s",
            f"ratio {ratio['pretrain_fbank_npy']:.3f}",
        ),
        (
            "loader, pretrain, wav -> fbank",
            f"{rates['loader_pretrain_wav_only']:.1f} clips/s",
            f"ratio {ratio['pretrain_wav_only']:.3f}",
        ),
        (
            "DataLoader worker, eval, fbank.npy",
            f"{worker_rates['loader_eval']:.1f} clips/s",
            f"ratio {ratio['eval_dataloader_worker']:.3f}",
        ),
        (
            "DataLoader worker, pretrain, fbank.npy",
            f"{worker_rates['loader_pretrain']:.1f} clips/s",
            f"ratio {ratio['pretrain_dataloader_worker']:.3f}",
        ),
        (
            "loader, pretrain, JPEG bytes (GPU decodes)",
            f"{rates['loader_pretrain_jpeg_bytes']:.1f} clips/s",
            f"target {BYTES_TARGET}",
        ),
        ("loader, eval, JPEG bytes (GPU decodes)", f"{rates['loader_eval_jpeg_bytes']:.1f} clips/s", ""),
        (
            "DataLoader worker, pretrain, fbank.npy, batch 40",
            f"{worker_rates['loader_pretrain_batch40']:.1f} clips/s",
            f"ratio {ratio['pretrain_dataloader_worker_batch40']:.3f}",
        ),
        (
            "DataLoader worker, pretrain, fbank.npy, consumer reads nothing",
            f"{worker_rates['loader_pretrain_idle_consumer']:.1f} clips/s",
            f"ratio {ratio['pretrain_dataloader_worker_idle_consumer']:.3f}",
        ),
        (
            "DataLoader worker, pretrain, fbank.npy, no buffer reuse",
            f"{worker_rates['loader_pretrain_no_buffer_reuse']:.1f} clips/s",
            "data.batch_buffers=0",
        ),
        (
            "DataLoader worker, pretrain, JPEG bytes",
            f"{worker_rates['loader_pretrain_jpeg_bytes']:.1f} clips/s",
            f"target {BYTES_TARGET}",
        ),
        (
            "DataLoader worker, pretrain, JPEG bytes, batch 40",
            f"{worker_rates['loader_pretrain_jpeg_bytes_batch40']:.1f} clips/s",
            f"target {BYTES_TARGET}",
        ),
        (
            "DataLoader worker, pretrain, JPEG bytes, batch 40, no buffer reuse",
            f"{worker_rates['loader_pretrain_jpeg_bytes_batch40_no_buffer_reuse']:.1f} clips/s",
            "data.batch_buffers=0",
        ),
        ("random resized crop alone", f"{per_clip['random_resized_crop']} ms/clip", "part of pretrain"),
        (
            "shared-memory batch buffer, decoded clip",
            f"{per_clip['shared_buffer_decoded_clip']} ms/clip",
            "DataLoader worker only: new pages per batch",
        ),
        (
            "shared-memory batch buffer, JPEG bytes clip",
            f"{per_clip['shared_buffer_jpeg_bytes_clip']} ms/clip",
            "JPEGs + float16 log-mel",
        ),
        ("fbank, torchaudio kaldi", f"{fbank_ms['torchaudio_kaldi']} ms/clip", ""),
        (
            "fbank, vectorised per clip",
            f"{fbank_ms['vectorised_per_clip']} ms/clip",
            "loader without fbank.npy",
        ),
        ("fbank, vectorised batch of 8", f"{fbank_ms['vectorised_batch_of_8']} ms/clip", ""),
        (
            "fbank, stored fbank.npy",
            f"{fbank_ms['stored_fbank_npy']} ms/clip",
            "read + gain + pad + normalise",
        ),
        (
            "eval loader CPU per clip",
            f"{per_clip['eval_loader']} ms",
            f"JPEG in place {per_clip['jpeg_decode_in_place']} + rest {per_clip['eval_rest']}",
        ),
        (
            "pretrain loader CPU per clip",
            f"{per_clip['pretrain_loader']} ms",
            f"JPEG in place {per_clip['jpeg_decode_in_place']} + crop {per_clip['random_resized_crop']} + rest {per_clip['pretrain_rest']}",
        ),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"target: loader / raw JPEG decode >= {results['target_ratio']}")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>16}  {note}")
    over = results["worker_over_in_process"]
    print(
        f"DataLoader worker / the same loader in process (same rounds): pretrain {over['pretrain']}, "
        f"with a consumer that reads nothing {over['pretrain_idle_consumer']}, eval {over['eval']}"
    )
    print(f"GPU demand ({args.size}): {results['gpu_demand']['clips_per_s']} clips/s, {demand['source']}")
    for name, cores in results["cpu_cores_per_gpu"].items():
        print(
            f"  CPU cores (loader workers) per GPU, {name:<28} {cores:>7}  ({per_worker[name]:.1f} clips/s per worker)"
        )
    print("  the JPEG-bytes figure excludes the GPU's own decode and augmentation time")
    print("main process CPU per batch received from a worker (one read per page of every tensor):")
    for name, ms in results["main_process_ms_per_batch"].items():
        print(f"  {name:<{width}}  {ms:>8} ms")
    if "device_decode" in results:
        d = results["device_decode"]
        print(
            f"decode on {d['device']} (DeviceFrameDecoder, batch {d['batch']}): {d['clips_per_s']} clips/s, "
            f"{d['host_cpu_ms_per_clip']} ms of main-process CPU per clip"
        )
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
