"""`emomae finetune` on two real processes (torchrun on 127.0.0.1, gloo, CPU) against one process.

- Training: the two ranks' batches j of full fine-tuning are together the global batch j of a
  1-process run, and the probes' ranks split each global batch of window indices the same way; no
  window goes to both ranks, and the probe's averaged gradients end at the 1-process weights.
- Evaluation: each validation / test window is scored by exactly one rank x loader worker, and a
  2-process run reports the 1-process figures: `eval_only` on the same weights, and a linear probe
  (whose cache is built half by each rank and gathered).

This file is also the worker script torchrun starts (`python test_finetune_distributed.py split|run ...`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import launch
import numpy as np
import pytest
import torch
from tiny_model import SHARD_TINY
from torch import nn

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "finetune" / "synth.yaml"
# probe split check: 50 training windows in global batches of 15 -> 3 steps, shares of 8 and 7 windows
PROBE_TRAIN, PROBE_BATCH, PROBE_EPOCHS = 50, 15, 3


def run_overrides(export: Path, manifest: Path, shards: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"encoder={export}",
        f"protocol.manifest={manifest}",
        f"protocol.shards={shards}",
        f"out_dir={out}",
        "accelerator=cpu",
        "speed_batches=1",
        *extra,
    ]


def load_run(overrides: list[str], run_dir: Path):
    """A `Run` of the synth protocol (its rank and world size come from the live process group, if any)."""
    from omegaconf import OmegaConf

    from emomae.config import load_config
    from finetune.protocols import FinetuneConfig
    from finetune.train import Run

    cfg = OmegaConf.to_object(load_config(FinetuneConfig, str(CONFIG), overrides))
    return Run(cfg, None, run_dir)


def fold0_streams(run) -> dict:
    """Keys of 2 epochs of fold 0's training stream (per batch) and of its val / test evaluation."""
    from finetune.streams import loader, scan_windows

    windows = scan_windows(run.urls)
    split = run.splits[0]
    stream, batch, steps = run.train_stream(split, windows)
    epochs = []
    for epoch in range(2):
        stream.epoch = epoch
        epochs.append([list(b["key"]) for b in loader(stream, run.cfg.num_workers)])
    evals = {
        part: [k for b in run.part_stream(8, split, part, windows) for k in b["key"]]
        for part in ("val", "test")
    }
    return {
        "batch": batch,
        "steps": steps,
        "rank_batch": stream.cfg.batch_size,
        "train": epochs,
        "eval": evals,
    }


class RecordingHead(nn.Module):
    """A linear head on feature `x` that records which rows (feature `row`) each training step saw."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)
        self.steps: list[list[int]] = []

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.training:
            self.steps.append(feats["row"][:, 0].long().tolist())
        return self.fc(feats["x"])


def probe_rows() -> dict:
    """`train_probe` on a fixed in-memory cache: rows of every training step, final weights, test figures."""
    from finetune.cache import FeatureCache
    from finetune.probe import train_probe
    from finetune.protocols import RecipeConfig

    n = PROBE_TRAIN + 20
    gen = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 3, (n,), generator=gen)
    x = torch.randn(n, 8, generator=gen) + torch.nn.functional.one_hot(targets, 8).float()
    cache = FeatureCache(
        [f"w{i}" for i in range(n)],
        [f"c{i}" for i in range(n)],
        targets.numpy(),
        {"av": {"x": x, "row": torch.arange(n, dtype=torch.float32)[:, None]}},
    )
    index = {
        "train": np.arange(PROBE_TRAIN),
        "val": np.arange(PROBE_TRAIN, PROBE_TRAIN + 10),
        "test": np.arange(PROBE_TRAIN + 10, n),
    }
    recipe = RecipeConfig(
        epochs=PROBE_EPOCHS,
        batch_size=PROBE_BATCH,
        blr=2.0,
        warmup_epochs=1,
        weight_decay=0.0,
        label_smoothing=0.0,
        mixup=0.0,
        cutmix=0.0,
    )
    torch.manual_seed(0)
    head = RecordingHead()
    result = train_probe(head, cache, index, recipe, "classification", ["a", "b", "c"], [], ["av"], seed=0)
    return {"steps": head.steps, "weights": head.fc.weight.detach().tolist(), "test": result["test"]["av"]}


# ---------------------------------------------------------------- the workers (run under torchrun)


def worker_args(argv: list[str]) -> argparse.Namespace:
    """The files a worker is given (--export, --manifest, --shards, --out); one thread per rank."""
    p = argparse.ArgumentParser()
    for name in ("--export", "--manifest", "--shards", "--out"):
        p.add_argument(name, type=Path, required=True)
    torch.set_num_threads(1)
    return p.parse_args(argv)


def split_worker(argv: list[str]) -> None:
    from finetune.distributed import all_ranks

    args = worker_args(argv)
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    run = load_run(
        run_overrides(
            args.export, args.manifest, args.shards, args.out, "head=finetune", "num_workers=2", "devices=2"
        ),
        args.out / "run",
    )
    report = {
        "rank": run.rank,
        "world_size": run.world_size,
        "stream": fold0_streams(run),
        "probe": probe_rows(),
    }
    reports = all_ranks([report])
    if rank == 0:
        (args.out / "ranks.json").write_text(json.dumps(reports))
    torch.distributed.destroy_process_group()


def run_worker(argv: list[str]) -> None:
    """`emomae finetune` as a user would start it under torchrun, three times in the same processes."""
    from finetune.train import main

    args = worker_args(argv)
    common = run_overrides(args.export, args.manifest, args.shards, args.out, "devices=2", "num_workers=1")
    for extra in (
        ["out_dir=" + str(args.out / "eval_only"), "head=finetune", "eval_only=true", "fold=0"],
        ["run_name=linear", "head=linear", "recipes.linear.epochs=5"],
        ["run_name=finetune", "head=finetune", "fold=0", "recipes.finetune.epochs=1"],
    ):
        assert main([str(CONFIG), *common, *extra]) == 0


# ---------------------------------------------------------------- the tests


def torchrun(mode: str, *args: str | Path, timeout: int = 300) -> str:
    """This file as 2 ranks' worker in `mode`; returns their stdout."""
    cmd = launch.torchrun(Path(__file__).resolve(), mode, *args)
    return launch.run_ok(cmd, launch.child_env(WANDB_MODE="disabled"), timeout)


