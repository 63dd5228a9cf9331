"""`make demo`: the whole flow on the built-in dataset, on a CPU, in minutes.

synth (real mp4 files) -> manifest -> shards -> pretrain the demo model -> export the encoder ->
linear probe on the pretrained encoder, on a randomly initialised one and on the pretrained one's
features z-scored per speaker (5 speaker folds) -> print
the losses, the probe margin and the per-modality results. Every step is the `emomae` command a user
would run; a finished step is skipped on a rerun (shards resume, pretraining resumes from last.ckpt).

Usage: python -m emomae.demo [--out demo_out] [--steps N] [--finetune]
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
import time
from pathlib import Path

from emomae.cli import main as emomae

REPO = Path(__file__).resolve().parents[1]


def run(*argv: str) -> None:
    print(f"\n$ emomae {shlex.join(argv)}", flush=True)
    start = time.perf_counter()
    code = emomae(list(argv))
    if code:
        raise SystemExit(f"demo: `emomae {shlex.join(argv)}` failed with exit code {code}")
    print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)


def loss_curve(run_dir: Path, key: str = "loss/total") -> list[tuple[int, float]]:
    """(step, value) of one logged loss over every CSV log of the run (a resumed run adds versions)."""
    points: dict[int, float] = {}
    for metrics in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with metrics.open() as f:
            for row in csv.DictReader(f):
                if row.get(key):
                    points[int(row["step"])] = float(row[key])
    return sorted(points.items())


def probe_summary(results_json: Path) -> dict:
    return json.loads(results_json.read_text())["summary"]


def print_losses(run_dir: Path) -> None:
    curve = loss_curve(run_dir)
    if len(curve) < 2:
        print(f"no loss curve found under {run_dir}/csv")
        return
    print("\npretraining loss (total = reconstruction + contrastive):")
    marks = curve[:: max(1, len(curve) // 8)] + [curve[-1]]
    for step, value in dict(marks).items():
        print(f"  step {step:5d}  {value:.4f}")
    first, last = curve[0][1], curve[-1][1]
    print(f"  fell from {first:.4f} to {last:.4f} ({100 * (first - last) / first:.0f} % lower)")


def print_probes(pretrained: dict, random: dict, normalised: dict, finetuned: dict | None) -> None:
    def fmt(s: dict, mode: str, metric: str = "uar") -> str:
        if mode not in s:
            return "   -   "
        mean, std = s[mode][metric]
        return f"{100 * mean:5.1f} ± {100 * std:4.1f}"

    rows = [
        ("linear probe, random encoder", random),
        ("linear probe, pretrained", pretrained),
        ("  same, speaker-normalised", normalised),
    ]
    if finetuned is not None:
        rows.append(("full fine-tuning, pretrained", finetuned))
    print("\nUAR % on held-out speakers (5 folds, mean ± std; chance 16.7):")
    print(f"  {'':32s} {'audio-visual':>14s} {'audio only':>14s} {'video only':>14s}")
    for name, s in rows:
        print(f"  {name:32s} {fmt(s, 'av'):>14s} {fmt(s, 'audio'):>14s} {fmt(s, 'video'):>14s}")
    margin = 100 * (pretrained["av"]["uar"][0] - random["av"]["uar"][0])
    print(f"\nprobe margin, pretrained - random encoder: {margin:+.1f} UAR points")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emomae.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo_out"))
    parser.add_argument("--speakers", type=int, default=10)
    parser.add_argument("--clips", type=int, default=5, help="clips per speaker and class")
    parser.add_argument(
        "--steps", type=int, default=None, help="pretraining steps (default: the demo config's)"
    )
    parser.add_argument("--finetune", action="store_true", help="also run full fine-tuning (slower)")
    args = parser.parse_args(argv)
    out = args.out
    start = time.perf_counter()

    if not (out / "synth" / "manifest.csv").is_file():
        run(
            "synth",
            "--out",
            str(out / "synth"),
            f"num_speakers={args.speakers}",
            f"clips_per_speaker_class={args.clips}",
            "frame_size=64",
        )
    run(
        "shards",
        str(out / "synth" / "manifest.csv"),
        str(out / "shards"),
        "--workers",
        "2",
        "--no-progress",
        "--captions",
        str(out / "synth" / "captions.jsonl"),
        "num_frames=8",
        "frame_stride=4",
        "img_size=64",
        "samples_per_shard=64",
    )

    pretrain_dir = out / "pretrain"
    overrides = [f"data.shards={out / 'shards'}", f"run_dir={pretrain_dir}"]
    if args.steps:
        overrides.append(f"trainer.max_steps={args.steps}")
    run("pretrain", str(REPO / "configs" / "pretrain" / "demo.yaml"), *overrides)
    run("export", str(pretrain_dir / "checkpoints" / "last.ckpt"), str(out / "export"))

    probe_cfg = str(REPO / "configs" / "finetune" / "synth.yaml")
    common = [
        f"encoder={out / 'export'}",
        f"protocol.manifest={out / 'synth' / 'manifest.csv'}",
        f"protocol.shards={out / 'shards'}",
        f"out_dir={out / 'finetune'}",
        "fold=all",
    ]
    run("finetune", probe_cfg, *common, "head=linear", "run_name=linear-pretrained")
    run("finetune", probe_cfg, *common, "head=linear", "random_init=true", "run_name=linear-random")
    # the same cached features, z-scored per speaker (docs/finetune.md, speaker_norm)
    run(
        "finetune",
        probe_cfg,
        *common,
        "head=linear",
        "speaker_norm=true",
        "run_name=linear-speaker-norm",
        f"cache_dir={out / 'finetune' / 'linear-pretrained' / 'cache'}",
    )
    finetuned = None
    if args.finetune:
        run("finetune", probe_cfg, *common, "head=finetune", "run_name=finetune-pretrained")
        finetuned = probe_summary(out / "finetune" / "finetune-pretrained" / "results.json")

    print_losses(pretrain_dir)
    print_probes(
        probe_summary(out / "finetune" / "linear-pretrained" / "results.json"),
        probe_summary(out / "finetune" / "linear-random" / "results.json"),
        probe_summary(out / "finetune" / "linear-speaker-norm" / "results.json"),
        finetuned,
    )
    print(
        f"\ndemo finished in {(time.perf_counter() - start) / 60:.1f} min; everything is under {out}/ "
        f"(results tables: {out}/finetune/*/results.md, confusion matrices: {out}/finetune/*/*.png)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
