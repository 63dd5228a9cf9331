"""Names and shapes of HiCMAE's checkpoints (github sunlicai/HiCMAE) in emomae's modules.

HiCMAE's pretraining model (`PretrainAudioVisionTransformer`) maps onto `MaskedAVAutoencoder`, its
fine-tuning model (`AudioVisionTransformer`) onto `AVEncoder` + `FeatureFusionHead`. Every tensor
has exactly one home and the shapes are the same; only names differ. The renaming is a list of
prefix rules and a list of in-block rules, so a key no rule covers is reported, never dropped.
Imports only torch: the mapping is usable without Lightning or the training code.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

# whole-module prefixes, tried in order (the first match wins; `blocks_audio` before `blocks`)
PREFIX_RULES: tuple[tuple[str, str], ...] = (
    (r"^encoder\.patch_embed\.", "encoder.video_embed."),
    (r"^encoder\.blocks\.", "encoder.video_blocks."),
    (r"^encoder\.norm\.", "encoder.video_norm."),
    (r"^encoder_audio\.patch_embed\.", "encoder.audio_embed."),
    (r"^encoder_audio\.blocks\.", "encoder.audio_blocks."),
    (r"^encoder_audio\.norm\.", "encoder.audio_norm."),
    (r"^encoder_fusion\.blocks_audio\.", "encoder.fusion.audio_blocks."),
    (r"^encoder_fusion\.blocks\.", "encoder.fusion.video_blocks."),
    (r"^encoder_fusion\.norm_audio\.", "encoder.fusion.audio_norm."),
    (r"^encoder_fusion\.norm\.", "encoder.fusion.video_norm."),
    (r"^decoder_audio\.", "audio_decoder."),
    (r"^decoder\.", "video_decoder."),
    (r"^mask_token_audio$", "audio_decoder.mask_token"),
    (r"^mask_token$", "video_decoder.mask_token"),
    (r"^encoder_to_decoder_audio\.", "audio_to_decoder."),
    (r"^encoder_to_decoder\.", "video_to_decoder."),
    # the fine-tuning head (hierarchical feature fusion)
    (r"^video_layer_weights$", "head.video_layer_weights"),
    (r"^audio_layer_weights$", "head.audio_layer_weights"),
    (r"^fc_norm\.", "head.norm."),
    (r"^head\.", "head.fc."),
)

# inside cross-then-self blocks: HiCMAE keeps the cross-attention's q bias as a separate parameter
# and names the query/context norms cross_norm1/2
BLOCK_RULES: tuple[tuple[str, str], ...] = (
    (r"\.cross_attn\.q_bias$", ".cross_attn.q.bias"),
    (r"\.cross_norm1\.", ".norm_q."),
    (r"\.cross_norm2\.", ".norm_context."),
)

# keys that only the fine-tuning model has; a checkpoint with them is a fine-tuned one
FINETUNE_ONLY = ("video_layer_weights", "audio_layer_weights", "fc_norm.weight", "head.weight")
PRETRAIN_ONLY = ("mask_token", "mask_token_audio", "encoder_to_decoder.weight")


class HiCMAEKeyError(ValueError):
    """A state dict that is not (or not entirely) a HiCMAE checkpoint; the message names the keys."""


def emomae_name(hicmae_key: str) -> str | None:
    """The emomae name of one HiCMAE key, or None when no rule covers it."""
    for pattern, replacement in PREFIX_RULES:
        if re.search(pattern, hicmae_key):
            name = re.sub(pattern, replacement, hicmae_key, count=1)
            for block_pattern, block_replacement in BLOCK_RULES:
                name = re.sub(block_pattern, block_replacement, name)
            return name
    return None


def checkpoint_kind(state: Mapping[str, object], where: str = "checkpoint") -> str:
    """'pretrain' or 'finetune', from the keys; HiCMAEKeyError when it is neither."""
    is_finetune = all(k in state for k in FINETUNE_ONLY)
    is_pretrain = all(k in state for k in PRETRAIN_ONLY)
    if is_finetune == is_pretrain:
        found = sorted(state)[:6]
        raise HiCMAEKeyError(
            f"{where}: not a HiCMAE checkpoint: a pretraining model has {list(PRETRAIN_ONLY)}, a fine-tuning model "
            f"{list(FINETUNE_ONLY)}; this state dict has {'both' if is_finetune else 'neither'} "
            f"({len(state)} keys, e.g. {found})"
        )
    return "finetune" if is_finetune else "pretrain"


def convert_state(
    hicmae_state: Mapping[str, Tensor], target: Mapping[str, Tensor], where: str = "checkpoint"
) -> dict[str, Tensor]:
    """HiCMAE state dict -> emomae state dict with the keys and shapes of `target` (an emomae
    module's state_dict, or any mapping of name -> tensor with `.shape`).

    Every HiCMAE key must have a home in `target` with the same shape, and every `target` key must
    be covered; otherwise HiCMAEKeyError names the first offenders (both shapes for a mismatch).
    """
    out: dict[str, Tensor] = {}
    unmapped, unexpected, shapes = [], [], []
    for key, tensor in hicmae_state.items():
        name = emomae_name(key)
        if name is None:
            unmapped.append(key)
        elif name not in target:
            unexpected.append(f"{key} -> {name}")
        elif tuple(target[name].shape) != tuple(tensor.shape):
            shapes.append(
                f"{key}: checkpoint {tuple(tensor.shape)} vs emomae {name} {tuple(target[name].shape)}"
            )
        else:
            out[name] = tensor
    missing = sorted(set(target) - set(out) - {emomae_name(k) for k in hicmae_state})
    problems = []
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {shapes[:3]}")
    if unmapped:
        problems.append(f"{len(unmapped)} key(s) that are not HiCMAE's: {sorted(unmapped)[:5]}")
    if unexpected:
        problems.append(
            f"{len(unexpected)} key(s) with no place in this emomae model: {sorted(unexpected)[:5]}"
        )
    if missing:
        problems.append(f"{len(missing)} emomae tensor(s) the checkpoint lacks: {missing[:5]}")
    if problems:
        raise HiCMAEKeyError(f"{where}: does not fit the emomae model: " + "; ".join(problems))
    return out


# ---------------------------------------------------------------- architecture

HEAD_DIM = 64  # every size HiCMAE registers (dim 256/384/512, decoder 128/192/384) uses 64-wide heads


def model_config_from_kwargs(kwargs: Mapping, num_frames: int = 16) -> dict:
    """ModelConfig fields from the keyword arguments of HiCMAE's `PretrainAudioVisionTransformer`
    (`img_size`, `encoder_embed_dim`, `return_intermediate_features` (0-based), ...)."""
    patch = int(kwargs["patch_size"])
    fbank_frames, mel_bins = (int(x) for x in kwargs.get("img_size_audio", (256, 128)))
    return {
        "num_frames": int(num_frames),
        "img_size": int(kwargs["img_size"]),
        "tubelet": int(kwargs["decoder_num_classes"]) // (3 * patch * patch),
        "patch": patch,
        "fbank_frames": fbank_frames,
        "mel_bins": mel_bins,
        "width": int(kwargs["encoder_embed_dim"]),
        "heads": int(kwargs["encoder_num_heads"]),
        "depth": int(kwargs["encoder_depth"]),
        "fusion_depth": int(kwargs["encoder_fusion_depth"]),
        "decoder_width": int(kwargs["decoder_embed_dim"]),
        "decoder_heads": int(kwargs["decoder_num_heads"]),
        "decoder_depth": int(kwargs["decoder_depth"]),
        "mlp_ratio": float(kwargs.get("mlp_ratio", 4.0)),
        "skip_layers": [int(i) + 1 for i in kwargs.get("return_intermediate_features", (3, 6, 9))],
        "qv_bias": bool(kwargs.get("qkv_bias", True)),
    }


def _count_blocks(state: Mapping[str, Tensor], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return len({m.group(1) for k in state if (m := pattern.match(k))})


def model_config_from_checkpoint(state: Mapping[str, Tensor], args: object | None = None) -> dict:
    """ModelConfig fields of a HiCMAE checkpoint: widths, depths and patch sizes from the tensor
    shapes; image size, frame count, fbank length and skip levels from its saved `args` where present
    (HiCMAE's defaults otherwise). Head counts are not in a state dict: 64-wide heads are assumed
    (true of every released size); override `heads` / `decoder_heads` for anything else."""
    embed = state["encoder.patch_embed.proj.weight"]  # (width, 3, tubelet, patch, patch)
    width, tubelet, patch = int(embed.shape[0]), int(embed.shape[2]), int(embed.shape[-1])
    get = (lambda name, default: getattr(args, name, default)) if args is not None else (lambda _n, d: d)
    fields = {
        "num_frames": int(get("num_frames", 16)),
        "img_size": int(get("input_size", 160)),
        "tubelet": tubelet,
        "patch": patch,
        "fbank_frames": int(get("input_size_audio", 256)),
        "mel_bins": 128,  # HiCMAE's fbank always has 128 mel bins; `input_size_audio` is its length
        "width": width,
        "heads": max(1, width // HEAD_DIM),
        "depth": _count_blocks(state, "encoder.blocks"),
        "fusion_depth": _count_blocks(state, "encoder_fusion.blocks"),
        "mlp_ratio": float(state["encoder.blocks.0.mlp.fc1.weight"].shape[0]) / width,
        "skip_layers": [int(i) + 1 for i in get("return_intermediate_features", (3, 6, 9))],
        "qv_bias": "encoder.blocks.0.attn.q_bias" in state,
    }
    if "decoder.norm.weight" in state:  # pretraining checkpoint: the decoders' shape too
        decoder_width = int(state["decoder.norm.weight"].shape[0])
        fields |= {
            "decoder_width": decoder_width,
            "decoder_heads": max(1, decoder_width // HEAD_DIM),
            "decoder_depth": _count_blocks(state, "decoder.blocks"),
        }
    return fields