@pytest.fixture(scope="module")
def export(synth_shards, tmp_path_factory) -> Path:
    """A tiny random encoder at the test shards' size, with a fine-tuned-head file beside it whose
    predictions vary (inputs standardised on the encoder's features, unit-scale weights), so that
    equal figures are not the artefact of a model that predicts one class."""
    from safetensors.torch import save_file

    from data_pipelines.shards import shard_urls
    from data_pipelines.stream import eval_pipeline
    from finetune.cache import build_cache
    from finetune.export import input_spec, load_encoder, read_export_config, save_export
    from finetune.heads import FeatureFusionHead
    from finetune.hicmae_import import HEAD_CONFIG, HEAD_FILE
    from finetune.streams import loader, stream_config
    from pretrain.encoders import AVEncoder, ModelConfig

    cfg = ModelConfig(**SHARD_TINY)
    torch.manual_seed(0)
    out = save_export(
        AVEncoder(cfg),
        cfg.to_dict(),
        input_spec({}, cfg.to_dict()),
        tmp_path_factory.mktemp("dist") / "export",
        "test",
    )
    spec = read_export_config(out)["input"]
    stream = eval_pipeline(
        shard_urls(synth_shards), stream_config(spec, cfg.to_dict(), 48, 0), rank=0, world_size=1
    )
    cache = build_cache(load_encoder(out), loader(stream, 0), ["av"], "pooled", "classification")
    head = FeatureFusionHead(64, 2, 2, 6)
    head.fit_standardizer(cache.features["av"])
    nn.init.normal_(head.fc.weight)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(out / HEAD_FILE))
    (out / HEAD_CONFIG).write_text(
        json.dumps(
            {
                "kind": "feature_fusion",
                "num_outputs": 6,
                "width": 64,
                "num_video_layers": 2,
                "num_audio_layers": 2,
            }
        )
    )
    return out


