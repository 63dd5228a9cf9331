"""Run reports: results.json + results.md (paper-table ready), confusion-matrix and per-class recall
PNGs, encoder inference speed, and the provenance every run directory carries (resolved config,
git commit, versions)."""

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
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
        if sha.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10)
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
def encoder_speed(encoder: torch.nn.Module, video: torch.Tensor, fbank: torch.Tensor, repeats: int = 3) -> dict:
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
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center",
                    color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
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
        summary["av_pooled"] = {"uar": uar(cm), "war": war(cm), "macro_f1": macro_f1(cm), "confusion": cm.tolist()}
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
        + ("The imported fine-tuned model evaluated as it is (no training, no epoch selection)."
           if results.get("eval_only") else "Epoch selected on a validation split of the training speakers (honest selection).")
        + (" Features z-scored per speaker, test speakers' unlabelled features included (speaker_norm)."
           if results.get("speaker_norm") else ""),
        "",
        "| fold | epoch | " + " | ".join(names[k] for k in keys) + " |",
        "|---|---|" + "---|" * len(keys),
    ]
    for f in folds:
        lines.append(f"| {f['fold']} | {f['selected_epoch']} | " + " | ".join(fmt(f["test"]["av"][k]) for k in keys) + " |")
    av = summary["av"]
    lines.append("| mean ± std | | " + " | ".join(f"{fmt(av[k][0])} ± {fmt(av[k][1])}" for k in keys) + " |")
    lines += ["", "| evaluation | " + " | ".join(names[k] for k in keys) + " |", "|---|" + "---|" * len(keys)]
    for modality in results["modalities"]:
        row = summary[modality]
        lines.append(f"| {MODALITY_NAMES[modality]} | " + " | ".join(f"{fmt(row[k][0])} ± {fmt(row[k][1])}" for k in keys) + " |")
    if "av_pooled" in summary:
        lines.append("| audio-visual, pooled over folds | " + " | ".join(fmt(summary["av_pooled"][k]) for k in keys) + " |")
    ref = summary["av_best_epoch_on_test"]
    lines.append("| audio-visual, best epoch on TEST (papers' protocol, optimistic) | "
                 + " | ".join(f"{fmt(ref[k][0])} ± {fmt(ref[k][1])}" for k in keys) + " |")
    lines += [
        "",
        "Missing modality: the absent input is replaced by zeros after normalisation (the mean image / the "
        "mean fbank), the same trained model runs unchanged.",
    ]
    if results.get("speed"):
        s = results["speed"]
        lines += ["", f"Encoder inference: {s['clips_per_s']:.1f} clips/s on {s['device']} (batch {s['batch_size']}, {s['dtype']})."]
    if results.get("cache"):
        c = results["cache"]
        lines += [f"Feature cache: {c['samples']} samples encoded once in {c['seconds']:.1f} s "
                  f"({c['samples'] / max(c['seconds'], 1e-9):.1f} samples/s), {c['bytes'] / 2**20:.1f} MiB."]
    lines += ["", f"git commit: `{results['meta'].get('git_commit')}`", ""]
    return "\n".join(lines)


def write_results(run_dir: Path, results: dict) -> tuple[Path, Path]:
    """results.json (everything) and results.md (the tables)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = run_dir / "results.json", run_dir / "results.md"
    json_path.write_text(json.dumps(results, indent=2, default=float) + "\n")
    md_path.write_text(results_markdown(results))
    return json_path, md_path
