"""`emomae pretrain <config.yaml> key=value ...`: the run config schema, the Trainer built from it,
checkpoints and resume, and the end-of-run summary.

The run directory holds everything a run produced:
`config.yaml` (fully resolved), `checkpoints/{last,step*}.ckpt`, `images/step*.png`, `csv/`, `tb/`,
`wandb/`, `summary.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from data_pipelines.datamodule import DataConfig
from data_pipelines.stream import PipeUrlError, check_pipe_urls, pipe_commands
from emomae.config import ConfigError, load_config, save_config
from pretrain.encoders import ModelConfig
from pretrain.inject_config import InjectConfig
from pretrain.mae import ObjectiveConfig
from pretrain.optim import OptimConfig, scaled_lr

STRATEGIES = ("auto", "ddp", "deepspeed_stage_2", "deepspeed_stage_3")
LOGGERS = ("csv", "tensorboard", "wandb")
SIGTERM_EXIT = 128 + 15  # what a shell reports for a job ended by SIGTERM


@dataclass
class TrainerConfig:
    accelerator: str = "auto"  # auto | cpu | gpu
    devices: Any = "auto"  # int, list of ids or "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | deepspeed_stage_2 | deepspeed_stage_3
    deepspeed_config: str | None = None  # ZeRO YAML; default configs/deepspeed/zero{2,3}.yaml
    precision: str = "auto"  # auto = bf16-mixed on a bf16-capable GPU, 32-true elsewhere
    compile: bool = False  # torch.compile the model (GPU; slow to start, faster steps)
    max_steps: int = 1000
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 10
    ckpt_every_n_steps: int = 500
    ckpt_keep: int = 3  # step checkpoints kept besides last.ckpt; -1 keeps all
    find_unused_parameters: bool = False
    deterministic: bool = False
    progress_bar: bool = True


@dataclass
class LoggingConfig:
    logger: Any = "csv"  # csv | tensorboard | wandb, or a list of them
    project: str = "emomae"
    entity: str | None = None
    run_name: str | None = None  # default: the run directory's name
    tags: list[str] = field(default_factory=list)
    image_every_n_steps: int = 500  # reconstruction PNG; 0 = never
    image_samples: int = 2


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run_dir: str = "runs/pretrain"
    seed: int = 0
    stage: str = (
        "mae"  # mae (stage 1) | inject (stage 2: caption alignment, pretrain/inject.py, docs/vaemo.md)
    )
    # weights to start from (weights only; resume= restores a whole run): a .ckpt of `emomae pretrain`
    # (stage 2 starts from stage 1) or a folder of `emomae import-hicmae` (HiCMAE's pretrained model)
    init: str | None = None
    inject: InjectConfig = field(default_factory=InjectConfig)
    resume: str = "auto"  # auto (run_dir/checkpoints/last.ckpt if present) | never | <checkpoint path>
    # How the training shards were cut (frames, frame stride, image size, audio rate), read from their
    # index.json / provenance.json when the run starts and kept in config.yaml and every checkpoint, so
    # `emomae export` can write the frame rate clips must be sampled at. Set it only for shards that
    # have neither file (e.g. `pipe:` URLs): `shard_sampling={frame_stride: 4}`.
    shard_sampling: dict[str, Any] | None = None


@dataclass
class PretrainSummary:
    run_dir: str
    steps: int
    seconds: float
    last_checkpoint: str | None
    losses: dict[str, float]
    interrupted_by: str | None = None
    # skipped input, from the run's corrupt-sample logs: {"samples", "shards", "samples_lost", "log_dir"}
    corrupt: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        losses = "  ".join(f"{k}={v:.4f}" for k, v in sorted(self.losses.items()))
        stop = f" (stopped by {self.interrupted_by})" if self.interrupted_by else ""
        text = (
            f"pretrain: {self.steps} steps in {self.seconds:.1f} s{stop}\n"
            f"  losses: {losses}\n  checkpoint: {self.last_checkpoint}\n  run dir: {self.run_dir}"
        )
        if self.corrupt.get("samples") or self.corrupt.get("shards"):
            c = self.corrupt
            text += (
                f"\n  skipped: {c['samples']} corrupt samples, {c['shards']} shard read errors "
                f"({c['samples_lost']} samples missing from shards that ended early); see {c['log_dir']}"
            )
        return text


def corrupt_summary(log_dir: str | Path) -> dict[str, Any]:
    """Counts of the corrupt-sample events every rank and worker of a run logged (data_pipelines/corrupt.py)."""
    from data_pipelines.stream import read_corrupt_logs

    events = read_corrupt_logs(log_dir) if Path(log_dir).is_dir() else []
    return {
        "samples": sum(e["kind"] == "sample" for e in events),
        "shards": sum(e["kind"] == "shard" for e in events),
        "samples_lost": sum(int(e.get("lost") or 0) for e in events),
        "log_dir": str(log_dir),
    }


def load_pretrain_config(path: str | Path | None, overrides: list[str] | None = None) -> PretrainConfig:
    """YAML + overrides -> a typed PretrainConfig (dataclass objects, not OmegaConf nodes)."""
    node = load_config(PretrainConfig, path, overrides)
    cfg: PretrainConfig = OmegaConf.to_object(node)
    check(cfg)
    return cfg


def check(cfg: PretrainConfig) -> None:
    """Cross-field checks that a schema cannot express; each error names its key."""
    t = cfg.trainer
    if t.strategy not in STRATEGIES:
        raise ConfigError(f"trainer.strategy must be one of {STRATEGIES}, got {t.strategy!r}")
    for name in loggers_of(cfg.logging):
        if name not in LOGGERS:
            raise ConfigError(f"logging.logger: unknown logger {name!r}; choose from {LOGGERS}")
    if not cfg.data.shards:
        raise ConfigError(
            "data.shards is empty: set it to a shard directory (with index.json) or a .tar pattern"
        )
    if t.max_steps < 1:
        raise ConfigError(f"trainer.max_steps must be >= 1, got {t.max_steps}")
    try:
        check_pipe_urls(shard_url_specs(cfg), cfg.data.allow_pipe_urls)
    except PipeUrlError as err:
        raise ConfigError(str(err)) from err
    check_data_follows_model(cfg)
    if cfg.stage not in ("mae", "inject"):
        raise ConfigError(f"stage must be 'mae' or 'inject', got stage={cfg.stage!r}")
    if cfg.stage == "inject" and not cfg.init:
        raise ConfigError("stage=inject starts from a stage-1 run: set init=<stage-1 checkpoint .ckpt>")
    try:
        cfg.inject.check()
    except ValueError as err:
        raise ConfigError(str(err)) from err
    schedule = cfg.optim.schedule_steps or t.max_steps
    if cfg.optim.warmup_steps >= schedule and schedule > 1:
        raise ConfigError(
            f"optim.warmup_steps ({cfg.optim.warmup_steps}) must be below the schedule length "
            f"({schedule}: optim.schedule_steps, else trainer.max_steps)"
        )
    if t.ckpt_every_n_steps < 1:
        raise ConfigError(f"trainer.ckpt_every_n_steps must be >= 1, got {t.ckpt_every_n_steps}")
    try:
        cfg.model.validate()
    except ValueError as err:
        raise ConfigError(f"model: {err}") from err
    if cfg.optim.ema and t.strategy.startswith("deepspeed"):
        from pretrain.deepspeed import DeepSpeedConfigError, zero_stage

        try:
            stage = zero_stage(t.strategy, t.deepspeed_config)
        except DeepSpeedConfigError as err:
            raise ConfigError(f"trainer.deepspeed_config: {err}") from err
        if stage == 3:
            # ZeRO-3 leaves each rank a shard of every parameter: an average of those is not the model's
            raise ConfigError(
                f"optim.ema=true does not work with ZeRO-3 (trainer.strategy={t.strategy}"
                f"{f', trainer.deepspeed_config={t.deepspeed_config}' if t.deepspeed_config else ''}): "
                "parameters are partitioned across ranks. For EMA weights use trainer.strategy=deepspeed_stage_2 "
                "or ddp, or set optim.ema=false"
            )
    if t.strategy.startswith("deepspeed") and not _on_gpu(t):
        raise ConfigError(
            f"trainer.strategy={t.strategy} needs CUDA GPUs (DeepSpeed's Lightning strategy runs on CUDA only); "
            "on CPU use trainer.strategy=auto or ddp"
        )


def shard_url_specs(cfg: PretrainConfig) -> list[str]:
    """The shard URLs the config names, brace patterns expanded (a shard folder is one entry)."""
    import webdataset as wds

    specs = [cfg.data.shards, cfg.inject.caption_shards if cfg.stage == "inject" else None]
    return [url for spec in specs if spec for url in wds.shardlists.expand_urls(spec)]


def check_data_follows_model(cfg: PretrainConfig) -> None:
    """The loader's clip geometry must be the model's input (the default configs interpolate it)."""
    for key in ("num_frames", "img_size", "fbank_frames", "mel_bins"):
        data_value, model_value = getattr(cfg.data, key), getattr(cfg.model, key)
        if data_value != model_value:
            raise ConfigError(
                f"data.{key}={data_value} but model.{key}={model_value}: the loader must produce the "
                f"model's input; set data.{key}={model_value} (or leave it to the config's "
                f"${{model.{key}}})"
            )


def shard_geometry_errors(cfg: PretrainConfig, sampling: dict) -> list[str]:
    """What in the shards' cut (`shard_index.shard_sampling`) stops this run: every sample would be
    rejected (frame count) or the loader refuses the audio (sample rate)."""
    problems = []
    if sampling.get("num_frames") is not None and sampling["num_frames"] != cfg.model.num_frames:
        problems.append(f"{sampling['num_frames']} frames per clip, the model takes {cfg.model.num_frames}")
    if sampling.get("sample_rate") is not None and sampling["sample_rate"] != cfg.data.sample_rate:
        problems.append(f"{sampling['sample_rate']} Hz audio, data.sample_rate is {cfg.data.sample_rate}")
    return problems


def shard_geometry_notes(model: ModelConfig, sampling: dict) -> list[str]:
    """What in the shards' cut a run survives but should know: upsampled frames, audio cut or padded
    to the model's fbank length, a stored fbank the loader cannot use."""
    from data_pipelines.features import num_fbank_frames

    notes = []
    if sampling.get("img_size") is not None and sampling["img_size"] < model.img_size:
        notes.append(f"{sampling['img_size']} px frames are upsampled to the model's {model.img_size} px")
    if None not in (sampling.get("num_frames"), sampling.get("frame_stride"), sampling.get("sample_rate")):
        window = round(
            sampling["num_frames"] * sampling["frame_stride"] / sampling["grid_fps"] * sampling["sample_rate"]
        )
        audio_frames = num_fbank_frames(window, sampling["sample_rate"])
        if abs(audio_frames - model.fbank_frames) > 0.05 * model.fbank_frames:
            notes.append(
                f"a window's audio is {audio_frames} fbank frames, cut or padded to the model's {model.fbank_frames}"
            )
    stored_bins = sampling.get("fbank_mel_bins")
    if stored_bins is not None and stored_bins != model.mel_bins:
        notes.append(
            f"the stored fbank.npy has {stored_bins} mel bins, the model takes {model.mel_bins}, so the "
            "loader computes the fbank from the audio (slower)"
        )
    return notes


