"""Which parts of emomae may import which: each module is imported in a fresh interpreter and the
modules it pulled in are checked against the rules (docs/architecture.md, "Import rules")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIGHTNING = ("pytorch_lightning", "lightning_fabric", "lightning")
TRAINING = (
    "pretrain.module",
    "pretrain.train",
    "pretrain.callbacks",
    "pretrain.inject",
    "pretrain.deepspeed",
)

RULES = {
    # the exported model: torch, timm, einops only; no Lightning, no data code, no training code
    "pretrain.encoders": (*LIGHTNING, "deepspeed", "data_pipelines", "finetune", "emomae", *TRAINING),
    # stage 2's config schema and caption loss: plain dataclasses and torch, no Lightning or data code
    "pretrain.inject_config": (*LIGHTNING, "data_pipelines", "finetune", *TRAINING),
    "pretrain.caption_loss": (*LIGHTNING, "data_pipelines", "finetune", *TRAINING),
    # the data side stands alone: it never imports the model or the tasks
    "data_pipelines.shards": ("pretrain", "finetune", *LIGHTNING),
    "data_pipelines.stream": ("pretrain", "finetune", *LIGHTNING),
    "data_pipelines.datamodule": ("pretrain", "finetune"),
    "data_pipelines.caption_mix": ("pretrain", "finetune"),
    "data_pipelines.synthetic": ("pretrain", "finetune", *LIGHTNING),
    # load_encoder, embed and zero-shot run without Lightning and only use the model side of pretrain
    "finetune.export": (*LIGHTNING, *TRAINING),
    "finetune.embed": (*LIGHTNING, *TRAINING),
    "finetune.zeroshot": (*LIGHTNING, *TRAINING),
    "finetune.heads": (*LIGHTNING, *TRAINING, "data_pipelines"),
    # fine-tuning uses Lightning, but not pretraining's training code
    "finetune.train": TRAINING,
}


def imported_by(module: str) -> set[str]:
    code = f"import importlib, json, sys; importlib.import_module({module!r}); print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    ).stdout
    return set(json.loads(out.splitlines()[-1]))


def forbidden_in(modules: set[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules for f in forbidden if m == f or m.startswith(f + "."))


@pytest.mark.parametrize("module", sorted(RULES))
def test_each_module_imports_only_what_its_layer_may(module):
    bad = forbidden_in(imported_by(module), RULES[module])
    assert not bad, f"{module} imports {bad[:5]}"


def test_the_check_sees_a_forbidden_import():
    # the training module does import Lightning and the data side: the same check must name them
    assert forbidden_in(imported_by("pretrain.module"), LIGHTNING)
    assert forbidden_in(imported_by("pretrain.train"), ("data_pipelines",))
