"""`emomae finetune <protocol.yaml> encoder=<export dir> fold=3|all head=linear|attentive|finetune ...`

Runs one or every fold of a protocol sequentially (a SLURM array runs one fold per task with
`fold=$SLURM_ARRAY_TASK_ID`) and writes one run directory:
`config.yaml` (resolved), `run.json` (git commit, argv, versions), `results.json`, `results.md`,
`confusion_av.png`, `recall_av.png`, per-fold `fold<k>/` (confusion PNG, Lightning CSV logs).

With `devices` x `num_nodes` > 1 (torchrun, srun, or a plain command that starts its own processes)
every process runs the whole protocol: each trains on its share of every global batch and scores its
share of every evaluation, exactly once over ranks x loader workers; the scores are gathered before
any metric, and rank 0 alone reports (progress, W&B, the run directory). docs/finetune.md, section 7.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.strategies import DDPStrategy

from data_pipelines.exact_once import shard_sizes
from data_pipelines.shards import shard_urls
from data_pipelines.stream import EvalStream, eval_pipeline
from emomae.config import ConfigError, load_config, save_config
from finetune.cache import (
    FeatureCache,
    build_cache,
    fingerprint,
    join_caches,
    load_cache,
    save_cache,
    speaker_normalized,
)
from finetune.distributed import all_ranks, from_rank0, process_group
from finetune.export import build_encoder, load_encoder, read_export_config, resolve_export_dir, weights_file
from finetune.full_model import FullFinetuneModel, predict
from finetune.heads import AttentiveProbe, FeatureFusionHead
from finetune.hicmae_import import load_head
from finetune.metrics import evaluate
from finetune.module import FinetuneModule
from finetune.probe import fold_indices, fold_result, train_probe
from finetune.protocols import FinetuneConfig, FoldSplit, fold_ids, fold_splits, read_clips, validate
from finetune.report import (
    Monitor,
    encoder_speed,
    figures,
    run_metadata,
    start_wandb,
    summarise,
    write_results,
)
from finetune.selection import selection_metric
from finetune.streams import (
    FoldTrainStream,
    PartEvalStream,
    PartFilter,
    StreamEpoch,
    loader,
    scan_windows,
    stream_config,
)
from pretrain.encoders import normalize_video


def launch(cfg: FinetuneConfig) -> torch.device | None:
    """With `devices` x `num_nodes` > 1: join the run's processes (started by torchrun or srun) or start
    them (a plain command relaunches itself once per device, as Lightning does), and open their
    process group. Returns this process's device, or None for a single-process run."""
    if cfg.devices * cfg.num_nodes == 1:
        return None
    from lightning_fabric import Fabric

    fabric = Fabric(accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes, strategy="ddp")
    fabric.launch()  # a no-op when the process group is up already (another run in the same processes)
    return fabric.device


