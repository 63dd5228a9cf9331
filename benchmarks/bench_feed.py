"""Does the loader feed the step? Pretraining on real shards next to the same step on synthetic input.

    python benchmarks/bench_feed.py --size base --batch 40 --workers 6 --steps 60 --device cuda [--compile]
    python benchmarks/bench_feed.py --size tiny --batch 4 --workers 1 --steps 12 --device cpu   # the code path

Three figures from one invocation, on one device:

- loader: the pretraining train loader alone (`AVDataModule`, `--workers` loader workers; on a GPU the
  frames decode there, `data.decode_device=cuda`), batches handed to the device as Lightning hands
  them, clips/s of wall clock after its first `--warmup` batches;
- real shards: `emomae pretrain` itself (`pretrain.train.pretrain`) on those shards for `--steps`
  steps, clips/s from its ThroughputMonitor (`train/device/samples_per_sec` in metrics.csv), the
  median of the values logged after the first third of the steps;
- synthetic input: `bench_pretrain.py`'s step on tensors already on the device, same size, batch,
  precision and compile, in a child process of its own.

real / synthetic is the fraction of the model's speed that training on shards keeps (target >= 0.9
with <= 6 workers at `base`, issue 15). The shards are `--shards` (a shard folder made by
`emomae shards` at the model's geometry), else 16 x 160 px shards written here from `--videos` (by
default the real clips of ../shared/realdata), as bench_loader.py writes them. Prints a table and writes
benchmarks/results/bench_feed.json (`--out`).
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_loader import CLIP_FOLDER, REALDATA, write_bench_shards  # noqa: E402
from child_process import child_env, write_results  # noqa: E402

from pretrain.train import load_pretrain_config, pretrain  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "bench_feed.json"
TARGET = 0.9


def run_overrides(args: argparse.Namespace, shards: Path, run_dir: Path) -> list[str]:
    """`emomae pretrain` overrides for this benchmark: one device, the CSV logger only, no pictures or
    checkpoints inside the timed steps."""
    on_gpu = args.device.startswith("cuda")
    return [
        f"data.shards={shards}",
        f"data.batch_size={args.batch}",
        f"data.num_workers={args.workers}",
        f"data.decode_device={args.decode_device}",
        "data.shuffle_buffer=64",
        f"trainer.accelerator={'gpu' if on_gpu else 'cpu'}",
        "trainer.devices=1",
        f"trainer.precision={'bf16-mixed' if on_gpu else '32-true'}",
        f"trainer.compile={str(args.compile).lower()}",
        f"trainer.max_steps={args.steps}",
        "trainer.log_every_n_steps=5",
        f"trainer.ckpt_every_n_steps={args.steps * 10}",
        "trainer.progress_bar=false",
        "optim.warmup_steps=5",
        "logging.logger=[csv]",
        f"logging.image_every_n_steps={args.steps * 10}",
        "resume=never",
        f"run_dir={run_dir}",
    ]


def loader_rate(cfg, device: str, batches: int, warmup: int) -> dict:
    """The train loader alone: batches through `on_before_batch_transfer` (where JPEG bytes decode on
    the device) and onto `device`, as the Trainer moves them; clips/s of wall clock after `warmup`."""
    from pytorch_lightning.utilities import move_data_to_device

    from data_pipelines.datamodule import AVDataModule

    datamodule = AVDataModule(cfg.data, rank=0, world_size=1)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    clips, start = 0, None
    for i, batch in enumerate(datamodule.train_dataloader()):
        if i == warmup:
            sync()
            clips, start = 0, time.perf_counter()
        batch = move_data_to_device(datamodule.on_before_batch_transfer(batch, 0), torch.device(device))
        clips += int(batch["video"].shape[0])
        if i + 1 == warmup + batches:
            break
    sync()
    seconds = time.perf_counter() - start
    return {"clips_per_s": round(clips / seconds, 1), "batches": batches, "seconds": round(seconds, 2)}


def training_rate(run_dir: Path, steps: int) -> dict:
    """Median `train/device/samples_per_sec` logged after the first third of the run's steps."""
    logs = sorted(run_dir.glob("csv/version_*/metrics.csv"))
    if not logs:
        raise SystemExit(f"no csv/version_*/metrics.csv in {run_dir}: the run logged nothing")
    metrics = logs[-1]
    values = [
        float(row["train/device/samples_per_sec"])
        for row in csv.DictReader(metrics.open())
        if row.get("train/device/samples_per_sec") and int(row["step"]) >= steps // 3
    ]
    if not values:
        raise SystemExit(
            f"{metrics} has no train/device/samples_per_sec after step {steps // 3}: run more --steps"
        )
    return {"clips_per_s": round(statistics.median(values), 1), "values": len(values)}


