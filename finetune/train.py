"""`emomae finetune <protocol.yaml> encoder=<export dir> fold=3|all head=linear|attentive|finetune ...`

Runs one or every fold of a protocol sequentially (a SLURM array runs one fold per task with
`fold=$SLURM_ARRAY_TASK_ID`) and writes one run directory:
`config.yaml` (resolved), `run.json` (git commit, argv, versions), `results.json`, `results.md`,
`confusion_av.png`, `recall_av.png`, per-fold `fold<k>/` (confusion PNG, Lightning CSV logs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import webdataset as wds
from omegaconf import OmegaConf
from pytorch_lightning.loggers import CSVLogger

from data_pipelines.augment import VideoAugConfig
from data_pipelines.features import FbankConfig
from data_pipelines.shards import shard_urls
from data_pipelines.stream import StreamConfig, eval_pipeline, pretrain_pipeline
from finetune.cache import FeatureCache, build_cache, fingerprint, load_cache, save_cache, speaker_normalized
from finetune.export import build_encoder, load_encoder, read_export_config, resolve_export_dir, weights_file
from finetune.heads import AttentiveProbe, FeatureFusionHead
from finetune.hicmae_import import load_head
from finetune.module import FinetuneModule, FullFinetuneModel, evaluate, predict
from finetune.probe import fold_indices, fold_result, train_probe
from finetune.protocols import FinetuneConfig, FoldSplit, fold_ids, fold_splits, read_clips, validate
from finetune.report import (
    encoder_speed,
    plot_confusion,
    plot_per_class_recall,
    run_metadata,
    summarise,
    write_results,
)
from pretrain.config import ConfigError, load_config, save_config
from pretrain.encoders import normalize_video


class PartFilter:
    """Sample filter (picklable, for loader workers): keep the windows of one part of a fold."""

    def __init__(self, split: FoldSplit, part: str, clip_meta: dict[str, dict]):
        self.split, self.part, self.clip_meta = split, part, clip_meta

    def __call__(self, meta: dict) -> bool:
        info = self.clip_meta.get(str(meta.get("clip_key")))
        if info is None:
            raise KeyError(f"clip {meta.get('clip_key')!r} is in the shards but not in protocol.manifest")
        return self.split.part(info) == self.part


def stream_config(spec: dict, arch: dict, batch_size: int, seed: int, recipe=None, epoch_length: int = 1) -> StreamConfig:
    """The encoder's input spec as a StreamConfig; training augmentation from the recipe."""
    fb = spec["fbank"]
    fbank = FbankConfig(sample_rate=int(spec["sample_rate"]), mel_bins=arch["mel_bins"], fbank_frames=arch["fbank_frames"],
                        mean=float(fb["mean"]), std=float(fb["std"]),
                        freq_mask=getattr(recipe, "freq_mask", 0), time_mask=getattr(recipe, "time_mask", 0))
    aug = VideoAugConfig(img_size=arch["img_size"])
    if recipe is not None and recipe.augment:
        aug = VideoAugConfig(img_size=arch["img_size"], crop_scale=tuple(recipe.crop_scale), hflip=recipe.hflip)
    return StreamConfig(batch_size=batch_size, num_frames=arch["num_frames"], img_size=arch["img_size"], fbank=fbank,
                        video_aug=aug, shuffle_buffer=256, epoch_length=max(1, epoch_length), seed=seed)


def scan_windows(urls: list[str]) -> list[str]:
    """clip_key of every window in the shards, reading only their json members."""
    clip_keys = []
    for sample in wds.tarfile_samples([{"url": u} for u in urls]):
        if "json" in sample:
            clip_keys.append(str(json.loads(sample["json"]).get("clip_key", sample["__key__"])))
    return clip_keys


def loader(stream, num_workers: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers)


