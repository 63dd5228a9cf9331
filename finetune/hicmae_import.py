"""`emomae import-hicmae CHECKPOINT OUT_DIR [key=value ...]`: a checkpoint written by HiCMAE's own
code (github sunlicai/HiCMAE: the VoxCeleb2-pretrained model, or a fine-tuned CREMA-D / MAFW fold)
-> an emomae export that `load_encoder`, `emomae embed`, `emomae finetune` and `emomae pretrain
init=` read.

What is written into OUT_DIR:
- always: the encoder export (`encoder.safetensors` + `config.json` + `MODEL_CARD.md`, or the
  Hugging Face layout with `layout=hf`), its card saying where the weights came from;
- from a pretraining checkpoint: `pretrain_model.safetensors`, the whole masked autoencoder
  (decoders included), which `emomae pretrain <config> init=OUT_DIR` continues from;
- from a fine-tuned checkpoint: `head.safetensors` + `head.json`, its hierarchical-feature-fusion
  head, which `emomae finetune <protocol> encoder=OUT_DIR head=finetune eval_only=true` evaluates.

The file is read with `torch.load(weights_only=True)`, allowing only `argparse.Namespace` (HiCMAE
saves its `args` with the weights); nothing else in it is ever unpickled.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from finetune.export import FILE_MODE, ExportError, input_spec, save_export
from finetune.heads import FeatureFusionHead
from pretrain.encoders import AVEncoder, ModelConfig
from pretrain.hicmae import (
    HiCMAEKeyError,
    checkpoint_kind,
    convert_state,
    model_config_from_checkpoint,
)
from pretrain.mae import MaskedAVAutoencoder, ObjectiveConfig

PRETRAIN_FILE = "pretrain_model.safetensors"
HEAD_FILE = "head.safetensors"
HEAD_CONFIG = "head.json"
UPSTREAM = "https://github.com/sunlicai/HiCMAE"
# the head's input standardisation is emomae's (identity until a linear probe fits it); HiCMAE has none
HEAD_ONLY_EMOMAE = ("standardize.",)


def read_hicmae_checkpoint(
    path: str | Path, use_ema: bool = False
) -> tuple[dict[str, torch.Tensor], object | None]:
    """-> (the model's state dict, the saved `args` Namespace or None). Accepts HiCMAE's
    `{'model': ..., 'args': ...}`, a DeepSpeed-style `{'module': ...}` or a bare state dict;
    `use_ema` takes `model_ema` instead."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: checkpoint not found")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ExportError(
            f"{path}: cannot be read as a weights-only checkpoint: {_load_failure(err)}"
        ) from err
    if not isinstance(ckpt, dict):
        raise ExportError(
            f"{path}: expected a dict (a state dict or {{'model': state_dict}}), got {type(ckpt).__name__}"
        )
    args = ckpt.get("args") if isinstance(ckpt.get("args"), argparse.Namespace) else None
    wanted = ("model_ema",) if use_ema else ("model", "module")
    for key in wanted:
        if isinstance(ckpt.get(key), dict):
            return dict(ckpt[key]), args
    if use_ema:
        raise ExportError(
            f"{path}: ema=true, but the checkpoint has no 'model_ema' (keys: {sorted(ckpt)[:8]})"
        )
    if all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return dict(ckpt), None
    raise ExportError(f"{path}: no state dict under 'model' or 'module' (keys: {sorted(ckpt)[:8]})")


def _load_failure(err: Exception) -> str:
    """The useful part of torch.load's error: the object a weights-only load refused, else what broke.
    (torch's own text suggests weights_only=False, which would run whatever the file holds.)"""
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
    if refused:
        return (
            f"it holds a {refused.group(1)} object, and only tensors, plain types and argparse.Namespace "
            "are loaded (no code from a checkpoint ever runs)"
        )
    return f"not a torch.save file, or a damaged one ({type(err).__name__})"