def shard_options_for(model: ModelConfig, sampling: dict) -> str:
    """The `emomae shards` options that cut clips this model takes (10 ms fbank frames span the window)."""
    grid_fps = sampling.get("grid_fps", 25.0)
    stride = max(1, round(model.fbank_frames / 100 * grid_fps / model.num_frames))
    return f"num_frames={model.num_frames} frame_stride={stride} img_size={model.img_size} fbank_mel_bins={model.mel_bins}"


def shards_for_run(cfg: PretrainConfig) -> dict | None:
    """Check the training shards against the model before anything is written; returns how they were
    cut (recorded as `shard_sampling`), or the config's own value when the shards do not say."""
    from data_pipelines.datamodule import resolve_shards
    from data_pipelines.shard_index import shard_sampling

    try:
        sampling = shard_sampling(resolve_shards(cfg.data.shards, cfg.data.train_groups))
    except (OSError, ValueError) as err:
        raise ConfigError(f"data.shards={cfg.data.shards!r}: {err}") from err
    if sampling is None:
        return cfg.shard_sampling
    where = f"the shards in {Path(sampling['source']).parent} (per {Path(sampling['source']).name})"
    advice = (
        f"shards for this model: `emomae shards <manifest.csv> <out_dir> {shard_options_for(cfg.model, sampling)}`"
        " and data.shards=<out_dir>"
    )
    problems = shard_geometry_errors(cfg, sampling)
    if problems:
        raise ConfigError(
            f"{where} do not fit this run: {'; '.join(problems)}. Write {advice}, or pick a model that "
            "fits these shards"
        )
    notes = shard_geometry_notes(cfg.model, sampling)
    if notes:
        print(f"emomae pretrain: note: {where}: {'; '.join(notes)}; {advice}", file=sys.stderr)
    return sampling