def synthetic_rate(args: argparse.Namespace) -> dict:
    """bench_pretrain.py's row for this size, batch and device (a child process: its own memory)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench_pretrain.json"
        cmd = [
            sys.executable,
            str(REPO / "benchmarks" / "bench_pretrain.py"),
            *("--sizes", args.size, "--batch", str(args.batch), "--device", args.device),
            *("--steps", str(max(5, args.steps // 4)), "--warmup", str(3 if args.compile else 2)),
            *("--threads", str(torch.get_num_threads()), "--out", str(out)),
            *(["--compile"] if args.compile else []),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, env=child_env(torch.get_num_threads()))
        if done.returncode != 0:
            raise SystemExit(f"bench_pretrain.py failed:\n{done.stderr[-3000:]}")
        (row,) = json.loads(out.read_text())["rows"]
    return {"clips_per_s": round(row["clips_per_s"], 1), "step_s_median": row["step_s_median"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="base", help="configs/pretrain/<size>.yaml")
    p.add_argument("--batch", type=int, default=40, help="clips per step (data.batch_size)")
    p.add_argument("--workers", type=int, default=6, help="loader workers (data.num_workers)")
    p.add_argument("--steps", type=int, default=60, help="training steps on the shards")
    p.add_argument("--warmup", type=int, default=5, help="loader batches not timed (worker start-up)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--decode-device", default="auto", help="data.decode_device (auto: on the GPU when there is one)"
    )
    p.add_argument(
        "--compile", action="store_true", help="trainer.compile=true, and the synthetic step compiled"
    )
    p.add_argument(
        "--shards", type=Path, help="a shard folder at the model's geometry (default: written here)"
    )
    p.add_argument("--clips", type=int, default=11, help="clips to shard when --shards is not given")
    p.add_argument(
        "--videos", type=Path, default=REALDATA / CLIP_FOLDER, help="their folder (.mp4 with audio)"
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards
        if shards is None:
            write_bench_shards(Path(tmp) / "data", args.clips, videos_dir=args.videos)
            shards = Path(tmp) / "data" / "shards"
        run_dir = Path(tmp) / "run"
        cfg = load_pretrain_config(args.size, run_overrides(args, shards, run_dir))
        if args.decode_device == "auto" and args.device.startswith("cuda"):
            cfg.data.decode_device = "cuda"  # "auto" is the GPU when training on one; no Trainer here says so
        loader = loader_rate(cfg, args.device, batches=max(10, args.steps // 2), warmup=args.warmup)
        summary = pretrain(load_pretrain_config(args.size, run_overrides(args, shards, run_dir)))
        real = training_rate(run_dir, args.steps)
        real["steps"], real["seconds"] = summary.steps, round(summary.seconds, 1)
    synthetic = synthetic_rate(args)

    results = {
        "command": " ".join(["python", "benchmarks/bench_feed.py", *(argv or sys.argv[1:])]),
        "machine": platform.platform(),
        "device": (
            torch.cuda.get_device_name(0)
            if args.device.startswith("cuda")
            else platform.processor() or platform.machine()
        ),
        "size": args.size,
        "batch": args.batch,
        "workers": args.workers,
        "compile": args.compile,
        "loader": loader,
        "real_shards": real,
        "synthetic_input": synthetic,
        "real_over_synthetic": round(real["clips_per_s"] / synthetic["clips_per_s"], 3),
        "target": TARGET,
    }
    print(
        f"{args.size}, batch {args.batch}, {args.workers} loader workers, {results['device']} ({args.device})"
    )
    print(f"  loader alone               {loader['clips_per_s']:>9.1f} clips/s")
    print(f"  pretraining on shards      {real['clips_per_s']:>9.1f} clips/s")
    print(f"  step on synthetic input    {synthetic['clips_per_s']:>9.1f} clips/s")
    print(f"  shards / synthetic         {results['real_over_synthetic']:>9.3f}   (target >= {TARGET})")
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
