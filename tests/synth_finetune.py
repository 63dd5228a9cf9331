"""`emomae finetune` with the built-in dataset's recipe (configs/finetune/synth.yaml) on a test's own
encoder export, manifest and shards."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SYNTH_RECIPE = str(REPO / "configs" / "finetune" / "synth.yaml")


def synth_finetune(export: Path, manifest: Path, shards: Path, out: Path, *extra: str) -> list[str]:
    """The arguments after `emomae finetune`: the recipe, the test's files, run directories under `out`,
    loading in the main process and one timed batch; then `extra`."""
    return [
        SYNTH_RECIPE,
        f"encoder={export}",
        f"protocol.manifest={manifest}",
        f"protocol.shards={shards}",
        f"out_dir={out}",
        "num_workers=0",
        "speed_batches=1",
        *extra,
    ]
