"""Pretraining step benchmark: time per optimizer step (forward + backward + AdamW), clips/s, peak
memory, model FLOPs per clip, and the fraction of this machine's measured matmul rate the step reaches
(MFU on GPU).

    python benchmarks/bench_pretrain.py --sizes tiny base --batch 2 --threads 2      # CPU, fp32
    python benchmarks/bench_pretrain.py --sizes base --batch 40 --device cuda         # GPU, bf16 autocast
    python benchmarks/bench_pretrain.py --sizes base --batch 40 --device cuda --compile   # + torch.compile

Each size runs in its own process so peak RSS is that model's alone. Prints a table and writes
benchmarks/results/bench_pretrain.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from child_process import child_env, forwarded, write_results

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "bench_pretrain.json"


def matmul_flops_per_s(device: str, dtype, n: int, reps: int = 5) -> float:
    """Measured dense matmul rate (2 n^3 FLOPs per product): the machine's practical peak."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory_bytes(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    from pretrain.callbacks import peak_rss_bytes

    return peak_rss_bytes()


def bench_one(size: str, batch: int, steps: int, warmup: int, device: str, compile: bool = False) -> dict:
    """One model size in this process: returns the row of the table. `compile` compiles the model in
    place as `trainer.compile=true` does (pretrain/module.py), after the FLOPs are counted eagerly."""
    import torch
    from omegaconf import OmegaConf

    from pretrain.encoders import ModelConfig
    from pretrain.flops import flop_counter
    from pretrain.mae import MaskedAVAutoencoder
    from pretrain.optim import OptimConfig, build_optimizer

    raw = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / f"{size}.yaml"))
    cfg = ModelConfig.from_dict({k: v for k, v in raw.items() if k != "base"})
    torch.manual_seed(0)
    model = MaskedAVAutoencoder(cfg).to(device).train()
    optimizer, scheduler = build_optimizer(model, OptimConfig(warmup_steps=0), 1e-4, 1e-5, 10_000)
    gen = torch.Generator(device="cpu").manual_seed(0)
    video = torch.randint(
        0, 256, (batch, cfg.num_frames, 3, cfg.img_size, cfg.img_size), dtype=torch.uint8, generator=gen
    )
    fbank = torch.randn(batch, cfg.fbank_frames, cfg.mel_bins, generator=gen)
    video, fbank = video.to(device), fbank.to(device)
    on_gpu = device.startswith("cuda")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else torch.autocast("cpu", enabled=False)

    def step() -> float:
        with amp:
            loss = model(video, fbank).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return float(loss)

    with flop_counter() as counter:  # forward + backward of one step, counted by op, attention included
        with amp:
            loss = model(video, fbank).loss
        loss.backward()
    optimizer.zero_grad(set_to_none=True)
    flops_per_step = counter.get_total_flops()
    if compile:  # its first steps compile: warm-up should be a few steps
        model.compile()

    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    times.sort()
    median = times[len(times) // 2]
    dtype = torch.bfloat16 if on_gpu else torch.float32
    peak = matmul_flops_per_s(device, dtype, 8192 if on_gpu else 1024)
    achieved = flops_per_step / median
    return {
        "size": size,
        "device": device,
        "batch": batch,
        "dtype": "bf16-autocast" if on_gpu else "fp32",
        "compile": compile,
        "threads": torch.get_num_threads(),
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "step_s_median": median,
        "step_s_min": times[0],
        "clips_per_s": batch / median,
        "gflops_per_clip": flops_per_step / batch / 1e9,
        "achieved_tflops": achieved / 1e12,
        "matmul_peak_tflops": peak / 1e12,
        "fraction_of_matmul_peak": achieved / peak,
        "peak_mem_gib": peak_memory_bytes(device) / 2**30,
        "peak_mem_kind": "cuda max_memory_allocated" if on_gpu else "process peak RSS",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "base"], help="configs/model/<size>.yaml")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the model (trainer.compile=true)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run a single size, print JSON
    args = parser.parse_args(argv)

    if args.one:
        import torch

        torch.set_num_threads(args.threads)
        row = bench_one(args.one, args.batch, args.steps, args.warmup, args.device, args.compile)
        print(json.dumps(row))
        return 0

    rows = []
    for size in args.sizes:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            size,
            *forwarded(args, "batch", "steps", "warmup", "threads", "device"),
            *(["--compile"] if args.compile else []),
        ]
        env = child_env(args.threads)
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            return done.returncode
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))

    header = (
        f"{'size':<6} {'params M':>8} {'batch':>5} {'step s':>7} {'clips/s':>8} {'GFLOP/clip':>10} "
        f"{'TFLOP/s':>8} {'matmul TFLOP/s':>14} {'fraction':>8} {'peak GiB':>8}"
    )
    print(
        f"device: {rows[0]['device']} ({platform.processor() or platform.machine()}), "
        f"{rows[0]['dtype']}, {rows[0]['threads']} threads{', compiled' if args.compile else ''}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['size']:<6} {r['params_M']:>8.2f} {r['batch']:>5} {r['step_s_median']:>7.3f} "
            f"{r['clips_per_s']:>8.2f} {r['gflops_per_clip']:>10.1f} {r['achieved_tflops']:>8.3f} "
            f"{r['matmul_peak_tflops']:>14.3f} {r['fraction_of_matmul_peak']:>8.1%} {r['peak_mem_gib']:>8.2f}"
        )
    write_results(
        args.out,
        {
            "command": " ".join(["python", "benchmarks/bench_pretrain.py", *(argv or sys.argv[1:])]),
            "machine": platform.platform(),
            "rows": rows,
        },
    )
    return 0


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
