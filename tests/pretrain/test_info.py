from __future__ import annotations

import json

import pytest

from emomae.cli import main as emomae
from emomae.config import ConfigError
from pretrain.info import gflops_per_clip, parameter_counts, resolve_model_config

# docs/model.md, measured on the reference code (millions)
BASE_PARTS = {
    "video encoder": 32.31,
    "audio encoder": 31.65,
    "fusion encoder": 16.82,
    "video decoder": 9.47,
    "audio decoder": 8.97,
    "encoder->decoder projections": 0.39,
}


def _close(value: int, millions: float, tolerance: float = 0.01) -> bool:
    return abs(value / 1e6 - millions) <= tolerance * millions


def test_base_parameter_counts_match_the_reference_within_one_percent():
    counts = parameter_counts(resolve_model_config("base"))
    assert _close(counts["pretraining total"], 99.61), counts
    assert _close(counts["encoder-only fine-tune total"], 80.79), counts
    for part, millions in BASE_PARTS.items():
        assert _close(counts[part], millions), (part, counts[part])


def test_tiny_and_small_match_the_reference_sizes():
    tiny = parameter_counts(resolve_model_config("tiny"))
    small = parameter_counts(resolve_model_config("small"))
    assert _close(tiny["encoder-only fine-tune total"], 20.47)
    assert _close(small["encoder-only fine-tune total"], 45.65)
    assert _close(small["pretraining total"], 50.59)


def test_base_fine_tune_flops_match_the_reference():
    flops = gflops_per_clip(resolve_model_config("base"))  # meta tensors: shapes only, no compute
    assert abs(flops["fine-tune forward (all tokens)"] - 92.2) <= 0.02 * 92.2
    # masking 90 % of video tokens makes a pretraining forward much cheaper than a fine-tuning one
    assert flops["pretraining forward (masked)"] < 0.5 * flops["fine-tune forward (all tokens)"]


def test_every_size_config_builds_and_unified_base_is_at_least_40_percent_smaller():
    totals = {}
    for size in ("micro", "tiny", "small", "base", "large", "unified-base"):
        totals[size] = parameter_counts(resolve_model_config(size))["encoder (AVEncoder)"]
    assert totals["micro"] < totals["tiny"] < totals["small"] < totals["base"] < totals["large"]
    assert totals["unified-base"] <= 0.6 * totals["base"]
    assert resolve_model_config("base", ["kind=unified"]).kind == "unified"


def test_info_command_prints_parts_totals_and_flops(capsys, tmp_path):
    assert emomae(["info", "micro", "width=64", "heads=1", "--json", str(tmp_path / "micro.json")]) == 0
    printed = capsys.readouterr().out
    for line in (
        "video encoder",
        "fusion encoder",
        "video decoder",
        "pretraining total",
        "encoder-only fine-tune total",
        "GFLOPs / clip",
    ):
        assert line in printed
    saved = json.loads((tmp_path / "micro.json").read_text())
    assert saved["model"]["width"] == 64
    assert saved["params"]["pretraining total"] == sum(
        v
        for k, v in saved["params"].items()
        if k
        in {
            "video encoder",
            "audio encoder",
            "fusion encoder",
            "video decoder",
            "audio decoder",
            "encoder->decoder projections",
        }
    )
    assert saved["gflops"]["fine-tune forward (all tokens)"] > 0


def test_unknown_size_or_key_is_reported_with_what_exists(capsys):
    with pytest.raises(ConfigError, match=r"unknown model size 'huge'.*'base'"):
        resolve_model_config("huge")
    with pytest.raises(SystemExit):
        emomae(["info", "base", "widht=3"])
    assert "widht" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        emomae(["info", "base", "img_size=150"])
    assert "img_size=150 must be a multiple of patch=16" in capsys.readouterr().err
