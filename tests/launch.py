"""Starting the processes of the multi-process tests: a free port, the child environment, torchrun's
command line, a run that must succeed, and spawned gloo ranks that hand back their tensors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """This environment for a child: one thread each (the ranks share the cores), and the repository
    and tests/ importable (a test file that is also a worker script imports the helpers here)."""
    path = os.pathsep.join([str(REPO), str(REPO / "tests")])
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path, **extra)


def torchrun(*args: str | Path, nproc: int = 2, nnodes: int = 1, port: int | None = None) -> list[str]:
    """`python -m torch.distributed.run` with a c10d rendezvous on 127.0.0.1 and no restarts, then `args`."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nnodes}",
        f"--nproc_per_node={nproc}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{port or free_port()}",
        "--max_restarts=0",
        *map(str, args),
    ]


def run_ok(cmd: list[str], env: dict[str, str], timeout: float = 300) -> str:
    """Runs `cmd` in the repository; fails the test with the end of its output unless it exits 0."""
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return proc.stdout


def start(cmd: list[str], env: dict[str, str], **options) -> subprocess.Popen:
    """Starts `cmd` in the repository, its stdout and stderr together as text on `.stdout`."""
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **options
    )


def gloo_ranks(rank_fn: Callable[[int], dict], world: int, out_dir: Path) -> list[dict]:
    """Runs `rank_fn(rank) -> {name: tensor}` in `world` spawned processes joined in one gloo process
    group (one thread each) -> each rank's tensors, detached, in rank order (saved under `out_dir`)."""
    mp.spawn(_gloo_rank, args=(rank_fn, world, free_port(), str(out_dir)), nprocs=world, join=True)
    return [torch.load(Path(out_dir) / f"rank{rank}.pt", weights_only=True) for rank in range(world)]


def _gloo_rank(rank: int, rank_fn: Callable[[int], dict], world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # only detached tensors outlive rank_fn: what it held (a DDP reducer, a graph) must go
        # before the process group does
        result = {name: value.detach() for name, value in rank_fn(rank).items()}
        torch.save(result, f"{out_dir}/rank{rank}.pt")
        # no rank may tear the group down while another still talks to it ("terminate called
        # without an active exception" now and then)
        dist.barrier()
    finally:
        dist.destroy_process_group()
