"""Evaluation protocols: the config schema of `emomae finetune` and speaker-disjoint fold splits.

A protocol YAML (`configs/finetune/<dataset>.yaml`) names the classes, the folds and a recipe per head
(linear probe, attentive probe, full fine-tuning). Every fold is tested on the clips of that fold;
the epoch is picked on a validation split carved from the TRAINING speakers (never the test fold),
which is the figure reported. The papers' protocol (best epoch on the test fold) is reported beside
it, labelled as such.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass, field
from pathlib import Path

from emomae.config import ConfigError

HEADS = ("linear", "attentive", "finetune")
MODALITIES = ("av", "audio", "video")


@dataclass
class RecipeConfig:
    """Optimisation of one head. `blr` is scaled by batch / 256 (docs/finetune.md)."""

    epochs: int = 50
    batch_size: int = 32
    blr: float = 1.0e-3
    min_lr: float = 1.0e-6
    warmup_epochs: int = 5
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: float = 0.75  # full fine-tuning only
    drop_path: float = 0.1  # full fine-tuning only
    mixup: float = 0.8  # Beta(alpha, alpha) for mixup; 0 = off
    cutmix: float = 1.0  # Beta(alpha, alpha) for cutmix; 0 = off
    mix_prob: float = 1.0  # probability that a batch is mixed at all
    switch_prob: float = 0.5  # probability of cutmix rather than mixup when both are on
    label_smoothing: float = 0.1
    modality_dropout: float = (
        0.0  # full fine-tuning: share of training clips that lose their audio or their video
    )
    # full fine-tuning: weight of the audio-only and video-only losses trained on every clip next to the
    # audio-visual one (0 = off); the unimodal encoders still run once per batch
    unimodal_loss: float = 0.0
    freeze_epochs: int = 0  # full fine-tuning: train only the head for this many epochs first (LP-FT)
    loss: str = "auto"  # auto: cross-entropy (classification) or ccc (regression); or mse
    grad_clip: float | None = None
    refit: bool = False  # probes: after the validation run picks the epoch, retrain on train + val speakers
    select_window: int = (
        1  # probes with refit: pick the epoch on a moving average of this many validation epochs
    )
    # training-stream augmentation (full fine-tuning): random resized crop, flip, SpecAugment
    augment: bool = True
    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    freq_mask: int = 0
    time_mask: int = 0


@dataclass
class ProtocolConfig:
    """A dataset's evaluation protocol."""

    name: str = "synth"
    task: str = "classification"  # classification | regression
    classes: list[str] = field(default_factory=list)  # index order of the labels
    targets: list[str] = field(default_factory=list)  # regression dimensions, e.g. [valence, arousal]
    num_folds: int = 5
    val_fraction: float = 0.2  # share of each fold's training speakers held out for model selection
    manifest: str | None = None  # the manifest CSV the shards were written from (speakers and folds)
    shards: str | None = None  # shard directory (index.json, fold<k>-*.tar)


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "emomae-finetune"
    entity: str | None = None
    mode: str = "online"  # online | offline | disabled
    tags: list[str] = field(default_factory=list)
    # runs of one protocol and head (e.g. the fold tasks of a SLURM array) share it; default <protocol>-<head>
    group: str | None = None


@dataclass
class FinetuneConfig:
    """Schema of `emomae finetune <cfg> key=value ...`."""

    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    recipes: dict[str, RecipeConfig] = field(default_factory=lambda: {name: RecipeConfig() for name in HEADS})
    encoder: str | None = None  # export directory (encoder.safetensors + config.json)
    random_init: bool = False  # control run: the encoder's architecture with fresh random weights
    head: str = "linear"  # linear | attentive | finetune
    # head=finetune: evaluate the fine-tuned head saved beside the encoder (`emomae import-hicmae` of a
    # fine-tuned HiCMAE checkpoint) on each fold's test speakers as it is: no training, no selection
    eval_only: bool = False
    # probes: z-score the cached features per speaker (every speaker's own windows, the test speakers'
    # included but never their labels), as speaker normalisation in speech emotion recognition
    speaker_norm: bool = False
    fold: str = "all"  # a fold id or `all`
    modalities: list[str] = field(default_factory=lambda: list(MODALITIES))  # evaluations at test
    out_dir: str = "finetune_out"
    run_name: str | None = None
    seed: int = 0
    num_workers: int = 2
    accelerator: str = "auto"
    # processes per node x nodes: each trains on its own share of every batch and scores its own share
    # of every evaluation; `recipes.<head>.batch_size` stays the global batch (docs/finetune.md)
    devices: int = 1
    num_nodes: int = 1
    precision: str = "32-true"
    cache_dir: str | None = None  # where linear/attentive probes keep frozen features; default in run dir
    speed_batches: int = 3  # batches timed for the encoder inference speed in the report
    wandb: WandbConfig = field(default_factory=WandbConfig)


