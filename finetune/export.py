"""`emomae export <ckpt> <out_dir>`: encoder weights of a pretraining checkpoint -> a self-contained
export (`encoder.safetensors` + `config.json` + `MODEL_CARD.md`), and `load_encoder` to rebuild the
`AVEncoder` from it with plain torch (no Lightning, no pickle).

`--layout hf` writes the Hugging Face hub layout instead (`model.safetensors` + `config.json` +
`README.md` with the card's YAML front matter); `load_encoder` reads either layout, or a hub id
(`user/emomae-base`, downloaded with huggingface_hub, the optional `hub` extra).

Sources: a Lightning `.ckpt` file (read with `weights_only=True`; encoder weights are the
`state_dict` entries under `model.encoder.`) or a DeepSpeed checkpoint directory (ZeRO shards are
consolidated to fp32 by DeepSpeed's own `get_fp32_state_dict_from_zero_checkpoint`).

`--ema` exports the exponential moving average of the weights instead (`optim.ema=true` runs):
`checkpoint["ema_state_dict"]`, which pretrain.callbacks.EMA writes beside `state_dict` in a Lightning
file and Lightning's DeepSpeed strategy passes on as client state (`<tag>/mp_rank_00_model_states.pt`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from data_pipelines.atomic import atomic_write
from pretrain.encoders import IMAGENET_MEAN, IMAGENET_STD

ENCODER_PREFIX = "model.encoder."
# prefixes a DeepSpeed engine / Lightning wrapper puts in front of the LightningModule's names
WRAPPER_PREFIXES = ("_forward_module.", "module.")
FORMAT_VERSION = 1
LAYOUTS = ("emomae", "hf")
# weights file of each layout; config.json is the same in both
WEIGHTS_FILES = {"emomae": "encoder.safetensors", "hf": "model.safetensors"}
CARD_FILES = {"emomae": "MODEL_CARD.md", "hf": "README.md"}
HUB_FILES = ["config.json", "model.safetensors", "README.md"]
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
HF_TAGS = ("audio-visual", "emotion-recognition", "masked-autoencoder")
FILE_MODE = 0o644  # safetensors writes 0600; exports are meant to be shared and uploaded
EMA_KEY = "ema_state_dict"  # pretrain.callbacks.EMA: the averaged weights, same names as state_dict


class ExportError(ValueError):
    """A checkpoint or export that cannot be used; the message names the file and what is wrong."""


class FrameStrideUnknown(ExportError):
    """Nothing says how far apart the training clips' frames were: the user must (--frame-stride)."""


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
        raise ExportError(
            f"{where}: no weights under {ENCODER_PREFIX!r} (found e.g. {sample}); is this an emomae pretraining checkpoint?"
        )
    return out


def _no_ema(where: Path) -> ExportError:
    return ExportError(
        f"{where}: --ema asks for the EMA weights, but there is no checkpoint[{EMA_KEY!r}] "
        "(the run had optim.ema=false); export without --ema to take the trained weights"
    )


def _read_lightning(path: Path, ema: bool) -> tuple[dict, dict, bool]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ExportError(f"{path}: cannot be read as a weights-only torch checkpoint: {err}") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ExportError(f"{path}: not a Lightning checkpoint (no 'state_dict' key)")
    meta = ckpt.get("emomae")
    if not isinstance(meta, dict) or "model" not in meta:
        raise ExportError(
            f"{path}: no checkpoint['emomae']['model'] (the ModelConfig); was it written by `emomae pretrain`?"
        )
    averaged = ckpt.get(EMA_KEY)
    if not ema:
        return encoder_state(ckpt["state_dict"], str(path)), meta, isinstance(averaged, dict)
    if not isinstance(averaged, dict):
        raise _no_ema(path)
    return encoder_state(averaged, f"{path} ({EMA_KEY})"), meta, True


