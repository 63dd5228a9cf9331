"""`emomae manifest <dataset> <root> --out manifest.csv [--folds K] [--seed S]`: runs the dataset's
adapter (data_pipelines/adapters/: one scanner per layout, each returning `ManifestRow`s with absolute
paths), optionally replaces the folds by speaker-independent ones, and writes the CSV and the list of
files the adapter skipped."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from data_pipelines.adapters import ADAPTERS
from data_pipelines.adapters.common import write_skipped
from data_pipelines.manifests import DATASETS, ManifestError, dataset_info, speaker_folds, write_manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="emomae manifest", description="Scan a dataset root and write a manifest CSV."
    )
    p.add_argument("dataset", help=f"one of: {', '.join(DATASETS)}")
    p.add_argument("root", type=Path, help="dataset root (hicmae: an annotation list or a folder of them)")
    p.add_argument("--out", type=Path, required=True, help="manifest CSV to write")
    p.add_argument(
        "--folds", type=int, default=None, help="speaker-independent folds (replaces official ones)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of --folds")
    p.add_argument(
        "--rewrite-root", action="append", default=[], metavar="OLD=NEW", help="hicmae: path prefix rewrite"
    )
    p.add_argument("--labels-from-parent", action="store_true", help="folder: class = parent folder name")
    args = p.parse_args(argv)
    try:
        info = dataset_info(args.dataset)
        kwargs = {"rewrite_root": args.rewrite_root} if info.name == "hicmae" else {}
        if info.name == "folder":
            kwargs = {"labels_from_parent": args.labels_from_parent}
        rows = ADAPTERS[info.name](args.root, **kwargs)
        if args.folds:
            assign = speaker_folds([r.speaker for r in rows], args.folds, args.seed)
            for r in rows:
                r.fold = assign[r.speaker]
        write_manifest(rows, args.out)
        skipped_log = _log_skipped(rows, args.out.parent / "errors.jsonl")
    except ManifestError as err:
        print(f"emomae manifest: {err}", file=sys.stderr)
        return 2
    folds = Counter(r.fold for r in rows if r.fold is not None)
    print(
        f"wrote {len(rows)} clips to {args.out}"
        + (f"; clips per fold {dict(sorted(folds.items()))}" if folds else "")
        + (f"; skipped files listed in {skipped_log}" if skipped_log else "")
    )
    return 0


def _log_skipped(rows, path: Path) -> Path | None:
    """The files an adapter skipped (`rows.skipped`) as `errors.jsonl` beside the manifest; a stale
    list from an earlier scan is removed when nothing was skipped."""
    skipped = getattr(rows, "skipped", [])
    if skipped:
        return write_skipped(skipped, path)
    path.unlink(missing_ok=True)
    return None


if __name__ == "__main__":
    sys.exit(main())
