"""Drawn talking faces: anti-aliased shapes from signed distances, expression from the clip's face
parameters, mouth opening from the speech envelope."""

from __future__ import annotations

from functools import partial

import numpy as np

from data_pipelines.synth.params import SynthConfig


def _soft(d: np.ndarray, px: float) -> np.ndarray:
    """Anti-aliased coverage of a shape from its signed distance `d` (negative inside), px = 1 pixel."""
    return np.clip(0.5 - d / px, 0.0, 1.0)


def _paint(img: np.ndarray, cover: np.ndarray, color) -> None:
    """Alpha-composite `color` over `img` (..., 3) in place with coverage `cover` (...)."""
    color = np.asarray(color, dtype=np.float32)
    img -= color  # img = (img - color) * (1 - cover) + color: in place, no 3-channel temporaries
    img *= (1 - cover)[..., None]
    img += color


def _band(
    img: np.ndarray, a: np.ndarray, b: np.ndarray, cy: np.ndarray, rx: float, top: float, bottom: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Views of the image rows that can hold face units [top, bottom] in a chunk of frames (margin:
    roll, anti-aliasing); painting only those is most of the renderer's speed."""
    size = img.shape[1]
    r0 = min(size, max(0, int(cy.min() + (top - 0.25) * rx)))
    r1 = max(r0, min(size, int(cy.max() + (bottom + 0.25) * rx) + 1))
    return img[:, r0:r1], a[:, r0:r1], b[:, r0:r1]


def render_face(
    spk: dict,
    clip: dict,
    mouth: np.ndarray,
    size: int,
    fps: float,
    cfg: SynthConfig,
    rng: np.random.Generator,
) -> np.ndarray:
    """Draw the talking face. `mouth`: (T,) speech envelope per frame. Returns (T, S, S, 3) uint8."""
    f = clip["face"]
    frames = len(mouth)
    t = np.arange(frames) / fps
    ph = rng.uniform(0, 2 * np.pi, 4)
    hz = rng.uniform(0.15, 0.5, 2)
    sway = cfg.head_motion * size
    cx = size * (0.5 + spk["offset"][0]) + sway * (
        0.7 * np.sin(2 * np.pi * hz[0] * t + ph[0]) + 0.3 * np.sin(3.4 * np.pi * hz[0] * t + ph[1])
    )
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
            ib, oa, ob = (
                brow_y - 0.07 * f["brow_tilt"],
                side * (spk["eye_dx"] + 0.2),
                brow_y + 0.02 * f["brow_tilt"],
            )
            u = np.clip(
                ((ea - ia) * (oa - ia) + (eb - ib) * (ob - ib)) / ((oa - ia) ** 2 + (ob - ib) ** 2), 0, 1
            )
            _paint(
                part,
                _soft(np.hypot(ea - ia - u * (oa - ia), eb - ib - u * (ob - ib)) - bt, px),
                np.array(spk["hair"], np.float32) * 0.8,
            )

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
        _paint(
            part,
            _soft(np.maximum.reduce([side_d, top - lip - mb, mb - bottom - lip]), px),
            skin * [0.8, 0.5, 0.5],
        )
        inside = np.maximum.reduce([side_d + 0.02, top - mb, mb - bottom])
        _paint(part, _soft(inside, px), (60, 20, 25))
        _paint(part, _soft(np.maximum(inside, mb - top - 0.35 * (bottom - top)), px), (225, 220, 205))

        img *= gain[None, :, :, None]
        # Luma-only sensor noise: a third of the random numbers, and what the codec keeps anyway.
        img += rng.standard_normal((n, size, size, 1), dtype=np.float32) * np.float32(cfg.pixel_noise)
        out[sl] = np.clip(img, 0, 255).round()
    return out