def _read_deepspeed(path: Path, ema: bool) -> tuple[dict, dict, bool]:
    """A DeepSpeed checkpoint directory (holding `latest` and the tag folder with `*_model_states.pt`
    and `*_optim_states.pt`). The ZeRO partitions are stitched by DeepSpeed's own converter; the
    emomae metadata comes from `emomae.json` beside it or the client state of `mp_rank_00_model_states.pt`,
    where the EMA weights are too (whole tensors: EMA runs under ZeRO-2 only, pretrain/train.py: check)."""
    tag_file = path / "latest"
    if not tag_file.is_file():
        raise ExportError(
            f"{path}: a DeepSpeed checkpoint directory needs a 'latest' file naming its tag folder"
        )
    tag = tag_file.read_text().strip()
    client, client_file = _client_state(path, tag)
    averaged = client.get(EMA_KEY)
    if ema:
        if not isinstance(averaged, dict):
            raise _no_ema(client_file)
        return encoder_state(averaged, f"{client_file} ({EMA_KEY})"), _deepspeed_meta(path, tag, client), True
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        # DeepSpeed's converter unpickles its own shard files: only export checkpoints you trained
        state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag)
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise ExportError(
            f"{path}: DeepSpeed could not consolidate the ZeRO checkpoint {tag!r}: {err}"
        ) from err
    return encoder_state(state, str(path)), _deepspeed_meta(path, tag, client), isinstance(averaged, dict)


def _client_state(path: Path, tag: str) -> tuple[dict, Path]:
    """(client state saved with the model states, that file): what Lightning put beside the weights
    (`emomae`, `ema_state_dict`, loops, ...); ({}, expected file) when no file reads weights-only."""
    states = sorted((path / tag).glob("*mp_rank_00_model_states.pt"))
    for file in states:
        try:
            client = torch.load(file, map_location="cpu", weights_only=True)
        except Exception:  # DeepSpeed stores objects a weights-only load refuses; try the sidecar route
            continue
        if isinstance(client, dict):
            return client, file
    return {}, states[0] if states else path / tag / "mp_rank_00_model_states.pt"


def _deepspeed_meta(path: Path, tag: str, client: dict) -> dict:
    sidecar = path / "emomae.json"
    if sidecar.is_file():
        return json.loads(sidecar.read_text())
    if isinstance(client.get("emomae"), dict):
        return client["emomae"]
    raise ExportError(
        f"{path}: no emomae metadata (ModelConfig) found: expected {sidecar.name} beside 'latest' or "
        f"checkpoint['emomae'] in {tag}/mp_rank_00_model_states.pt"
    )


def read_checkpoint(path: str | Path, ema: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """-> (encoder state dict, `checkpoint['emomae']` = {"model": ModelConfig dict, "config": run config});
    `ema`: the encoder of `checkpoint['ema_state_dict']` (an ExportError naming the file when absent)."""
    state, meta, _ = _read_checkpoint(Path(path), ema)
    return state, meta


def _read_checkpoint(path: Path, ema: bool) -> tuple[dict[str, torch.Tensor], dict, bool]:
    """read_checkpoint, and whether the checkpoint holds EMA weights."""
    if path.is_dir():
        return _read_deepspeed(path, ema)
    if path.is_file():
        return _read_lightning(path, ema)
    raise ExportError(f"checkpoint not found: {path}")


# --- the export format ---------------------------------------------------------------------------


def build_encoder(model_cfg: dict, where: str = "config"):
    """AVEncoder from a ModelConfig dict; an unknown or mistyped field is an ExportError naming it."""
    from pretrain.encoders import AVEncoder, ModelConfig

    if not isinstance(model_cfg, dict):
        raise ExportError(
            f"{where}: 'architecture' must be a mapping of ModelConfig fields, got {type(model_cfg).__name__}"
        )
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
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if own[k].shape != state[k].shape
    ]
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


