"""Data-parallel scaling: the same per-process micro-batch on 1 and on 2 processes (Lightning DDP,
torchrun), throughput per process and scaling efficiency = per-process throughput at N / at 1.

    python benchmarks/bench_scaling.py                                 # CPU, gloo, micro model
    python benchmarks/bench_scaling.py --model tiny --batch 4 --steps 20
    python benchmarks/bench_scaling.py --device gpu --model base --batch 40 --procs 1 2 4 8

Batches are random tensors already in memory, so the figure is the training step (forward, backward
with the gradient all-reduce, the gathered contrastive loss, AdamW), not the loader. Each process gets
`--threads` CPU threads: on a CPU the N-process run uses N times the cores of the 1-process run
(weak scaling), and what is left of perfect efficiency is gloo over loopback plus contention for
memory bandwidth. Prints a table and writes benchmarks/results/bench_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from child_process import child_env, forwarded

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "bench_scaling.json"


def worker(args: argparse.Namespace) -> None:
    """Runs under torchrun: train `warmup + steps` steps, rank 0 writes step times to `args.out`."""
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.callbacks import Callback
    from torch.utils.data import DataLoader

    from pretrain.info import resolve_model_config
    from pretrain.mae import ObjectiveConfig
    from pretrain.module import PretrainModule
    from pretrain.optim import OptimConfig

    torch.set_num_threads(args.threads)
    world = int(os.environ.get("WORLD_SIZE", 1))
    cfg = resolve_model_config(args.model)
    gen = torch.Generator().manual_seed(int(os.environ.get("RANK", 0)))
    batches = [
        {
            "video": torch.randint(
                0,
                256,
                (args.batch, cfg.num_frames, 3, cfg.img_size, cfg.img_size),
                dtype=torch.uint8,
                generator=gen,
            ),
            "fbank": torch.randn(args.batch, cfg.fbank_frames, cfg.mel_bins, generator=gen),
        }
        for _ in range(4)
    ]  # cycled: the step, not the data, is measured
    total = args.warmup + args.steps
    data = [batches[i % len(batches)] for i in range(total)]

    class StepTimes(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_start(self, *_) -> None:
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, *_) -> None:
            if trainer.strategy.root_device.type == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.start)

    pl.seed_everything(0, verbose=False)
    module = PretrainModule(
        cfg, ObjectiveConfig(), OptimConfig(warmup_steps=1), peak_lr=1e-4, final_lr=1e-5, max_steps=total
    )
    timer = StepTimes()
    precision = "bf16-mixed" if args.device == "gpu" else "32-true"
    trainer = pl.Trainer(
        accelerator=args.device,
        devices=world,
        strategy="ddp" if world > 1 else "auto",
        precision=precision,
        max_steps=total,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[timer],
    )
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=None))
    if trainer.is_global_zero:
        Path(args.out).write_text(json.dumps({"step_times": timer.times[args.warmup :]}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(procs: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "times.json"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={procs}",
            "--nnodes=1",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{free_port()}",
            __file__,
            "--worker",
            "--out",
            str(out),
            *forwarded(args, "model", "batch", "steps", "warmup", "threads", "device"),
        ]
        env = child_env(args.threads, WANDB_MODE="disabled")
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{procs}-process run failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
        times = sorted(json.loads(out.read_text())["step_times"])
    median = times[len(times) // 2]
    per_proc = args.batch / median
    return {
        "procs": procs,
        "median_step_s": median,
        "clips_per_s_per_proc": per_proc,
        "clips_per_s_total": per_proc * procs,
        "step_times_s": times,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--model", default="micro", help="size name (configs/model) or model YAML")
    p.add_argument("--batch", type=int, default=8, help="clips per process and step")
    p.add_argument("--steps", type=int, default=15, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    p.add_argument(
        "--procs", type=int, nargs="+", default=[1, 2], help="process counts; the first is the baseline"
    )
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    args = p.parse_args()
    if args.worker:
        sys.path.insert(0, str(REPO))
        return worker(args)

    rows = [run(n, args) for n in args.procs]
    base = rows[0]["clips_per_s_per_proc"]
    for r in rows:
        r["scaling_efficiency"] = r["clips_per_s_per_proc"] / base
    print(
        f"model {args.model}, batch {args.batch}/process, {args.threads} thread(s)/process, {args.device}, "
        f"{'gloo' if args.device == 'cpu' else 'nccl'}; median of {args.steps} steps"
    )
    print(f"{'processes':>9} {'step s':>8} {'clips/s/proc':>13} {'clips/s total':>14} {'efficiency':>11}")
    for r in rows:
        print(
            f"{r['procs']:>9} {r['median_step_s']:>8.3f} {r['clips_per_s_per_proc']:>13.2f} "
            f"{r['clips_per_s_total']:>14.2f} {r['scaling_efficiency']:>10.0%}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "benchmark": "bench_scaling",
                "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                "model": args.model,
                "batch_per_process": args.batch,
                "threads_per_process": args.threads,
                "device": args.device,
                "cpu_count": os.cpu_count(),
                "machine": platform.machine(),
                "load_average_at_end": os.getloadavg(),
                "results": rows,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
