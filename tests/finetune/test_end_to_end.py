"""The whole downstream path on the built-in dataset: `emomae pretrain` (micro model, briefly) ->
`emomae export` -> `emomae finetune` with a linear probe, the same probe on a random encoder, and full
fine-tuning; plus `emomae embed` on a real clip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from demo_run import pretrain_args
from synth_finetune import synth_finetune
from tiny_model import tiny

from data_pipelines.synthetic import CLASSES
from emomae.cli import main as emomae
from finetune.embed import main as embed_main
from finetune.export import input_spec, save_export
from pretrain.encoders import AVEncoder, ModelConfig

REPO = Path(__file__).resolve().parents[2]


# Larger than the session dataset (6 speakers): every fold trains on 6 speakers and tests on 2, which
# is what fine-tuning needs to generalise across faces and voices at all.
DOWNSTREAM_SIZE = dict(num_speakers=10, clips_per_speaker_class=3, frame_size=64, fps=25, seconds=2.56)
PRETRAIN_STEPS = 300
# The linear probe's seeds (0: the recipe's) for the pretrained-vs-random comparison, which one seed's
# fold split and initialisation decide on this small set
PROBE_SEEDS = (0, 1, 2)


def _finetune(out: Path, export: Path, manifest: Path, shards: Path, name: str, *extra: str) -> dict:
    args = synth_finetune(export, manifest, shards, out / "runs", f"run_name={name}", *extra)
    assert emomae(["finetune", *args]) == 0
    return json.loads((out / "runs" / name / "results.json").read_text())


@pytest.fixture(scope="module")
def downstream(write_test_shards, tmp_path_factory) -> dict:
    """The README's flow at a small size: synth -> shards -> pretrain (demo recipe, briefly) -> export,
    then the linear probe on the pretrained and on a random encoder (5 folds) and full fine-tuning
    with the built-in dataset's recipe (fold 0)."""
    from data_pipelines.synthetic import SynthConfig, generate

    out = tmp_path_factory.mktemp("downstream")
    manifest = generate(out / "synth", SynthConfig(seed=0, **DOWNSTREAM_SIZE))
    shards = write_test_shards(manifest, out / "shards")
    run = out / "pretrain"
    assert emomae(pretrain_args(shards, run, PRETRAIN_STEPS, "data.num_workers=1")) == 0
    export = out / "export"
    assert emomae(["export", str(run / "checkpoints" / "last.ckpt"), str(export)]) == 0
    results = {
        "linear": _finetune(out, export, manifest, shards, "linear", "head=linear"),
        "random": _finetune(
            out, export, manifest, shards, "random", "head=linear", "random_init=true", "modalities=[av]"
        ),
        "finetune": _finetune(out, export, manifest, shards, "finetune", "head=finetune", "fold=0"),
        # two more probe seeds of each encoder (another fold split and probe init; another random
        # encoder), the pretrained ones on the features cached above
        **{
            f"linear_seed{seed}": _finetune(
                out,
                export,
                manifest,
                shards,
                f"linear_seed{seed}",
                "head=linear",
                f"seed={seed}",
                f"cache_dir={out / 'runs' / 'linear' / 'cache'}",
            )
            for seed in PROBE_SEEDS[1:]
        },
        **{
            f"random_seed{seed}": _finetune(
                out,
                export,
                manifest,
                shards,
                f"random_seed{seed}",
                "head=linear",
                "random_init=true",
                "modalities=[av]",
                f"seed={seed}",
            )
            for seed in PROBE_SEEDS[1:]
        },
        # the same cached features, z-scored per speaker
        "speaker_norm": _finetune(
            out,
            export,
            manifest,
            shards,
            "speaker_norm",
            "head=linear",
            "speaker_norm=true",
            f"cache_dir={out / 'runs' / 'linear' / 'cache'}",
        ),
    }
    print(
        "test UAR per fold (validation-selected):",
        {
            k: {m: [round(f["test"][m]["uar"], 3) for f in r["folds"]] for m in r["folds"][0]["test"]}
            for k, r in results.items()
        },
    )
    return {**results, "runs": out / "runs"}


def _uar(result: dict, modality: str = "av", fold: int | None = None) -> float:
    """Mean test UAR over the run's folds, or of one fold."""
    values = [f["test"][modality]["uar"] for f in result["folds"] if fold is None or f["fold"] == fold]
    return sum(values) / len(values)


@pytest.mark.slow
def test_finetune_run_directory_holds_tables_figures_config_and_commit(downstream):
    out = downstream["runs"] / "finetune"
    for name in (
        "results.md",
        "results.json",
        "config.yaml",
        "run.json",
        "confusion_av.png",
        "recall_av.png",
        "fold0/confusion_video.png",
        "fold0/metrics.csv",
    ):
        assert (out / name).is_file(), name
    assert "best epoch on TEST (papers' protocol" in (out / "results.md").read_text()
    assert "git_commit" in json.loads((out / "run.json").read_text())
    ft, lin = downstream["finetune"], downstream["linear"]
    assert [f["fold"] for f in ft["folds"]] == [0] and [f["fold"] for f in lin["folds"]] == [0, 1, 2, 3, 4]
    for f in lin["folds"]:
        assert f["windows"]["val"] > 0 and f["windows"]["train"] > 0
        assert set(f["test"]) == {"av", "audio", "video"}
        # the reported epoch is the validation pick; the papers' protocol figure can only be >= it
        assert f["best_on_test"]["uar"] >= f["test"]["av"]["uar"] - 1e-9
    # every window of the dataset was tested exactly once over the 5 folds
    assert sum(f["windows"]["test"] for f in lin["folds"]) == lin["cache"]["samples"]
    assert ft["speed"]["clips_per_s"] > 0


