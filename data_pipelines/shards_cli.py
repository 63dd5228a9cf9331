"""`emomae shards <manifest.csv> <out_dir> [--workers N] [--captions FILE] [--preview N] [key=value ...]`:
the ShardConfig from the options, then the shards (data_pipelines/shards.py) or, with `--preview`,
only the contact sheet of the face crops (data_pipelines/face_preview.py)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

from data_pipelines.decode import SILENCE_DBFS
from data_pipelines.face_preview import write_preview
from data_pipelines.faces import FaceModelError
from data_pipelines.manifests import ManifestError
from data_pipelines.shards import ShardConfig, write_shards
from emomae.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="emomae shards", description="Decode the clips of a manifest into WebDataset shards."
    )
    p.add_argument("manifest", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--captions", type=Path, default=None, help="CSV key,caption or JSONL {key, caption|text}")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--silent-audio",
        choices=("keep", "skip"),
        default=None,
        help=f"clips whose audio is below {SILENCE_DBFS:g} dBFS: keep (default, flagged audio_silent) or skip",
    )
    p.add_argument(
        "--allow-missing-audio",
        action="store_true",
        help="write clips without audio with zero audio (json audio_missing: true) instead of skipping them",
    )
    p.add_argument(
        "--face",
        choices=("auto", "none"),
        default=None,
        help="auto: detect, track and crop the face of each clip without a manifest bbox; none (default): as before",
    )
    p.add_argument(
        "--preview",
        type=int,
        default=None,
        metavar="N",
        help="write out_dir/preview.png (source frame with the crop box, and the crop) of the first N clips; no shards",
    )
    p.add_argument("overrides", nargs="*", help="ShardConfig key=value, e.g. img_size=160 max_windows=2")
    args = p.parse_intermixed_args(argv)
    overrides = list(args.overrides)
    if args.silent_audio:
        overrides.append(f"silent_audio={args.silent_audio}")
    if args.allow_missing_audio:
        overrides.append("allow_missing_audio=true")
    if args.face:
        overrides.append(f"face={args.face}")
    try:
        cfg = ShardConfig(**OmegaConf.to_container(load_config(ShardConfig, None, overrides)))
        if args.preview is not None:
            print(f"wrote {write_preview(args.manifest, args.out_dir / 'preview.png', cfg, args.preview)}")
            return 0
        write_shards(
            args.manifest,
            args.out_dir,
            cfg,
            args.workers,
            args.captions,
            not args.no_progress,
            argv=["emomae", "shards", *(argv if argv is not None else sys.argv[1:])],
        )
    except (ConfigError, ManifestError, ValueError, FileNotFoundError, FaceModelError) as err:
        print(f"emomae shards: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
