"""Dimensional regression end to end: a manifest with valence/arousal floats -> shards -> `emomae
finetune protocol.task=regression` with the linear probe (CCC loss) and with full fine-tuning.

The targets are the circumplex position of each clip's class scaled by the intensity the generator
actually used (params.jsonl). Arousal is what the synthetic voice carries (loud and high vs quiet and
low), so even a randomly initialised encoder's audio features predict it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from synth_finetune import synth_finetune

from emomae.cli import main as emomae
from finetune.export import input_spec, save_export
from pretrain.encoders import AVEncoder, ModelConfig

REPO = Path(__file__).resolve().parents[2]
# (valence, arousal) of each class at full intensity; neutral sits at the origin
CIRCUMPLEX = {
    "ANG": (-0.6, 0.8),
    "DIS": (-0.6, -0.3),
    "FEA": (-0.5, 0.6),
    "HAP": (0.8, 0.7),
    "NEU": (0.0, 0.0),
    "SAD": (-0.7, -0.6),
}


@pytest.fixture(scope="module")
def regression_data(synth_manifest, write_test_shards, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(manifest with float labels, its shards, a random micro-encoder export)."""
    out = tmp_path_factory.mktemp("regression")
    intensity = {}
    for line in (synth_manifest.parent / "params.jsonl").read_text().splitlines():
        record = json.loads(line)
        intensity[record["key"]] = record["intensity"]
    with synth_manifest.open() as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        valence, arousal = CIRCUMPLEX[row["label_name"]]
        scale = intensity[row["key"]]
        row["label"] = f"{valence * scale:.4f} {arousal * scale:.4f}"
        row["video"] = str((synth_manifest.parent / row["video"]).resolve())
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    shards = write_test_shards(manifest, out / "shards")
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict(
        OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / "micro.yaml"))
    )
    export = save_export(AVEncoder(cfg), cfg.to_dict(), input_spec({}, cfg.to_dict()), out / "export", "test")
    return manifest, shards, export


def _run(tmp_path: Path, data: tuple[Path, Path, Path], name: str, *extra: str) -> dict:
    manifest, shards, export = data
    regression = ("protocol.task=regression", "protocol.targets=[valence,arousal]", f"run_name={name}")
    args = ["finetune", *synth_finetune(export, manifest, shards, tmp_path, *regression, *extra)]
    assert emomae(args) == 0
    return json.loads((tmp_path / name / "results.json").read_text())


@pytest.mark.slow
def test_linear_probe_with_ccc_loss_predicts_arousal_from_the_voice(regression_data, tmp_path):
    results = _run(tmp_path, regression_data, "linear", "head=linear", "fold=all", "modalities=[av,audio]")
    ccc = [f["test"]["audio"]["ccc_arousal"] for f in results["folds"]]
    pcc = [f["test"]["audio"]["pcc_arousal"] for f in results["folds"]]
    print("arousal per fold (audio only): CCC", [round(c, 3) for c in ccc], "PCC", [round(c, 3) for c in pcc])
    # measured: PCC 0.35-0.88 (mean 0.65); CCC lower (mean 0.19), the price of unseen speakers' offsets
    assert sum(pcc) / len(pcc) > 0.4 and sum(ccc) / len(ccc) > 0.1
    assert set(results["summary"]["av"]) == {"ccc", "pcc"}
    table = (tmp_path / "linear" / "results.md").read_text()
    assert "CCC" in table and "UAR" not in table


@pytest.mark.slow
def test_full_finetuning_trains_on_ccc_and_reports_both_dimensions(regression_data, tmp_path):
    results = _run(
        tmp_path,
        regression_data,
        "finetune",
        "head=finetune",
        "fold=0",
        "recipes.finetune.epochs=4",
        "modalities=[av]",
    )
    fold = results["folds"][0]
    av = fold["test"]["av"]
    for key in ("ccc", "pcc", "ccc_valence", "ccc_arousal", "pcc_valence", "pcc_arousal"):
        assert -1.0 <= av[key] <= 1.0, key
    # the fine-tuned model's arousal tracks the test speakers' targets. Measured over seeds 0-5 (each
    # its own fold 0 of 24 test clips): PCC 0.28-0.55, CCC 0.18-0.43. A CCC loss of the wrong sign
    # drives them below zero.
    assert av["pcc_arousal"] > 0.2 and av["ccc_arousal"] > 0.1, av
    with (tmp_path / "finetune" / "fold0" / "metrics.csv").open() as f:
        losses = [float(r["train/epoch_loss"]) for r in csv.DictReader(f) if r.get("train/epoch_loss")]
    # each epoch's mean over its steps: one step's loss swings with its batch (it rose from epoch 1 to 2
    # under seed 1). Measured, seeds 0-5, first -> last of 4 epochs: falls by 0.085-0.31.
    assert len(losses) == 4 and all(0.0 <= loss <= 2.0 for loss in losses), (
        f"the CCC loss (1 - CCC) lies in [0, 2]: {losses}"
    )
    assert losses[-1] < losses[0] - 0.05, f"the CCC loss must fall while training: {losses}"