def build_model_config(state: dict, args: object | None, overrides: dict, where: str) -> ModelConfig:
    fields = model_config_from_checkpoint(state, args) | overrides
    try:
        return ModelConfig.from_dict(fields)
    except (TypeError, ValueError) as err:
        raise ExportError(f"{where}: {err}") from err


def pretraining_model(
    state: dict, cfg: ModelConfig, where: str = "checkpoint", objective: ObjectiveConfig | None = None
) -> MaskedAVAutoencoder:
    """HiCMAE pretraining weights in emomae's `MaskedAVAutoencoder` (eval mode)."""
    model = MaskedAVAutoencoder(cfg, objective)
    model.load_state_dict(convert_state(state, model.state_dict(), where))
    return model.eval()


def finetuning_model(
    state: dict, cfg: ModelConfig, where: str = "checkpoint"
) -> tuple[AVEncoder, FeatureFusionHead]:
    """HiCMAE fine-tuned weights in emomae's `AVEncoder` + `FeatureFusionHead` (eval mode). The
    head's class count comes from the checkpoint's `head.weight`."""
    if "head.weight" not in state:
        raise HiCMAEKeyError(f"{where}: a fine-tuned HiCMAE checkpoint has 'head.weight'; this one does not")
    num_outputs = int(state["head.weight"].shape[0])
    encoder = AVEncoder(cfg)
    head = FeatureFusionHead(cfg.width, cfg.depth, cfg.depth, num_outputs)
    target = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    target |= {f"head.{k}": v for k, v in head.state_dict().items() if not k.startswith(HEAD_ONLY_EMOMAE)}
    converted = convert_state(state, target, where)
    encoder.load_state_dict(
        {k[len("encoder.") :]: v for k, v in converted.items() if k.startswith("encoder.")}
    )
    head_state = head.state_dict() | {
        k[len("head.") :]: v for k, v in converted.items() if k.startswith("head.")
    }
    head.load_state_dict(head_state)
    return encoder.eval(), head.eval()


def _card_note(path: Path, kind: str, use_ema: bool) -> str:
    what = "pretraining" if kind == "pretrain" else "fine-tuning"
    return (
        f"Weights imported from the HiCMAE {what} checkpoint `{path.name}`"
        f"{' (its EMA weights)' if use_ema else ''} by `emomae import-hicmae`. HiCMAE: Sun et al., "
        f"Information Fusion 2024 (arXiv 2401.05698), code and released checkpoints at {UPSTREAM} "
        "(MIT licence). emomae reproduces HiCMAE's outputs for the same weights and inputs "
        "(tests/pretrain/test_hicmae_parity.py); see docs/hicmae.md for what differs in the inputs."
    )


def _write(tensors: dict[str, torch.Tensor], path: Path, fmt: str) -> None:
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path), metadata={"format": fmt})
    os.chmod(path, FILE_MODE)