class Run:
    """One `emomae finetune` invocation: shared state of all folds."""

    def __init__(
        self,
        cfg: FinetuneConfig,
        node,
        run_dir: Path,
        device: torch.device | None = None,
        monitor: Monitor | None = None,
    ):
        self.cfg, self.run_dir = cfg, run_dir
        self.rank, self.world_size = process_group()
        self.monitor = monitor or Monitor(show=False)
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
        self.device = device or torch.device(
            "cuda" if cfg.accelerator in ("auto", "gpu") and torch.cuda.is_available() else "cpu"
        )
        self.recipe = cfg.recipes[cfg.head]
        self.modalities = list(dict.fromkeys(["av", *cfg.modalities]))
        self._check_shards()

    def _check_shards(self) -> None:
        index = json.loads((Path(self.cfg.protocol.shards) / "index.json").read_text())
        shard_cfg = index.get("config", {})
        for key in ("num_frames", "img_size"):
            if key in shard_cfg and int(shard_cfg[key]) != int(self.arch[key]):
                raise ConfigError(
                    f"protocol.shards: {key}={shard_cfg[key]} in {self.cfg.protocol.shards}/index.json, "
                    f"but the encoder was built for {key}={self.arch[key]}; write shards to match it"
                )

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

    def eval_stream(self, batch_size: int) -> EvalStream:
        """Every window of the shards once over ranks x workers (the probes' cache, the speed batch)."""
        scfg = stream_config(self.spec, self.arch, batch_size, self.cfg.seed)
        return eval_pipeline(
            self.urls, scfg, rank=self.rank, world_size=self.world_size, log_dir=str(self.run_dir / "corrupt")
        )

    def part_stream(self, batch_size: int, split: FoldSplit, part: str, windows: list[tuple[str, int, str]]):
        """The `part` windows of a fold, once over ranks x workers, as a loader."""
        addresses = [(url, index) for url, index, clip in windows if split.part(self.clip_meta[clip]) == part]
        scfg = stream_config(self.spec, self.arch, batch_size, self.cfg.seed)
        stream = PartEvalStream(
            self.urls,
            scfg,
            addresses,
            rank=self.rank,
            world_size=self.world_size,
            sample_filter=PartFilter(split, part, self.clip_meta),
            log_dir=str(self.run_dir / "corrupt"),
        )
        return loader(stream, self.cfg.num_workers)

    def rank_share(self, total: int) -> int:
        """Windows of `total` this rank's loader workers read in an exact-once split."""
        slots, k = self.world_size * max(1, self.cfg.num_workers), max(1, self.cfg.num_workers)
        return ((self.rank + 1) * k * total) // slots - (self.rank * k * total) // slots

    # --- probes on cached features -------------------------------------------------------------

    def cache(self, kind: str) -> FeatureCache:
        cache_dir = Path(self.cfg.cache_dir) if self.cfg.cache_dir else self.run_dir / "cache"
        weights = weights_file(resolve_export_dir(self.cfg.encoder))
        stat = weights.stat()
        fp = fingerprint(
            self.arch,
            str(weights.resolve()),
            stat.st_size,
            stat.st_mtime_ns,
            self.cfg.random_init,
            # the seed draws a random encoder's weights; a trained one's features do not depend on it,
            # so probes of several seeds share them
            self.cfg.seed if self.cfg.random_init else None,
            (Path(self.cfg.protocol.shards) / "index.json").read_text(),
            kind,
            self.modalities,
            self.task,
        )
        path = cache_dir / f"features-{fp}"
        # rank 0 reads a finished cache and hands it round: the others need not see its filesystem
        cached = from_rank0(load_cache(path) if self.rank == 0 else None)
        if cached is not None:
            return cached
        total = sum(shard_sizes(self.urls) or [0])
        progress = self.monitor.caching(kind, self.rank_share(total))
        part = build_cache(
            self.encoder(),
            loader(self.eval_stream(self.recipe.batch_size), self.cfg.num_workers),
            self.modalities,
            kind,
            self.task,
            self.device,
            progress=progress.update,
        )
        progress.close()
        cache = join_caches(all_ranks([part]))
        if self.rank == 0:
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
        return train_probe(
            head,
            cache,
            index,
            self.recipe,
            self.task,
            self.classes,
            self.targets,
            self.modalities,
            seed=self.cfg.seed + split.test_fold,
            on_epoch=self.monitor.epoch,
        )

    # --- full fine-tuning ---------------------------------------------------------------------

    def train_stream(
        self, split: FoldSplit, windows: list[tuple[str, int, str]]
    ) -> tuple[FoldTrainStream, int, int]:
        """This rank's training stream of a fold, the global batch and the steps per epoch. The recipe's
        batch (at most the fold's training windows) is the global one, split evenly over the ranks."""
        world = self.world_size
        train = sum(split.part(self.clip_meta[clip]) == "train" for _, _, clip in windows)
        batch = min(self.recipe.batch_size, train) // world * world
        if batch == 0:
            raise ConfigError(
                f"fold {split.test_fold}: {train} training windows cannot fill a batch on each of "
                f"{world} processes"
            )
        steps = max(1, train // batch)
        scfg = stream_config(
            self.spec,
            self.arch,
            batch // world,
            self.cfg.seed + split.test_fold,
            self.recipe,
            epoch_length=steps,
        )
        stream = FoldTrainStream(
            self.urls,
            scfg,
            rank=self.rank,
            world_size=world,
            sample_filter=PartFilter(split, "train", self.clip_meta),
            log_dir=str(self.run_dir / "corrupt"),
        )
        return stream, batch, steps

    def finetune_fold(self, split: FoldSplit, windows: list[tuple[str, int, str]]) -> dict:
        cfg, recipe = self.cfg, self.recipe
        pl.seed_everything(cfg.seed + split.test_fold, workers=True, verbose=False)
        parts = [split.part(self.clip_meta[clip]) for _, _, clip in windows]
        sizes = {p: parts.count(p) for p in ("train", "val", "test")}
        train_stream, batch, steps = self.train_stream(split, windows)
        evals = [self.part_stream(recipe.batch_size, split, part, windows) for part in ("val", "test")]
        encoder = self.encoder(recipe.drop_path)
        head = FeatureFusionHead(self.arch["width"], self.arch["depth"], self.arch["depth"], self.num_outputs)
        model = FullFinetuneModel(encoder, head)
        module = FinetuneModule(
            model,
            self.task,
            self.classes,
            self.targets,
            recipe,
            peak_lr=recipe.blr * batch / 256,
            steps_per_epoch=steps,
            seed=cfg.seed + split.test_fold,
        )
        fold_dir = self.run_dir / f"fold{split.test_fold}"
        # no buffer sync in forward: the buffers are fixed (positional tables), and a collective in every
        # forward would hang the evaluation, where ranks can score different numbers of batches
        strategy = DDPStrategy(forward_sync_buffers=False) if self.world_size > 1 else "auto"
        trainer = pl.Trainer(
            max_epochs=recipe.epochs,
            accelerator=cfg.accelerator,
            devices=cfg.devices,
            num_nodes=cfg.num_nodes,
            strategy=strategy,
            precision=cfg.precision,
            use_distributed_sampler=False,
            logger=CSVLogger(str(fold_dir), name="", version=""),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            gradient_clip_val=recipe.grad_clip,
            log_every_n_steps=max(1, steps),
            callbacks=[StreamEpoch(train_stream), EpochMonitor(self.monitor)],
        )
        trainer.fit(module, train_dataloaders=loader(train_stream, cfg.num_workers), val_dataloaders=evals)
        model.load_state_dict(module.tracker.best_state)
        model.to(self.device).eval()
        test = {}
        for modality in self.modalities:
            scores, targets, keys = predict(model, evals[1], self.task, modality, self.device)
            test[modality] = evaluate(scores, targets, keys, self.task, self.classes, self.targets)
        return fold_result(module.tracker, test, sizes)

    def evaluate_fold(self, split: FoldSplit, windows: list[tuple[str, int, str]]) -> dict:
        """`eval_only=true`: the encoder and its saved fine-tuned head on the fold's test speakers."""
        head = load_head(resolve_export_dir(self.cfg.encoder))
        if head.fc.out_features != self.num_outputs:
            raise ConfigError(
                f"eval_only: the head in {self.cfg.encoder} has {head.fc.out_features} outputs, the "
                f"protocol {self.cfg.protocol.name} has {self.num_outputs} classes/targets"
            )
        model = FullFinetuneModel(self.encoder(), head).to(self.device).eval()
        parts = [split.part(self.clip_meta[clip]) for _, _, clip in windows]
        test_stream = self.part_stream(self.recipe.batch_size, split, "test", windows)
        test, metric = {}, selection_metric(self.task)
        for modality in self.modalities:
            scores, targets, keys = predict(model, test_stream, self.task, modality, self.device)
            test[modality] = evaluate(scores, targets, keys, self.task, self.classes, self.targets)
            self.monitor.epoch(len(test) - 1, {f"{modality}/test_{metric}": test[modality][metric]})
        return {
            "selected_epoch": "imported",
            "val": {},
            "test": test,
            "best_on_test": {**test["av"], "epoch": None},
            "windows": {"test": parts.count("test")},
            "curve": [],
        }

    # --- the whole run ------------------------------------------------------------------------

    def speed(self) -> dict:
        batch = next(iter(loader(self.eval_stream(self.recipe.batch_size), 0)))  # this rank's first batch
        encoder = self.encoder().to(self.device)
        video = normalize_video(batch["video"].to(self.device))
        return encoder_speed(
            encoder, video, batch["fbank"].to(self.device).float(), repeats=self.cfg.speed_batches
        )

    def run(self) -> dict:
        cfg = self.cfg
        folds = fold_ids(cfg.fold, cfg.protocol.num_folds)
        results: dict = {
            "protocol": cfg.protocol.name,
            "head": cfg.head,
            "encoder": str(cfg.encoder),
            "random_init": cfg.random_init,
            "task": self.task,
            "classes": self.classes,
            "targets": self.targets,
            "modalities": self.modalities,
            "folds": [],
        }
        if cfg.head in ("linear", "attentive"):
            cache = self.cache("pooled" if cfg.head == "linear" else "tokens")
            results["cache"] = {
                "samples": len(cache.keys),
                "seconds": cache.seconds,
                "bytes": cache.num_bytes,
                "modes": self.modalities,
            }
            if cfg.speaker_norm:
                cache = speaker_normalized(cache, [self.clip_meta[c]["speaker"] for c in cache.clip_keys])
            results["speaker_norm"] = cfg.speaker_norm
            epochs = self.recipe.epochs * (2 if self.recipe.refit else 1)
            for i, k in enumerate(folds):
                self.monitor.start_fold(k, i + 1, len(folds), epochs, f"{cfg.head} probe")
                results["folds"].append({"fold": k, **self.probe_fold(cache, self.splits[k])})
                self.monitor.end_fold()
        else:
            windows = from_rank0(scan_windows(self.urls) if self.rank == 0 else None)
            run_fold = self.evaluate_fold if cfg.eval_only else self.finetune_fold
            results["eval_only"] = cfg.eval_only
            for i, k in enumerate(folds):
                if cfg.eval_only:
                    self.monitor.start_fold(
                        k, i + 1, len(folds), len(self.modalities), "evaluation", unit="modality"
                    )
                else:
                    self.monitor.start_fold(k, i + 1, len(folds), self.recipe.epochs, "fine-tuning")
                results["folds"].append({"fold": k, **run_fold(self.splits[k], windows)})
                self.monitor.end_fold()
        results["speed"] = self.speed() if self.rank == 0 else {}
        results["summary"] = summarise(results["folds"], self.task)
        return results


class EpochMonitor(pl.Callback):
    """Each epoch's figures to the run's `Monitor` (progress, W&B) once its validation is done:
    the mean training loss (this rank's batches) and the validation and test selection metric."""

    def __init__(self, monitor: Monitor):
        self.monitor = monitor
        self.loss, self.steps = torch.zeros(()), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.loss = self.loss + outputs["loss"].detach().float().cpu()
        self.steps += 1

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # after this epoch's validation
        last, metric = pl_module.tracker.history[-1], pl_module.tracker.metric
        figures = {
            "train_loss": float(self.loss) / max(1, self.steps),
            f"val_{metric}": last["val"][metric],
            f"test_{metric}": last["test"][metric],
        }
        self.loss, self.steps = torch.zeros(()), 0
        self.monitor.epoch(trainer.current_epoch, figures)


def finetune(cfg: FinetuneConfig, node=None, argv: list[str] | None = None) -> dict:
    """Run the protocol; returns the results dict (also written to the run directory by rank 0)."""
    validate(cfg)
    device = launch(cfg)
    rank = process_group()[0]
    name = (
        cfg.run_name
        or f"{cfg.protocol.name}-{cfg.head}{'-random' if cfg.random_init else ''}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    run_dir = Path(cfg.out_dir) / from_rank0(name)  # the ranks' clocks may tick apart
    run_dir.mkdir(parents=True, exist_ok=True)
    node = node if node is not None else OmegaConf.structured(cfg)
    meta = run_metadata(argv)
    resolved = OmegaConf.to_container(node, resolve=True)
    wandb_run = None
    if rank == 0:
        save_config(node, run_dir / "config.yaml")
        (run_dir / "run.json").write_text(json.dumps(meta, indent=2) + "\n")
        if cfg.wandb.enabled:
            wandb_run = start_wandb(
                cfg.wandb, run_dir, resolved, cfg.wandb.group or f"{cfg.protocol.name}-{cfg.head}"
            )
    monitor = Monitor(show=rank == 0, wandb_run=wandb_run)
    start = time.perf_counter()
    try:
        results = Run(cfg, node, run_dir, device, monitor).run()
        results["meta"] = {**meta, "seconds": time.perf_counter() - start, "run_dir": str(run_dir)}
        if rank == 0:
            write_results(run_dir, results)
            monitor.finish(results, figures(run_dir, results))
    except BaseException:
        monitor.finish(None, [], failed=True)  # the curves so far stay in W&B, marked failed
        raise
    return results


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="emomae finetune", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="protocol YAML, e.g. configs/finetune/crema_d.yaml")
    parser.add_argument(
        "overrides", nargs="*", help="key=value, e.g. encoder=exports/base fold=all head=linear"
    )
    args = parser.parse_args(argv)
    try:
        node = load_config(FinetuneConfig, args.config, args.overrides)
        cfg = OmegaConf.to_object(node)
        results = finetune(cfg, node, ["emomae", "finetune", *argv])
    except ConfigError as err:
        print(f"emomae finetune: {err}", file=sys.stderr)
        return 2
    if process_group()[0] == 0:
        print((Path(results["meta"]["run_dir"]) / "results.md").read_text())
    return 0
