"""The benchmark scripts a GPU session runs in one go (benchmarks/gpu_bench.sh): their code paths, on
the CPU at the smallest size, so the GPU's few minutes are not spent on a crash."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def test_gpu_bench_is_valid_bash_and_refuses_without_cuda(tmp_path):
    script = REPO / "benchmarks" / "gpu_bench.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", EMOMAE_PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", str(script), str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_device_decode_rates_decodes_every_clip_of_the_kept_batches(synth_shards):
    from bench_loader import device_decode_rates

    from data_pipelines.augment import VideoAugConfig
    from data_pipelines.shards import shard_urls
    from data_pipelines.stream import StreamConfig, pretrain_pipeline

    cfg = StreamConfig(
        batch_size=4,
        num_frames=8,
        img_size=64,
        video_aug=VideoAugConfig(img_size=64),
        shuffle_buffer=8,
        epoch_length=2,
        jpeg_bytes=True,
    )
    batches = list(pretrain_pipeline(shard_urls(synth_shards), cfg, rank=0, world_size=1))
    rates = device_decode_rates(batches, "cpu", min_seconds=0.2)
    assert rates["device"] == "cpu" and rates["batch"] == 4 and rates["dropped"] == 0
    assert rates["clips_per_s"] > 0 and rates["host_cpu_ms_per_clip"] > 0
    assert all("jpeg" in b for b in batches)  # the decoder worked on copies: the batches stay reusable


def test_bench_feed_runs_pretraining_on_shards_and_the_synthetic_step(tmp_path):
    """tiny, batch 2, 1 worker, 10 steps on the CPU: every figure measured, the ratio theirs."""
    out = tmp_path / "feed.json"
    env = dict(os.environ, OMP_NUM_THREADS="2", WANDB_MODE="offline")
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_feed.py"), "--size", "tiny", "--batch", "2"]
        + ["--workers", "1", "--steps", "10", "--warmup", "2", "--device", "cpu", "--clips", "3"]
        + ["--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["size"] == "tiny" and result["workers"] == 1 and result["batch"] == 2
    for part in ("loader", "real_shards", "synthetic_input"):
        assert result[part]["clips_per_s"] > 0, part
    assert result["real_shards"]["steps"] == 10
    ratio = result["real_shards"]["clips_per_s"] / result["synthetic_input"]["clips_per_s"]
    assert abs(result["real_over_synthetic"] - ratio) < 1e-3
    assert "shards / synthetic" in proc.stdout
