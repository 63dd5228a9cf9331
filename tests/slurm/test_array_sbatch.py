"""The job-array scripts: slurm/shards.sbatch on the local cluster (two array tasks write two parts
that together hold every clip once and train as one glob), and the (protocol, fold) table of
slurm/finetune_folds.sbatch."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_model import SHARD_TINY

REPO = Path(__file__).resolve().parents[2]


def wait_done(job: str, timeout: float = 300) -> dict[str, str]:
    """Waits until every task of an array job has ended; returns {task id: state}."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", job], capture_output=True, text=True, check=True
        ).stdout
        tasks = {}
        for line in out.splitlines():
            fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
            tasks[fields.get("ArrayTaskId", "0")] = fields["JobState"]
        if tasks and all(
            s not in {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING"} for s in tasks.values()
        ):
            return tasks
        time.sleep(1)
    raise AssertionError(f"array job {job} did not finish within {timeout} s")


def run_array(
    partition: str, script: str, args: list[str], logs: Path, env: dict, timeout: float = 300
) -> None:
    """Runs `script` as a 2-task array job (one CPU each, logs in `logs`) and waits for it; fails with
    the logs' tail unless both tasks completed."""
    logs.mkdir()
    submit = subprocess.run(
        [
            "sbatch",
            "--parsable",
            f"--partition={partition}",
            "--array=0-1",
            "--cpus-per-task=1",
            f"--output={logs}/%x-%A_%a.out",
            f"--chdir={REPO}",
            script,
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    try:
        states = wait_done(job, timeout)
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    log_text = "\n".join(p.read_text() for p in sorted(logs.glob("*.out")))
    assert states == {"0": "COMPLETED", "1": "COMPLETED"}, log_text[-4000:]


@pytest.mark.slow
@pytest.mark.slurm
def test_shard_array_tasks_write_disjoint_parts_that_cover_the_manifest_once(
    slurm_cluster, synth_manifest, tmp_path
):
    from data_pipelines.datamodule import resolve_shards
    from data_pipelines.features import FbankConfig
    from data_pipelines.stream import StreamConfig, eval_pipeline, shard_sizes

    out = tmp_path / "shards"
    sizes = ["num_frames=8", "frame_stride=4", "img_size=64", "samples_per_shard=16"]
    script = str(REPO / "slurm" / "shards.sbatch")
    env = dict(os.environ, EMOMAE_PYTHON=sys.executable)
    run_array(slurm_cluster, script, [str(synth_manifest), str(out), *sizes], tmp_path / "logs", env)

    with open(synth_manifest, newline="") as f:
        clips = [row["key"] for row in csv.DictReader(f)]
    parts = sorted(out.glob("part-*"))
    assert [p.name for p in parts] == ["part-000", "part-001"]
    part_clips = []
    for part in parts:
        with open(part / "manifest.csv", newline="") as f:
            part_clips.append([row["key"] for row in csv.DictReader(f)])
        assert (part / "index.json").is_file() and (part / "provenance.json").is_file()
    assert sorted(part_clips[0] + part_clips[1]) == sorted(clips)
    assert set(part_clips[0]).isdisjoint(part_clips[1])

    # the parts train as one dataset through a glob; every window sample exactly once
    urls = resolve_shards(str(out / "part-*" / "*.tar"), None)
    assert shard_sizes(urls) is not None  # sizes come from each part's own index.json
    stream = eval_pipeline(
        urls,
        StreamConfig(batch_size=16, num_frames=8, img_size=64, fbank=FbankConfig(fbank_frames=128)),
        rank=0,
        world_size=1,
    )
    seen = [(clip, key) for b in stream for clip, key in zip(b["clip_key"], b["key"])]
    assert len(seen) == len(set(seen)) == sum(shard_sizes(urls))
    assert sorted({clip for clip, _ in seen}) == sorted(clips)


def test_finetune_fold_plan_enumerates_protocols_times_folds_and_the_array_range(tmp_path):
    env = dict(os.environ, EMOMAE_PYTHON=sys.executable, EMOMAE_ROOT=str(REPO))
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    configs = [str(REPO / "configs" / "finetune" / name) for name in ("crema_d.yaml", "ravdess.yaml")]
    proc = subprocess.run(
        ["bash", str(REPO / "slurm" / "finetune_folds.sbatch"), "--plan", *configs, "--", "head=linear"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    table = [line.split() for line in proc.stdout.splitlines()[1:] if line and line[0].isdigit()]
    # CREMA-D: 5 actor folds, RAVDESS: 6 (docs/finetune.md, section 3)
    assert [(int(t), Path(c).name, int(k)) for t, c, _, k in table] == (
        [(i, "crema_d.yaml", i) for i in range(5)] + [(5 + i, "ravdess.yaml", i) for i in range(6)]
    )
    assert "--array=0-10 " in proc.stdout


def test_finetune_fold_task_outside_the_table_fails_naming_the_valid_range(tmp_path):
    env = dict(os.environ, EMOMAE_PYTHON=sys.executable, EMOMAE_ROOT=str(REPO), SLURM_ARRAY_TASK_ID="7")
    proc = subprocess.run(
        [
            "bash",
            str(REPO / "slurm" / "finetune_folds.sbatch"),
            str(REPO / "configs" / "finetune" / "crema_d.yaml"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "outside the 5 (protocol, fold) pairs; use --array=0-4" in proc.stderr


@pytest.mark.slow
@pytest.mark.slurm
def test_finetune_fold_tasks_run_their_folds_and_share_one_feature_cache(
    slurm_cluster, synth_manifest, synth_shards, tmp_path
):
    from finetune.export import input_spec, save_export
    from pretrain.encoders import AVEncoder, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(**{**SHARD_TINY, "decoder_depth": 2, "skip_layers": [2]})
    export = save_export(
        AVEncoder(cfg), cfg.to_dict(), input_spec({}, cfg.to_dict()), tmp_path / "export", "test"
    )
    out, cache = tmp_path / "runs", tmp_path / "cache"
    env = dict(os.environ, EMOMAE_PYTHON=sys.executable, EMOMAE_ACCELERATOR="cpu")
    args = [
        str(REPO / "configs" / "finetune" / "synth.yaml"),
        "--",
        f"encoder={export}",
        f"protocol.manifest={synth_manifest}",
        f"protocol.shards={synth_shards}",
        f"out_dir={out}",
        f"cache_dir={cache}",
        "head=linear",
        "recipes.linear.epochs=5",
        "num_workers=0",
        "speed_batches=1",
    ]
    script = str(REPO / "slurm" / "finetune_folds.sbatch")
    run_array(slurm_cluster, script, args, tmp_path / "logs", env, timeout=600)
    for fold in (0, 1):
        results = json.loads((out / f"synth-linear-fold{fold}" / "results.json").read_text())
        assert [f["fold"] for f in results["folds"]] == [fold]
        assert 0.0 <= results["summary"]["av"]["uar"][0] <= 1.0
        assert (out / f"synth-linear-fold{fold}" / "results.md").is_file()
    # both tasks used the same fingerprinted cache: one complete pair of files, no temporary left over
    assert sorted(p.suffix for p in cache.iterdir()) == [".json", ".safetensors"]
