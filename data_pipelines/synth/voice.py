"""Synthetic voices: source-filter speech with class-dependent prosody, and its per-frame envelope
(what moves the drawn mouth)."""

from __future__ import annotations

import numpy as np

# (F1, F2, F3) in Hz of an adult male vocal tract; speakers scale them by their tract factor.
VOWELS = np.array(
    [[730, 1090, 2440], [530, 1840, 2480], [270, 2290, 3010], [570, 840, 2410], [300, 870, 2240]],
    dtype=np.float64,
)


def synth_voice(
    spk: dict, clip: dict, seconds: float, sr: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
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

    semis = (
        v["pitch_st"]
        + target[idx]
        + v["contour"] * (tau - 0.4)
        - 1.5 * (t / seconds - 0.5)
        + v["tremor_st"] * np.sin(2 * np.pi * 5.5 * t + rng.uniform(0, 2 * np.pi))
    )
    wobble = np.interp(
        t, np.arange(int(seconds * 200) + 2) / 200, rng.standard_normal(int(seconds * 200) + 2)
    )
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
