"""`init=<path>`: start a pretraining run from existing weights (weights only; the optimizer, the
schedule and the data position start fresh, unlike `resume=`).

Two sources:
- an emomae pretraining checkpoint (`.ckpt`, read with `weights_only=True`), e.g. stage 1 of a
  stage-2 (inject) run;
- a folder written by `emomae import-hicmae` from a HiCMAE pretraining checkpoint
  (`pretrain_model.safetensors` + `config.json`), to continue pretraining HiCMAE's weights.
Either way the stored ModelConfig must equal the run's, and the load is strict.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from pretrain.encoders import ModelConfig

IMPORTED_MODEL = (
    "pretrain_model.safetensors"  # what `emomae import-hicmae` writes for a pretraining checkpoint
)


def _read_ckpt(path: Path) -> tuple[dict, dict]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    meta = ckpt.get("emomae") if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict) or "model" not in meta or "state_dict" not in ckpt:
        raise ValueError(
            f"init: {path} is not an emomae pretraining checkpoint (no state_dict / emomae.model)"
        )
    state = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    return state, meta


def _read_import(path: Path) -> tuple[dict, dict]:
    weights, config = path / IMPORTED_MODEL, path / "config.json"
    if not (weights.is_file() and config.is_file()):
        raise ValueError(
            f"init: {path} is a folder without {IMPORTED_MODEL} + config.json; expected the output of "
            "`emomae import-hicmae` on a pretraining checkpoint (a fine-tuned one has no decoders)"
        )
    meta = json.loads(config.read_text())
    return load_file(str(weights)), {
        "model": meta["architecture"],
        "config": {},
        "source": meta.get("source"),
    }


def load_initial_weights(model: torch.nn.Module, model_cfg: ModelConfig, path: str | Path) -> dict:
    """Copy the weights at `path` (a `.ckpt` or an imported folder) into `model`, a
    MaskedAVAutoencoder; returns the source's emomae metadata ({"model": ModelConfig dict, ...})."""
    path = Path(path)
    if path.is_dir():
        state, meta = _read_import(path)
    elif path.is_file():
        state, meta = _read_ckpt(path)
    else:
        raise FileNotFoundError(
            f"init: {path} not found (expected a .ckpt written by `emomae pretrain` or a folder "
            "written by `emomae import-hicmae`)"
        )
    theirs, ours = dict(meta["model"]), model_cfg.to_dict()
    differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    if differ:
        pairs = ", ".join(f"{k}: checkpoint {theirs.get(k)!r} vs config {ours.get(k)!r}" for k in differ[:6])
        raise ValueError(
            f"init: the model config differs from the weights at {path} ({pairs}); "
            "use the model section they were trained with (e.g. the same size file)"
        )
    # strict: the model itself maps older layouts and a temperature that one objective learns and
    # another keeps fixed (MaskedAVAutoencoder._older_layouts)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"init: {path} does not fit the model: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    return meta
