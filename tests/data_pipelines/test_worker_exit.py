"""A script that dies of an uncaught exception while a loader iterator is alive exits: its workers
ignore SIGTERM (stream.ignore_stop_signals, for SLURM), so multiprocessing's exit handler alone would
wait for them forever; stream.kill_loader_workers_at_exit stops them first."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
from torch.utils.data import DataLoader
from data_pipelines.features import FbankConfig
from data_pipelines.shards import shard_urls
from data_pipelines.stream import StreamConfig, eval_pipeline

cfg = StreamConfig(batch_size=2, num_frames=8, img_size=48, fbank=FbankConfig(fbank_frames=64))
stream = eval_pipeline(shard_urls(sys.argv[1]) * 50, cfg, rank=0, world_size=1)
batches = iter(DataLoader(stream, batch_size=None, num_workers=2))
batch = next(batches)
raise RuntimeError("the training step failed")
"""


def test_an_uncaught_exception_with_live_loader_workers_ends_the_process(synth_shards, tmp_path):
    script = tmp_path / "crash.py"
    script.write_text(SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(synth_shards)],
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,  # without the exit handler it never ends
    )
    assert done.returncode == 1 and "RuntimeError: the training step failed" in done.stderr, done.stderr