def input_spec(run_config: dict | None, model_cfg: dict, frame_stride: int = 4) -> dict:
    """What a clip must look like before it enters the encoder: geometry from the architecture,
    fbank settings and normalisation from the pretraining run's `data` section (DataConfig), the audio
    rate the shards were cut at when the run recorded it (`shard_sampling`), `frame_stride` (steps
    of the 25 fps grid between frames; `export` finds the run's, see `run_frame_stride`) and the face
    step (`face`) from the index.json of the shard folder it was trained on (none when unreadable)."""
    from data_pipelines.face_track import face_spec
    from data_pipelines.features import KALDI_FBANK_ARGS, FbankConfig

    data = dict((run_config or {}).get("data") or {})
    sampling = dict((run_config or {}).get("shard_sampling") or {})
    defaults = FbankConfig()
    return {
        "num_frames": int(model_cfg.get("num_frames", 16)),
        "frame_stride": int(frame_stride),
        "img_size": int(model_cfg.get("img_size", 160)),
        "sample_rate": int(sampling.get("sample_rate") or data.get("sample_rate", defaults.sample_rate)),
        "fbank": {
            "fbank_frames": int(model_cfg.get("fbank_frames", defaults.fbank_frames)),
            "mel_bins": int(model_cfg.get("mel_bins", defaults.mel_bins)),
            "mean": float(data.get("fbank_mean", defaults.mean)),
            "std": float(data.get("fbank_std", defaults.std)),
            **{k: v for k, v in KALDI_FBANK_ARGS.items()},
        },
        "video_mean": list(IMAGENET_MEAN),
        "video_std": list(IMAGENET_STD),
        "face": face_spec(
            Path(str(data.get("shards") or ""))
        ),  # the shards' face step (face=auto), which `emomae embed` repeats
    }


def shard_files_of(spec: str) -> list[str]:
    """The local shard files (or the folder) a run's `data.shards` names, where this machine can see them."""
    import glob

    import webdataset as wds

    if not spec:
        return []
    if Path(spec).is_dir():
        return [str(Path(spec) / "index.json")]  # any name inside the folder: its files are what is read
    return [f for pattern in wds.shardlists.expand_urls(spec) for f in sorted(glob.glob(pattern))]


def run_frame_stride(run_config: dict | None) -> tuple[int, str] | None:
    """(frame stride, where it was found) of a pretraining run: its recorded `shard_sampling` (runs
    since it was recorded), else the index.json / provenance.json beside its `data.shards` when this
    machine can read them; None when neither says."""
    from data_pipelines.shard_index import shard_sampling

    run_config = run_config or {}
    recorded = (run_config.get("shard_sampling") or {}).get("frame_stride")
    if recorded is not None:
        return int(recorded), "the run's shard_sampling"
    spec = str((run_config.get("data") or {}).get("shards") or "")
    try:
        sampling = shard_sampling(shard_files_of(spec))
    except (OSError, ValueError) as err:
        raise ExportError(f"data.shards={spec!r} of the run: {err}") from err
    if sampling is None or sampling.get("frame_stride") is None:
        return None
    return int(sampling["frame_stride"]), sampling["source"]


def choose_frame_stride(run_config: dict | None, given: int | None, checkpoint: str | Path) -> int:
    """The frame stride to export: the run's own, checked against `--frame-stride` when both exist."""
    found = run_frame_stride(run_config)
    if found is None:
        if given is None:
            raise FrameStrideUnknown(
                f"{checkpoint}: the frame stride of the shards this run trained on is not recorded in the checkpoint "
                "and their index.json / provenance.json cannot be read from here; pass --frame-stride N (the "
                "`frame_stride` of `emomae shards`, 4 by default: frames 4 steps apart on the 25 fps grid)"
            )
        return given
    stride, where = found
    if given is not None and given != stride:
        raise ExportError(
            f"{checkpoint}: --frame-stride {given} disagrees with frame_stride={stride} of the "
            f"shards the run trained on ({where}); leave --frame-stride out"
        )
    return stride


