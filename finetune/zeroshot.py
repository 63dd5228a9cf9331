"""`emomae zeroshot <stage-2 checkpoint or export> <shards> [--prompts FILE]`: classify clips with no
training at all, by cosine similarity between a clip's projected AV embedding and the text embedding
of each class's prompts (averaged over a class's prompts, CLIP-style prompt ensembling).

Scores per alignment branch (video, audio, fused) and their mean (`ensemble`); windows of a clip are
averaged and UAR / WAR / macro-F1 reported as for the fine-tuning protocols.

Prompt files (YAML), e.g. configs/zeroshot/crema-d.yaml:
    classes: [ANG, DIS, ...]                 # label index order
    words: {ANG: angry, ...}                 # fills `{}` in templates (default: the class name)
    templates: ["a person who seems {}."]    # used for classes without explicit prompts
    prompts: {ANG: ["a furious face and a loud, tense voice"]}   # optional, per class
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from finetune.export import (
    TEXT_HEADS_FILE,
    ExportError,
    build_encoder,
    encoder_state,
    input_spec,
    load_encoder,
    load_weights,
    read_export_config,
    text_heads_state,
)
from finetune.metrics import average_clips, classification_metrics
from pretrain.encoders import normalize_video
from pretrain.text import FrozenTextEncoder, TextHeads, pool_branches

DEFAULT_TEMPLATES = (
    "a person who seems {}.",
    "the face and the voice of a {} person.",
    "Overall the person seems {}.",
)


# ---------------------------------------------------------------- the zero-shot model


def _heads_from_state(state: dict[str, torch.Tensor], text_dim: int, width: int, where: str) -> TextHeads:
    branches = sorted({k.split(".")[1] for k in state if k.startswith("proj.")})
    if not branches:
        raise ExportError(
            f"{where}: no text projection heads (text_heads.proj.*); is this a stage-2 (inject) model?"
        )
    heads = TextHeads(width, text_dim, branches=branches)
    heads.load_state_dict(state, strict=True)
    return heads.eval()


def load_zeroshot_model(source: str | Path) -> tuple[torch.nn.Module, TextHeads, dict]:
    """A stage-2 Lightning checkpoint or an export folder -> (AVEncoder, TextHeads, info), where info
    holds `text_encoder`, `architecture` and the `input` spec. Checkpoints load with weights_only."""
    source = Path(source)
    if source.is_dir():
        encoder = load_encoder(source)
        config = read_export_config(source)  # also reads exports that name the branches `paths`
        text = config.get("text")
        heads_file = source / TEXT_HEADS_FILE
        if not isinstance(text, dict) or not heads_file.is_file():
            raise ExportError(
                f"{source}: no {TEXT_HEADS_FILE} / config.json 'text' entry: export a stage-2 "
                "(stage: inject) checkpoint to get the text heads zero-shot needs"
            )
        arch = config["architecture"]
        heads = _heads_from_state(
            load_file(str(heads_file)), int(text["dim"]), int(arch["width"]), str(heads_file)
        )
        recorded = text.get("branches")
        if recorded is not None and sorted(recorded) != sorted(heads.proj):
            raise ExportError(
                f"{source}: {TEXT_HEADS_FILE} holds heads for {sorted(heads.proj)}, but config.json's "
                f"text entry names the branches {sorted(recorded)}"
            )
        return (
            encoder,
            heads,
            {"text_encoder": text["encoder"], "architecture": arch, "input": config["input"]},
        )
    if not source.is_file():
        raise ExportError(f"zero-shot model not found: {source} (a stage-2 .ckpt or an export folder)")
    ckpt = torch.load(source, map_location="cpu", weights_only=True)
    meta = ckpt.get("emomae") if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict) or "model" not in meta:
        raise ExportError(f"{source}: not an emomae checkpoint (no checkpoint['emomae']['model'])")
    run_config = meta.get("config") or {}
    if run_config.get("stage") != "inject":
        raise ExportError(
            f"{source}: a stage-1 checkpoint (stage={run_config.get('stage', 'mae')!r}) has no text heads; "
            "zero-shot needs a stage-2 run (configs/pretrain/inject_*.yaml)"
        )
    encoder, _ = build_encoder(meta["model"], where=f"{source} (checkpoint['emomae']['model'])")
    load_weights(encoder, encoder_state(ckpt["state_dict"], str(source)), str(source))
    state = text_heads_state(ckpt["state_dict"])
    dim = next(v for k, v in state.items() if k.endswith(".weight")).shape[0]
    heads = _heads_from_state(state, dim, int(meta["model"]["width"]), str(source))
    info = {
        "text_encoder": run_config["inject"]["text_encoder"],
        "architecture": meta["model"],
        "input": input_spec(run_config, meta["model"]),
    }
    return encoder.eval(), heads, info


# ---------------------------------------------------------------- prompts


def class_prompts(
    prompt_file: str | Path | None, classes: list[str] | None = None, templates: list[str] | None = None
) -> dict[str, list[str]]:
    """class name -> prompts, in label index order, from a prompt YAML and/or class names + templates."""
    spec: dict = {}
    if prompt_file is not None:
        path = Path(prompt_file)
        if not path.is_file():
            raise ValueError(f"prompt file not found: {path}")
        spec = OmegaConf.to_container(OmegaConf.load(path), resolve=True) or {}
        unknown = sorted(set(spec) - {"classes", "words", "templates", "prompts"})
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; expected classes, words, templates, prompts")
    names = list(classes or spec.get("classes") or [])
    if not names:
        raise ValueError(
            "no classes: give --classes or a prompt file with `classes: [...]` in label index order"
        )
    words, explicit = spec.get("words") or {}, spec.get("prompts") or {}
    templates = list(templates or spec.get("templates") or DEFAULT_TEMPLATES)
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"templates must contain '{{}}' for the class word, got {bad}")
    out = {}
    for name in names:
        given = explicit.get(name)
        out[name] = [given] if isinstance(given, str) else list(given or [])
        if not out[name]:
            out[name] = [t.format(words.get(name, name)) for t in templates]
    return out


def prompt_classifier(text: FrozenTextEncoder, prompts: dict[str, list[str]]) -> torch.Tensor:
    """(C, D) unit vectors: mean of each class's normalised prompt embeddings, renormalised."""
    rows = [torch.nn.functional.normalize(text.encode(p), dim=-1).mean(0) for p in prompts.values()]
    return torch.nn.functional.normalize(torch.stack(rows), dim=-1)


