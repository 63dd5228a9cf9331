"""`emomae embed <video> --encoder <export dir> [--out x.npy]`: the clip embedding of one video file.

The video goes through the same preprocessing as the shards (`data_pipelines.decode` windows, the
export's frame count/stride/size, Kaldi fbank with the export's normalisation). The embedding of a
window is the hierarchical feature vector `[mean of video layers, mean of audio layers, fused video,
fused audio]` (token-means, uniform layer weights) = `(4 D,)`; the clip embedding is the mean over
its windows.

A window without audio (`audio_present` False, the flag of shard samples written with
`--allow-missing-audio`) is embedded with its audio input blanked: zeros in place of the normalised
fbank, as missing-modality evaluation does (`finetune.modality.drop_modality`), decided per window.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from data_pipelines.decode import DecodeError, SamplingConfig, decode_clip
from data_pipelines.face_track import face_config_of_spec
from data_pipelines.faces import FaceModelError
from data_pipelines.features import FbankConfig, waveform_to_fbank
from finetune.export import ExportError, load_encoder, read_export_config
from finetune.modality import zero_rows
from pretrain.encoders import normalize_video
from pretrain.pooling import pool_tokens


def clip_inputs(
    video: Path,
    spec: dict,
    max_windows: int | None = None,
    allow_missing_audio: bool = False,
    face: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Decode a clip -> uint8 video `(W, T, 3, S, S)`, normalised fbank `(W, F, M)` (one row per
    window) and whether it has audio (False only for a clip without any, when allowed). The face step
    is the one the export's `input.face` records (the training shards'); `face="auto"|"none"` overrides it."""
    sampling = SamplingConfig(
        num_frames=spec["num_frames"],
        frame_stride=spec["frame_stride"],
        img_size=spec["img_size"],
        max_windows=max_windows,
        sample_rate=spec["sample_rate"],
    )
    face_step = face_config_of_spec(
        spec.get("face") if face is None else {**(spec.get("face") or {}), "mode": face}
    )
    clip = decode_clip(Path(video), sampling, allow_missing_audio=allow_missing_audio, face=face_step)
    fb = spec["fbank"]
    fbank_cfg = FbankConfig(
        sample_rate=spec["sample_rate"],
        mel_bins=fb["mel_bins"],
        fbank_frames=fb["fbank_frames"],
        mean=fb["mean"],
        std=fb["std"],
    )
    frames = torch.stack([torch.from_numpy(w.frames).permute(0, 3, 1, 2) for w in clip.windows])
    # The fbank of the real audio only, zero-padded after (HiCMAE; `samples.real_samples` does the same).
    fbank = torch.stack(
        [
            waveform_to_fbank(torch.from_numpy(w.audio[: len(w.audio) - w.audio_padded]), fbank_cfg)
            for w in clip.windows
        ]
    )
    return frames, fbank, not clip.audio_missing


def blank_missing_audio(fbank: torch.Tensor, audio_present: torch.Tensor | None) -> torch.Tensor:
    """Normalised fbank `(W, F, M)` with the rows whose `audio_present` is False replaced by zeros
    (the blank of `drop_modality(..., "video")`); unchanged when `audio_present` is None."""
    if audio_present is None:
        return fbank
    return zero_rows(fbank, audio_present.bool().cpu().numpy())


@torch.inference_mode()
def window_embeddings(
    encoder: torch.nn.Module,
    video: torch.Tensor,
    fbank: torch.Tensor,
    audio_present: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 video `(W, T, 3, S, S)`, normalised fbank `(W, F, M)`, `audio_present` `(W,)` bool or
    None (all have audio) -> one embedding `(W, 4 D)` per window."""
    fbank = blank_missing_audio(fbank.float(), audio_present)
    pooled = pool_tokens(encoder.forward_features(normalize_video(video), fbank))
    return torch.cat(
        [
            pooled["video_layers"].mean(1),
            pooled["audio_layers"].mean(1),
            pooled["fused_video"],
            pooled["fused_audio"],
        ],
        dim=-1,
    )


def embed_clip(
    encoder: torch.nn.Module,
    video: torch.Tensor,
    fbank: torch.Tensor,
    audio_present: torch.Tensor | None = None,
) -> np.ndarray:
    """The clip embedding `(4 D,)` float32: the mean of its `window_embeddings`."""
    return window_embeddings(encoder, video, fbank, audio_present).mean(0).numpy().astype(np.float32)


def embed_batch(encoder: torch.nn.Module, batch: dict) -> torch.Tensor:
    """A loader batch (docs/architecture.md: `video`, `fbank`, `audio_present`) -> `(B, 4 D)`, one
    embedding per sample, the samples without audio with their audio blanked."""
    return window_embeddings(encoder, batch["video"], batch["fbank"], batch.get("audio_present"))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="emomae embed", description=__doc__.splitlines()[0])
    parser.add_argument("video", help="video file (mp4, mpg, flv, ...), normally with an audio track")
    parser.add_argument("--encoder", required=True, help="export folder written by `emomae export`")
    parser.add_argument("--out", help="save the embedding as .npy instead of printing it")
    parser.add_argument("--max-windows", type=int, default=None, help="windows per clip (default: all)")
    parser.add_argument(
        "--allow-missing-audio",
        action="store_true",
        help="embed a video without any audio with its audio input blanked (as the shards do)",
    )
    parser.add_argument(
        "--face",
        choices=("auto", "none"),
        default=None,
        help="crop the face (auto) or not (none); default: what the export's input.face records",
    )
    args = parser.parse_args(argv)
    try:
        spec = read_export_config(args.encoder)["input"]
        encoder = load_encoder(args.encoder)
        video, fbank, has_audio = clip_inputs(
            Path(args.video), spec, args.max_windows, args.allow_missing_audio, args.face
        )
    except (ExportError, DecodeError, FaceModelError) as err:
        print(f"emomae embed: {err}", file=sys.stderr)
        return 1
    if not has_audio:
        print(f"emomae embed: {args.video} has no audio; its audio input is blanked", file=sys.stderr)
    emb = embed_clip(encoder, video, fbank, torch.full((video.shape[0],), has_audio))
    if args.out:
        np.save(args.out, emb)
        print(f"saved a ({emb.shape[0]},) embedding of {video.shape[0]} window(s) to {args.out}")
    else:
        np.set_printoptions(precision=4, suppress=True, linewidth=110)
        print(emb)
    return 0