def import_hicmae(
    checkpoint: str | Path,
    out_dir: str | Path,
    overrides: dict | None = None,
    use_ema: bool = False,
    layout: str = "emomae",
) -> dict:
    """Convert one HiCMAE checkpoint into an emomae export folder; returns a summary dict."""
    checkpoint, out = Path(checkpoint), Path(out_dir)
    state, args = read_hicmae_checkpoint(checkpoint, use_ema)
    kind = checkpoint_kind(state, str(checkpoint))
    cfg = build_model_config(state, args, dict(overrides or {}), str(checkpoint))
    frame_stride = int(getattr(args, "sampling_rate", 4))  # HiCMAE's name for the frame stride
    spec = input_spec(None, cfg.to_dict()) | {"frame_stride": frame_stride}
    extra = {
        "imported_from": {"kind": kind, "checkpoint": checkpoint.name, "upstream": UPSTREAM, "ema": use_ema},
        "license": "MIT",
    }
    note = _card_note(checkpoint, kind, use_ema)
    if kind == "pretrain":
        model = pretraining_model(state, cfg, str(checkpoint))
        encoder = model.encoder
    else:
        encoder, head = finetuning_model(state, cfg, str(checkpoint))
    save_export(
        encoder, cfg.to_dict(), spec, out, source=checkpoint.name, extra=extra, layout=layout, card_note=note
    )
    if kind == "pretrain":
        _write(model.state_dict(), out / PRETRAIN_FILE, "emomae-pretrain-model")
        written = {"pretrain_model": PRETRAIN_FILE}
    else:
        _write(head.state_dict(), out / HEAD_FILE, "emomae-head")
        head_config = {
            "kind": "feature_fusion",
            "num_outputs": head.fc.out_features,
            "width": cfg.width,
            "num_video_layers": cfg.depth,
            "num_audio_layers": cfg.depth,
            "source": checkpoint.name,
        }
        (out / HEAD_CONFIG).write_text(json.dumps(head_config, indent=2) + "\n")
        os.chmod(out / HEAD_CONFIG, FILE_MODE)
        written = {"head": HEAD_FILE, "num_outputs": head.fc.out_features}
    return {"kind": kind, "out_dir": str(out), "architecture": cfg.to_dict(), **written}


def load_head(export_dir: str | Path) -> FeatureFusionHead:
    """The fine-tuned head that `import_hicmae` wrote beside an encoder export (eval mode)."""
    from safetensors.torch import load_file

    export_dir = Path(export_dir)
    config_path, weights = export_dir / HEAD_CONFIG, export_dir / HEAD_FILE
    if not (config_path.is_file() and weights.is_file()):
        raise ExportError(
            f"{export_dir}: no fine-tuned head ({HEAD_CONFIG} + {HEAD_FILE}); it is written by "
            "`emomae import-hicmae` from a fine-tuned HiCMAE checkpoint"
        )
    c = json.loads(config_path.read_text())
    if c.get("kind") != "feature_fusion":
        raise ExportError(f"{config_path}: head kind {c.get('kind')!r} is not 'feature_fusion'")
    head = FeatureFusionHead(
        int(c["width"]), int(c["num_video_layers"]), int(c["num_audio_layers"]), int(c["num_outputs"])
    )
    head.load_state_dict(load_file(str(weights)))
    return head.eval()


def parse_overrides(items: list[str]) -> dict:
    """`heads=2 decoder_heads=2 img_size=96` -> ModelConfig fields (values parsed as JSON, else strings)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ExportError(f"override {item!r} is not key=value (a ModelConfig field, e.g. heads=8)")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="emomae import-hicmae", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="HiCMAE .pth checkpoint (pretraining or fine-tuned)")
    parser.add_argument("out_dir", help="folder for the emomae export")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="ModelConfig fields a state dict cannot tell, e.g. heads=8 decoder_heads=6 (64-wide "
        "heads are assumed, as in every released HiCMAE size)",
    )
    parser.add_argument("--ema", action="store_true", help="import the checkpoint's model_ema weights")
    parser.add_argument(
        "--layout",
        choices=("emomae", "hf"),
        default="emomae",
        help="emomae: encoder.safetensors + MODEL_CARD.md; hf: model.safetensors + README.md",
    )
    args = parser.parse_intermixed_args(argv)  # options may follow the key=value overrides
    try:
        summary = import_hicmae(
            args.checkpoint, args.out_dir, parse_overrides(args.overrides), args.ema, args.layout
        )
    except (ExportError, HiCMAEKeyError) as err:
        print(f"emomae import-hicmae: {err}", file=sys.stderr)
        return 1
    arch = summary["architecture"]
    print(
        f"imported a HiCMAE {summary['kind']} checkpoint (width {arch['width']}, depth {arch['depth']}, "
        f"{arch['img_size']} px, {arch['num_frames']} frames) into {summary['out_dir']}"
    )
    return 0
