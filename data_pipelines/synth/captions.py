"""Templated captions: an affective description of a synthetic clip from its generator parameters."""

from __future__ import annotations

import numpy as np


def caption(clip: dict, rng: np.random.Generator, emotion_rate: float) -> str:
    """A detailed affective description from the generator's parameters, in varied wording."""
    f, v = clip["face"], clip["voice"]
    pick = lambda *words: words[rng.integers(len(words))]  # noqa: E731
    shown = max(abs(f[p]) for p in ("brow_raise", "brow_tilt", "mouth_curve"))  # 0 is the neutral face
    how = (
        pick("hardly", "barely")
        if shown < 0.35
        else "slightly"
        if shown < 0.6
        else pick("clearly", "markedly")
        if shown < 0.85
        else pick("strongly", "intensely")
    )
    if f["brow_tilt"] < -0.35:
        brows = pick(
            "brows lowered and drawn together", "a furrowed brow", "brows knit down towards the nose"
        )
    elif f["brow_tilt"] > 0.35:
        brows = pick(
            "inner brows pulled upward", "brows raised and slanted in worry", "brows lifted at the inner ends"
        )
    else:
        brows = pick("relaxed brows", "brows at rest", "an untroubled brow")
    eyes = (
        pick("narrowed eyes", "eyes slightly squinted")
        if f["eye_open"] < 0.8
        else pick("wide-open eyes", "eyes opened wide")
        if f["eye_open"] > 1.12
        else pick("eyes open normally", "a steady gaze")
    )
    if f["mouth_curve"] > 0.4:
        mouth = pick("a broad smile", "lip corners pulled up into a smile", "a grin")
    elif f["mouth_curve"] < -0.4:
        mouth = pick("lip corners turned down", "a downturned mouth")
    elif f["lip_press"] > 0.35:
        mouth = pick("lips pressed tight", "tightened lips", "a thin, pressed mouth")
    else:
        mouth = pick("a relaxed mouth", "a neutral mouth")
    loud = (
        pick("loud", "forceful", "raised")
        if v["loudness_db"] > -4
        else pick("quiet", "soft", "subdued")
        if v["loudness_db"] < -10
        else pick("moderate", "conversational")
    )
    pitch = (
        pick("high", "elevated")
        if v["pitch_st"] > 3
        else pick("low", "deep")
        if v["pitch_st"] < -1.5
        else pick("mid-range", "medium")
    )
    spread = (
        pick("animated", "widely varying", "lively")
        if v["range_st"] > 2.5
        else pick("flat", "monotone", "level")
        if v["range_st"] < 1.0
        else pick("moderately varied", "natural")
    )
    tempo = (
        pick("fast", "quick", "hurried")
        if clip["rate"] > 4.7
        else pick("slow", "unhurried", "measured")
        if clip["rate"] < 3.9
        else pick("steady", "even")
    )
    contour = (
        pick("rising", "lifting")
        if v["contour"] > 0.6
        else pick("falling", "sinking")
        if v["contour"] < -0.6
        else pick("level", "steady")
    )
    quality = (
        pick("trembling", "shaky", "quavering")
        if v["tremor_st"] > 0.35
        else pick("breathy", "airy")
        if v["breath"] > 0.15
        else pick("tense, bright", "sharp, pressed")
        if v["tilt"] < 0.95
        else pick("dark, muffled", "heavy")
        if v["tilt"] > 1.6
        else pick("clear", "plain")
    )
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
    text = (
        f"{face_part}; {voice_part}."
        if rng.random() < 0.5
        else f"{voice_part[0].upper()}{voice_part[1:]}. {face_part}."
    )
    if rng.random() < emotion_rate:
        word = {
            "ANG": ("angry", "irritated", "furious"),
            "DIS": ("disgusted", "repulsed"),
            "FEA": ("fearful", "afraid", "anxious"),
            "HAP": ("happy", "joyful", "cheerful"),
            "NEU": ("neutral", "calm", "composed"),
            "SAD": ("sad", "sorrowful", "downcast"),
        }[clip["label_name"]]
        text += f" Overall the person seems {pick(*word)}."
    return text


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"
