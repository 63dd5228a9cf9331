"""`emomae shards <manifest> <out_dir> --preview N face=auto`: a contact sheet (`preview.png`) of the
first N clips, each as its source frame with the crop square drawn and the crop the shards would
hold, so the face step can be checked before a long run. Writes no shards."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data_pipelines.decode import DecodeError, frame_files
from data_pipelines.manifests import ManifestRow, read_manifest
from data_pipelines.shards import decode_row

TILE = 192  # pixels: height of each source frame and side of each crop in the sheet
CAPTION = 28


def source_frame(video: Path, index: int) -> np.ndarray:
    """Frame `index` of a video file or frame folder as (H, W, 3) uint8 RGB."""
    if video.is_dir():
        return np.asarray(Image.open(frame_files(video)[index]).convert("RGB"))
    import decord

    return decord.VideoReader(str(video), ctx=decord.cpu(0), num_threads=1)[index].asnumpy()[..., :3]


def preview_tile(row: ManifestRow, cfg) -> Image.Image:
    """One clip: source frame (middle frame of its middle window) with the crop square in red, and the
    crop itself; a clip that would be skipped shows the reason instead of a crop."""
    one_window = replace(cfg, max_windows=1)
    try:
        clip = decode_row(row, one_window)
    except DecodeError as err:
        return caption_tile(row.key, f"skipped ({err.kind}): {err}")
    w = clip.windows[0]
    mid = len(w.frame_indices) // 2
    frame = Image.fromarray(source_frame(Path(row.video), w.frame_indices[mid]))
    scale = TILE / frame.height
    frame = frame.resize((max(1, round(frame.width * scale)), TILE), Image.Resampling.BILINEAR)
    if w.face_boxes is not None:
        box = [v * scale for v in w.face_boxes[mid]]
        ImageDraw.Draw(frame).rectangle(box, outline=(255, 0, 0), width=3)
    crop = Image.fromarray(w.frames[mid]).resize((TILE, TILE), Image.Resampling.BILINEAR)
    tile = Image.new("RGB", (frame.width + TILE, TILE + CAPTION), "white")
    tile.paste(frame, (0, 0))
    tile.paste(crop, (frame.width, 0))
    track = clip.face_track
    note = (
        f"face on {track.share:.0%} of frames" + (", multi-face" if track.multi_face else "")
        if track
        else ("manifest bbox" if row.bbox else "no face step (face=none)")
    )
    ImageDraw.Draw(tile).text((4, TILE + 6), f"{row.key}: {note}", fill="black")
    return tile


def caption_tile(key: str, text: str) -> Image.Image:
    tile = Image.new("RGB", (2 * TILE, TILE + CAPTION), (235, 235, 235))
    ImageDraw.Draw(tile).multiline_text((4, 6), f"{key}\n" + "\n".join(_wrap(text, 60)), fill="black")
    return tile


def _wrap(text: str, width: int) -> list[str]:
    return [text[i : i + width] for i in range(0, min(len(text), 4 * width), width)]


def contact_sheet(tiles: list[Image.Image], columns: int = 2) -> Image.Image:
    """Tiles in a grid, `columns` wide, each cell as large as the largest tile."""
    cell_w, cell_h = max(t.width for t in tiles), max(t.height for t in tiles)
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % columns) * cell_w, (i // columns) * cell_h))
    return sheet


def write_preview(manifest: Path, out: Path, cfg, n: int) -> Path:
    """Contact sheet of the first `n` clips of `manifest` under ShardConfig `cfg` -> `out` (PNG)."""
    rows = read_manifest(Path(manifest))[:n]
    if not rows:
        raise ValueError(f"{manifest}: no clips to preview")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet([preview_tile(row, cfg) for row in rows]).save(out)
    return out