def validate(cfg) -> None:
    """Cross-field checks that the schema cannot express; each error names the key."""
    p = cfg.protocol
    if cfg.head not in HEADS:
        raise ConfigError(f"head must be one of {HEADS}, got {cfg.head!r}")
    if cfg.head not in cfg.recipes:
        raise ConfigError(f"recipes.{cfg.head} is missing: every head needs a recipe")
    if cfg.eval_only and cfg.head != "finetune":
        raise ConfigError(
            f"eval_only=true evaluates a fine-tuned model: set head=finetune (got head={cfg.head!r})"
        )
    if cfg.eval_only and cfg.random_init:
        raise ConfigError(
            "eval_only=true evaluates the weights in `encoder`; random_init=true would replace them"
        )
    recipe = cfg.recipes[cfg.head]
    if not 0 <= recipe.modality_dropout <= 1:
        raise ConfigError(
            f"recipes.{cfg.head}.modality_dropout is a probability in [0, 1], got {recipe.modality_dropout}"
        )
    if cfg.speaker_norm and cfg.head == "finetune":
        raise ConfigError(
            "speaker_norm=true applies to the probes' cached features; head=finetune trains the "
            "encoder, so its features move: use head=linear or head=attentive"
        )
    world_size = cfg.devices * cfg.num_nodes
    if cfg.devices < 1 or cfg.num_nodes < 1:
        raise ConfigError(
            f"devices and num_nodes count processes, >= 1 each; got devices={cfg.devices}, "
            f"num_nodes={cfg.num_nodes}"
        )
    if cfg.head == "finetune" and not cfg.eval_only and recipe.batch_size % world_size:
        raise ConfigError(
            f"recipes.finetune.batch_size={recipe.batch_size} is the global batch and must split "
            f"evenly over devices x num_nodes = {world_size} processes"
        )
    if recipe.unimodal_loss < 0:
        raise ConfigError(
            f"recipes.{cfg.head}.unimodal_loss is a loss weight >= 0, got {recipe.unimodal_loss}"
        )
    if recipe.unimodal_loss > 0 and recipe.modality_dropout > 0:
        raise ConfigError(
            f"recipes.{cfg.head}: modality_dropout={recipe.modality_dropout} and unimodal_loss="
            f"{recipe.unimodal_loss} both train the missing-modality inputs; set one of them to 0"
        )
    if not 0 <= recipe.freeze_epochs < recipe.epochs:
        raise ConfigError(
            f"recipes.{cfg.head}.freeze_epochs must lie in [0, epochs={recipe.epochs}) so the encoder "
            f"trains at all, got {recipe.freeze_epochs}"
        )
    if p.task not in ("classification", "regression"):
        raise ConfigError(f"protocol.task must be classification or regression, got {p.task!r}")
    if p.task == "classification" and len(p.classes) < 2:
        raise ConfigError(f"protocol.classes must list at least 2 class names, got {list(p.classes)}")
    if p.task == "regression" and not p.targets:
        raise ConfigError("protocol.targets must name the regression dimensions (e.g. [valence, arousal])")
    if p.num_folds < 2:
        raise ConfigError(f"protocol.num_folds must be >= 2, got {p.num_folds}")
    if not 0 < p.val_fraction < 1:
        raise ConfigError(f"protocol.val_fraction must lie in (0, 1), got {p.val_fraction}")
    for key in ("manifest", "shards"):
        if not getattr(p, key):
            raise ConfigError(f"protocol.{key} is not set (pass protocol.{key}=PATH)")
    if not cfg.encoder:
        raise ConfigError("encoder is not set: pass encoder=<export dir> (from `emomae export`)")
    bad = [m for m in cfg.modalities if m not in MODALITIES]
    if bad:
        raise ConfigError(f"modalities must be drawn from {MODALITIES}, got {bad}")
    fold_ids(cfg.fold, p.num_folds)


