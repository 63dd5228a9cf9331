"""`emomae export <ckpt> <out_dir>`: encoder weights of a pretraining checkpoint -> a self-contained
export (`encoder.safetensors` + `config.json` + `MODEL_CARD.md`), and `load_encoder` to rebuild the
`AVEncoder` from it with plain torch (no Lightning, no pickle).

Sources: a Lightning `.ckpt` file (read with `weights_only=True`; encoder weights are the
`state_dict` entries under `model.encoder.`) or a DeepSpeed checkpoint directory (ZeRO shards are
consolidated to fp32 by DeepSpeed's own `get_fp32_state_dict_from_zero_checkpoint`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pretrain.encoders import IMAGENET_MEAN, IMAGENET_STD

ENCODER_PREFIX = "model.encoder."
# prefixes a DeepSpeed engine / Lightning wrapper puts in front of the LightningModule's names
WRAPPER_PREFIXES = ("_forward_module.", "module.")
FORMAT_VERSION = 1


class ExportError(ValueError):
    """A checkpoint or export that cannot be used; the message names the file and what is wrong."""


# --- reading checkpoints -----------------------------------------------------------------------


def _strip_wrappers(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


def encoder_state(state_dict: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """The `model.encoder.*` entries of a LightningModule state dict, prefix removed, fp32."""
    out = {}
    for name, tensor in state_dict.items():
        name = _strip_wrappers(name)
        if name.startswith(ENCODER_PREFIX):
            t = tensor.detach()
            out[name[len(ENCODER_PREFIX) :]] = t.float() if t.is_floating_point() else t
    if not out:
        sample = sorted(state_dict)[:5]
        raise ExportError(f"{where}: no weights under {ENCODER_PREFIX!r} (found e.g. {sample}); is this an emomae pretraining checkpoint?")
    return out


def _read_lightning(path: Path) -> tuple[dict, dict]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ExportError(f"{path}: cannot be read as a weights-only torch checkpoint: {err}") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ExportError(f"{path}: not a Lightning checkpoint (no 'state_dict' key)")
    meta = ckpt.get("emomae")
    if not isinstance(meta, dict) or "model" not in meta:
        raise ExportError(f"{path}: no checkpoint['emomae']['model'] (the ModelConfig); was it written by `emomae pretrain`?")
    return encoder_state(ckpt["state_dict"], str(path)), meta


def _read_deepspeed(path: Path) -> tuple[dict, dict]:
    """A DeepSpeed checkpoint directory (holding `latest` and the tag folder with `*_model_states.pt`
    and `*_optim_states.pt`). The ZeRO partitions are stitched by DeepSpeed's own converter; the
    emomae metadata comes from `emomae.json` beside it or the client state of `mp_rank_00_model_states.pt`."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_file = path / "latest"
    if not tag_file.is_file():
        raise ExportError(f"{path}: a DeepSpeed checkpoint directory needs a 'latest' file naming its tag folder")
    tag = tag_file.read_text().strip()
    try:
        # DeepSpeed's converter unpickles its own shard files: only export checkpoints you trained
        state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag)
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise ExportError(f"{path}: DeepSpeed could not consolidate the ZeRO checkpoint {tag!r}: {err}") from err
    return encoder_state(state, str(path)), _deepspeed_meta(path, tag)


def _deepspeed_meta(path: Path, tag: str) -> dict:
    sidecar = path / "emomae.json"
    if sidecar.is_file():
        return json.loads(sidecar.read_text())
    states = sorted((path / tag).glob("*mp_rank_00_model_states.pt"))
    for file in states:
        try:
            client = torch.load(file, map_location="cpu", weights_only=True)
        except Exception:  # DeepSpeed stores objects a weights-only load refuses; try the sidecar route
            continue
        if isinstance(client, dict) and isinstance(client.get("emomae"), dict):
            return client["emomae"]
    raise ExportError(
        f"{path}: no emomae metadata (ModelConfig) found: expected {sidecar.name} beside 'latest' or "
        f"checkpoint['emomae'] in {tag}/mp_rank_00_model_states.pt"
    )


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """-> (encoder state dict, `checkpoint['emomae']` = {"model": ModelConfig dict, "config": run config})."""
    path = Path(path)
    if path.is_dir():
        return _read_deepspeed(path)
    if path.is_file():
        return _read_lightning(path)
    raise ExportError(f"checkpoint not found: {path}")