def save_export(
    encoder: torch.nn.Module,
    model_cfg: dict,
    spec: dict,
    out_dir: str | Path,
    source: str,
    extra: dict | None = None,
    layout: str = "emomae",
    card_note: str | None = None,
) -> Path:
    """Write `encoder.safetensors`, `config.json` and `MODEL_CARD.md` into `out_dir` (`layout="emomae"`),
    or the Hugging Face layout `model.safetensors`, `config.json` and `README.md` (the same card under
    a YAML front matter block; `extra["license"]` becomes its `license:`) with `layout="hf"`.
    `card_note`: a markdown paragraph for the card's `## Source` section (where the weights came from).
    Every file is written with mode 0644."""
    if layout not in LAYOUTS:
        raise ExportError(f"unknown export layout {layout!r}; expected one of {list(LAYOUTS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
    weights = out / WEIGHTS_FILES[layout]
    write_shared(
        weights,
        lambda tmp: save_file(
            state, str(tmp), metadata={"format": "emomae-encoder", "version": str(FORMAT_VERSION)}
        ),
    )
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
    config_text = json.dumps(config, indent=2) + "\n"
    write_shared(out / "config.json", lambda tmp: tmp.write_text(config_text))
    card = model_card(config, card_note=card_note, layout=layout)
    if layout == "hf":
        card = hf_front_matter(config) + card
    write_shared(out / CARD_FILES[layout], lambda tmp: tmp.write_text(card))
    return out


def write_shared(path: Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` a temporary file beside `path`, make it FILE_MODE, then rename it into place: an
    export folder never holds a half-written file, nor one only its owner can read (safetensors
    creates its files 0600), even when a later file of the export fails."""

    def write_readable(tmp: Path) -> None:
        write(tmp)
        os.chmod(tmp, FILE_MODE)

    return atomic_write(path, write_readable)


def hf_front_matter(config: dict) -> str:
    """The YAML block the hub reads from a README.md (model card metadata)."""
    lines = ["---", "library_name: emomae"]
    if config.get("license"):
        lines.append(f"license: {json.dumps(str(config['license']))}")  # a JSON string is a YAML scalar
    lines += ["tags:", *(f"- {tag}" for tag in HF_TAGS), "pipeline_tag: feature-extraction", "---", ""]
    return "\n".join(lines) + "\n"


def model_card(config: dict, card_note: str | None = None, layout: str = "emomae") -> str:
    arch, spec = config["architecture"], config["input"]
    fb = spec["fbank"]
    arch_rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in arch.items())
    load_line = (
        'encoder = load_encoder("user/repo-id")      # a hub id (needs huggingface_hub) or a local folder'
        if layout == "hf"
        else 'encoder = load_encoder("path/to/this/folder")      # plain torch, weights from safetensors'
    )
    source = f"## Source\n\n{card_note.strip()}\n\n" if card_note and card_note.strip() else ""
    return f"""# emomae audio-visual emotion encoder

Self-supervised audio-visual encoder (masked AV autoencoder with hierarchical contrastive losses, HiCMAE
family), exported from `{config["source"]}`; {config["num_parameters"] / 1e6:.2f} M parameters.
Only the encoders are kept (video ViT, audio ViT, fusion encoder); decoders are dropped.

## Use

```python
from finetune import load_encoder
{load_line}
out = encoder.forward_features(video, fbank)      # video (B, T, 3, H, W) normalised, fbank (B, F, M)
```

`emomae embed clip.mp4 --encoder path/to/this/folder` prints a clip embedding;
`emomae finetune configs/finetune/<dataset>.yaml encoder=path/to/this/folder` probes or fine-tunes it.

## Input

- video: {spec["num_frames"]} frames, {spec["frame_stride"]} steps apart on a 25 fps grid, {spec["img_size"]} x {spec["img_size"]} RGB face crops,
  uint8 -> [0, 1] -> `(x - mean) / std` with mean {spec["video_mean"]}, std {spec["video_std"]}.
- audio: {spec["sample_rate"]} Hz mono over the same span, Kaldi fbank ({fb.get("mel_bins")} mel bins, {fb.get("frame_length")} ms window,
  {fb.get("frame_shift")} ms shift), padded/cut to {fb.get("fbank_frames")} frames, normalised `(x - {fb.get("mean")}) / (2 * {fb.get("std")})`.

## Architecture (`config.json` -> `architecture`)

| field | value |
|---|---|
{arch_rows}

{source}## Limitations

Pretrained without labels; emotion is read out by a probe or fine-tuning. Faces and voices in the
pretraining data carry their demographic skew; evaluate per group before deployment.
"""


def is_hub_id(source: str | Path) -> bool:
    """A string (not a Path) naming no existing file or folder, shaped like `user/repo`."""
    return (
        isinstance(source, str)
        and HUB_ID.fullmatch(source) is not None
        and not Path(source).exists()
        and not any(part in (".", "..") for part in source.split("/"))
    )


def resolve_export_dir(source: str | Path) -> Path:
    """Export folder of `source`: a local folder (either layout) as it is, or a Hugging Face hub id
    (`user/emomae-base`) downloaded (config.json, model.safetensors, README.md) into the HF cache.
    Resolve once and pass the folder on to `read_export_config` / `load_encoder`."""
    if not is_hub_id(source):
        return Path(source)
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:
        raise ExportError(
            f"{source!r} is not a local folder and looks like a Hugging Face hub id, but huggingface_hub is not "
            "installed (pip install 'emomae[hub]'); a hub id needs huggingface_hub and network access, "
            "otherwise pass a local export folder"
        ) from err
    try:
        return Path(snapshot_download(source, allow_patterns=HUB_FILES))
    except Exception as err:  # offline (HF_HUB_OFFLINE=1), no network, unknown or private repo, ...
        reason = (str(err).strip().splitlines() or [""])[0]
        raise ExportError(
            f"{source!r} is not a local folder, and downloading it as a Hugging Face hub id failed "
            f"({type(err).__name__}: {reason}); a hub id needs network access (or a copy in the local "
            "Hugging Face cache), otherwise pass a local export folder"
        ) from err


def weights_file(export_dir: str | Path) -> Path:
    """`encoder.safetensors` (emomae layout) or, without it, `model.safetensors` (hf layout)."""
    export_dir = Path(export_dir)
    for name in (WEIGHTS_FILES["emomae"], WEIGHTS_FILES["hf"]):
        if (export_dir / name).is_file():
            return export_dir / name
    raise ExportError(
        f"{export_dir}: encoder.safetensors is missing (nor is there a model.safetensors, "
        "the Hugging Face layout)"
    )


def read_export_config(export_dir: str | Path) -> dict:
    """config.json of an export (either layout; a hub id is resolved first), checked; errors name the
    file and the key."""
    export_dir = resolve_export_dir(export_dir)
    path = export_dir / "config.json"
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
    text = config.get("text")
    if isinstance(text, dict) and "paths" in text and "branches" not in text:
        text["branches"] = text.pop("paths")  # stage-2 exports written before the rename
    return config


def load_encoder(source: str | Path, device: str | torch.device = "cpu"):
    """Rebuild the exported `AVEncoder` (eval mode) from `config.json` + `encoder.safetensors` (emomae
    layout) or `model.safetensors` (hf layout); `source` is such a folder or a hub id (`user/repo`)."""
    export_dir = resolve_export_dir(source)
    config = read_export_config(export_dir)
    encoder, _ = build_encoder(config["architecture"], where=str(export_dir / "config.json"))
    weights = weights_file(export_dir)
    load_weights(encoder, load_file(str(weights)), where=str(weights))
    return encoder.to(device).eval()


def export(
    checkpoint: str | Path,
    out_dir: str | Path,
    layout: str = "emomae",
    ema: bool = False,
    frame_stride: int | None = None,
) -> Path:
    """Checkpoint (Lightning file or DeepSpeed dir) -> export folder in `layout` ("emomae" or "hf");
    checks the weights fit. `ema`: export the EMA weights (config.json gets `"weights": "ema"`); without
    it, a checkpoint that has them gets a one-line note on stdout. `frame_stride`: the shards' frame
    stride, needed only when the run did not record it and its shards are out of reach
    (`FrameStrideUnknown` otherwise)."""
    state, meta, has_ema = _read_checkpoint(Path(checkpoint), ema)
    if has_ema and not ema:
        print(f"note: {checkpoint} also holds EMA weights ({EMA_KEY}); `emomae export --ema` exports those")
    model_cfg = meta["model"]
    encoder, _ = build_encoder(model_cfg, where=f"{checkpoint} (checkpoint['emomae']['model'])")
    load_weights(encoder, state, where=f"{checkpoint} ({EMA_KEY})" if ema else str(checkpoint))
    stride = choose_frame_stride(meta.get("config"), frame_stride, checkpoint)
    spec = input_spec(meta.get("config"), model_cfg, frame_stride=stride)
    extra, card_note = None, None
    if ema:
        decay = ((meta.get("config") or {}).get("optim") or {}).get("ema_decay")
        extra = {"weights": "ema"}
        card_note = (
            f"The weights are the exponential moving average of the training weights"
            f"{f' (decay {decay})' if decay is not None else ''}, `checkpoint[{EMA_KEY!r}]`, "
            "exported with `emomae export --ema`."
        )
    out = save_export(
        encoder,
        model_cfg,
        spec,
        out_dir,
        source=Path(checkpoint).name,
        extra=extra,
        layout=layout,
        card_note=card_note,
    )
    if export_text_heads(checkpoint, out):  # stage-2 (inject) runs: the projection heads zero-shot needs
        os.chmod(out / TEXT_HEADS_FILE, FILE_MODE)
    return out


# Stage-2 (inject) checkpoints also carry the AV->text projection heads that `emomae zeroshot` needs.
TEXT_HEADS_FILE = "text_heads.safetensors"
HEADS_PREFIX = "text_heads."


def text_heads_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The stage-2 text projection heads of a Lightning state dict, fp32 on the CPU (empty for stage 1)."""
    return {
        k[len(HEADS_PREFIX) :]: v.detach().float().cpu().contiguous()
        for k, v in state_dict.items()
        if k.startswith(HEADS_PREFIX)
    }


def export_text_heads(checkpoint: str | Path, out_dir: str | Path) -> bool:
    """Add `text_heads.safetensors` and config.json's `text` entry to an export of a stage-2
    Lightning checkpoint; returns False (and writes nothing) for a stage-1 checkpoint."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if not checkpoint.is_file():
        return False  # DeepSpeed folders: consolidate to a .ckpt first to keep the text heads
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = text_heads_state(ckpt.get("state_dict", {}))
    run_config = (ckpt.get("emomae") or {}).get("config") or {}
    if not state:
        return False
    save_file(state, str(out_dir / TEXT_HEADS_FILE), metadata={"format": "emomae-text-heads"})
    config_file = out_dir / "config.json"
    config = json.loads(config_file.read_text())
    dim = next(v for k, v in state.items() if k.endswith(".weight")).shape[0]
    config["text"] = {
        "encoder": run_config["inject"]["text_encoder"],
        "dim": int(dim),
        "branches": sorted({k.split(".")[1] for k in state if k.startswith("proj.")}),
    }
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    return True


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="emomae export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="Lightning .ckpt file or DeepSpeed checkpoint directory")
    parser.add_argument(
        "out_dir",
        help="folder to write encoder.safetensors, config.json, MODEL_CARD.md into "
        "(with --layout hf: model.safetensors, config.json, README.md)",
    )
    parser.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="emomae",
        help="emomae (default) or hf: the Hugging Face hub layout, ready to upload",
    )
    parser.add_argument(
        "--ema",
        action="store_true",
        help="export the EMA weights (checkpoint['ema_state_dict'], runs with optim.ema=true)",
    )
    parser.add_argument(
        "--frame-stride",
        type=int,
        metavar="N",
        help="frame stride of the shards the run trained on (`emomae shards frame_stride=`), for "
        "checkpoints that do not record it when their shards' index.json is out of reach",
    )
    args = parser.parse_args(argv)
    if args.frame_stride is not None and args.frame_stride < 1:
        parser.error(f"--frame-stride must be >= 1, got {args.frame_stride}")
    try:
        out = export(
            args.checkpoint, args.out_dir, layout=args.layout, ema=args.ema, frame_stride=args.frame_stride
        )
    except ExportError as err:
        print(f"emomae export: {err}", file=sys.stderr)
        return 2 if isinstance(err, FrameStrideUnknown) else 1
    print(f"exported encoder to {out}")
    return 0
