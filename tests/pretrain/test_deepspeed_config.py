"""DeepSpeed config generation (runs on CPU: only the strategy itself needs CUDA)."""

from __future__ import annotations

import pytest

from pretrain.deepspeed import (
    CONFIG_DIR,
    STRATEGY_FILES,
    DeepSpeedConfigError,
    build_deepspeed_config,
    deepspeed_strategy,
    load_zero_yaml,
)


@pytest.mark.parametrize("strategy, stage", [("deepspeed_stage_2", 2), ("deepspeed_stage_3", 3)])
def test_shipped_zero_yaml_builds_a_config_deepspeed_accepts(strategy, stage):
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = build_deepspeed_config(
        CONFIG_DIR / STRATEGY_FILES[strategy], micro_batch=40, accumulate=2, world_size=4, grad_clip=1.0
    )
    assert cfg["zero_optimization"]["stage"] == stage
    assert cfg["train_micro_batch_size_per_gpu"] == 40
    assert cfg["gradient_accumulation_steps"] == 2
    assert cfg["train_batch_size"] == 40 * 2 * 4
    assert cfg["gradient_clipping"] == 1.0
    assert cfg["bf16"] == {"enabled": True}
    zero = cfg["zero_optimization"]
    assert zero["overlap_comm"] is True and zero["contiguous_gradients"] is True
    assert zero["reduce_bucket_size"] == 500_000_000
    # DeepSpeed's own parser reads the same values back (single-rank view of the batch)
    parsed = DeepSpeedConfig(dict(cfg, train_batch_size=80))
    assert parsed.zero_optimization_stage == stage
    assert parsed.zero_config.overlap_comm is True
    assert parsed.bfloat16_config.enabled is True
    assert parsed.gradient_clipping == 1.0


def test_fp32_run_disables_bf16_and_no_clip_means_zero():
    cfg = build_deepspeed_config({"zero_optimization": {"stage": 2}}, micro_batch=2, precision="32-true")
    assert cfg["bf16"] == {"enabled": False}
    assert cfg["gradient_clipping"] == 0.0


def test_fp16_is_refused_with_the_key_named():
    with pytest.raises(DeepSpeedConfigError, match="trainer.precision"):
        build_deepspeed_config({"zero_optimization": {"stage": 2}}, micro_batch=2, precision="16-mixed")


def test_misspelled_zero_key_is_rejected_by_deepspeed_validation():
    with pytest.raises(DeepSpeedConfigError, match="overlap_com"):
        build_deepspeed_config({"zero_optimization": {"stage": 2, "overlap_com": True}}, micro_batch=2)


def test_missing_stage_is_an_error():
    with pytest.raises(DeepSpeedConfigError, match="zero_optimization.stage"):
        build_deepspeed_config({"zero_optimization": {}}, micro_batch=2)


def test_yaml_may_not_set_values_owned_by_the_run_config(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("zero_optimization: {stage: 2}\ntrain_micro_batch_size_per_gpu: 8\n")
    with pytest.raises(DeepSpeedConfigError, match="train_micro_batch_size_per_gpu"):
        load_zero_yaml(path)


def test_lightning_strategy_gets_the_config_without_accumulation():
    cfg = build_deepspeed_config(CONFIG_DIR / "zero2.yaml", micro_batch=4, accumulate=3)
    strategy = deepspeed_strategy(cfg)
    # Lightning fills gradient_accumulation_steps from the Trainer and refuses a duplicate
    assert "gradient_accumulation_steps" not in strategy.config
    assert strategy.config["zero_optimization"]["stage"] == 2
    assert strategy.config["train_micro_batch_size_per_gpu"] == 4
