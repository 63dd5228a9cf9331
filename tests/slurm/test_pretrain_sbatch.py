"""slurm/pretrain.sbatch on a real SLURM cluster: two CPU ranks (gloo) train the demo model on the
built-in shards; SLURM's pre-time-limit SIGUSR1 makes every rank save at the same step and the job
requeue itself; the requeued job resumes from that checkpoint and finishes, in the same W&B run."""

from __future__ import annotations

import csv
import hashlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "slurm" / "pretrain.sbatch"
DEMO = REPO / "configs" / "pretrain" / "demo.yaml"


def job_fields(job_id: str) -> dict[str, str]:
    """`scontrol show job -o` as a dict (JobState, Restarts, ExitCode, ...)."""
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True
    ).stdout
    return dict(item.split("=", 1) for item in out.split() if "=" in item)


def wait_for(
    what: str, predicate, timeout: float, log: Path | None = None, poll: float = 0.5, job: str | None = None
):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    if job is not None:  # a stuck job: SIGABRT makes faulthandler print every rank's Python stacks to the log
        subprocess.run(["scancel", "--signal=ABRT", job], capture_output=True)
        time.sleep(5)
    tail = log.read_text()[-4000:] if log is not None and log.exists() else "(no job log)"
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; job log tail:\n{tail}")


def logged_steps(run_dir: Path, version: int) -> list[int]:
    """Optimizer steps that logged a loss in one start of the run (one CSV version per start)."""
    with open(run_dir / "csv" / f"version_{version}" / "metrics.csv") as f:
        return sorted(int(r["step"]) for r in csv.DictReader(f) if r.get("loss/total"))


def sbatch(args: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 0, f"sbatch failed: {proc.stderr}"
    return proc.stdout.strip().split(";")[0]


@pytest.mark.slow
@pytest.mark.slurm
def test_two_rank_job_saves_on_sigusr1_requeues_itself_and_resumes_to_the_last_step(
    slurm_cluster, synth_shards, tmp_path
):
    max_steps, every = 16, 4
    run_dir, log_dir = tmp_path / "run", tmp_path / "logs"
    log_dir.mkdir()
    env = dict(
        os.environ,
        EMOMAE_ACCELERATOR="cpu",
        EMOMAE_PYTHON=sys.executable,
        OMP_NUM_THREADS="1",
        WANDB_MODE="offline",
        HF_HUB_OFFLINE="1",
        PYTHONFAULTHANDLER="1",
    )
    # the job starts its own W&B service, as on a cluster, not the one an earlier test left in this process
    for name in ("WANDB_RUN_ID", "WANDB_SERVICE"):
        env.pop(name, None)
    job = sbatch(
        [
            f"--partition={slurm_cluster}",
            "--nodes=1",
            "--ntasks-per-node=2",
            "--cpus-per-task=1",
            f"--output={log_dir}/%x-%j.out",
            f"--chdir={REPO}",
            str(SBATCH),
            str(DEMO),
            f"data.shards={synth_shards}",
            f"run_dir={run_dir}",
            f"trainer.max_steps={max_steps}",
            f"trainer.ckpt_every_n_steps={every}",
            "trainer.log_every_n_steps=1",
            "trainer.progress_bar=false",
            "optim.warmup_steps=2",
            "data.batch_size=4",
            "data.num_workers=1",
            "data.shuffle_buffer=16",
            "logging.logger=[csv,wandb]",
            "logging.image_every_n_steps=0",
        ],
        env,
    )
    log = log_dir / f"emomae-pretrain-{job}.out"
    try:
        # The first periodic checkpoint: both ranks are in the training loop. Then what SLURM does
        # `--signal=USR1@120` before the time limit: SIGUSR1 to every task of the job step.
        wait_for(
            "the first periodic checkpoint",
            (run_dir / "checkpoints" / f"step{every:07d}.ckpt").exists,
            300,
            log,
            job=job,
        )
        subprocess.run(["scancel", "--signal=USR1", job], check=True)
        wait_for(
            "the job to requeue itself",
            lambda: job_fields(job).get("Restarts") == "1" and job_fields(job)["JobState"] == "PENDING",
            120,
            log,
            job=job,
        )
        # SLURM holds a requeued job for ~2 minutes (BeginTime) before it may start again; skip the wait.
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
        state = wait_for(
            "the requeued job to finish",
            lambda: (
                job_fields(job)["JobState"] in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}
                and job_fields(job)
            ),
            300,
            log,
            job=job,
        )
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    text = log.read_text()
    assert state["JobState"] == "COMPLETED", text[-4000:]

    # both ranks joined the same 2-process group, in the first start and again after the requeue
    assert "restart 0:" in text and "restart 1:" in text
    assert text.count("1: Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2") == 2, text[-4000:]
    assert text.count("0: Initializing distributed: GLOBAL_RANK: 0, MEMBER: 1/2") == 2
    saved = re.search(r"signal SIGUSR1: saving \S+last\.ckpt at step (\d+)", text)
    assert saved, text[-4000:]
    stopped_at = int(saved.group(1))
    assert every <= stopped_at < max_steps
    assert f"requeued SLURM job {job}" in text
    for rank in (0, 1):  # each rank printed the end-of-run summary of the resumed start
        assert f"{rank}: pretrain: {max_steps} steps" in text

    # the second start continued exactly where the signal stopped the first: no step twice, none lost
    first, second = logged_steps(run_dir, 0), logged_steps(run_dir, 1)
    assert first == list(range(stopped_at))
    assert second == list(range(stopped_at, max_steps))
    end = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert end["global_step"] == max_steps
    adam_steps = {int(s["step"]) for s in end["optimizer_states"][0]["state"].values()}
    assert adam_steps == {max_steps}, "AdamW saw a different number of updates than optimizer steps"
    assert end["AVDataModule"]["batches"] == max_steps  # every batch of the stream used once

    # one W&B run across the requeue: the id derived from the run directory, two offline segments
    expected_id = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
    assert (run_dir / "wandb_id.txt").read_text().strip() == expected_id
    segments = sorted((run_dir / "wandb").glob(f"offline-run-*-{expected_id}"))
    assert len(segments) == 2, sorted(p.name for p in (run_dir / "wandb").iterdir())


def test_sbatch_script_refuses_to_run_outside_slurm_with_a_clear_message(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(
        ["bash", str(SBATCH), str(DEMO)], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert proc.returncode != 0
    assert "must run under sbatch" in proc.stderr


def test_sbatch_script_rejects_tasks_that_do_not_split_evenly_over_nodes(tmp_path):
    env = dict(os.environ, SLURM_JOB_ID="1", SLURM_NTASKS="3", SLURM_JOB_NUM_NODES="2", EMOMAE_ROOT=str(REPO))
    proc = subprocess.run(
        ["bash", str(SBATCH), str(DEMO)], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert proc.returncode == 2
    assert "3 tasks do not split evenly over 2 nodes" in proc.stderr