@pytest.mark.slow
def test_two_ranks_share_each_global_batch_and_each_evaluation_window_without_overlap(
    export, synth_manifest, synth_shards, tmp_path
):
    torchrun(
        "split", "--export", export, "--manifest", synth_manifest, "--shards", synth_shards, "--out", tmp_path
    )
    ranks = json.loads((tmp_path / "ranks.json").read_text())
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]
    # the 1-process reference: the same code in this (not distributed) process
    one = load_run(
        run_overrides(export, synth_manifest, synth_shards, tmp_path, "head=finetune", "num_workers=2"),
        tmp_path / "one",
    )
    assert one.world_size == 1
    ref = fold0_streams(one)

    # full fine-tuning: equal step counts; per step the ranks' halves are the 1-process global batch,
    # window for window (a resampled stream may repeat a window within an epoch, as one process does)
    streams = [r["stream"] for r in ranks]
    assert ref["batch"] == 16 and ref["steps"] == 4  # 72 training windows of fold 0
    for s in streams:
        assert (s["batch"], s["steps"], s["rank_batch"]) == (16, 4, 8)
    for epoch in range(2):
        mine = [s["train"][epoch] for s in streams]
        assert len(mine[0]) == len(mine[1]) == len(ref["train"][epoch]) == 4
        for step, whole in enumerate(ref["train"][epoch]):
            assert sorted(mine[0][step] + mine[1][step]) == sorted(whole), (epoch, step)
            assert len(mine[0][step]) == len(mine[1][step]) == 8
    assert ref["train"][0] != ref["train"][1], "each epoch draws new batches"

    # evaluation: every val / test window once over 2 ranks x 2 workers, each rank its half
    for part in ("val", "test"):
        halves = [s["eval"][part] for s in streams]
        assert sorted(halves[0] + halves[1]) == sorted(ref["eval"][part]), part
        assert len(set(ref["eval"][part])) == len(ref["eval"][part]) > 0
        assert abs(len(halves[0]) - len(halves[1])) <= 2, (part, len(halves[0]), len(halves[1]))

    # probes: per step the ranks' rows are the 1-process batch's, no row twice; each epoch trains on
    # all training rows but the N mod batch = 5 its permutation leaves last (as one process does)
    probe = probe_rows()
    steps = PROBE_TRAIN // PROBE_BATCH
    assert len(probe["steps"]) == PROBE_EPOCHS * steps
    for step, whole in enumerate(probe["steps"]):
        split = [r["probe"]["steps"][step] for r in ranks]
        assert sorted(split[0] + split[1]) == sorted(whole) and not set(split[0]) & set(split[1]), step
        assert sorted(map(len, split)) == [7, 8]
    for epoch in range(PROBE_EPOCHS):
        seen = [row for s in probe["steps"][epoch * steps : (epoch + 1) * steps] for row in s]
        assert len(seen) == len(set(seen)) == PROBE_TRAIN - PROBE_TRAIN % PROBE_BATCH
        assert set(seen) <= set(range(PROBE_TRAIN))
    # the averaged gradients of the (8, 7) shares are the global batch's: same weights on both ranks,
    # and those of the 1-process run up to float summation order
    assert ranks[0]["probe"]["weights"] == ranks[1]["probe"]["weights"]
    np.testing.assert_allclose(ranks[0]["probe"]["weights"], probe["weights"], rtol=1e-4, atol=1e-6)
    assert ranks[0]["probe"]["test"] == probe["test"]


@pytest.mark.slow
def test_a_two_process_run_reports_the_one_process_figures(export, synth_manifest, synth_shards, tmp_path):
    from finetune.train import main

    stdout = torchrun(
        "run",
        "--export",
        export,
        "--manifest",
        synth_manifest,
        "--shards",
        synth_shards,
        "--out",
        tmp_path / "two",
    )
    common = run_overrides(export, synth_manifest, synth_shards, tmp_path / "one", "num_workers=1")
    assert (
        main([str(CONFIG), *common, "run_name=eval_only", "head=finetune", "eval_only=true", "fold=0"]) == 0
    )
    assert main([str(CONFIG), *common, "run_name=linear", "head=linear", "recipes.linear.epochs=5"]) == 0

    def results(path: Path) -> dict:
        return json.loads((path / "results.json").read_text())

    # one run directory, named by rank 0, though each rank formed a name from its own clock
    (eval_dir,) = (tmp_path / "two" / "eval_only").iterdir()
    two, one = results(eval_dir), results(tmp_path / "one" / "eval_only")
    assert two["folds"][0]["test"] == one["folds"][0]["test"]
    av = two["folds"][0]["test"]["av"]
    assert av["num_samples"] == 24, "each of fold 0's 24 test clips is scored once"  # not 0, 12 or 48
    predicted = np.asarray(av["confusion"]).sum(axis=0)  # columns: the predicted classes
    assert (predicted > 0).sum() >= 3, av["confusion"]

    # linear probe: the cache is encoded half per rank and gathered in shard order, the training split
    two, one = results(tmp_path / "two" / "linear"), results(tmp_path / "one" / "linear")
    assert two["cache"]["samples"] == one["cache"]["samples"] == 144
    for f2, f1 in zip(two["folds"], one["folds"], strict=True):
        assert f2["test"] == f1["test"], f2["fold"]
        assert f2["selected_epoch"] == f1["selected_epoch"]
        for p2, p1 in zip(f2["curve"], f1["curve"], strict=True):
            assert p2 == pytest.approx(p1, abs=1e-9)

    # full fine-tuning on 2 ranks: one epoch of the 1-process step count, every test clip scored once
    ft = results(tmp_path / "two" / "finetune")
    fold = ft["folds"][0]
    assert fold["windows"] == {"train": 72, "val": 24, "test": 48}
    assert [p["epoch"] for p in fold["curve"]] == [0]
    assert all(fold["test"][m]["num_samples"] == 24 for m in ("av", "audio", "video"))
    metrics = (tmp_path / "two" / "finetune" / "fold0" / "metrics.csv").read_text().splitlines()
    assert metrics[0].startswith("epoch,step") and metrics[-1].split(",")[1] == "3"  # 4 steps: 72 // 16
    # only rank 0 reports
    assert stdout.count("fold 0 (1/1) fine-tuning: epoch 1/1") == 1
    assert stdout.count("# synth - linear") == 1


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    if sys.argv[1:2] == ["split"]:
        split_worker(sys.argv[2:])
    elif sys.argv[1:2] == ["run"]:
        run_worker(sys.argv[2:])
    else:
        sys.exit(
            "usage: test_finetune_distributed.py split|run --export DIR --manifest CSV --shards DIR --out DIR"
        )
