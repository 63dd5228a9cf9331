"""`emomae synth`: a procedural audio-visual emotion dataset written as real mp4 files.

Six CREMA-D classes, drawn faces whose expression depends on the class and voices whose prosody
does, with speaker identities, per-clip intensity and noise. The classes are split across the
modalities on purpose (docs/synthetic.md): the face cannot tell ANG from DIS nor FEA from SAD, the
voice cannot tell ANG from HAP nor DIS from SAD, so a unimodal classifier tops out at 4/6 while an
audio-visual one can be right on every clip. The mouth opens with the speech envelope frame by
frame, which gives a contrastive AV objective something to find.

Outputs under `out_dir`: `clips/<key>.mp4` (H.264 or MPEG-4 video + AAC mono audio), `manifest.csv`
(docs/architecture.md), `params.jsonl` (every generator parameter per clip), `captions.jsonl`
(`{"key", "caption"}`, templated from those parameters) and `synth.yaml` (the config).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from data_pipelines.manifests import ManifestRow, dataset_info, speaker_folds, write_manifest

CLASSES: tuple[str, ...] = dataset_info("crema-d").classes  # ANG DIS FEA HAP NEU SAD

# The confusion design: which face and which voice each class gets. Classes sharing a group are
# drawn from the same distribution in that modality, so only the other modality separates them.
FACE_GROUP = {"ANG": "frown", "DIS": "frown", "FEA": "worried", "SAD": "worried", "HAP": "smile", "NEU": "neutral"}
VOICE_GROUP = {"ANG": "aroused", "HAP": "aroused", "DIS": "subdued", "SAD": "subdued", "FEA": "trembling",
               "NEU": "plain"}

# Face prototypes at full intensity. brow_tilt < 0: inner ends down (drawn together); mouth_curve > 0:
# corners up; lip_press thins the lips and damps the articulation; mouth_rest: opening between syllables.
FACES: dict[str, dict[str, float]] = {
    "neutral": dict(brow_raise=0.0, brow_tilt=0.0, eye_open=1.0, mouth_curve=0.0, mouth_width=1.0, lip_press=0.0,
                    mouth_rest=0.0),
    "frown": dict(brow_raise=-1.0, brow_tilt=-1.0, eye_open=0.6, mouth_curve=-0.3, mouth_width=0.8, lip_press=0.8,
                  mouth_rest=0.0),
    "worried": dict(brow_raise=0.8, brow_tilt=1.0, eye_open=1.25, mouth_curve=-0.9, mouth_width=1.05, lip_press=0.2,
                    mouth_rest=0.3),
    "smile": dict(brow_raise=0.3, brow_tilt=0.0, eye_open=0.7, mouth_curve=1.0, mouth_width=1.25, lip_press=0.0,
                  mouth_rest=0.6),
}
# Voice prototypes: loudness (dB re. the loudest), pitch shift and accent range (semitones), spectral
# tilt (harmonic k has amplitude k^-tilt: low = tense/bright), jitter (relative f0 noise), tremor
# (semitones at ~5.5 Hz), breathiness (aspiration share) and contour (pitch slope per syllable, st).
VOICES: dict[str, dict[str, float]] = {
    "plain": dict(loudness_db=-8.0, pitch_st=0.0, range_st=1.5, tilt=1.2, jitter=0.004, tremor_st=0.0, breath=0.08,
                  contour=-1.0),
    "aroused": dict(loudness_db=0.0, pitch_st=5.0, range_st=4.0, tilt=0.7, jitter=0.004, tremor_st=0.0, breath=0.04,
                    contour=1.5),
    "trembling": dict(loudness_db=-5.0, pitch_st=8.0, range_st=2.0, tilt=1.3, jitter=0.02, tremor_st=0.8, breath=0.3,
                      contour=0.5),
    "subdued": dict(loudness_db=-14.0, pitch_st=-3.0, range_st=0.6, tilt=1.9, jitter=0.012, tremor_st=0.0,
                    breath=0.2, contour=-2.0),
}
# Size of one unit of `expression_jitter` per parameter (so one jitter value suits them all).
FACE_SCALE = dict(brow_raise=1.0, brow_tilt=1.0, eye_open=0.4, mouth_curve=1.0, mouth_width=0.3, lip_press=0.8,
                  mouth_rest=0.5)
VOICE_SCALE = dict(loudness_db=10.0, pitch_st=5.0, range_st=2.0, tilt=0.8, jitter=0.01, tremor_st=0.5, breath=0.2,
                   contour=1.5)
# (F1, F2, F3) in Hz of an adult male vocal tract; speakers scale them by their tract factor.
VOWELS = np.array([[730, 1090, 2440], [530, 1840, 2480], [270, 2290, 3010], [570, 840, 2410], [300, 870, 2240]],
                  dtype=np.float64)
SKIN = np.array([[255, 224, 196], [241, 194, 125], [224, 172, 105], [198, 134, 66], [141, 85, 36], [92, 56, 30]],
                dtype=np.float32)
HAIR = np.array([[20, 15, 10], [60, 40, 25], [110, 75, 40], [200, 170, 110], [150, 60, 30], [120, 120, 120]],
                dtype=np.float32)
AAC_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)


@dataclass
class SynthConfig:
    """Size, identity, noise and encoding of the built-in dataset (every key is a `key=value` override)."""

    seed: int = 0
    num_speakers: int = 10
    clips_per_speaker_class: int = 5
    frame_size: int = 128  # square frames, pixels (even: yuv420p)
    fps: float = 25.0
    seconds: float = 2.56
    sample_rate: int = 16000  # of the AAC track; 44100/48000 exercise the resampling path
    folds: int = 5  # speaker-independent folds
    intensity_min: float = 0.5  # per-clip expression intensity, uniform in [min, max], both modalities
    intensity_max: float = 1.0
    expression_jitter: float = 0.1  # per-clip noise on every face/voice parameter (units of FACE/VOICE_SCALE)
    head_motion: float = 0.03  # head sway amplitude, fraction of the frame
    pixel_noise: float = 3.0  # sensor noise std, uint8 levels
    noise_dbfs_min: float = -55.0  # background noise RMS per clip, uniform in dBFS
    noise_dbfs_max: float = -35.0
    video_codec: str = "libx264"  # or "mpeg4"
    crf: int = 18  # libx264 quality (mpeg4 gets a bit rate instead)
    caption_emotion_rate: float = 0.5  # share of captions that also name the emotion
    workers: int = 0  # clip-writing processes; 0: one per CPU core (at most 8; none for small jobs)

    def __post_init__(self) -> None:
        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise ValueError(f"SynthConfig.{key}={getattr(self, key)!r}: expected {what}")

        need(self.seed >= 0, "seed", "a non-negative integer")
        need(self.num_speakers >= 1 and self.clips_per_speaker_class >= 1, "num_speakers", ">= 1 speakers and clips")
        need(2 <= self.folds <= self.num_speakers, "folds", f"2 <= folds <= num_speakers ({self.num_speakers})")
        # decord 0.6.0 misreads frames 48 or 72 pixels wide (it infers 4 channels from the row padding).
        need(self.frame_size >= 32 and self.frame_size % 2 == 0 and self.frame_size not in (48, 72), "frame_size",
             "an even size >= 32 (yuv420p), not 48 or 72 (decord 0.6.0 misreads those widths)")
        need(0 < self.fps <= 120, "fps", "0 < fps <= 120")
        need(0.5 <= self.seconds <= 60, "seconds", "0.5 <= seconds <= 60")
        need(self.sample_rate in AAC_RATES, "sample_rate", f"one of the AAC rates {AAC_RATES}")
        need(0 <= self.intensity_min <= self.intensity_max, "intensity_min", "0 <= intensity_min <= intensity_max")
        need(self.noise_dbfs_min <= self.noise_dbfs_max < 0, "noise_dbfs_min", "noise_dbfs_min <= noise_dbfs_max < 0")
        need(self.video_codec in ("libx264", "mpeg4"), "video_codec", "'libx264' or 'mpeg4'")
        need(0 <= self.caption_emotion_rate <= 1, "caption_emotion_rate", "a share in [0, 1]")
        need(self.workers >= 0, "workers", ">= 0")


# ---------------------------------------------------------------- parameters


def speaker_traits(cfg: SynthConfig, s: int) -> dict:
    """Identity of speaker `s`: looks, base pitch, vocal tract and habits (fixed by seed and index)."""
    rng = np.random.default_rng([cfg.seed, 0, s])
    female = bool(rng.random() < 0.5)
    mix = lambda table: (table[rng.integers(len(table))] * 0.7 + table[rng.integers(len(table))] * 0.3)  # noqa: E731
    return {
        "speaker": f"spk{s:03d}",
        "female": female,
        "f0": float((205.0 if female else 115.0) * 2 ** (rng.normal(0, 2) / 12)),
        "tract": float((1.17 if female else 1.0) * rng.uniform(0.95, 1.05)),
        "rate": float(rng.uniform(3.6, 5.0)),  # syllables per second
        "skin": (mix(SKIN) + rng.normal(0, 6, 3)).clip(0, 255).round(1).tolist(),
        "hair": (mix(HAIR) + rng.normal(0, 8, 3)).clip(0, 255).round(1).tolist(),
        "background": rng.uniform(40, 215, 3).round(1).tolist(),
        "shirt": rng.uniform(20, 235, 3).round(1).tolist(),
        "face_width": float(rng.uniform(0.28, 0.32)),  # half-width, fraction of the frame
        "face_aspect": float(rng.uniform(1.18, 1.32)),
        "eye_dx": float(rng.uniform(0.36, 0.46)),  # in face half-widths
        "mouth_y": float(rng.uniform(0.5, 0.58)),
        "lip": float(rng.uniform(0.04, 0.06)),
        "offset": rng.uniform(-0.03, 0.03, 2).round(4).tolist(),
        # Resting habits: some faces look a little stern or glum at rest.
        "rest_brow": float(rng.normal(0, 0.12)),
        "rest_mouth": float(rng.normal(0, 0.12)),
    }


def clip_params(cfg: SynthConfig, spk: dict, label: int, rng: np.random.Generator) -> dict:
    """Face and voice parameters of one clip: class prototype scaled by intensity, plus jitter."""
    name = CLASSES[label]
    k = float(rng.uniform(cfg.intensity_min, cfg.intensity_max))
    j = cfg.expression_jitter

    def blend(proto: dict, neutral: dict, scale: dict) -> dict:
        return {p: neutral[p] + k * (proto[p] - neutral[p]) + j * scale[p] * rng.standard_normal() for p in proto}

    face = blend(FACES[FACE_GROUP[name]], FACES["neutral"], FACE_SCALE)
    face["brow_raise"] += spk["rest_brow"]
    face["mouth_curve"] += spk["rest_mouth"]
    face["eye_open"] = max(face["eye_open"], 0.3)
    face["mouth_width"] = float(np.clip(face["mouth_width"], 0.6, 1.5))
    face["lip_press"] = float(np.clip(face["lip_press"], 0.0, 1.0))
    face["mouth_rest"] = max(face["mouth_rest"], 0.0)
    voice = blend(VOICES[VOICE_GROUP[name]], VOICES["plain"], VOICE_SCALE)
    for p in ("range_st", "jitter", "tremor_st", "breath"):
        voice[p] = max(voice[p], 0.0)
    voice["breath"] = min(voice["breath"], 0.6)
    voice["tilt"] = max(voice["tilt"], 0.3)
    return {
        "label": label, "label_name": name, "intensity": k,
        "face": {p: round(v, 4) for p, v in face.items()},
        "voice": {p: round(v, 5) for p, v in voice.items()},
        # Speaking rate is a speaker habit, not a class cue: the lips show the syllable rhythm, so a
        # class-dependent rate would let the face see the voice's class (docs/synthetic.md).
        "rate": round(spk["rate"] * math.exp(0.1 * rng.standard_normal()), 4),
        "gain_db": round(float(rng.uniform(-2, 2)), 3),
        "noise_dbfs": round(float(rng.uniform(cfg.noise_dbfs_min, cfg.noise_dbfs_max)), 2),
    }


# ---------------------------------------------------------------- voice


def synth_voice(spk: dict, clip: dict, seconds: float, sr: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Source-filter speech: harmonics of a prosodic f0 contour shaped by per-syllable formants.

    Returns `wave` (N,) float32 in [-1, 1] and the syllable energy envelope `env` (N,) in [0, 1].
    """
    v = clip["voice"]
    n = round(seconds * sr)
    t = np.arange(n) / sr
    # Syllables: onsets, lengths, accents and vowels; occasional pauses between words.
    onsets, lengths = [], []
    pos = rng.uniform(0.05, 0.25)
    while pos < seconds:
        d = rng.uniform(0.75, 1.25) / clip["rate"]
        onsets.append(pos)
        lengths.append(d)
        pos += d + (rng.uniform(0.1, 0.3) if rng.random() < 0.15 else 0.0)
    onsets, lengths = np.array(onsets), np.array(lengths)
    m = len(onsets)
    accent = rng.uniform(0.55, 1.0, m)
    target = v["range_st"] * np.clip(rng.standard_normal(m), -2.5, 2.5)
    vowel = VOWELS[rng.integers(len(VOWELS), size=m)] * spk["tract"]

    idx = np.searchsorted(onsets, t, side="right") - 1
    ok = idx >= 0
    idx = np.maximum(idx, 0)
    tau = (t - onsets[idx]) / lengths[idx]
    nucleus = ok & (tau < 0.8)  # the last fifth of a syllable is a closure
    env = np.where(nucleus, accent[idx] * np.sin(np.pi * np.clip(tau, 0, 0.8) / 0.8) ** 0.7, 0.0)

    semis = (v["pitch_st"] + target[idx] + v["contour"] * (tau - 0.4) - 1.5 * (t / seconds - 0.5)
             + v["tremor_st"] * np.sin(2 * np.pi * 5.5 * t + rng.uniform(0, 2 * np.pi)))
    wobble = np.interp(t, np.arange(int(seconds * 200) + 2) / 200, rng.standard_normal(int(seconds * 200) + 2))
    f0 = spk["f0"] * 2 ** (semis / 12) * (1 + v["jitter"] * wobble)
    phase = 2 * np.pi * np.cumsum(f0) / sr

    # Harmonic amplitudes: tilt times a sum of formant resonances, evaluated at k * f0(t). They vary
    # slowly, so they are computed once per millisecond block; only the sines run at the sample rate.
    top = min(0.45 * sr, 5000.0)
    harmonics = np.arange(1, int(top / f0.min()) + 1, dtype=np.float32)[:, None]
    hop = max(1, sr // 1000)
    blocks = -(-n // hop)
    coarse = np.arange(blocks) * hop
    fk = harmonics * f0[coarse].astype(np.float32)[None]
    shape = np.full_like(fk, 0.03)
    for j, (gain, width) in enumerate(((1.0, 90.0), (0.6, 110.0), (0.3, 170.0))):
        centre = vowel[idx[coarse], j].astype(np.float32)
        shape += gain / (1 + ((fk - centre) / np.float32(width * (1 + 2 * v["breath"]))) ** 2)
    amp = harmonics ** np.float32(-v["tilt"]) * shape * (fk < top)
    amp /= np.sqrt(0.5 * (amp**2).sum(0)) + 1e-9  # unit power: loudness is set below, not by the tilt
    offsets = rng.uniform(0, 2 * np.pi, (len(harmonics), 1)).astype(np.float32)
    # Wrapping first keeps k * phase exact in float32 (k is an integer).
    padded = np.pad(np.mod(phase, 2 * np.pi), (0, blocks * hop - n)).astype(np.float32)
    sines = np.sin(harmonics * padded[None] + offsets).reshape(len(harmonics), blocks, hop)
    voiced = np.einsum("kbh,kb->bh", sines, amp).reshape(-1)[:n]

    hiss = np.diff(rng.standard_normal(n + 1))  # first difference: aspiration is high-frequency
    speech = env * ((1 - v["breath"]) * voiced + v["breath"] * 1.5 * hiss)
    since = t - onsets[idx]
    speech += ok * (since < 0.03) * np.exp(-since / 0.008) * 0.5 * accent[idx] * hiss  # consonant bursts
    speech *= 0.18 * 10 ** ((v["loudness_db"] + clip["gain_db"]) / 20)

    # Room noise: pink (1/f power), shaped in the frequency domain, scaled to unit RMS.
    spectrum = np.fft.rfft(rng.standard_normal(n)) / np.sqrt(np.maximum(np.fft.rfftfreq(n, 1 / sr), 20.0))
    room = np.fft.irfft(spectrum, n)
    room /= room.std() + 1e-12
    wave = speech + room * 10 ** (clip["noise_dbfs"] / 20)
    return np.clip(wave, -1, 1).astype(np.float32), env.astype(np.float32)


def frame_envelope(env: np.ndarray, sr: int, fps: float, num_frames: int) -> np.ndarray:
    """Mean speech envelope over each video frame's time span: (T,) in [0, 1]."""
    edges = np.minimum((np.arange(num_frames) * sr / fps).round().astype(int), len(env) - 1)
    sums = np.add.reduceat(env, edges)
    counts = np.diff(np.append(edges, len(env)))
    return sums / np.maximum(counts, 1)


# ---------------------------------------------------------------- face


def _soft(d: np.ndarray, px: float) -> np.ndarray:
    """Anti-aliased coverage of a shape from its signed distance `d` (negative inside), px = 1 pixel."""
    return np.clip(0.5 - d / px, 0.0, 1.0)


def _paint(img: np.ndarray, cover: np.ndarray, color) -> None:
    """Alpha-composite `color` over `img` (..., 3) in place with coverage `cover` (...)."""
    color = np.asarray(color, dtype=np.float32)
    img -= color  # img = (img - color) * (1 - cover) + color: in place, no 3-channel temporaries
    img *= (1 - cover)[..., None]
    img += color


def _band(img: np.ndarray, a: np.ndarray, b: np.ndarray, cy: np.ndarray, rx: float, top: float,
          bottom: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Views of the image rows that can hold face units [top, bottom] in a chunk of frames (margin:
    roll, anti-aliasing); painting only those is most of the renderer's speed."""
    size = img.shape[1]
    r0 = min(size, max(0, int(cy.min() + (top - 0.25) * rx)))
    r1 = max(r0, min(size, int(cy.max() + (bottom + 0.25) * rx) + 1))
    return img[:, r0:r1], a[:, r0:r1], b[:, r0:r1]


def render_face(spk: dict, clip: dict, mouth: np.ndarray, size: int, fps: float, cfg: SynthConfig,
                rng: np.random.Generator) -> np.ndarray:
    """Draw the talking face. `mouth`: (T,) speech envelope per frame. Returns (T, S, S, 3) uint8."""
    f = clip["face"]
    frames = len(mouth)
    t = np.arange(frames) / fps
    ph = rng.uniform(0, 2 * np.pi, 4)
    hz = rng.uniform(0.15, 0.5, 2)
    sway = cfg.head_motion * size
    cx = size * (0.5 + spk["offset"][0]) + sway * (0.7 * np.sin(2 * np.pi * hz[0] * t + ph[0])
                                                  + 0.3 * np.sin(3.4 * np.pi * hz[0] * t + ph[1]))
    cy = size * (0.53 + spk["offset"][1]) + 0.6 * sway * np.sin(2 * np.pi * hz[1] * t + ph[2])
    roll = (cfg.head_motion / 0.03) * 0.04 * np.sin(1.6 * np.pi * hz[1] * t + ph[3])
    blink = np.ones(frames)
    for start in rng.uniform(0, frames / fps, rng.poisson(0.3 * frames / fps)):  # ~18 blinks a minute
        blink = np.minimum(blink, np.clip(np.abs(t - start - 0.075) / 0.075, 0.05, 1.0))
    eye_open = f["eye_open"] * blink
    opening = 0.035 * f["mouth_rest"] + 0.17 * mouth * (1 - 0.5 * f["lip_press"])

    rx = spk["face_width"] * size  # everything below is in face half-widths (rx pixels)
    asp = spk["face_aspect"]
    px = 1.0 / rx
    skin = np.array(spk["skin"], np.float32)
    rows = (np.arange(size, dtype=np.float32) + 0.5)[:, None] / size
    backdrop = np.array(spk["background"], np.float32) * (1.1 - 0.2 * rows[..., None])  # (S, 1, 3)
    gain = rng.uniform(0.85, 1.15) * (1 + rng.uniform(-0.2, 0.2) * (rows.T - 0.5))  # light level and side
    out = np.empty((frames, size, size, 3), np.uint8)
    step = max(1, (1 << 20) // (size * size))  # bound memory at large frame sizes
    grid = np.arange(size, dtype=np.float32) + 0.5
    cx, cy, roll = cx.astype(np.float32), cy.astype(np.float32), roll.astype(np.float32)
    for lo in range(0, frames, step):
        sl = slice(lo, lo + step)
        n = len(t[sl])
        c, s = np.cos(roll[sl])[:, None, None], np.sin(roll[sl])[:, None, None]
        dx, dy = grid[None, None, :] - cx[sl, None, None], grid[None, :, None] - cy[sl, None, None]
        a, b = (c * dx + s * dy) / rx, (c * dy - s * dx) / rx
        img = np.broadcast_to(backdrop, (n, size, size, 3)).astype(np.float32)

        band = partial(_band, img, a, b, cy[sl], rx)

        part, pa, pb = band(asp + 0.1, 9.0)
        _paint(part, _soft(np.hypot(pa / 1.9, (pb - asp - 0.95) / 0.85) - 1, px / 0.85), spk["shirt"])
        part, pa, pb = band(0.0, 9.0)
        _paint(part, _soft(np.maximum(np.abs(pa) - 0.42, -pb), px), skin * 0.82)  # neck
        part, pa, pb = band(-asp - 0.2, asp - 0.2)
        _paint(part, _soft((np.hypot(pa / 1.1, (pb + 0.2) / asp) - 1) * 1.1, px), spk["hair"])
        part, pa, pb = band(-asp, asp)
        r2 = pa**2 + (pb / asp) ** 2
        _paint(part, _soft(np.sqrt(r2) - 1, px), skin * (1 - 0.18 * r2[..., None]))
        part, pa, pb = band(-0.04, 0.28)
        _paint(part, 0.6 * _soft(np.hypot(pa / 0.09, (pb - 0.12) / 0.16) - 1, px / 0.09), skin * 0.8)  # nose

        eye_y, bt = -0.28, 0.045
        brow_y = eye_y - 0.22 - 0.08 * f["brow_raise"]
        part, ea, eb = band(brow_y - 0.2, eye_y + 0.15)
        eh = np.maximum(0.09 * eye_open[sl], 0.004).astype(np.float32)[:, None, None]
        for side in (-1.0, 1.0):
            ex = side * spk["eye_dx"]
            sclera = (np.hypot((ea - ex) / 0.16, (eb - eye_y) / eh) - 1) * np.minimum(0.16, eh)
            _paint(part, _soft(sclera, px), (235, 235, 228))
            _paint(part, _soft(np.maximum(np.hypot(ea - ex, eb - eye_y) - 0.075, sclera), px), (55, 40, 30))
            # Brow: a thick segment; tilt < 0 pulls the inner end down and towards the nose.
            ia = side * (spk["eye_dx"] - 0.13 + 0.05 * min(f["brow_tilt"], 0.0))
            ib, oa, ob = brow_y - 0.07 * f["brow_tilt"], side * (spk["eye_dx"] + 0.2), brow_y + 0.02 * f["brow_tilt"]
            u = np.clip(((ea - ia) * (oa - ia) + (eb - ib) * (ob - ib)) / ((oa - ia) ** 2 + (ob - ib) ** 2), 0, 1)
            _paint(part, _soft(np.hypot(ea - ia - u * (oa - ia), eb - ib - u * (ob - ib)) - bt, px),
                   np.array(spk["hair"], np.float32) * 0.8)

        # Mouth: a lip band around a midline bent by mouth_curve, opened by the speech envelope.
        centre = spk["mouth_y"] * asp
        part, ma, mb = band(centre - 0.25, centre + 0.4)
        mw = 0.3 * f["mouth_width"]
        un2 = np.minimum((ma / mw) ** 2, 1.0)
        arc = np.sqrt(1 - un2)
        mid = centre - 0.14 * f["mouth_curve"] * (un2 - 0.25)
        o = opening[sl].astype(np.float32)[:, None, None]
        top, bottom = mid - 0.35 * o * arc, mid + 0.65 * o * arc
        lip = spk["lip"] * (1 - 0.6 * f["lip_press"]) * np.sqrt(arc) + 0.008
        side_d = np.abs(ma) - mw
        _paint(part, _soft(np.maximum.reduce([side_d, top - lip - mb, mb - bottom - lip]), px), skin * [0.8, 0.5, 0.5])
        inside = np.maximum.reduce([side_d + 0.02, top - mb, mb - bottom])
        _paint(part, _soft(inside, px), (60, 20, 25))
        _paint(part, _soft(np.maximum(inside, mb - top - 0.35 * (bottom - top)), px), (225, 220, 205))

        img *= gain[None, :, :, None]
        # Luma-only sensor noise: a third of the random numbers, and what the codec keeps anyway.
        img += rng.standard_normal((n, size, size, 1), dtype=np.float32) * np.float32(cfg.pixel_noise)
        out[sl] = np.clip(img, 0, 255).round()
    return out


# ---------------------------------------------------------------- captions


def caption(clip: dict, rng: np.random.Generator, emotion_rate: float) -> str:
    """A detailed affective description from the generator's parameters, in varied wording."""
    f, v = clip["face"], clip["voice"]
    pick = lambda *words: words[rng.integers(len(words))]  # noqa: E731
    shown = max(abs(f[p]) for p in ("brow_raise", "brow_tilt", "mouth_curve"))  # 0 is the neutral face
    how = (pick("hardly", "barely") if shown < 0.35 else "slightly" if shown < 0.6
           else pick("clearly", "markedly") if shown < 0.85 else pick("strongly", "intensely"))
    if f["brow_tilt"] < -0.35:
        brows = pick("brows lowered and drawn together", "a furrowed brow", "brows knit down towards the nose")
    elif f["brow_tilt"] > 0.35:
        brows = pick("inner brows pulled upward", "brows raised and slanted in worry", "brows lifted at the inner ends")
    else:
        brows = pick("relaxed brows", "brows at rest", "an untroubled brow")
    eyes = (pick("narrowed eyes", "eyes slightly squinted") if f["eye_open"] < 0.8
            else pick("wide-open eyes", "eyes opened wide") if f["eye_open"] > 1.12
            else pick("eyes open normally", "a steady gaze"))
    if f["mouth_curve"] > 0.4:
        mouth = pick("a broad smile", "lip corners pulled up into a smile", "a grin")
    elif f["mouth_curve"] < -0.4:
        mouth = pick("lip corners turned down", "a downturned mouth")
    elif f["lip_press"] > 0.35:
        mouth = pick("lips pressed tight", "tightened lips", "a thin, pressed mouth")
    else:
        mouth = pick("a relaxed mouth", "a neutral mouth")
    loud = (pick("loud", "forceful", "raised") if v["loudness_db"] > -4
            else pick("quiet", "soft", "subdued") if v["loudness_db"] < -10 else pick("moderate", "conversational"))
    pitch = (pick("high", "elevated") if v["pitch_st"] > 3 else pick("low", "deep") if v["pitch_st"] < -1.5
             else pick("mid-range", "medium"))
    spread = (pick("animated", "widely varying", "lively") if v["range_st"] > 2.5
              else pick("flat", "monotone", "level") if v["range_st"] < 1.0 else pick("moderately varied", "natural"))
    tempo = (pick("fast", "quick", "hurried") if clip["rate"] > 4.7 else pick("slow", "unhurried", "measured")
             if clip["rate"] < 3.9 else pick("steady", "even"))
    contour = (pick("rising", "lifting") if v["contour"] > 0.6 else pick("falling", "sinking") if v["contour"] < -0.6
               else pick("level", "steady"))
    quality = (pick("trembling", "shaky", "quavering") if v["tremor_st"] > 0.35
               else pick("breathy", "airy") if v["breath"] > 0.15
               else pick("tense, bright", "sharp, pressed") if v["tilt"] < 0.95
               else pick("dark, muffled", "heavy") if v["tilt"] > 1.6 else pick("clear", "plain"))
    face_part = pick(
        f"The speaker's face is {how} expressive: {brows}, {eyes} and {mouth}",
        f"A face with {mouth}, {brows} and {eyes}",
        f"Their expression, {how} marked, shows {brows}, {eyes} and {mouth}",
        f"On screen: {brows}, {eyes}, {mouth}",
    )
    voice_part = pick(
        f"the voice is {loud} with {_a(pitch)} {pitch}, {spread} pitch and {_a(tempo)} {tempo} tempo",
        f"they speak in {_a(loud)} {loud}, {quality} voice at {_a(tempo)} {tempo} pace, pitched {pitch} and {contour} "
        "within syllables",
        f"the speech is {tempo} and {loud}; the {quality} voice stays {pitch} with {spread} intonation",
        f"the voice sounds {quality} and {loud}, {pitch} in pitch, with {spread} intonation",
    )
    text = f"{face_part}; {voice_part}." if rng.random() < 0.5 else f"{voice_part[0].upper()}{voice_part[1:]}. {face_part}."
    if rng.random() < emotion_rate:
        word = {"ANG": ("angry", "irritated", "furious"), "DIS": ("disgusted", "repulsed"),
                "FEA": ("fearful", "afraid", "anxious"), "HAP": ("happy", "joyful", "cheerful"),
                "NEU": ("neutral", "calm", "composed"), "SAD": ("sad", "sorrowful", "downcast")}[clip["label_name"]]
        text += f" Overall the person seems {pick(*word)}."
    return text


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# ---------------------------------------------------------------- files


def write_mp4(path: Path, frames: np.ndarray, wave: np.ndarray, fps: float, sr: int, codec: str = "libx264",
              crf: int = 18) -> None:
    """frames (T, H, W, 3) uint8 RGB + wave (N,) float32 mono -> one mp4 (written to a temp name first)."""
    import av

    tmp = path.with_suffix(".part")
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(tmp), "w", format="mp4") as box:
        video = box.add_stream(codec, rate=rate)
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        video.thread_count = 1  # clips are small; parallelism comes from worker processes
        if codec == "libx264":
            video.options = {"crf": str(crf), "preset": "ultrafast"}
        else:
            video.bit_rate = int(max(2e5, 0.8 * frames.shape[1] * frames.shape[2] * fps))
        audio = box.add_stream("aac", rate=sr)
        audio.layout = "mono"
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = i, 1 / rate
            box.mux(video.encode(frame))
        box.mux(video.encode())
        # pts 0 makes the encoder's priming samples negative, so the muxer writes an edit list and
        # decoders (decord included) start the audio at t = 0, in sync with frame 0.
        sound = av.AudioFrame.from_ndarray(wave[None], format="fltp", layout="mono")
        sound.sample_rate, sound.pts, sound.time_base = sr, 0, Fraction(1, sr)
        box.mux(audio.encode(sound))
        box.mux(audio.encode())
    os.replace(tmp, path)


def make_clip(cfg: SynthConfig, s: int, label: int, i: int, clips_dir: Path) -> dict:
    """Generate and write one clip; returns its params record (with the caption)."""
    spk = speaker_traits(cfg, s)
    rng = np.random.default_rng([cfg.seed, 1, s, label, i])
    clip = clip_params(cfg, spk, label, rng)
    key = f"synth-s{s:03d}-{CLASSES[label]}-{i:03d}"
    num_frames = round(cfg.seconds * cfg.fps)
    wave, env = synth_voice(spk, clip, cfg.seconds, cfg.sample_rate, rng)
    mouth = frame_envelope(env, cfg.sample_rate, cfg.fps, num_frames)
    frames = render_face(spk, clip, mouth, cfg.frame_size, cfg.fps, cfg, rng)
    write_mp4(clips_dir / f"{key}.mp4", frames, wave, cfg.fps, cfg.sample_rate, cfg.video_codec, cfg.crf)
    text = caption(clip, np.random.default_rng([cfg.seed, 2, s, label, i]), cfg.caption_emotion_rate)
    return {"key": key, "speaker": spk["speaker"], **clip, "mouth_envelope": mouth.round(4).tolist(),
            "speaker_traits": spk, "caption": text}


def _make_clip_job(job: tuple) -> dict:
    return make_clip(*job)


def generate(out_dir: Path, cfg: SynthConfig | None = None) -> Path:
    """Write the dataset under `out_dir`; returns the path of its `manifest.csv`."""
    cfg = cfg or SynthConfig()
    cfg.__post_init__()  # again: fields may have been changed after construction
    out_dir = Path(out_dir)
    clips_dir = out_dir / "clips"
    clips_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(cfg, s, c, i, clips_dir) for s in range(cfg.num_speakers) for c in range(len(CLASSES))
            for i in range(cfg.clips_per_speaker_class)]
    # Auto: one process per core, but none for small jobs, where starting them costs more than it saves.
    workers = min(cfg.workers or min(os.cpu_count() or 1, 8, len(jobs) // 16), len(jobs))
    if workers > 1:
        # spawn: the parent may hold torch/OpenMP threads, which fork would copy in a broken state.
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            records = list(pool.map(_make_clip_job, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
    else:
        records = [make_clip(*job) for job in jobs]

    folds = speaker_folds([r["speaker"] for r in records], cfg.folds, seed=cfg.seed)
    rows = [ManifestRow(key=r["key"], video=f"clips/{r['key']}.mp4", label=str(r["label"]),
                        label_name=r["label_name"], speaker=r["speaker"], fold=folds[r["speaker"]]) for r in records]
    manifest = write_manifest(rows, out_dir / "manifest.csv")
    with (out_dir / "params.jsonl").open("w") as fp, (out_dir / "captions.jsonl").open("w") as fc:
        for r in records:
            text = r.pop("caption")
            fp.write(json.dumps({**r, "fold": folds[r["speaker"]]}) + "\n")
            fc.write(json.dumps({"key": r["key"], "caption": text}) + "\n")
    from omegaconf import OmegaConf

    OmegaConf.save(OmegaConf.structured(cfg), out_dir / "synth.yaml")
    return manifest


def main(argv: list[str] | None = None) -> int:
    """`emomae synth --out DIR [--config YAML] [key=value ...]`."""
    from omegaconf import OmegaConf

    from pretrain.config import ConfigError, load_config

    p = argparse.ArgumentParser(prog="emomae synth", description="Generate the built-in procedural AV emotion "
                                "dataset: mp4 clips, manifest.csv, params.jsonl, captions.jsonl (docs/synthetic.md).")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--config", type=Path, default=None, help="YAML with SynthConfig keys")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help=f"SynthConfig keys: {', '.join(SynthConfig.__dataclass_fields__)}")
    args = p.parse_args(argv)
    try:
        cfg = OmegaConf.to_object(load_config(SynthConfig, args.config, args.overrides))
    except (ConfigError, ValueError) as err:
        print(f"emomae synth: {err}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    manifest = generate(args.out, cfg)
    took = time.perf_counter() - start
    n = cfg.num_speakers * len(CLASSES) * cfg.clips_per_speaker_class
    print(f"wrote {n} clips ({cfg.num_speakers} speakers x {len(CLASSES)} classes x {cfg.clips_per_speaker_class}, "
          f"{cfg.frame_size}px, {cfg.seconds:g} s) in {took:.1f} s ({n / took:.1f} clips/s): {manifest}")
    return 0