class Run:
    """One `emomae finetune` invocation: shared state of all folds."""

    def __init__(self, cfg: FinetuneConfig, node, run_dir: Path):
        self.cfg, self.run_dir = cfg, run_dir
        p = cfg.protocol
        export_config = read_export_config(cfg.encoder)
        self.arch, self.spec = export_config["architecture"], export_config["input"]
        self.task = p.task
        self.classes, self.targets = list(p.classes), list(p.targets)
        self.num_outputs = len(self.classes) if self.task == "classification" else len(self.targets)
        self.urls = shard_urls(Path(p.shards))
        clips = read_clips(p.manifest)
        self.clip_meta = {c.key: {"speaker": c.speaker, "fold": c.fold} for c in clips}
        self.splits = fold_splits(clips, p.num_folds, p.val_fraction, cfg.seed)
        self.device = torch.device("cuda" if cfg.accelerator in ("auto", "gpu") and torch.cuda.is_available() else "cpu")
        self.recipe = cfg.recipes[cfg.head]
        self.modalities = list(dict.fromkeys(["av", *cfg.modalities]))
        self._check_shards()

    def _check_shards(self) -> None:
        index = json.loads((Path(self.cfg.protocol.shards) / "index.json").read_text())
        shard_cfg = index.get("config", {})
        for key in ("num_frames", "img_size"):
            if key in shard_cfg and int(shard_cfg[key]) != int(self.arch[key]):
                raise ConfigError(f"protocol.shards: {key}={shard_cfg[key]} in {self.cfg.protocol.shards}/index.json, "
                                  f"but the encoder was built for {key}={self.arch[key]}; write shards to match it")

    def encoder(self, drop_path: float = 0.0):
        """The exported encoder (or, with random_init, the same architecture freshly initialised)."""
        if self.cfg.random_init:
            torch.manual_seed(self.cfg.seed)
            encoder, _ = build_encoder({**self.arch, "drop_path": drop_path})
            return encoder
        encoder = load_encoder(self.cfg.encoder)
        if drop_path > 0:
            fresh, _ = build_encoder({**self.arch, "drop_path": drop_path})
            fresh.load_state_dict(encoder.state_dict())
            encoder = fresh
        return encoder

    def eval_stream(self, batch_size: int, sample_filter=None):
        scfg = stream_config(self.spec, self.arch, batch_size, self.cfg.seed)
        return eval_pipeline(self.urls, scfg, rank=0, world_size=1, sample_filter=sample_filter,
                             log_dir=str(self.run_dir / "corrupt"))

    # --- probes on cached features -------------------------------------------------------------

    def cache(self, kind: str) -> FeatureCache:
        cache_dir = Path(self.cfg.cache_dir) if self.cfg.cache_dir else self.run_dir / "cache"
        weights = weights_file(resolve_export_dir(self.cfg.encoder))
        stat = weights.stat()
        fp = fingerprint(self.arch, str(weights.resolve()), stat.st_size, stat.st_mtime_ns, self.cfg.random_init,
                         self.cfg.seed, (Path(self.cfg.protocol.shards) / "index.json").read_text(), kind,
                         self.modalities, self.task)
        path = cache_dir / f"features-{fp}"
        cached = load_cache(path)
        if cached is not None:
            return cached
        cache = build_cache(self.encoder(), loader(self.eval_stream(self.recipe.batch_size), self.cfg.num_workers),
                            self.modalities, kind, self.task, self.device)
        save_cache(cache, path)
        return cache

    def probe_fold(self, cache: FeatureCache, split: FoldSplit) -> dict:
        torch.manual_seed(self.cfg.seed + split.test_fold)
        width = self.arch["width"]
        if self.cfg.head == "linear":
            head = FeatureFusionHead(width, self.arch["depth"], self.arch["depth"], self.num_outputs)
        else:
            head = AttentiveProbe(width, self.num_outputs, num_heads=max(1, width // 64))
        index = fold_indices(cache, split, self.clip_meta)
        return train_probe(head, cache, index, self.recipe, self.task, self.classes, self.targets, self.modalities,
                           seed=self.cfg.seed + split.test_fold)

    # --- full fine-tuning ---------------------------------------------------------------------

    def finetune_fold(self, split: FoldSplit, window_clips: list[str]) -> dict:
        cfg, recipe = self.cfg, self.recipe
        pl.seed_everything(cfg.seed + split.test_fold, workers=True, verbose=False)
        parts = [split.part(self.clip_meta[c]) for c in window_clips]
        sizes = {p: parts.count(p) for p in ("train", "val", "test")}
        batch = min(recipe.batch_size, sizes["train"])
        steps = max(1, sizes["train"] // batch)
        train_cfg = stream_config(self.spec, self.arch, batch, cfg.seed + split.test_fold, recipe, epoch_length=steps)
        train_stream = pretrain_pipeline(self.urls, train_cfg, rank=0, world_size=1,
                                         sample_filter=PartFilter(split, "train", self.clip_meta),
                                         log_dir=str(self.run_dir / "corrupt"))
        evals = [loader(self.eval_stream(recipe.batch_size, PartFilter(split, part, self.clip_meta)), cfg.num_workers)
                 for part in ("val", "test")]
        encoder = self.encoder(recipe.drop_path)
        head = FeatureFusionHead(self.arch["width"], self.arch["depth"], self.arch["depth"], self.num_outputs)
        model = FullFinetuneModel(encoder, head)
        module = FinetuneModule(model, self.task, self.classes, self.targets, recipe,
                                peak_lr=recipe.blr * batch / 256, steps_per_epoch=steps, seed=cfg.seed + split.test_fold)
        fold_dir = self.run_dir / f"fold{split.test_fold}"
        trainer = pl.Trainer(
            max_epochs=recipe.epochs, accelerator=cfg.accelerator, devices=cfg.devices, precision=cfg.precision,
            logger=CSVLogger(str(fold_dir), name="", version=""), enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
            gradient_clip_val=recipe.grad_clip, callbacks=[StreamEpoch(train_stream)], log_every_n_steps=max(1, steps),
        )
        trainer.fit(module, train_dataloaders=loader(train_stream, cfg.num_workers), val_dataloaders=evals)
        model.load_state_dict(module.tracker.best_state)
        model.to(self.device).eval()
        test = {}
        for modality in self.modalities:
            scores, targets, keys = predict(model, evals[1], self.task, modality, self.device)
            test[modality] = evaluate(scores, targets, keys, self.task, self.classes, self.targets)
        return fold_result(module.tracker, test, sizes)

    def evaluate_fold(self, split: FoldSplit, window_clips: list[str]) -> dict:
        """`eval_only=true`: the encoder and its saved fine-tuned head on the fold's test speakers."""
        head = load_head(resolve_export_dir(self.cfg.encoder))
        if head.fc.out_features != self.num_outputs:
            raise ConfigError(f"eval_only: the head in {self.cfg.encoder} has {head.fc.out_features} outputs, the "
                              f"protocol {self.cfg.protocol.name} has {self.num_outputs} classes/targets")
        model = FullFinetuneModel(self.encoder(), head).to(self.device).eval()
        parts = [split.part(self.clip_meta[c]) for c in window_clips]
        test_stream = loader(self.eval_stream(self.recipe.batch_size, PartFilter(split, "test", self.clip_meta)),
                             self.cfg.num_workers)
        test = {}
        for modality in self.modalities:
            scores, targets, keys = predict(model, test_stream, self.task, modality, self.device)
            test[modality] = evaluate(scores, targets, keys, self.task, self.classes, self.targets)
        return {"selected_epoch": "imported", "val": {}, "test": test, "best_on_test": {**test["av"], "epoch": None},
                "windows": {"test": parts.count("test")}, "curve": []}

    # --- the whole run ------------------------------------------------------------------------

    def speed(self) -> dict:
        batch = next(iter(loader(self.eval_stream(self.recipe.batch_size), 0)))
        encoder = self.encoder().to(self.device)
        video = normalize_video(batch["video"].to(self.device))
        return encoder_speed(encoder, video, batch["fbank"].to(self.device).float(), repeats=self.cfg.speed_batches)

    def run(self) -> dict:
        cfg = self.cfg
        folds = fold_ids(cfg.fold, cfg.protocol.num_folds)
        results: dict = {"protocol": cfg.protocol.name, "head": cfg.head, "encoder": str(cfg.encoder),
                         "random_init": cfg.random_init, "task": self.task, "classes": self.classes,
                         "targets": self.targets, "modalities": self.modalities, "folds": []}
        if cfg.head in ("linear", "attentive"):
            cache = self.cache("pooled" if cfg.head == "linear" else "tokens")
            results["cache"] = {"samples": len(cache.keys), "seconds": cache.seconds, "bytes": cache.num_bytes,
                                "modes": self.modalities}
            if cfg.speaker_norm:
                cache = speaker_normalized(cache, [self.clip_meta[c]["speaker"] for c in cache.clip_keys])
            results["speaker_norm"] = cfg.speaker_norm
            for k in folds:
                results["folds"].append({"fold": k, **self.probe_fold(cache, self.splits[k])})
        else:
            windows = scan_windows(self.urls)
            run_fold = self.evaluate_fold if cfg.eval_only else self.finetune_fold
            results["eval_only"] = cfg.eval_only
            for k in folds:
                results["folds"].append({"fold": k, **run_fold(self.splits[k], windows)})
        results["speed"] = self.speed()
        results["summary"] = summarise(results["folds"], self.task)
        return results


class StreamEpoch(pl.Callback):
    """Tell the training stream which epoch it is, so each epoch gets new shuffles and augmentations."""

    def __init__(self, stream):
        self.stream = stream

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.stream.epoch = trainer.current_epoch


def figures(run_dir: Path, results: dict) -> list[Path]:
    """Confusion matrix and per-class recall PNGs (pooled over the run's folds, and per fold)."""
    if results["task"] != "classification":
        return []
    classes, paths = results["classes"], []
    pooled = results["summary"]["av_pooled"]
    paths.append(plot_confusion(pooled["confusion"], classes, run_dir / "confusion_av.png",
                                f"{results['protocol']} {results['head']}: audio-visual, all folds"))
    recall = np.diag(np.asarray(pooled["confusion"])) / np.maximum(np.asarray(pooled["confusion"]).sum(1), 1)
    paths.append(plot_per_class_recall(recall.tolist(), classes, run_dir / "recall_av.png",
                                       f"{results['protocol']} {results['head']}: per-class recall"))
    for f in results["folds"]:
        fold_dir = run_dir / f"fold{f['fold']}"
        fold_dir.mkdir(parents=True, exist_ok=True)
        for modality, metrics in f["test"].items():
            paths.append(plot_confusion(metrics["confusion"], classes, fold_dir / f"confusion_{modality}.png",
                                        f"fold {f['fold']}, {modality}"))
    return paths


def log_wandb(cfg: FinetuneConfig, run_dir: Path, results: dict, images: list[Path], resolved: dict) -> None:
    import wandb

    w = cfg.wandb
    run = wandb.init(project=w.project, entity=w.entity, mode=w.mode, dir=str(run_dir), config=resolved,
                     name=run_dir.name, tags=list(w.tags), job_type="finetune")
    for f in results["folds"]:
        for point in f["curve"]:
            run.log({f"fold{f['fold']}/{k}": v for k, v in point.items() if k != "epoch"} | {"epoch": point["epoch"]})
    flat = {}
    for modality, metrics in results["summary"].items():
        for key, value in metrics.items():
            if isinstance(value, (list, tuple)) and len(value) == 2 and not isinstance(value[0], list):
                flat[f"{modality}/{key}_mean"], flat[f"{modality}/{key}_std"] = value
            elif isinstance(value, float):
                flat[f"{modality}/{key}"] = value
    run.summary.update(flat)
    run.log({p.stem: wandb.Image(str(p)) for p in images if p.parent == run_dir})
    run.finish()


def finetune(cfg: FinetuneConfig, node=None, argv: list[str] | None = None) -> dict:
    """Run the protocol; returns the results dict (also written to the run directory)."""
    validate(cfg)
    name = cfg.run_name or f"{cfg.protocol.name}-{cfg.head}{'-random' if cfg.random_init else ''}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.out_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    node = node if node is not None else OmegaConf.structured(cfg)
    save_config(node, run_dir / "config.yaml")
    meta = run_metadata(argv)
    (run_dir / "run.json").write_text(json.dumps(meta, indent=2) + "\n")
    start = time.perf_counter()
    results = Run(cfg, node, run_dir).run()
    results["meta"] = {**meta, "seconds": time.perf_counter() - start, "run_dir": str(run_dir)}
    write_results(run_dir, results)
    images = figures(run_dir, results)
    if cfg.wandb.enabled:
        log_wandb(cfg, run_dir, results, images, OmegaConf.to_container(node, resolve=True))
    return results


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="emomae finetune", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="protocol YAML, e.g. configs/finetune/crema_d.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. encoder=exports/base fold=all head=linear")
    args = parser.parse_args(argv)
    try:
        node = load_config(FinetuneConfig, args.config, args.overrides)
        cfg = OmegaConf.to_object(node)
        results = finetune(cfg, node, ["emomae", "finetune", *argv])
    except ConfigError as err:
        print(f"emomae finetune: {err}", file=sys.stderr)
        return 2
    print((Path(results["meta"]["run_dir"]) / "results.md").read_text())
    return 0