# ---------------------------------------------------------------- scoring


@torch.inference_mode()
def zeroshot_scores(
    encoder: torch.nn.Module,
    heads: TextHeads,
    classifier: torch.Tensor,
    batches,
    device: str | torch.device = "cpu",
) -> dict:
    """Softmax class probabilities per branch for every window of an evaluation stream.

    -> {"keys", "clip_keys", "labels": (N,), "probs": {branch: (N, C)}} (branches + "ensemble")."""
    encoder.eval().to(device)
    heads.eval().to(device)
    classifier = classifier.to(device)
    scale = heads.scale()
    keys, clip_keys, labels, probs = [], [], [], {}
    for batch in batches:
        out = encoder.forward_features(
            normalize_video(batch["video"].to(device)), batch["fbank"].to(device).float()
        )
        embedded = heads(
            pool_branches(out.video_layers[-1], out.audio_layers[-1], out.fused_video, out.fused_audio)
        )
        for branch, z in embedded.items():
            probs.setdefault(branch, []).append((scale * z @ classifier.T).softmax(-1).float().cpu())
        keys += list(batch["key"])
        clip_keys += list(batch["clip_key"])
        labels.append(batch["label"].cpu())
    if not keys:
        raise RuntimeError("the evaluation stream gave no samples")
    stacked = {p: torch.cat(v).numpy() for p, v in probs.items()}
    stacked["ensemble"] = np.mean(list(stacked.values()), axis=0)
    return {"keys": keys, "clip_keys": clip_keys, "labels": torch.cat(labels).numpy(), "probs": stacked}


