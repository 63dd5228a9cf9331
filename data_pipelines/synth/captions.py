"""Templated captions: an affective description of a synthetic clip from its generator parameters."""

from __future__ import annotations

import numpy as np

# Graded words: (above this, the words above, below this, the words below, the words between), each
# set of words separated by "|"
EYES = (
    1.12,
    "wide-open eyes|eyes opened wide",
    0.8,
    "narrowed eyes|eyes slightly squinted",
    "eyes open normally|a steady gaze",
)
# the voice's graded words, in the order a caption draws them: (parameter, then as EYES)
VOICE_GRADES = (
    ("loudness_db", -4, "loud|forceful|raised", -10, "quiet|soft|subdued", "moderate|conversational"),
    ("pitch_st", 3, "high|elevated", -1.5, "low|deep", "mid-range|medium"),
    (
        "range_st",
        2.5,
        "animated|widely varying|lively",
        1.0,
        "flat|monotone|level",
        "moderately varied|natural",
    ),
    ("rate", 4.7, "fast|quick|hurried", 3.9, "slow|unhurried|measured", "steady|even"),
    ("contour", 0.6, "rising|lifting", -0.6, "falling|sinking", "level|steady"),
)


def graded(value: float, above: float, high: str, below: float, low: str, between: str) -> list[str]:
    """The words of the band `value` falls in."""
    return (high if value > above else low if value < below else between).split("|")


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
    eyes = pick(*graded(f["eye_open"], *EYES))
    if f["mouth_curve"] > 0.4:
        mouth = pick("a broad smile", "lip corners pulled up into a smile", "a grin")
    elif f["mouth_curve"] < -0.4:
        mouth = pick("lip corners turned down", "a downturned mouth")
    elif f["lip_press"] > 0.35:
        mouth = pick("lips pressed tight", "tightened lips", "a thin, pressed mouth")
    else:
        mouth = pick("a relaxed mouth", "a neutral mouth")
    graded_by = {**v, "rate": clip["rate"]}
    loud, pitch, spread, tempo, contour = (pick(*graded(graded_by[p], *bands)) for p, *bands in VOICE_GRADES)
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