def announce_pipe_commands(cfg: PretrainConfig) -> None:
    """With data.allow_pipe_urls=true, say which shell commands the shard URLs will run."""
    commands = pipe_commands(shard_url_specs(cfg))
    if commands:
        shown = "; ".join(commands[:3]) + (f"; ... ({len(commands)} commands)" if len(commands) > 3 else "")
        print(
            f"emomae pretrain: data.allow_pipe_urls=true, shards are read by running: {shown}",
            file=sys.stderr,
        )


def loggers_of(logging: LoggingConfig) -> list[str]:
    names = logging.logger
    if names is None:
        return []
    return [names] if isinstance(names, str) else list(names)


def _on_gpu(t: TrainerConfig) -> bool:
    return t.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def resolve_precision(t: TrainerConfig) -> str:
    """'auto' -> bf16-mixed on a GPU that has bf16 (Ampere+), else fp32 (bf16 on CPU is very slow)."""
    if t.precision != "auto":
        return t.precision
    return "bf16-mixed" if _on_gpu(t) and torch.cuda.is_bf16_supported() else "32-true"


def resume_path(cfg: PretrainConfig) -> str | None:
    """The checkpoint to continue from: `resume=auto` takes run_dir/checkpoints/last.ckpt when present."""
    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        last = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
        return str(last) if last.exists() else None
    path = Path(cfg.resume)
    if not path.exists():
        raise ConfigError(f"resume: checkpoint {path} does not exist (use resume=auto or resume=never)")
    return str(path)