def zeroshot_metrics(scores: dict, num_classes: int) -> dict[str, dict]:
    """Clip-level (window-averaged) UAR / WAR / macro-F1 per branch; unlabelled windows are ignored."""
    labelled = scores["labels"] >= 0
    if not labelled.any():
        raise ValueError("no labelled samples in the shards: zero-shot accuracy needs labels")
    clip_keys = [k for k, keep in zip(scores["clip_keys"], labelled) if keep]
    out = {}
    for branch, probs in scores["probs"].items():
        _, clip_probs, clip_labels = average_clips(clip_keys, probs[labelled], scores["labels"][labelled])
        out[branch] = classification_metrics(clip_probs, clip_labels, num_classes)
    return out


def run_zeroshot(
    model: str | Path,
    shards: str,
    prompts: dict[str, list[str]],
    groups: list[str] | None = None,
    batch_size: int = 32,
    num_workers: int = 2,
    device: str = "cpu",
    text_cache: str | None = None,
) -> dict:
    """Load the model, embed the prompts, score every window of `shards` once and return the metrics."""
    from data_pipelines.datamodule import resolve_shards
    from data_pipelines.stream import eval_pipeline
    from finetune.streams import loader, stream_config

    encoder, heads, info = load_zeroshot_model(model)
    text = FrozenTextEncoder(info["text_encoder"], cache_dir=text_cache)
    classifier = prompt_classifier(text, prompts)
    if classifier.shape[1] != heads.text_dim:
        raise ValueError(
            f"text encoder {info['text_encoder']!r} gives {classifier.shape[1]}-d embeddings, the heads "
            f"expect {heads.text_dim}"
        )
    stream = eval_pipeline(
        resolve_shards(shards, groups),
        stream_config(info["input"], info["architecture"], batch_size, 0),
        rank=0,
        world_size=1,
    )
    scores = zeroshot_scores(encoder, heads, classifier, loader(stream, num_workers), device)
    text.flush()
    metrics = zeroshot_metrics(scores, len(prompts))
    return {
        "model": str(model),
        "shards": shards,
        "text_encoder": info["text_encoder"],
        "classes": list(prompts),
        "prompts": prompts,
        "num_windows": len(scores["keys"]),
        "chance_uar": 1.0 / len(prompts),
        "metrics": metrics,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="emomae zeroshot", description=__doc__.splitlines()[0])
    p.add_argument(
        "model", help="stage-2 Lightning checkpoint (.ckpt) or export folder with text_heads.safetensors"
    )
    p.add_argument("shards", help="shard directory (index.json) or .tar pattern")
    p.add_argument("--prompts", default=None, help="prompt YAML (classes, words, templates, prompts)")
    p.add_argument(
        "--classes", nargs="+", default=None, help="class names in label index order (overrides the file)"
    )
    p.add_argument("--template", action="append", default=None, help="prompt template with {} (repeatable)")
    p.add_argument("--groups", nargs="+", default=None, help="shard groups to evaluate (default: all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    try:
        prompts = class_prompts(args.prompts, args.classes, args.template)
        result = run_zeroshot(
            args.model, args.shards, prompts, args.groups, args.batch_size, args.workers, args.device
        )
    except (ExportError, ValueError) as err:
        print(f"emomae zeroshot: {err}", file=sys.stderr)
        return 2
    print(
        f"zero-shot on {result['num_windows']} windows, {len(prompts)} classes (chance UAR {result['chance_uar']:.3f})"
    )
    print(f"{'branch':<10} {'UAR':>7} {'WAR':>7} {'F1':>7}")
    for branch, m in result["metrics"].items():
        print(f"{branch:<10} {m['uar']:7.4f} {m['war']:7.4f} {m['macro_f1']:7.4f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0
