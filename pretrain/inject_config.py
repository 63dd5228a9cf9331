"""`InjectConfig`: the `inject:` section of a stage-2 run config (docs/vaemo.md) and its checks.

Kept apart from the stage-2 module so the run config schema (`pretrain/train.py`) can name it
without importing the text encoder or Lightning code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pretrain.text import ALIGN_BRANCHES, DEFAULT_TEXT_ENCODER


@dataclass
class InjectConfig:
    """The `inject:` section of a stage-2 run config."""

    text_encoder: str = DEFAULT_TEXT_ENCODER  # sentence-transformers/HF name or local folder
    text_cache_dir: str | None = None  # on-disk caption embedding cache (default: <run_dir>/text_cache)
    # the AV features aligned with captions (old name: paths) and their weights (old: path_weights)
    branches: list[str] = field(default_factory=lambda: list(ALIGN_BRANCHES))
    branch_weights: dict[str, float] = field(
        default_factory=lambda: {"video": 1.0, "audio": 1.0, "fused": 1.0}
    )
    text_weight: float = 1.0  # weight of the summed text losses
    stage1_weight: float = 1.0  # weight of the stage-1 objectives (reconstruction + AV contrastive)
    caption_ratio: float = 0.5  # share of each training batch drawn from captioned samples; 0: no mixing
    caption_shards: str | None = None  # shards holding the captioned clips (default: data.shards)
    # "full": captioned clips are encoded again without masking, as zero-shot and probes see them;
    # "masked": reuse the visible tokens of the stage-1 pass (FLIP-style, no extra encoder pass)
    text_view: str = "full"
    temperature: float = 0.07
    learnable_temperature: bool = True
    gather_negatives: bool = True

    def check(self) -> None:
        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise ValueError(f"inject.{key}={getattr(self, key)!r}: expected {what}")

        need(
            bool(self.branches) and set(self.branches) <= set(ALIGN_BRANCHES),
            "branches",
            f"a non-empty subset of {ALIGN_BRANCHES}",
        )
        need(
            set(self.branch_weights) <= set(ALIGN_BRANCHES), "branch_weights", f"keys among {ALIGN_BRANCHES}"
        )
        need(0.0 <= self.caption_ratio <= 1.0, "caption_ratio", "a share in [0, 1]")
        need(self.text_view in ("full", "masked"), "text_view", "'full' or 'masked'")
        need(self.temperature > 0, "temperature", "> 0")
        need(self.text_weight >= 0 and self.stage1_weight >= 0, "text_weight", "non-negative loss weights")