@pytest.mark.slow
def test_linear_probe_on_the_pretrained_encoder_beats_the_same_probe_on_a_random_one(downstream):
    # The margin is small here and one seed does not decide it: over probe seeds 0-5 (5 folds each),
    # pretrained minus random UAR was +0.105, +0.012, +0.038, +0.033, +0.028, +0.011 (mean +0.038);
    # pooled over seeds 0-2 +0.052, over 3-5 +0.024. 800 pretraining steps instead of 300 did not
    # widen it (pretrained 0.41-0.48 over seeds 0-5). The demo's larger set is where it shows.
    runs = {
        encoder: [downstream[encoder]] + [downstream[f"{encoder}_seed{seed}"] for seed in PROBE_SEEDS[1:]]
        for encoder in ("linear", "random")
    }
    pretrained, random = (sum(_uar(r) for r in runs[e]) / len(PROBE_SEEDS) for e in ("linear", "random"))
    assert pretrained > random + 0.02, (
        f"linear-probe UAR over seeds {PROBE_SEEDS} x 5 folds: pretrained {pretrained:.3f}, random {random:.3f}"
    )
    # the later seeds' pretrained probes read the features the first one cached
    assert all(
        downstream[f"linear_seed{s}"]["cache"]["seconds"] == downstream["linear"]["cache"]["seconds"]
        for s in PROBE_SEEDS[1:]
    )


@pytest.mark.slow
def test_speaker_normalised_features_lift_the_linear_probe(downstream):
    # measured: 5-fold av 0.689 vs 0.522, audio only 0.561 vs 0.389, video only 0.300 vs 0.172
    normalised, plain = downstream["speaker_norm"], downstream["linear"]
    assert normalised["cache"]["seconds"] == plain["cache"]["seconds"], (
        "the probe must reuse the cached features"
    )
    assert _uar(normalised) > _uar(plain) + 0.05, (
        f"5-fold UAR: speaker-normalised {_uar(normalised):.3f}, plain {_uar(plain):.3f}"
    )
    assert "z-scored per speaker" in (downstream["runs"] / "speaker_norm" / "results.md").read_text()


@pytest.mark.slow
def test_speaker_normalised_probe_uses_the_face_beside_the_voice(downstream):
    # measured, 5 folds: av 0.689, audio only 0.561, video only 0.300 (earlier run: 0.700, 0.533, 0.289;
    # SAD recall 22/30 vs 8/30)
    normalised = downstream["speaker_norm"]
    av, audio, video = (_uar(normalised, m) for m in ("av", "audio", "video"))
    assert av > audio + 0.05 and av > video + 0.2, (
        f"5-fold UAR: av {av:.3f}, audio {audio:.3f}, video {video:.3f}"
    )
    # the voice cannot tell SAD from DIS (both subdued), the face can (worried vs frown): the
    # audio-visual probe must recover SAD clips the audio-only evaluation calls DIS
    sad, dis = CLASSES.index("SAD"), CLASSES.index("DIS")
    pooled = {
        m: sum(np.array(f["test"][m]["confusion"]) for f in normalised["folds"]) for m in ("av", "audio")
    }
    assert pooled["av"][sad, dis] < pooled["audio"][sad, dis], pooled
    assert pooled["av"][sad, sad] > pooled["audio"][sad, sad], pooled


@pytest.mark.slow
def test_full_finetuning_beats_the_linear_probe_on_the_same_test_speakers(downstream):
    finetuned, probe = _uar(downstream["finetune"], fold=0), _uar(downstream["linear"], fold=0)
    assert finetuned > probe + 0.05, f"fold-0 UAR: fine-tuned {finetuned:.3f}, linear probe {probe:.3f}"


@pytest.mark.slow
def test_the_audio_visual_model_beats_its_video_only_evaluation(downstream):
    ft = downstream["finetune"]
    av, video = _uar(ft), _uar(ft, "video")
    assert av > video + 0.2, f"fold-0 UAR: av {av:.3f}, video only {video:.3f}"


@pytest.mark.slow
def test_the_audio_visual_model_loses_nothing_to_its_audio_only_evaluation(downstream):
    # On this set the voice carries the classes and full fine-tuning of fold 0 barely learns the face
    # (video-only UAR is near chance), so fusion cannot be asked to win here: the 5-fold speaker-
    # normalised probe test shows the face lifting UAR. What is asked: fusing in the face does not
    # cost the voice's predictions. Measured over seeds 0-5 of this fine-tuning: av minus audio-only
    # UAR +0.08, 0, +0.08, 0, +0.06, 0; one of fold 0's 36 test clips moves it by ~0.03.
    ft = downstream["finetune"]
    av, audio = _uar(ft), _uar(ft, "audio")
    assert av >= audio - 0.03, f"fold-0 UAR: av {av:.3f}, audio only {audio:.3f}"


def test_embed_prints_one_vector_per_real_clip(realdata_dir, tmp_path, capsys):
    cfg = ModelConfig(**tiny(depth=2, decoder_depth=2, skip_layers=[2]))
    torch.manual_seed(0)
    export = save_export(
        AVEncoder(cfg), cfg.to_dict(), input_spec({}, cfg.to_dict()), tmp_path / "export", "test"
    )
    clip = realdata_dir / "grid_lipnet" / "bbaf2n.mpg"  # MPEG-1 + MP2 at 44.1 kHz: resampled to 16 kHz
    assert embed_main([str(clip), "--encoder", str(export), "--out", str(tmp_path / "e.npy")]) == 0
    emb = np.load(tmp_path / "e.npy")
    assert emb.shape == (4 * 64,) and np.isfinite(emb).all() and emb.std() > 0
    assert embed_main([str(tmp_path / "missing.mp4"), "--encoder", str(export)]) == 1
    assert "video file not found" in capsys.readouterr().err
