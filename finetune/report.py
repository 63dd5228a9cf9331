"""Run reports: results.json + results.md (paper-table ready), confusion-matrix and per-class recall
PNGs, encoder inference speed, and the provenance every run directory carries (resolved config,
git commit, versions); and what a run reports while it works: progress (a bar on a terminal, plain
lines in a SLURM log) and per-epoch figures to W&B (`Monitor`)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from finetune.metrics import mean_std

CLASSIFICATION_KEYS = ("uar", "war", "macro_f1")
MODALITY_NAMES = {"av": "audio-visual", "audio": "audio only", "video": "video only"}


def git_commit(where: Path | None = None) -> str | None:
    """`<sha>` (with `-dirty` when the tree has changes) of the checkout holding this code, or None."""
    where = where or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10
        )
        if sha.returncode:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU ({torch.get_num_threads()} threads)"


def run_metadata(argv: list[str] | None = None) -> dict:
    """Who made this run: git commit, command line, library versions, host."""
    import pytorch_lightning
    import timm

    return {
        "git_commit": git_commit(),
        "argv": list(sys.argv if argv is None else argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pytorch_lightning": pytorch_lightning.__version__,
        "timm": timm.__version__,
        "host": platform.node(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


@torch.inference_mode()
def encoder_speed(
    encoder: torch.nn.Module, video: torch.Tensor, fbank: torch.Tensor, repeats: int = 3
) -> dict:
    """Encoder forward throughput in clips/s on the device of `video` (one warm-up pass first).
    video: `(B, T, 3, H, W)` normalised float, fbank: `(B, F, M)`."""
    encoder.eval()
    encoder.forward_features(video, fbank)
    if video.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        encoder.forward_features(video, fbank)
    if video.is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "clips_per_s": repeats * video.shape[0] / seconds,
        "batch_size": int(video.shape[0]),
        "device": device_name(video.device),
        "dtype": str(video.dtype).replace("torch.", ""),
    }


def plot_confusion(cm: np.ndarray, classes: list[str], path: Path, title: str) -> Path:
    """Row-normalised confusion matrix (rows = true class) with counts, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm, dtype=np.float64)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = 1.6 + 0.55 * len(classes)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(
                j,
                i,
                f"{int(cm[i, j])}",
                ha="center",
                va="center",
                color="white" if norm[i, j] > 0.5 else "black",
                fontsize=8,
            )
    fig.colorbar(im, ax=ax, fraction=0.046, label="recall (row-normalised)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_per_class_recall(recall: list[float | None], classes: list[str], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = [np.nan if r is None else r for r in recall]
    fig, ax = plt.subplots(figsize=(1.5 + 0.6 * len(classes), 3.2))
    ax.bar(range(len(classes)), values, color="tab:blue")
    ax.axhline(np.nanmean(values), color="tab:red", linestyle="--", label=f"UAR {np.nanmean(values):.3f}")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("recall")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def figures(run_dir: Path, results: dict) -> list[Path]:
    """Confusion matrix and per-class recall PNGs (pooled over the run's folds, and per fold)."""
    if results["task"] != "classification":
        return []
    classes, paths = results["classes"], []
    pooled = results["summary"]["av_pooled"]
    paths.append(
        plot_confusion(
            pooled["confusion"],
            classes,
            run_dir / "confusion_av.png",
            f"{results['protocol']} {results['head']}: audio-visual, all folds",
        )
    )
    recall = np.diag(np.asarray(pooled["confusion"])) / np.maximum(np.asarray(pooled["confusion"]).sum(1), 1)
    paths.append(
        plot_per_class_recall(
            recall.tolist(),
            classes,
            run_dir / "recall_av.png",
            f"{results['protocol']} {results['head']}: per-class recall",
        )
    )
    for f in results["folds"]:
        fold_dir = run_dir / f"fold{f['fold']}"
        fold_dir.mkdir(parents=True, exist_ok=True)
        for modality, metrics in f["test"].items():
            paths.append(
                plot_confusion(
                    metrics["confusion"],
                    classes,
                    fold_dir / f"confusion_{modality}.png",
                    f"fold {f['fold']}, {modality}",
                )
            )
    return paths


def summarise(folds: list[dict], task: str) -> dict:
    """Mean and std over folds for every modality of the honest (validation-selected) figures and
    for the papers' protocol (epoch picked on the test fold)."""
    keys = CLASSIFICATION_KEYS if task == "classification" else ("ccc", "pcc")
    summary: dict[str, dict] = {}
    for modality in folds[0]["test"]:
        summary[modality] = {k: mean_std([f["test"][modality][k] for f in folds]) for k in keys}
    summary["av_best_epoch_on_test"] = {k: mean_std([f["best_on_test"][k] for f in folds]) for k in keys}
    # pooled over folds: the way HiCMAE reports CREMA-D (all test predictions in one confusion matrix)
    if task == "classification":
        from finetune.metrics import macro_f1, uar, war

        cm = np.sum([np.asarray(f["test"]["av"]["confusion"]) for f in folds], axis=0)
        summary["av_pooled"] = {
            "uar": uar(cm),
            "war": war(cm),
            "macro_f1": macro_f1(cm),
            "confusion": cm.tolist(),
        }
    return summary


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def results_markdown(results: dict) -> str:
    """The run as Markdown tables (percentages for classification, raw for CCC/PCC)."""
    task, folds, summary = results["task"], results["folds"], results["summary"]
    keys = CLASSIFICATION_KEYS if task == "classification" else ("ccc", "pcc")
    fmt = _pct if task == "classification" else (lambda x: f"{x:.4f}")
    names = {"uar": "UAR", "war": "WAR", "macro_f1": "macro-F1", "ccc": "CCC", "pcc": "PCC"}
    lines = [
        f"# {results['protocol']} - {results['head']}",
        "",
        f"Encoder: `{results['encoder']}`{' (random init control)' if results.get('random_init') else ''}. "
        + (
            "The imported fine-tuned model evaluated as it is (no training, no epoch selection)."
            if results.get("eval_only")
            else "Epoch selected on a validation split of the training speakers (honest selection)."
        )
        + (
            " Features z-scored per speaker, test speakers' unlabelled features included (speaker_norm)."
            if results.get("speaker_norm")
            else ""
        ),
        "",
        "| fold | epoch | " + " | ".join(names[k] for k in keys) + " |",
        "|---|---|" + "---|" * len(keys),
    ]
    for f in folds:
        lines.append(
            f"| {f['fold']} | {f['selected_epoch']} | "
            + " | ".join(fmt(f["test"]["av"][k]) for k in keys)
            + " |"
        )
    av = summary["av"]
    lines.append("| mean ± std | | " + " | ".join(f"{fmt(av[k][0])} ± {fmt(av[k][1])}" for k in keys) + " |")
    lines += ["", "| evaluation | " + " | ".join(names[k] for k in keys) + " |", "|---|" + "---|" * len(keys)]
    for modality in results["modalities"]:
        row = summary[modality]
        lines.append(
            f"| {MODALITY_NAMES[modality]} | "
            + " | ".join(f"{fmt(row[k][0])} ± {fmt(row[k][1])}" for k in keys)
            + " |"
        )
    if "av_pooled" in summary:
        lines.append(
            "| audio-visual, pooled over folds | "
            + " | ".join(fmt(summary["av_pooled"][k]) for k in keys)
            + " |"
        )
    ref = summary["av_best_epoch_on_test"]
    lines.append(
        "| audio-visual, best epoch on TEST (papers' protocol, optimistic) | "
        + " | ".join(f"{fmt(ref[k][0])} ± {fmt(ref[k][1])}" for k in keys)
        + " |"
    )
    lines += [
        "",
        "Missing modality: the absent input is replaced by zeros after normalisation (the mean image / the "
        "mean fbank), the same trained model runs unchanged.",
    ]
    if results.get("speed"):
        s = results["speed"]
        lines += [
            "",
            f"Encoder inference: {s['clips_per_s']:.1f} clips/s on {s['device']} (batch {s['batch_size']}, {s['dtype']}).",
        ]
    if results.get("cache"):
        c = results["cache"]
        lines += [
            f"Feature cache: {c['samples']} samples encoded once in {c['seconds']:.1f} s "
            f"({c['samples'] / max(c['seconds'], 1e-9):.1f} samples/s), {c['bytes'] / 2**20:.1f} MiB."
        ]
    lines += ["", f"git commit: `{results['meta'].get('git_commit')}`", ""]
    return "\n".join(lines)


def write_results(run_dir: Path, results: dict) -> tuple[Path, Path]:
    """results.json (everything) and results.md (the tables)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = run_dir / "results.json", run_dir / "results.md"
    json_path.write_text(json.dumps(results, indent=2, default=float) + "\n")
    md_path.write_text(results_markdown(results))
    return json_path, md_path


# ---------------------------------------------------------------- while the run works


class Progress:
    """Progress of one piece of long work (a fold's epochs, the probes' feature caching). A tqdm bar
    when stdout is a terminal; otherwise plain lines, for SLURM logs: at the first and the last step,
    at every tenth of the total and at least every `every_s` seconds, each with the latest figures."""

    def __init__(self, label: str, total: int, unit: str, enabled: bool = True, every_s: float = 60.0):
        self.label, self.total, self.unit, self.enabled, self.every_s = (
            label,
            max(1, total),
            unit,
            enabled,
            every_s,
        )
        self.done, self.start = 0, time.perf_counter()
        self.last = self.start
        self.bar = None
        if enabled and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=label, unit=unit, file=sys.stdout, dynamic_ncols=True)

    def update(self, n: int = 1, **figures: float) -> None:
        if not self.enabled:
            return
        before, self.done = self.done, self.done + n
        if self.bar is not None:
            if figures:  # shown by the update's redraw
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in figures.items()}, refresh=False)
            self.bar.update(n)
            return
        now = time.perf_counter()
        tenth = 10 * self.done // self.total > 10 * before // self.total
        if before == 0 or self.done >= self.total or tenth or now - self.last >= self.every_s:
            self.last = now
            shown = "".join(f" {k} {v:.4g}" for k, v in figures.items())
            print(
                f"{self.label}: {self.unit} {self.done}/{self.total}{shown} [{now - self.start:.1f} s]",
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def start_wandb(w, run_dir: Path, resolved: dict, group: str):
    """The W&B run of a protocol run (`w`: the config's `wandb` section), started before the first fold."""
    import wandb

    return wandb.init(
        project=w.project,
        entity=w.entity,
        mode=w.mode,
        dir=str(run_dir),
        config=resolved,
        name=run_dir.name,
        group=group,
        tags=list(w.tags),
        job_type="finetune",
    )


class Monitor:
    """A run's live reporting, on rank 0 (`show=False` elsewhere makes every call a no-op).

    Each fold's epochs go to a `Progress` and, with a W&B run, to `run.log` as they finish: one W&B
    run per protocol run, keys `fold<k>/<figure>` plotted against `fold<k>/epoch`, so the folds of
    one run are separate curves. `finish` adds the summary, the figures and the results table."""

    def __init__(self, show: bool, wandb_run=None):
        self.show, self.wandb = show, wandb_run if show else None
        self.fold: int | None = None
        self.progress = Progress("", 1, "", enabled=False)

    def caching(self, what: str, total: int) -> Progress:
        return Progress(f"caching {what} features", total, "windows", enabled=self.show)

    def start_fold(
        self, fold: int, position: int, count: int, epochs: int, what: str, unit: str = "epoch"
    ) -> None:
        self.fold = fold
        self.progress = Progress(f"fold {fold} ({position}/{count}) {what}", epochs, unit, enabled=self.show)
        if self.wandb is not None:
            self.wandb.define_metric(f"fold{fold}/epoch")
            self.wandb.define_metric(f"fold{fold}/*", step_metric=f"fold{fold}/epoch")

    def epoch(self, epoch: int, figures: dict[str, float]) -> None:
        self.progress.update(1, **figures)
        if self.wandb is not None:
            prefix = f"fold{self.fold}/"
            self.wandb.log({prefix + "epoch": epoch, **{prefix + k: float(v) for k, v in figures.items()}})

    def end_fold(self) -> None:
        self.progress.close()

    def finish(self, results: dict | None, images: list[Path], failed: bool = False) -> None:
        """Summary figures, the PNGs and the results table (when the run got that far), then close."""
        if self.wandb is None:
            return
        import wandb

        run, self.wandb = self.wandb, None
        if results is not None:
            run.summary.update(flat_summary(results["summary"]))
            run.log(
                {_image_key(p): wandb.Image(str(p)) for p in images} | {"results": _table(wandb, results)}
            )
        run.finish(exit_code=1 if failed else 0)


def _table(wandb, results: dict):
    columns, rows = results_table(results)
    return wandb.Table(columns=columns, data=rows)


def _image_key(path: Path) -> str:
    """`confusion_av` for a run-level PNG, `fold<k>/confusion_<modality>` for a fold's."""
    return f"{path.parent.name}/{path.stem}" if path.parent.name.startswith("fold") else path.stem


def flat_summary(summary: dict) -> dict[str, float]:
    """`summarise`'s (mean, std) pairs and pooled figures as flat W&B summary keys."""
    flat = {}
    for modality, metrics in summary.items():
        for key, value in metrics.items():
            if isinstance(value, (list, tuple)) and len(value) == 2 and not isinstance(value[0], list):
                flat[f"{modality}/{key}_mean"], flat[f"{modality}/{key}_std"] = value
            elif isinstance(value, float):
                flat[f"{modality}/{key}"] = value
    return flat


def results_table(results: dict) -> tuple[list[str], list[list]]:
    """results.md's table as (columns, rows): one row per fold and evaluation, then the mean and std
    over folds per evaluation."""
    keys = list(CLASSIFICATION_KEYS if results["task"] == "classification" else ("ccc", "pcc"))
    rows = [
        [str(f["fold"]), str(f["selected_epoch"]), m, *(float(f["test"][m][k]) for k in keys)]
        for f in results["folds"]
        for m in f["test"]
    ]
    for i, stat in enumerate(("mean", "std")):
        rows += [
            [stat, "", m, *(float(results["summary"][m][k][i]) for k in keys)] for m in results["modalities"]
        ]
    return ["fold", "epoch", "evaluation", *keys], rows