# --- the export format ---------------------------------------------------------------------------


def build_encoder(model_cfg: dict, where: str = "config"):
    """AVEncoder from a ModelConfig dict; an unknown or mistyped field is an ExportError naming it."""
    from pretrain.encoders import AVEncoder, ModelConfig

    if not isinstance(model_cfg, dict):
        raise ExportError(f"{where}: 'architecture' must be a mapping of ModelConfig fields, got {type(model_cfg).__name__}")
    try:
        cfg = ModelConfig.from_dict(model_cfg)
        return AVEncoder(cfg), cfg
    except (TypeError, ValueError) as err:
        raise ExportError(f"{where}: invalid architecture: {err}") from err


def load_weights(encoder: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Strict load that reports missing, unexpected and mis-shaped tensors by name."""
    own = encoder.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es), e.g. {shapes[:3]}")
        if missing:
            parts.append(f"{len(missing)} missing tensor(s), e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[:3]}")
        raise ExportError(f"{where}: weights do not fit the architecture in its config: " + "; ".join(parts))
    encoder.load_state_dict(state, strict=True)


def input_spec(run_config: dict | None, model_cfg: dict) -> dict:
    """What a clip must look like before it enters the encoder: geometry from the architecture,
    fbank settings and normalisation from the pretraining run's `data` section (DataConfig), the
    frame stride from the index.json of the shards it was trained on (default 4, the reference)."""
    from data_pipelines.features import KALDI_FBANK_ARGS, FbankConfig

    data = dict((run_config or {}).get("data") or {})
    defaults = FbankConfig()
    frame_stride = 4
    shards = Path(str(data.get("shards") or ""))
    if shards.name and (shards / "index.json").is_file():
        frame_stride = int(json.loads((shards / "index.json").read_text()).get("config", {}).get("frame_stride", 4))
    return {
        "num_frames": int(model_cfg.get("num_frames", 16)),
        "frame_stride": frame_stride,
        "img_size": int(model_cfg.get("img_size", 160)),
        "sample_rate": int(data.get("sample_rate", defaults.sample_rate)),
        "fbank": {
            "fbank_frames": int(model_cfg.get("fbank_frames", defaults.fbank_frames)),
            "mel_bins": int(model_cfg.get("mel_bins", defaults.mel_bins)),
            "mean": float(data.get("fbank_mean", defaults.mean)),
            "std": float(data.get("fbank_std", defaults.std)),
            **{k: v for k, v in KALDI_FBANK_ARGS.items()},
        },
        "video_mean": list(IMAGENET_MEAN),
        "video_std": list(IMAGENET_STD),
    }


def save_export(encoder: torch.nn.Module, model_cfg: dict, spec: dict, out_dir: str | Path, source: str,
                extra: dict | None = None) -> Path:
    """Write `encoder.safetensors`, `config.json` and `MODEL_CARD.md` into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
    save_file(state, str(out / "encoder.safetensors"), metadata={"format": "emomae-encoder", "version": str(FORMAT_VERSION)})
    n_params = sum(v.numel() for v in state.values())
    config = {
        "format": "emomae-encoder",
        "version": FORMAT_VERSION,
        "architecture": model_cfg,
        "input": spec,
        "source": source,
        "num_parameters": n_params,
        **(extra or {}),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "MODEL_CARD.md").write_text(model_card(config))
    return out


def model_card(config: dict) -> str:
    arch, spec = config["architecture"], config["input"]
    fb = spec["fbank"]
    arch_rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in arch.items())
    return f"""# emomae audio-visual emotion encoder

Self-supervised audio-visual encoder (masked AV autoencoder with hierarchical contrastive losses, HiCMAE
family), exported from `{config['source']}`; {config['num_parameters'] / 1e6:.2f} M parameters.
Only the encoders are kept (video ViT, audio ViT, fusion encoder); decoders are dropped.

## Use

```python
from finetune import load_encoder
encoder = load_encoder("path/to/this/folder")      # plain torch, weights from safetensors
out = encoder.forward_features(video, fbank)      # video (B, T, 3, H, W) normalised, fbank (B, F, M)
```

`emomae embed clip.mp4 --encoder path/to/this/folder` prints a clip embedding;
`emomae finetune configs/finetune/<dataset>.yaml encoder=path/to/this/folder` probes or fine-tunes it.

## Input

- video: {spec['num_frames']} frames, {spec['frame_stride']} steps apart on a 25 fps grid, {spec['img_size']} x {spec['img_size']} RGB face crops,
  uint8 -> [0, 1] -> `(x - mean) / std` with mean {spec['video_mean']}, std {spec['video_std']}.
- audio: {spec['sample_rate']} Hz mono over the same span, Kaldi fbank ({fb.get('mel_bins')} mel bins, {fb.get('frame_length')} ms window,
  {fb.get('frame_shift')} ms shift), padded/cut to {fb.get('fbank_frames')} frames, normalised `(x - {fb.get('mean')}) / (2 * {fb.get('std')})`.

## Architecture (`config.json` -> `architecture`)

| field | value |
|---|---|
{arch_rows}

## Limitations

Pretrained without labels; emotion is read out by a probe or fine-tuning. Faces and voices in the
pretraining data carry their demographic skew; evaluate per group before deployment.
"""


