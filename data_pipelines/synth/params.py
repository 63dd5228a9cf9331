"""The synthetic dataset's design: SynthConfig, the class -> face/voice confusion tables, prototypes
and per-speaker and per-clip parameter draws (docs/synthetic.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from data_pipelines.manifests import dataset_info

CLASSES: tuple[str, ...] = dataset_info("crema-d").classes  # ANG DIS FEA HAP NEU SAD

# The confusion design: which face and which voice each class gets. Classes sharing a group are
# drawn from the same distribution in that modality, so only the other modality separates them.
FACE_GROUP = {
    "ANG": "frown",
    "DIS": "frown",
    "FEA": "worried",
    "SAD": "worried",
    "HAP": "smile",
    "NEU": "neutral",
}
VOICE_GROUP = {
    "ANG": "aroused",
    "HAP": "aroused",
    "DIS": "subdued",
    "SAD": "subdued",
    "FEA": "trembling",
    "NEU": "plain",
}

FACE_PARAMS = ("brow_raise", "brow_tilt", "eye_open", "mouth_curve", "mouth_width", "lip_press", "mouth_rest")
VOICE_PARAMS = ("loudness_db", "pitch_st", "range_st", "tilt", "jitter", "tremor_st", "breath", "contour")


def _named(params: tuple[str, ...], rows: dict[str, tuple[float, ...]]) -> dict[str, dict[str, float]]:
    """A table of rows (values in the order of `params`) as {row name: {parameter: value}}."""
    return {name: dict(zip(params, values, strict=True)) for name, values in rows.items()}


# Face prototypes at full intensity (values in FACE_PARAMS order). brow_tilt < 0: inner ends down (drawn
# together); mouth_curve > 0: corners up; lip_press thins the lips and damps the articulation;
# mouth_rest: opening between syllables.
FACES = _named(
    FACE_PARAMS,
    {
        "neutral": (0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0),
        "frown": (-1.0, -1.0, 0.6, -0.3, 0.8, 0.8, 0.0),
        "worried": (0.8, 1.0, 1.25, -0.9, 1.05, 0.2, 0.3),
        "smile": (0.3, 0.0, 0.7, 1.0, 1.25, 0.0, 0.6),
    },
)
# Voice prototypes (values in VOICE_PARAMS order): loudness (dB re. the loudest), pitch shift and accent
# range (semitones), spectral tilt (harmonic k has amplitude k^-tilt: low = tense/bright), jitter
# (relative f0 noise), tremor (semitones at ~5.5 Hz), breathiness (aspiration share) and contour (pitch
# slope per syllable, st).
VOICES = _named(
    VOICE_PARAMS,
    {
        "plain": (-8.0, 0.0, 1.5, 1.2, 0.004, 0.0, 0.08, -1.0),
        "aroused": (0.0, 5.0, 4.0, 0.7, 0.004, 0.0, 0.04, 1.5),
        "trembling": (-5.0, 8.0, 2.0, 1.3, 0.02, 0.8, 0.3, 0.5),
        "subdued": (-14.0, -3.0, 0.6, 1.9, 0.012, 0.0, 0.2, -2.0),
    },
)
# Size of one unit of `expression_jitter` per parameter (so one jitter value suits them all).
FACE_SCALE = dict(zip(FACE_PARAMS, (1.0, 1.0, 0.4, 1.0, 0.3, 0.8, 0.5), strict=True))
VOICE_SCALE = dict(zip(VOICE_PARAMS, (10.0, 5.0, 2.0, 0.8, 0.01, 0.5, 0.2, 1.5), strict=True))
SKIN = np.array(
    [[255, 224, 196], [241, 194, 125], [224, 172, 105], [198, 134, 66], [141, 85, 36], [92, 56, 30]],
    dtype=np.float32,
)
HAIR = np.array(
    [[20, 15, 10], [60, 40, 25], [110, 75, 40], [200, 170, 110], [150, 60, 30], [120, 120, 120]],
    dtype=np.float32,
)
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
    # How far the drawn face moves per unit of expression: at 1 a full frown lowers the brows by about
    # 1.5 px in a 64 px frame, which a small encoder does not learn from ten speakers (docs/synthetic.md)
    face_gain: float = 2.0
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
        need(
            self.num_speakers >= 1 and self.clips_per_speaker_class >= 1,
            "num_speakers",
            ">= 1 speakers and clips",
        )
        need(
            2 <= self.folds <= self.num_speakers, "folds", f"2 <= folds <= num_speakers ({self.num_speakers})"
        )
        # decord 0.6.0 misreads frames 48 or 72 pixels wide (it counts the row padding as channels);
        # decode.py works around it, but the dataset should open in any decord reader.
        need(
            self.frame_size >= 32 and self.frame_size % 2 == 0 and self.frame_size not in (48, 72),
            "frame_size",
            "an even size >= 32 (yuv420p), not 48 or 72 (decord 0.6.0 misreads those widths)",
        )
        need(0 < self.fps <= 120, "fps", "0 < fps <= 120")
        need(0.5 <= self.seconds <= 60, "seconds", "0.5 <= seconds <= 60")
        need(self.sample_rate in AAC_RATES, "sample_rate", f"one of the AAC rates {AAC_RATES}")
        need(
            0 <= self.intensity_min <= self.intensity_max,
            "intensity_min",
            "0 <= intensity_min <= intensity_max",
        )
        need(self.face_gain > 0, "face_gain", "a positive factor on the face's expression displacement")
        need(
            self.noise_dbfs_min <= self.noise_dbfs_max < 0,
            "noise_dbfs_min",
            "noise_dbfs_min <= noise_dbfs_max < 0",
        )
        need(self.video_codec in ("libx264", "mpeg4"), "video_codec", "'libx264' or 'mpeg4'")
        need(0 <= self.caption_emotion_rate <= 1, "caption_emotion_rate", "a share in [0, 1]")
        need(self.workers >= 0, "workers", ">= 0")


def speaker_traits(cfg: SynthConfig, s: int) -> dict:
    """Identity of speaker `s`: looks, base pitch, vocal tract and habits (fixed by seed and index)."""
    rng = np.random.default_rng([cfg.seed, 0, s])
    female = bool(rng.random() < 0.5)
    mix = lambda table: table[rng.integers(len(table))] * 0.7 + table[rng.integers(len(table))] * 0.3  # noqa: E731
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

    def blend(proto: dict, neutral: dict, scale: dict, gain: float = 1.0) -> dict:
        return {
            p: neutral[p] + gain * k * (proto[p] - neutral[p]) + j * scale[p] * rng.standard_normal()
            for p in proto
        }

    face = blend(FACES[FACE_GROUP[name]], FACES["neutral"], FACE_SCALE, cfg.face_gain)
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
        "label": label,
        "label_name": name,
        "intensity": k,
        "face": {p: round(v, 4) for p, v in face.items()},
        "voice": {p: round(v, 5) for p, v in voice.items()},
        # Speaking rate is a speaker habit, not a class cue: the lips show the syllable rhythm, so a
        # class-dependent rate would let the face see the voice's class (docs/synthetic.md).
        "rate": round(spk["rate"] * math.exp(0.1 * rng.standard_normal()), 4),
        "gain_db": round(float(rng.uniform(-2, 2)), 3),
        "noise_dbfs": round(float(rng.uniform(cfg.noise_dbfs_min, cfg.noise_dbfs_max)), 2),
    }
