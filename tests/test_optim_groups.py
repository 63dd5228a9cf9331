"""The optimizer groups and learning rates of pretraining, full fine-tuning and the probes, step by step,
against the record in optim_groups.json: which parameters (by name, in order) share a group, their
weight decay, layer-decay scale and the lr of every step of a short schedule.

The record was written by the code before the shared optimizer pieces moved to `emomae/optim.py`, so
this test is the proof that the move changed no group. A deliberate change of the grouping or the
schedule rewrites it: `python tests/test_optim_groups.py --write`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from emomae.optim import param_groups
from finetune.heads import AttentiveProbe, FeatureFusionHead
from finetune.optim import build_optimizer as finetune_optimizer
from finetune.optim import layer_decay_param_groups
from finetune.protocols import RecipeConfig
from pretrain.encoders import AVEncoder, ModelConfig
from pretrain.optim import OptimConfig
from pretrain.optim import build_optimizer as pretrain_optimizer

RECORD = Path(__file__).with_name("optim_groups.json")
SMALL = dict(
    num_frames=4,
    img_size=32,
    fbank_frames=32,
    mel_bins=32,
    width=64,
    heads=2,
    depth=3,
    fusion_depth=2,
    decoder_depth=2,
    skip_layers=[3],
)
RECIPE = RecipeConfig(
    epochs=4, warmup_epochs=1, freeze_epochs=1, layer_decay=0.75, weight_decay=0.05, min_lr=1e-5
)
STEPS_PER_EPOCH = 3


def describe(optimizer: torch.optim.Optimizer, scheduler, model: torch.nn.Module, steps: int) -> dict:
    """Each group's parameter names (in order), weight decay, layer-decay keys and lr at steps 0..steps."""
    names = {id(p): name for name, p in model.named_parameters()}
    groups = []
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        entry = {"names": [names[id(p)] for p in group["params"]], "weight_decay": group["weight_decay"]}
        entry |= {k: group[k] for k in ("lr_scale", "layer_id", "head") if k in group}
        entry["lr"] = [group["initial_lr"] * factor(step) for step in range(steps + 1)]
        groups.append(entry)
    return {"betas": list(optimizer.defaults["betas"]), "groups": groups}


def encoder(kind: str) -> AVEncoder:
    torch.manual_seed(0)
    return AVEncoder(ModelConfig(kind=kind, **SMALL))


def pretraining(kind: str) -> dict:
    model = encoder(kind)
    cfg = OptimConfig(weight_decay=0.05, warmup_steps=3, extra_no_weight_decay=["*_embed.proj.weight"])
    optimizer, scheduler = pretrain_optimizer(model, cfg, peak_lr=1e-3, final_lr=1e-5, max_steps=10)
    return describe(optimizer, scheduler, model, steps=12)


def full_finetuning(kind: str) -> dict:
    enc = encoder(kind)
    head = FeatureFusionHead(64, SMALL["depth"], SMALL["depth"], 6)
    groups = layer_decay_param_groups(
        enc,
        head,
        SMALL["depth"],
        SMALL["fusion_depth"],
        RECIPE.layer_decay,
        RECIPE.weight_decay,
        enc.no_weight_decay(),
    )
    optimizer, scheduler = finetune_optimizer(groups, RECIPE, peak_lr=1e-3, steps_per_epoch=STEPS_PER_EPOCH)
    named = torch.nn.ModuleDict({"encoder": enc, "head": head})
    described = describe(optimizer, scheduler, named, steps=RECIPE.epochs * STEPS_PER_EPOCH)
    for group in described["groups"]:  # the groups name head parameters `head.*`, encoder ones bare
        group["names"] = [n.removeprefix("encoder.") for n in group["names"]]
    return described


def probe(head: torch.nn.Module) -> dict:
    groups = param_groups(head, RECIPE.weight_decay)  # the probes' rule (finetune/probe.py)
    optimizer, scheduler = finetune_optimizer(groups, RECIPE, peak_lr=1e-3, steps_per_epoch=STEPS_PER_EPOCH)
    return describe(optimizer, scheduler, head, steps=RECIPE.epochs * STEPS_PER_EPOCH)


SETUPS = {
    "pretrain/separate": lambda: pretraining("separate"),
    "pretrain/unified": lambda: pretraining("unified"),
    "finetune/separate": lambda: full_finetuning("separate"),
    "finetune/unified": lambda: full_finetuning("unified"),
    "probe/linear": lambda: probe(FeatureFusionHead(64, SMALL["depth"], SMALL["depth"], 6)),
    "probe/attentive": lambda: probe(AttentiveProbe(64, 6)),
}


def current() -> dict:
    return {name: build() for name, build in SETUPS.items()}


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_optimizer_groups_and_lrs_match_the_record(setup):
    recorded, now = json.loads(RECORD.read_text())[setup], SETUPS[setup]()
    assert now["betas"] == recorded["betas"]
    assert [g["names"] for g in now["groups"]] == [g["names"] for g in recorded["groups"]]
    for got, want in zip(now["groups"], recorded["groups"]):
        # weight decay, lr_scale, layer_id, head: exact (JSON keeps a float's every bit)
        assert {k: v for k, v in got.items() if k != "lr"} == {k: v for k, v in want.items() if k != "lr"}
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-12, abs=1e-18), got["names"][0]


def test_the_record_covers_every_setup_and_sees_a_changed_group():
    recorded = json.loads(RECORD.read_text())
    assert set(recorded) == set(SETUPS)
    # the comparison must notice one parameter moved to another group
    moved = SETUPS["finetune/separate"]()
    moved["groups"][1]["names"].append(moved["groups"][0]["names"].pop())
    assert [g["names"] for g in moved["groups"]] != [
        g["names"] for g in recorded["finetune/separate"]["groups"]
    ]


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    RECORD.write_text(json.dumps(current(), indent=1) + "\n")
    print(f"wrote {RECORD}")
