"""The built-in dataset: real mp4 files that decord reads, a correct manifest, reproducibility, and a
class signal that is real, split across the modalities, and synchronous between lips and voice.

Every check on content works on what decord decodes from the written files, not on the generator's
arrays, so it also covers the codecs and the audio/video alignment in the container.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from pathlib import Path

import decord
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchaudio.functional as AF

from data_pipelines.manifests import COLUMNS, speaker_folds
from data_pipelines.synthetic import (
    CLASSES,
    FACE_GROUP,
    FACES,
    VOICE_GROUP,
    SynthConfig,
    clip_params,
    generate,
    main,
    speaker_traits,
)

# conftest's SYNTH_TEST_SIZE: 6 speakers x 6 classes x 2 clips, 64 px, 25 fps, 2.56 s, 16 kHz.
FRAMES, SIZE, SR, AUDIO = 64, 64, 16000, 40960


def _rows(manifest: Path) -> list[dict]:
    with manifest.open(newline="") as f:
        return list(csv.DictReader(f))


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def decoded(synth_manifest):
    """Every clip of the shared built-in dataset, decoded by decord: gray frames (N, T, H, W) and
    16 kHz mono audio (N, L), plus the manifest rows."""
    rows = _rows(synth_manifest)
    gray, audio = [], []
    for r in rows:
        path = str(synth_manifest.parent / r["video"])
        gray.append(decord.VideoReader(path)[:].asnumpy().astype(np.float32).mean(-1))
        audio.append(decord.AudioReader(path, sample_rate=SR, mono=True)[:].asnumpy()[0, :AUDIO])
    return rows, np.stack(gray), np.stack(audio)


# ---------------------------------------------------------------- files and manifest


def test_clips_decode_with_decord_at_configured_frames_size_and_audio_rate(synth_manifest):
    rows = _rows(synth_manifest)
    for cls in CLASSES:  # one clip per class is enough: they share the writer
        path = str(synth_manifest.parent / next(r["video"] for r in rows if r["label_name"] == cls))
        video = decord.VideoReader(path)
        assert len(video) == FRAMES
        assert video[0].shape == (SIZE, SIZE, 3)
        assert video.get_avg_fps() == pytest.approx(25.0)
        audio = decord.AudioReader(path, sample_rate=SR, mono=True)[:].asnumpy()
        assert audio.shape[0] == 1
        # AAC codes whole 1024-sample frames; the edit list trims the encoder delay at the start.
        assert AUDIO <= audio.shape[1] <= AUDIO + 1024
        assert np.sqrt((audio**2).mean()) > 1e-3, f"{path}: silent audio track"


def test_manifest_labels_speakers_and_folds_are_right_and_speaker_disjoint(synth_manifest):
    with synth_manifest.open(newline="") as f:
        header = next(csv.reader(f))
    assert tuple(header) == COLUMNS
    rows = _rows(synth_manifest)
    assert len(rows) == 6 * 6 * 2
    assert all((synth_manifest.parent / r["video"]).is_file() and r["audio"] == "" for r in rows)
    assert all(CLASSES[int(r["label"])] == r["label_name"] for r in rows)
    assert Counter((r["speaker"], r["label_name"]) for r in rows) == {
        (f"spk{s:03d}", c): 2 for s in range(6) for c in CLASSES
    }
    fold_of = {}
    for r in rows:
        assert fold_of.setdefault(r["speaker"], r["fold"]) == r["fold"], (
            f"speaker {r['speaker']} in two folds"
        )
    assert sorted({int(f) for f in fold_of.values()}) == [0, 1, 2, 3, 4]
    assert {s: int(f) for s, f in fold_of.items()} == speaker_folds([r["speaker"] for r in rows], 5, seed=0)
    params = _jsonl(synth_manifest.parent / "params.jsonl")
    assert [(p["key"], p["label"], p["speaker"]) for p in params] == [
        (r["key"], int(r["label"]), r["speaker"]) for r in rows
    ]


def test_same_seed_reproduces_files_and_params_and_other_seed_changes_them(tmp_path):
    tiny = dict(num_speakers=2, folds=2, clips_per_speaker_class=1, frame_size=32, seconds=1.0)

    def digest(out: Path) -> dict[str, str]:
        files = sorted(out.glob("clips/*.mp4")) + [
            out / n for n in ("manifest.csv", "params.jsonl", "captions.jsonl")
        ]
        return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}

    first = digest(generate(tmp_path / "a", SynthConfig(seed=1, workers=1, **tiny)).parent)
    # Two processes must give the same bytes: every clip draws from its own seeded stream.
    again = digest(generate(tmp_path / "b", SynthConfig(seed=1, workers=2, **tiny)).parent)
    other = digest(generate(tmp_path / "c", SynthConfig(seed=2, workers=1, **tiny)).parent)
    assert len(first) == 12 + 3
    assert again == first
    changed = [name for name in first if first[name] != other[name]]
    assert set(changed) >= {n for n in first if n.endswith(".mp4")} | {"params.jsonl", "captions.jsonl"}


def test_cli_writes_a_dataset_from_overrides_with_44k_audio_and_mpeg4(tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(
        [
            "--out",
            str(out),
            "num_speakers=2",
            "folds=2",
            "clips_per_speaker_class=1",
            "frame_size=32",
            "seconds=1.2",
            "sample_rate=44100",
            "video_codec=mpeg4",
            "workers=1",
        ]
    )
    assert code == 0
    assert "12 clips" in capsys.readouterr().out
    rows = _rows(out / "manifest.csv")
    assert len(rows) == 12
    path = str(out / rows[0]["video"])
    video = decord.VideoReader(path)
    assert (len(video), video[0].shape) == (30, (32, 32, 3))
    audio = decord.AudioReader(path, sample_rate=SR, mono=True)[:].asnumpy()
    assert round(1.2 * SR) <= audio.shape[1] <= round(1.2 * SR) + 1024 * SR // 44100 + 1


def test_bad_settings_fail_with_a_message_naming_the_key(tmp_path, capsys):
    with pytest.raises(ValueError, match="folds"):
        SynthConfig(num_speakers=3, folds=5)
    for size in (63, 48):  # odd: no yuv420p; 48: decord 0.6.0 misreads that width
        with pytest.raises(ValueError, match="frame_size"):
            SynthConfig(frame_size=size)
    assert main(["--out", str(tmp_path / "x"), "sample_rate=12345"]) == 2
    assert "sample_rate" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "x"), "num_speaker=3"]) == 2
    assert "num_speaker" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="face_gain"):
        SynthConfig(face_gain=0)


def test_face_gain_scales_the_expression_and_leaves_identity_jitter_and_voice_alone():
    spk = speaker_traits(SynthConfig(), 3)
    one, two = (
        clip_params(SynthConfig(face_gain=gain), spk, CLASSES.index("SAD"), np.random.default_rng(7))
        for gain in (1.0, 2.0)
    )
    k, worried, neutral = one["intensity"], FACES["worried"], FACES["neutral"]
    for p in ("brow_raise", "brow_tilt", "mouth_curve"):  # never clipped for this class
        assert two["face"][p] - one["face"][p] == pytest.approx(k * (worried[p] - neutral[p]), abs=1e-3), p
    assert two["voice"] == one["voice"] and two["intensity"] == k and two["rate"] == one["rate"]


# ---------------------------------------------------------------- the class signal


def _face_features(gray: np.ndarray) -> np.ndarray:
    """Mean brow-band and mouth-band pixels over time, 4 x 4 pooled: (N, 64)."""
    mean = torch.from_numpy(gray.mean(1))[:, None]
    s = gray.shape[-1]
    brow = mean[..., int(0.2 * s) : int(0.5 * s), int(0.25 * s) : int(0.75 * s)]
    mouth = mean[..., int(0.62 * s) : int(0.88 * s), int(0.3 * s) : int(0.7 * s)]
    return torch.cat([F.avg_pool2d(brow, 4).flatten(1), F.avg_pool2d(mouth, 4).flatten(1)], 1).numpy()


def _voice_features(audio: np.ndarray) -> np.ndarray:
    """Loudness, pitch level/range/jitter and spectral balance of the voiced frames: (N, 8)."""
    wave = torch.from_numpy(audio)
    frames = wave.unfold(1, 400, 160)  # 25 ms windows, 10 ms hop
    energy = 10 * torch.log10(frames.pow(2).mean(-1) + 1e-10)
    f0 = AF.detect_pitch_frequency(wave, SR, frame_time=0.02, win_length=5, freq_low=70, freq_high=600)
    f0 = f0[:, torch.linspace(0, f0.shape[1] - 1, energy.shape[1]).round().long()]
    power = torch.fft.rfft(frames * torch.hann_window(400), n=512).abs() ** 2  # 31.25 Hz bins
    out = []
    for e, pitch, p in zip(energy, f0, power):
        voiced = e > e.max() - 25
        semis = 12 * torch.log2(pitch[voiced])
        low, mid, high = p[voiced, 2:32].sum(1), p[voiced, 32:128].sum(1), p[voiced, 128:].sum(1)
        out.append(
            [
                e[voiced].mean(),
                e.quantile(0.95),
                semis.median(),
                semis.quantile(0.9) - semis.quantile(0.1),
                semis.diff().abs().median(),
                torch.log10(mid / low).mean(),
                torch.log10(high / low).mean(),
                voiced.float().mean(),
            ]
        )
    return np.array(out, np.float32)


def _per_speaker_z(x: np.ndarray, speakers: np.ndarray) -> np.ndarray:
    # Speaker normalisation (standard in emotion recognition): removes identity, keeps expression.
    x = x.copy()
    for s in np.unique(speakers):
        m = speakers == s
        x[m] = (x[m] - x[m].mean(0)) / (x[m].std(0) + 1e-6)
    return x


def _fit_logreg(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-2, steps: int = 500) -> torch.Tensor:
    """L2-regularised multinomial logistic regression by full-batch gradient descent with the
    step size 1/L of its smoothness bound. x: (N, D) -> weights (D + 1, C), last row the bias."""
    x = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    onehot = F.one_hot(y, len(CLASSES)).double()
    lipschitz = 0.5 * torch.linalg.eigvalsh(x.T @ x / len(x)).max() + 2 * l2
    w = torch.zeros(x.shape[1], len(CLASSES), dtype=torch.float64)
    for _ in range(steps):
        w -= (x.T @ (torch.softmax(x @ w, 1) - onehot) / len(x) + 2 * l2 * w) / lipschitz
    return w


def _fold_accuracy(x: np.ndarray, y: np.ndarray, folds: np.ndarray) -> tuple[float, np.ndarray]:
    """Leave-one-fold-out logistic regression (speaker-independent folds): accuracy, predictions."""
    pred = np.zeros_like(y)
    for k in np.unique(folds):
        test = folds == k
        w = _fit_logreg(torch.from_numpy(x[~test]), torch.from_numpy(y[~test]))
        pred[test] = (torch.from_numpy(x[test]).double() @ w[:-1] + w[-1]).argmax(1).numpy()
    return float((pred == y).mean()), pred


def test_each_modality_alone_beats_chance_and_audio_visual_beats_both(decoded):
    rows, gray, audio = decoded
    y = np.array([int(r["label"]) for r in rows])
    speakers = np.array([r["speaker"] for r in rows])
    folds = np.array([int(r["fold"]) for r in rows])
    face = _per_speaker_z(_face_features(gray), speakers)
    voice = _per_speaker_z(_voice_features(audio), speakers)
    video_acc, video_pred = _fold_accuracy(face, y, folds)
    audio_acc, audio_pred = _fold_accuracy(voice, y, folds)
    av_acc, _ = _fold_accuracy(np.concatenate([face, voice], 1), y, folds)
    # Measured on this fixture: video 0.50, audio 0.60, AV 0.92 (chance 1/6; unimodal ceiling 4/6).
    assert video_acc > 0.33, video_acc
    assert audio_acc > 0.4, audio_acc
    assert av_acc > max(video_acc, audio_acc) + 0.2, (video_acc, audio_acc, av_acc)
    assert av_acc > 0.75, av_acc

    # The audio's mistakes are the designed ones: classes that share a voice group.
    wrong = audio_pred != y
    same_voice = np.array([VOICE_GROUP[CLASSES[a]] == VOICE_GROUP[CLASSES[b]] for a, b in zip(y, audio_pred)])
    assert (same_voice & wrong).sum() > 0.6 * wrong.sum()
    # ... and the video confuses the classes that share a face group more than any other pairs.
    wrong = video_pred != y
    same_face = np.array([FACE_GROUP[CLASSES[a]] == FACE_GROUP[CLASSES[b]] for a, b in zip(y, video_pred)])
    assert (same_face & wrong).sum() > 0.3 * wrong.sum()


def test_mouth_opening_follows_speech_energy_frame_by_frame(decoded):
    rows, gray, audio = decoded
    s = gray.shape[-1]
    mouth = gray[:, :, int(0.64 * s) : int(0.84 * s), int(0.36 * s) : int(0.64 * s)]
    # How far the mouth region is from its typical look: lips parting show dark mouth and teeth,
    # whatever the skin tone (a sign-free measure, so dark and light faces count alike).
    activity = np.abs(mouth - np.median(mouth, axis=1, keepdims=True)).mean((2, 3))  # (N, T)
    loudness = np.sqrt((audio.reshape(len(audio), FRAMES, -1) ** 2).mean(-1))  # RMS per video frame
    synced = [np.corrcoef(a, e)[0, 1] for a, e in zip(activity, loudness)]
    shifted = [np.corrcoef(a, np.roll(e, 12))[0, 1] for a, e in zip(activity, loudness)]  # 0.48 s off
    # Measured: mean r 0.82 in sync (10 % of clips below 0.66), -0.04 when shifted.
    assert np.mean(synced) > 0.6, np.mean(synced)
    assert np.quantile(synced, 0.1) > 0.3
    assert np.mean(synced) - np.mean(shifted) > 0.5


def test_captions_cover_every_clip_describe_it_and_vary_in_wording(synth_manifest):
    keys = [r["key"] for r in _rows(synth_manifest)]
    captions = _jsonl(synth_manifest.parent / "captions.jsonl")
    assert [c["key"] for c in captions] == keys
    texts = [c["caption"] for c in captions]
    assert all(len(t.split()) >= 15 for t in texts)
    assert len(set(texts)) == len(texts)
    assert len({" ".join(t.split()[:2]) for t in texts}) >= 5  # several templates
    params = {p["key"]: p for p in _jsonl(synth_manifest.parent / "params.jsonl")}
    smiles = ("smile", "grin")
    for c in captions:
        face = params[c["key"]]["face"]
        if face["mouth_curve"] > 0.4:
            assert any(w in c["caption"] for w in smiles), c
        if face["mouth_curve"] < 0.0:
            assert not any(w in c["caption"] for w in smiles), c
    assert any("smile" in t or "grin" in t for t in texts)