def build_loggers(cfg: PretrainConfig, run_dir: Path, resolved: dict) -> list:
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    out = []
    for name in loggers_of(cfg.logging):
        if name == "csv":  # a new version folder per (re)start: Lightning's CSV writer truncates otherwise
            out.append(CSVLogger(save_dir=run_dir, name="csv"))
        elif name == "tensorboard":
            out.append(TensorBoardLogger(save_dir=run_dir, name="tb", default_hp_metric=False))
        elif name == "wandb":
            # the id is kept in the run dir so a resumed or requeued job continues the same W&B run
            id_file = run_dir / "wandb_id.txt"
            run_id = id_file.read_text().strip() if id_file.is_file() else ""
            if not run_id:
                # chosen before the run starts (the logger knows its id only once rank 0 creates the
                # experiment); WANDB_RUN_ID is what slurm/pretrain.sbatch derives from the run dir
                import os
                import secrets

                run_id = os.environ.get("WANDB_RUN_ID") or secrets.token_hex(8)
                if _is_global_zero():
                    id_file.write_text(run_id)
            logger = WandbLogger(
                project=cfg.logging.project,
                entity=cfg.logging.entity,
                name=cfg.logging.run_name or run_dir.name,
                save_dir=str(run_dir),
                id=run_id,
                resume="allow",
                tags=list(cfg.logging.tags),
                config=resolved,
            )
            out.append(logger)
    return out


def _is_global_zero() -> bool:
    from lightning_fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def build_strategy(cfg: PretrainConfig, precision: str, world_size: int):
    t = cfg.trainer
    if t.strategy == "ddp":
        from pytorch_lightning.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=t.find_unused_parameters)
    if t.strategy.startswith("deepspeed"):
        from pretrain.deepspeed import CONFIG_DIR, STRATEGY_FILES, build_deepspeed_config, deepspeed_strategy

        yaml_path = t.deepspeed_config or CONFIG_DIR / STRATEGY_FILES[t.strategy]
        ds = build_deepspeed_config(
            yaml_path,
            micro_batch=cfg.data.batch_size,
            accumulate=t.accumulate_grad_batches,
            world_size=world_size,
            grad_clip=cfg.optim.grad_clip,
            precision=precision,
        )
        return deepspeed_strategy(ds)
    return "auto"


