"""Export, probing and fine-tuning of pretrained audio-visual emotion encoders."""

from __future__ import annotations


def load_encoder(export_dir, device="cpu"):
    """Rebuild an exported `AVEncoder` (see `finetune.export.load_encoder`)."""
    from finetune.export import load_encoder as _load

    return _load(export_dir, device)


__all__ = ["load_encoder"]
