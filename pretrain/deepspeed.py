"""DeepSpeed ZeRO configs from YAML (configs/deepspeed/*.yaml) and the Lightning strategy built on them.

The YAML holds DeepSpeed's own keys (mostly `zero_optimization`); the run config fills in what must
agree with the Trainer: micro batch, accumulation, clipping and bf16/fp32. The result is validated by
DeepSpeed's own config class, so a typo in a bucket name fails before any GPU is touched.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from emomae.config import config_root

CONFIG_DIR = config_root() / "deepspeed"  # the checkout's configs/, or the installed emomae_configs package
# strategy name in the run config -> YAML file under configs/deepspeed
STRATEGY_FILES = {"deepspeed_stage_2": "zero2.yaml", "deepspeed_stage_3": "zero3.yaml"}
# keys the run config owns; a YAML that sets them would silently disagree with the Trainer
_OWNED_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "bf16",
    "fp16",
)


class DeepSpeedConfigError(ValueError):
    """A DeepSpeed YAML or run setting that DeepSpeed would reject."""


def load_zero_yaml(path: str | Path) -> dict[str, Any]:
    """Read a ZeRO YAML into plain dicts; refuses keys that the run config owns."""
    path = Path(path)
    if not path.is_file():
        raise DeepSpeedConfigError(f"DeepSpeed config not found: {path}")
    body = OmegaConf.to_container(OmegaConf.load(path), resolve=True) or {}
    if not isinstance(body, dict):
        raise DeepSpeedConfigError(f"{path}: expected a mapping of DeepSpeed keys, got {type(body).__name__}")
    owned = [k for k in _OWNED_KEYS if k in body]
    if owned:
        raise DeepSpeedConfigError(
            f"{path}: remove {owned}; batch size, accumulation, clipping and precision come from the run "
            "config (data.batch_size, trainer.accumulate_grad_batches, optim.grad_clip, trainer.precision)"
        )
    return body


def zero_stage(strategy: str, config_path: str | Path | None = None) -> int | None:
    """ZeRO stage a run will use: `zero_optimization.stage` of its YAML (`trainer.deepspeed_config`, else
    the strategy's default file), None for a strategy that is not DeepSpeed."""
    if strategy not in STRATEGY_FILES:
        return None
    body = load_zero_yaml(config_path or CONFIG_DIR / STRATEGY_FILES[strategy])
    stage = (body.get("zero_optimization") or {}).get("stage")
    return int(stage) if stage is not None else None


def build_deepspeed_config(
    zero: dict[str, Any] | str | Path,
    *,
    micro_batch: int,
    accumulate: int = 1,
    world_size: int = 1,
    grad_clip: float | None = None,
    precision: str = "bf16-mixed",
) -> dict[str, Any]:
    """Complete DeepSpeed config dict: the ZeRO section from `zero` (a dict or a YAML path) plus batch,
    accumulation, clipping and precision. Validated with `deepspeed.runtime.config.DeepSpeedConfig`."""
    body = copy.deepcopy(zero) if isinstance(zero, dict) else load_zero_yaml(zero)
    if "zero_optimization" not in body or "stage" not in body["zero_optimization"]:
        raise DeepSpeedConfigError("DeepSpeed config needs zero_optimization.stage (2 or 3)")
    if precision not in ("bf16-mixed", "bf16-true", "32", "32-true"):
        # fp16 needs loss scaling, which the bf16 default exists to avoid (docs/pretrain.md)
        raise DeepSpeedConfigError(
            f"trainer.precision {precision!r} is not supported with DeepSpeed; use bf16-mixed or 32"
        )
    config = {
        **body,
        "train_micro_batch_size_per_gpu": int(micro_batch),
        "gradient_accumulation_steps": int(accumulate),
        "train_batch_size": int(micro_batch) * int(accumulate) * int(world_size),
        "gradient_clipping": float(grad_clip or 0.0),
        "bf16": {"enabled": precision.startswith("bf16")},
    }
    validate(config, world_size)
    return config


def validate(config: dict[str, Any], world_size: int = 1) -> None:
    """Let DeepSpeed parse `config`; its pydantic models reject unknown keys and bad values."""
    from deepspeed.runtime.config import DeepSpeedConfig

    # DeepSpeed derives the world size from torch.distributed when it is up; otherwise it assumes 1,
    # so check the batch arithmetic ourselves and hand it a single-rank view.
    single = dict(
        config,
        train_batch_size=config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"],
    )
    try:
        DeepSpeedConfig(single)
    except Exception as err:  # pydantic ValidationError or DeepSpeed's own assertions
        raise DeepSpeedConfigError(f"DeepSpeed rejected the config: {err}") from err
    if config["train_batch_size"] != single["train_batch_size"] * world_size:
        raise DeepSpeedConfigError("train_batch_size must equal micro batch x accumulation x world size")


def deepspeed_strategy(config: dict[str, Any]):
    """Lightning's `DeepSpeedStrategy` for a config from `build_deepspeed_config`.

    Lightning sets `gradient_accumulation_steps` from the Trainer itself and refuses to see it twice,
    and derives the global batch; both are dropped here (they were only needed for validation).
    """
    from pytorch_lightning.strategies import DeepSpeedStrategy

    handed = {k: v for k, v in config.items() if k not in ("gradient_accumulation_steps", "train_batch_size")}
    return DeepSpeedStrategy(config=handed)
