"""`emomae` command line: one subcommand per job, each implemented next to the code it drives.

Subcommands are imported lazily so `emomae --help` stays fast and a missing optional dependency
(deepspeed, sentence-transformers) only matters to the subcommand that needs it.
"""

from __future__ import annotations

import importlib
import sys

# name -> ("module:function", one-line help). Each function takes the remaining argv list.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("data_pipelines.synthetic:main", "generate the built-in procedural AV emotion dataset (mp4)"),
    "manifest": ("data_pipelines.manifest_cli:main", "scan a dataset root and write a manifest CSV"),
    "shards": ("data_pipelines.shards_cli:main", "decode clips of a manifest into WebDataset tar shards"),
    "merge-captions": ("data_pipelines.captions:main", "add text captions to existing shards"),
    "pretrain": ("pretrain.train:main", "pretrain a masked AV autoencoder from a YAML config"),
    "info": ("pretrain.info:main", "print parameter counts and FLOPs of a model config"),
    "export": ("finetune.export:main", "export encoders from a checkpoint to safetensors + JSON"),
    "import-hicmae": (
        "finetune.hicmae_import:main",
        "convert a HiCMAE checkpoint (pretrained or fine-tuned) to an export",
    ),
    "embed": ("finetune.embed:main", "print or save the clip embedding of a video file"),
    "finetune": ("finetune.train:main", "probe or fine-tune an exported encoder on a protocol"),
    "zeroshot": ("finetune.zeroshot:main", "zero-shot classification with class text prompts"),
}


def _usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: emomae <command> [args...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "`emomae <command> --help` for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"emomae: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name = SUBCOMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    result = func(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
