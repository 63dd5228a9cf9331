"""`emomae info <model.yaml | size> [key=value ...]`: parameter counts per part and GFLOPs per clip.

Models are built on the meta device, so even `large` costs no memory and no compute; FLOPs are
counted by `pretrain.flops.flop_counter` on meta tensors (attention included, as on every device; a
multiply-add is 2 FLOPs).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from emomae.config import ConfigError, load_config, resolve_config_path
from pretrain.encoders import ModelConfig
from pretrain.flops import flop_counter
from pretrain.mae import MaskedAVAutoencoder, ObjectiveConfig


def resolve_model_config(spec: str, overrides: list[str] | None = None) -> ModelConfig:
    """A YAML path or a size name from configs/model/ (tiny, small, base, large, micro, ...)."""
    path = resolve_config_path(spec, "model")
    cfg: ModelConfig = OmegaConf.to_object(load_config(ModelConfig, path, overrides))
    try:
        cfg.validate()
    except ValueError as err:
        raise ConfigError(f"{path}: {err}") from err
    return cfg


def _part(name: str) -> str:
    if name.startswith("encoder."):
        rest = name.removeprefix("encoder.")
        if rest.startswith("fusion."):
            return "fusion encoder"
        if rest.startswith("blocks."):
            return "shared encoder blocks"
        return f"{rest.split('_')[0]} encoder"
    if name.startswith(("video_to_decoder", "audio_to_decoder")):
        return "encoder->decoder projections"
    if name.startswith(("video_decoder", "audio_decoder")):
        return name.split("_")[0] + " decoder"
    return "contrastive loss"


def finetune_head(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The fine-tuning head itself (`finetune.heads.FeatureFusionHead`, docs/finetune.md), as fine-tuning
    builds it on this encoder: one layer weight per encoder layer and modality, 4 x width LayerNorm,
    linear. Build it under `torch.device("meta")` to count without allocating."""
    from finetune.heads import FeatureFusionHead  # only here: `emomae info` reports on both stages

    return FeatureFusionHead(cfg.width, cfg.depth, cfg.depth, num_classes)


def parameter_counts(
    cfg: ModelConfig, objective: ObjectiveConfig | None = None, num_classes: int = 6
) -> dict[str, int]:
    """Parameters per part, the pretraining total and the encoder-only fine-tune total."""
    with torch.device("meta"):
        model = MaskedAVAutoencoder(cfg, objective)
        head = finetune_head(cfg, num_classes)
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        counts[_part(name)] = counts.get(_part(name), 0) + p.numel()
    counts["pretraining total"] = sum(p.numel() for p in model.parameters())
    counts["encoder (AVEncoder)"] = sum(p.numel() for p in model.encoder.parameters())
    counts[f"fine-tune head ({num_classes} classes)"] = sum(p.numel() for p in head.parameters())
    counts["encoder-only fine-tune total"] = (
        counts["encoder (AVEncoder)"] + counts[f"fine-tune head ({num_classes} classes)"]
    )
    return counts


def gflops_per_clip(cfg: ModelConfig, objective: ObjectiveConfig | None = None) -> dict[str, float]:
    """Forward GFLOPs for one clip: the fine-tuning view (encoder on all tokens) and a pretraining
    step's forward (masked encoder, decoders, losses)."""
    with torch.device("meta"):
        model = MaskedAVAutoencoder(cfg, objective)
        video = torch.zeros(1, cfg.num_frames, 3, cfg.img_size, cfg.img_size, dtype=torch.uint8)
        fbank = torch.zeros(1, cfg.fbank_frames, cfg.mel_bins)
        with flop_counter() as finetune:
            model.encoder.forward_features(video.float(), fbank)
        with flop_counter() as pretrain:
            model(video, fbank)
    return {
        "fine-tune forward (all tokens)": finetune.get_total_flops() / 1e9,
        "pretraining forward (masked)": pretrain.get_total_flops() / 1e9,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="emomae info", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="model YAML or size name (configs/model/<name>.yaml)")
    parser.add_argument("overrides", nargs="*", help="ModelConfig overrides, e.g. kind=unified width=384")
    parser.add_argument("--classes", type=int, default=6, help="classes of the fine-tune head (default 6)")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    parser.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    try:
        cfg = resolve_model_config(args.model, args.overrides)
    except ConfigError as err:
        parser.error(str(err))
    counts = parameter_counts(cfg, num_classes=args.classes)
    flops = {} if args.no_flops else gflops_per_clip(cfg)
    t, h, w = cfg.video_grid
    print(
        f"{args.model}: kind={cfg.kind} width={cfg.width}/{cfg.heads} depth={cfg.depth} "
        f"decoder={cfg.decoder_width}/{cfg.decoder_heads}x{cfg.decoder_depth} "
        f"tokens video={t}x{h}x{w}={cfg.num_video_tokens} audio={cfg.num_audio_tokens}"
    )
    width = max(map(len, [*counts, *flops]))
    for name, n in counts.items():
        print(f"  {name:<{width}}  {n / 1e6:9.2f} M  ({n:,})")
    for name, g in flops.items():
        print(f"  {name:<{width}}  {g:9.2f} GFLOPs / clip")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"model": cfg.to_dict(), "params": counts, "gflops": flops}, indent=2)
        )
    return 0
