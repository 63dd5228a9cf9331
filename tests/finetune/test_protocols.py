"""Fold splits and protocol configs."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from emomae.config import ConfigError, load_config
from finetune.protocols import ClipInfo, FinetuneConfig, fold_splits, read_clips, validate

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "finetune"


def _clips(num_speakers=10, per_speaker=3, folds=5):
    return [
        ClipInfo(f"s{s}_c{c}", f"spk{s}", s % folds) for s in range(num_speakers) for c in range(per_speaker)
    ]


def test_fold_splits_are_speaker_disjoint_and_test_every_clip_once():
    clips = _clips()
    splits = fold_splits(clips, 5, val_fraction=0.25, seed=0)
    tested = []
    for split in splits:
        assert not (split.train_speakers & split.val_speakers)
        assert not (split.train_speakers & split.test_speakers)
        assert not (split.val_speakers & split.test_speakers)
        assert split.val_speakers, "a validation split is carved from the training speakers"
        parts = {c.key: split.part({"speaker": c.speaker, "fold": c.fold}) for c in clips}
        assert set(parts.values()) == {"train", "val", "test"}  # every clip lands in one part
        tested += [k for k, p in parts.items() if p == "test"]
        # the validation split never touches the test fold
        assert all(c.fold != split.test_fold for c in clips if parts[c.key] == "val")
    assert sorted(tested) == sorted(c.key for c in clips)


def test_fold_splits_reject_a_speaker_in_two_folds():
    clips = _clips() + [ClipInfo("leak", "spk0", 1)]
    with pytest.raises(ConfigError, match=r"spk0.*more than one fold"):
        fold_splits(clips, 5, 0.2)


def test_read_clips_needs_a_fold_per_clip(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("key,video,audio,label,label_name,speaker,fold,split,bbox\na,a.mp4,,0,x,s1,,,\n")
    with pytest.raises(ConfigError, match=r"m\.csv:2: clip 'a' has no fold"):
        read_clips(path)


@pytest.mark.parametrize("name", ["crema_d", "ravdess", "mafw", "dfew", "msp_improv", "synth"])
def test_protocol_configs_load_and_match_the_dataset_registry(name):
    from data_pipelines.manifests import DATASETS

    cfg = OmegaConf.to_object(
        load_config(
            FinetuneConfig,
            CONFIGS / f"{name}.yaml",
            ["encoder=x", "protocol.manifest=m.csv", "protocol.shards=s"],
        )
    )
    validate(cfg)
    registry = {"crema_d": "crema-d", "msp_improv": "msp-improv"}.get(name, name)
    if registry in DATASETS:
        assert tuple(cfg.protocol.classes) == DATASETS[registry].classes
        assert cfg.protocol.num_folds == DATASETS[registry].num_folds


def test_unknown_key_or_bad_head_is_a_clear_error():
    with pytest.raises(ConfigError, match="recipes.linear.epoch"):
        load_config(FinetuneConfig, CONFIGS / "synth.yaml", ["recipes.linear.epoch=3"])
    cfg = OmegaConf.to_object(
        load_config(
            FinetuneConfig,
            CONFIGS / "synth.yaml",
            ["encoder=x", "protocol.manifest=m", "protocol.shards=s", "head=mlp"],
        )
    )
    with pytest.raises(ConfigError, match="head must be one of"):
        validate(cfg)
    cfg.head, cfg.fold = "linear", "7"
    with pytest.raises(ConfigError, match=r"fold must be an integer in \[0, 5\)"):
        validate(cfg)
    cfg.fold, cfg.head = "0", "finetune"
    cfg.recipes["finetune"].modality_dropout = 1.5
    with pytest.raises(
        ConfigError, match=r"recipes.finetune.modality_dropout is a probability in \[0, 1\], got 1.5"
    ):
        validate(cfg)
    cfg.recipes["finetune"].modality_dropout, cfg.recipes["finetune"].freeze_epochs = 0.5, 30
    with pytest.raises(ConfigError, match=r"recipes.finetune.freeze_epochs must lie in \[0, epochs=30\)"):
        validate(cfg)
    cfg.recipes["finetune"].freeze_epochs, cfg.recipes["finetune"].unimodal_loss = 0, -1.0
    with pytest.raises(ConfigError, match=r"recipes.finetune.unimodal_loss is a loss weight >= 0, got -1.0"):
        validate(cfg)
    cfg.recipes["finetune"].unimodal_loss = 1.0
    with pytest.raises(ConfigError, match=r"modality_dropout=0.5 and unimodal_loss=1.0 both train"):
        validate(cfg)
    cfg.recipes["finetune"].modality_dropout = 0.0
    validate(cfg)
    cfg.speaker_norm = True
    with pytest.raises(ConfigError, match="speaker_norm=true applies to the probes' cached features"):
        validate(cfg)
    cfg.head = "linear"
    validate(cfg)
