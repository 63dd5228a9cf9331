"""What `emomae finetune` reports while it works: every fold's epochs go to W&B as they finish (an
offline run, read back from its own run file), the figures and the results table at the end, and
progress as plain lines when stdout is not a terminal (a SLURM log; pytest's capture is not a TTY)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from synth_finetune import synth_finetune
from tiny_model import SHARD_TINY

from finetune.train import main

REPO = Path(__file__).resolve().parents[2]
EPOCHS = 3


def _reader():
    """`wandb_records` of tests/pretrain/test_tracking.py (the tests are not a package)."""
    spec = importlib.util.spec_from_file_location(
        "pretrain_tracking", REPO / "tests" / "pretrain" / "test_tracking.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.wandb_records


wandb_records = _reader()


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    from finetune.export import input_spec, save_export
    from pretrain.encoders import AVEncoder, ModelConfig

    cfg = ModelConfig(**SHARD_TINY)
    torch.manual_seed(0)
    return save_export(
        AVEncoder(cfg),
        cfg.to_dict(),
        input_spec({}, cfg.to_dict()),
        tmp_path_factory.mktemp("tracking") / "export",
        "test",
    )


def finetune(export: Path, manifest: Path, shards: Path, out: Path, *extra: str) -> int:
    return main(synth_finetune(export, manifest, shards, out, "accelerator=cpu", *extra))


def run_file(run_dir: Path) -> Path:
    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    return path


def history(path: Path) -> list[dict]:
    """Each history record of a run file as {key: value}."""
    rows = []
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return rows


def epochs_of(rows: list[dict], k: int) -> list[dict]:
    """Fold k's per-epoch records (W&B also stamps `fold<k>/epoch` on the fold's end-of-run images)."""
    return [r for r in rows if f"fold{k}/train_loss" in r or f"fold{k}/refit_train_loss" in r]


@pytest.fixture(scope="module")
def wandb_run(export, synth_manifest, synth_shards, tmp_path_factory) -> Path:
    """Linear probe, 5 folds, W&B offline."""
    out = tmp_path_factory.mktemp("wandb_runs")
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_SILENT", "true")
    try:
        assert (
            finetune(
                export,
                synth_manifest,
                synth_shards,
                out,
                "head=linear",
                "run_name=probe",
                f"recipes.linear.epochs={EPOCHS}",
                "wandb.enabled=true",
                "wandb.mode=offline",
            )
            == 0
        )
    finally:
        mp.undo()
    return out / "probe"


def test_wandb_gets_every_fold_s_epochs_on_its_own_axis_and_the_run_s_group(wandb_run):
    results = json.loads((wandb_run / "results.json").read_text())
    path = run_file(wandb_run)
    run = next(r.run for r in wandb_records(path) if r.WhichOneof("record_type") == "run")
    assert run.display_name == "probe" and run.run_group == "synth-linear" and run.job_type == "finetune"
    step_metrics = {}
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "metric" and record.metric.step_metric:
            step_metrics[record.metric.glob_name or record.metric.name] = record.metric.step_metric
    rows = history(path)
    for fold in results["folds"]:
        k = fold["fold"]
        assert step_metrics.get(f"fold{k}/*") == f"fold{k}/epoch"
        mine = epochs_of(rows, k)
        # the selection run's epochs, then the refit run's (the linear recipe refits on train + val)
        assert [r[f"fold{k}/epoch"] for r in mine] == [*range(EPOCHS), *range(EPOCHS)]
        selection, refit = mine[:EPOCHS], mine[EPOCHS:]
        assert all(np.isfinite(r[f"fold{k}/train_loss"]) for r in selection)
        assert [r[f"fold{k}/val_uar"] for r in selection] == [p["val_uar"] for p in fold["curve"]]
        assert [r[f"fold{k}/refit_test_uar"] for r in refit] == [p["test_uar"] for p in fold["curve"]]


def test_wandb_gets_the_figures_the_results_table_and_the_summary_at_the_end(wandb_run):
    results = json.loads((wandb_run / "results.json").read_text())
    files = next((wandb_run / "wandb").glob("offline-run-*/files"))
    images = {
        p.relative_to(files / "media" / "images").as_posix().rsplit("_", 2)[0]
        for p in (files / "media" / "images").rglob("*.png")
    }
    assert {"confusion_av", "recall_av", "fold0/confusion_av", "fold4/confusion_video"} <= images
    (table_file,) = (files / "media" / "table").glob("results_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["fold", "epoch", "evaluation", "uar", "war", "macro_f1"]
    rows = {(r[0], r[2]): r for r in table["data"]}
    assert len(table["data"]) == 5 * 3 + 2 * 3  # folds x evaluations, then mean and std per evaluation
    for fold in results["folds"]:
        for modality, metrics in fold["test"].items():
            assert rows[(str(fold["fold"]), modality)][3:] == [
                metrics["uar"],
                metrics["war"],
                metrics["macro_f1"],
            ]
    assert rows[("mean", "av")][3] == pytest.approx(results["summary"]["av"]["uar"][0])
    summary = {}
    for record in wandb_records(run_file(wandb_run)):
        if record.WhichOneof("record_type") == "summary":
            summary |= {
                item.key or "/".join(item.nested_key): item.value_json for item in record.summary.update
            }
    assert json.loads(summary["av/uar_mean"]) == pytest.approx(results["summary"]["av"]["uar"][0])
    assert json.loads(summary["av_pooled/uar"]) == pytest.approx(results["summary"]["av_pooled"]["uar"])


def test_a_run_that_fails_in_a_later_fold_has_the_earlier_folds_curves_in_wandb(
    export, synth_manifest, synth_shards, tmp_path
):
    # the shards without fold 3's clips: fold 3 has no test windows, so the run stops there
    index = json.loads((synth_shards / "index.json").read_text())
    shards = tmp_path / "shards"
    shards.mkdir()
    index["shards"] = [s for s in index["shards"] if not s["name"].startswith("fold3-")]
    for s in index["shards"]:
        shutil.copy(synth_shards / s["name"], shards / s["name"])
    (shards / "index.json").write_text(json.dumps(index))
    with pytest.raises(RuntimeError, match="fold 3: the test part is empty"):
        finetune(
            export,
            synth_manifest,
            shards,
            tmp_path / "runs",
            "head=linear",
            "run_name=broken",
            f"recipes.linear.epochs={EPOCHS}",
            "wandb.enabled=true",
            "wandb.mode=offline",
        )
    path = run_file(tmp_path / "runs" / "broken")
    rows = history(path)
    for k in range(3):
        assert [r[f"fold{k}/epoch"] for r in epochs_of(rows, k)] == [*range(EPOCHS), *range(EPOCHS)]
    assert not any(key.startswith("fold3/") for r in rows for key in r)
    (exit_record,) = [r.exit for r in wandb_records(path) if r.WhichOneof("record_type") == "exit"]
    assert exit_record.exit_code == 1


def test_progress_is_plain_lines_per_fold_epoch_and_cached_window_when_stdout_is_not_a_terminal(
    export, synth_manifest, synth_shards, tmp_path, capsys
):
    files = (export, synth_manifest, synth_shards, tmp_path)
    assert finetune(*files, "head=finetune", "fold=0", "recipes.finetune.epochs=2") == 0
    assert finetune(*files, "head=linear", "fold=1", f"recipes.linear.epochs={EPOCHS}") == 0
    out = capsys.readouterr().out
    assert "\r" not in out and "\x1b" not in out, "no bar redraws in a log file"
    lines = out.splitlines()

    def count(line: str) -> str:  # "<what>: <unit> <done>/<total> <figures> [<seconds> s]"
        return line.split(": ", 1)[1].split()[1]

    finetuned = [line for line in lines if line.startswith("fold 0 (1/1) fine-tuning: epoch ")]
    assert [count(line) for line in finetuned] == ["1/2", "2/2"]
    for line in finetuned:
        assert (
            " train_loss " in line and " val_uar " in line and " test_uar " in line and line.endswith(" s]")
        )
    caching = [line for line in lines if line.startswith("caching pooled features: windows ")]
    assert caching and count(caching[-1]) == "144/144"
    probe = [line for line in lines if line.startswith("fold 1 (1/1) linear probe: epoch ")]
    assert probe and count(probe[-1]) == f"{2 * EPOCHS}/{2 * EPOCHS}"  # selection run, then the refit run