def fold_ids(fold: str | int, num_folds: int) -> list[int]:
    """`all` -> every fold; `3` -> [3]; anything else is an error naming the key."""
    if str(fold) == "all":
        return list(range(num_folds))
    try:
        k = int(fold)
    except ValueError:
        raise ConfigError(f"fold must be an integer in [0, {num_folds}) or 'all', got {fold!r}") from None
    if not 0 <= k < num_folds:
        raise ConfigError(f"fold must be an integer in [0, {num_folds}) or 'all', got {fold!r}")
    return [k]


@dataclass(frozen=True)
class ClipInfo:
    key: str
    speaker: str
    fold: int


@dataclass(frozen=True)
class FoldSplit:
    """Speakers of one fold's train / validation / test parts (disjoint)."""

    test_fold: int
    train_speakers: frozenset[str]
    val_speakers: frozenset[str]
    test_speakers: frozenset[str]

    def part(self, info: dict) -> str | None:
        """`train`, `val`, `test` or None for a sample's json metadata (`speaker`, `fold`)."""
        if int(info["fold"]) == self.test_fold:
            return "test"
        speaker = str(info.get("speaker") or "")
        if speaker in self.val_speakers:
            return "val"
        if speaker in self.train_speakers:
            return "train"
        return None


def read_clips(manifest: str | Path) -> list[ClipInfo]:
    """Speaker and fold of every clip of a manifest CSV; a missing column or fold is an error."""
    path = Path(manifest)
    if not path.is_file():
        raise ConfigError(f"protocol.manifest: file not found: {path}")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = {"key", "speaker", "fold"} - set(reader.fieldnames or [])
        if missing:
            raise ConfigError(f"{path}: manifest lacks column(s) {sorted(missing)}")
        clips = []
        for line, row in enumerate(reader, start=2):
            if not (row["fold"] or "").strip():
                raise ConfigError(
                    f"{path}:{line}: clip {row['key']!r} has no fold; k-fold protocols need one"
                )
            # a clip without a speaker id is its own speaker, so no identity can leak across parts
            clips.append(ClipInfo(row["key"], row["speaker"] or f"clip:{row['key']}", int(row["fold"])))
    return clips


def fold_splits(clips: list[ClipInfo], num_folds: int, val_fraction: float, seed: int = 0) -> list[FoldSplit]:
    """One split per fold: test = the fold's speakers; validation = a seeded share (at least one) of
    the remaining speakers; train = the rest. Speakers are disjoint across the three parts."""
    by_fold: dict[int, set[str]] = {}
    for c in clips:
        if not 0 <= c.fold < num_folds:
            raise ConfigError(f"clip {c.key!r} has fold {c.fold}, outside protocol.num_folds={num_folds}")
        by_fold.setdefault(c.fold, set()).add(c.speaker)
    empty = [k for k in range(num_folds) if k not in by_fold]
    if empty:
        raise ConfigError(f"fold(s) {empty} hold no clips; check protocol.num_folds against the manifest")
    shared = {s for k, spk in by_fold.items() for s in spk if any(s in by_fold[j] for j in by_fold if j != k)}
    if shared:
        raise ConfigError(
            f"speaker(s) {sorted(shared)[:5]} appear in more than one fold: folds must be speaker-disjoint"
        )
    splits = []
    for k in range(num_folds):
        rest = sorted(s for j, spk in by_fold.items() if j != k for s in spk)
        if len(rest) < 2:
            raise ConfigError(
                f"fold {k}: {len(rest)} training speaker(s); need 2+ to carve a validation split"
            )
        rng = random.Random(f"{seed}-{k}")
        n_val = min(len(rest) - 1, max(1, round(val_fraction * len(rest))))
        val = set(rng.sample(rest, n_val))
        splits.append(FoldSplit(k, frozenset(set(rest) - val), frozenset(val), frozenset(by_fold[k])))
    return splits