def build_callbacks(cfg: PretrainConfig, run_dir: Path) -> list:
    from pytorch_lightning.callbacks import ModelCheckpoint, ThroughputMonitor

    from pretrain.callbacks import EMA, LastCheckpoint, MemoryMonitor, ReconstructionImages, StepProgressBar

    t, m = cfg.trainer, cfg.model
    ckpt_dir = run_dir / "checkpoints"
    tokens_per_clip = m.num_video_tokens + m.num_audio_tokens
    callbacks = [
        # "step" as the monitor keeps the newest ckpt_keep step checkpoints; last.ckpt is always written
        ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="step{step:07d}",
            auto_insert_metric_name=False,
            every_n_train_steps=t.ckpt_every_n_steps,
            save_last=True,
            save_top_k=t.ckpt_keep,
            monitor="step",
            mode="max",
        ),
        ThroughputMonitor(
            batch_size_fn=lambda b: b["video"].shape[0],
            length_fn=lambda b: b["video"].shape[0] * tokens_per_clip,  # input tokens (visible + masked)
            window_size=max(2, min(50, t.log_every_n_steps)),
            separator="/",
        ),
        MemoryMonitor(),
        ReconstructionImages(run_dir / "images", cfg.logging.image_every_n_steps, cfg.logging.image_samples),
    ]
    if cfg.optim.ema:
        callbacks.append(EMA(cfg.optim.ema_decay))
    if t.progress_bar:
        callbacks.append(StepProgressBar(refresh_rate=max(1, t.log_every_n_steps // 2)))
    # last, so a signal-time save sees this step's EMA update and the other callbacks' state
    callbacks.append(LastCheckpoint(ckpt_dir / "last.ckpt"))
    return callbacks


def pretrain(cfg: PretrainConfig) -> PretrainSummary:
    """Run (or continue) one pretraining run described by `cfg`."""
    import pytorch_lightning as pl
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from data_pipelines.datamodule import AVDataModule, StreamResumeError
    from pretrain.module import PretrainModule

    t = cfg.trainer
    run_dir = Path(cfg.run_dir)
    ckpt_path = resume_path(cfg)
    cfg.shard_sampling = shards_for_run(cfg)  # before the run folder: a misfit leaves nothing behind
    if cfg.data.error_log_dir is None:  # every skipped sample and short shard lands in the run's own log
        cfg.data.error_log_dir = str(run_dir / "corrupt")
    run_dir.mkdir(parents=True, exist_ok=True)
    precision = resolve_precision(t)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    # the world size decides the lr (blr x global batch / 256), so the Trainer comes first
    world_size = (t.devices if isinstance(t.devices, int) else 1) * t.num_nodes
    trainer_kwargs: dict[str, Any] = dict(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        precision=precision,
        strategy=build_strategy(cfg, precision, world_size),
        max_steps=t.max_steps,
        max_epochs=-1,
        accumulate_grad_batches=t.accumulate_grad_batches,
        log_every_n_steps=t.log_every_n_steps,
        # DeepSpeed clips inside its engine (gradient_clipping in its config)
        gradient_clip_val=None if t.strategy.startswith("deepspeed") else cfg.optim.grad_clip,
        callbacks=build_callbacks(cfg, run_dir),
        enable_progress_bar=t.progress_bar,
        default_root_dir=run_dir,
        deterministic=t.deterministic,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_model_summary=True,
        use_distributed_sampler=False,  # shards are split by the data pipeline
    )
    peak_lr, final_lr = scaled_lr(cfg.optim, cfg.data.batch_size * t.accumulate_grad_batches * world_size)
    resolved = resolved_dict(cfg, precision=precision, lr=peak_lr, min_lr=final_lr)
    trainer = pl.Trainer(logger=build_loggers(cfg, run_dir, resolved) or False, **trainer_kwargs)
    if trainer.world_size != world_size:  # devices="auto" or a list: recompute with the real count
        world_size = trainer.world_size
        peak_lr, final_lr = scaled_lr(cfg.optim, cfg.data.batch_size * t.accumulate_grad_batches * world_size)
        resolved = resolved_dict(cfg, precision=precision, lr=peak_lr, min_lr=final_lr)
    if trainer.is_global_zero:
        save_config(OmegaConf.create(resolved), run_dir / "config.yaml")

    schedule_steps = cfg.optim.schedule_steps or t.max_steps
    module_kwargs = dict(
        peak_lr=peak_lr, final_lr=final_lr, max_steps=schedule_steps, seed=cfg.seed, compile=t.compile
    )
    if cfg.stage == "inject":
        from pretrain.inject import build_stage2

        module, datamodule = build_stage2(cfg, resolved, **module_kwargs)
    else:
        module = PretrainModule(cfg.model, cfg.objective, cfg.optim, resolved, init=cfg.init, **module_kwargs)
        datamodule = AVDataModule(cfg.data)
    start, interrupted = time.perf_counter(), None
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SIGTERMException:
        interrupted = "SIGTERM"
    except StreamResumeError as err:  # every rank raises it while restoring, before any step
        _finish_wandb(trainer, failed=True)
        raise ConfigError(f"resume from {ckpt_path}: {err}") from err
    except BaseException:
        _finish_wandb(trainer, failed=True)
        raise
    _finish_wandb(trainer, failed=interrupted is not None)
    signal_cb = next(c for c in trainer.callbacks if type(c).__name__ == "LastCheckpoint")
    if interrupted is None and signal_cb.received is not None:
        import signal

        interrupted = signal.Signals(signal_cb.received).name
    last = run_dir / "checkpoints" / "last.ckpt"
    summary = PretrainSummary(
        run_dir=str(run_dir),
        steps=trainer.global_step,
        seconds=time.perf_counter() - start,
        last_checkpoint=str(last) if last.exists() else None,
        interrupted_by=interrupted,
        losses={k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("loss/")},
        corrupt=corrupt_summary(cfg.data.error_log_dir),
    )
    if trainer.is_global_zero:
        (run_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=2))
    return summary


def _finish_wandb(trainer, failed: bool) -> None:
    """Close the W&B run now rather than at interpreter exit, so its files are complete when
    `pretrain()` returns (another run in the same process, a notebook, a test reading them)."""
    from pytorch_lightning.loggers import WandbLogger

    for logger in trainer.loggers:
        # `_experiment` is private: WandbLogger has no public way to ask whether its run was started, and
        # `logger.experiment` starts one; a run that never logged has none to finish (pyproject pins Lightning)
        if isinstance(logger, WandbLogger) and trainer.is_global_zero and logger._experiment is not None:
            logger.experiment.finish(exit_code=1 if failed else 0)


def resolved_dict(cfg: PretrainConfig, **resolved: Any) -> dict:
    """The config as plain types with the values decided at run time filled in (lr, precision)."""
    out = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    out["optim"]["lr"], out["optim"]["min_lr"] = resolved["lr"], resolved["min_lr"]
    out["trainer"]["precision"] = resolved["precision"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="emomae pretrain",
        description="Pretrain a masked audio-visual autoencoder. Settings come from the YAML file and are "
        "overridden by key=value pairs, e.g. `emomae pretrain configs/pretrain/base.yaml "
        "data.shards=/data/vox2 trainer.devices=4 optim.blr=3e-4`.",
    )
    parser.add_argument(
        "config",
        help="YAML run config, or the name of a shipped one: demo, tiny, small, base, "
        "large, inject_<size> (configs/pretrain/)",
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides (OmegaConf dot-list)")
    parser.add_argument("--print-config", action="store_true", help="print the merged config and exit")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_pretrain_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"emomae pretrain: {err}", file=sys.stderr)
        return 2
    announce_pipe_commands(cfg)
    if args.print_config:
        print(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        return 0
    from pretrain.deepspeed import DeepSpeedConfigError

    try:
        summary = pretrain(cfg)
    except (ConfigError, DeepSpeedConfigError) as err:  # found once the run starts (resume path, ZeRO YAML)
        print(f"emomae pretrain: {err}", file=sys.stderr)
        return 2
    print(summary)
    return SIGTERM_EXIT if summary.interrupted_by == "SIGTERM" else 0


if __name__ == "__main__":
    sys.exit(main())