def read_export_config(export_dir: str | Path) -> dict:
    """config.json of an export, checked; errors name the file and the key."""
    path = Path(export_dir) / "config.json"
    if not path.is_file():
        raise ExportError(f"{export_dir}: no config.json; is this a folder written by `emomae export`?")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ExportError(f"{path}: malformed JSON: {err}") from err
    if not isinstance(config, dict):
        raise ExportError(f"{path}: expected a JSON object at the top level")
    for key in ("architecture", "input"):
        if not isinstance(config.get(key), dict):
            raise ExportError(f"{path}: key {key!r} is missing or not a mapping")
    return config


def load_encoder(export_dir: str | Path, device: str | torch.device = "cpu"):
    """Rebuild the exported `AVEncoder` (eval mode) from `encoder.safetensors` + `config.json`."""
    export_dir = Path(export_dir)
    config = read_export_config(export_dir)
    encoder, _ = build_encoder(config["architecture"], where=str(export_dir / "config.json"))
    weights = export_dir / "encoder.safetensors"
    if not weights.is_file():
        raise ExportError(f"{export_dir}: encoder.safetensors is missing")
    load_weights(encoder, load_file(str(weights)), where=str(weights))
    return encoder.to(device).eval()


def export(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Checkpoint (Lightning file or DeepSpeed dir) -> export folder; checks the weights fit."""
    state, meta = read_checkpoint(checkpoint)
    model_cfg = meta["model"]
    encoder, _ = build_encoder(model_cfg, where=f"{checkpoint} (checkpoint['emomae']['model'])")
    load_weights(encoder, state, where=str(checkpoint))
    spec = input_spec(meta.get("config"), model_cfg)
    out = save_export(encoder, model_cfg, spec, out_dir, source=Path(checkpoint).name)
    from finetune.zeroshot import export_text_heads

    export_text_heads(checkpoint, out)  # stage-2 (inject) runs: the projection heads zero-shot needs
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="emomae export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="Lightning .ckpt file or DeepSpeed checkpoint directory")
    parser.add_argument("out_dir", help="folder to write encoder.safetensors, config.json, MODEL_CARD.md into")
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out_dir)
    except ExportError as err:
        print(f"emomae export: {err}", file=sys.stderr)
        return 1
    print(f"exported encoder to {out}")
    return 0
