"""Face crops at shard time (face=auto): BlazeFace finds the face on the real clips, agrees with an
independent detector (OpenCV's Haar cascade, used only here), and the shards, their json,
provenance.json, errors.jsonl, the preview sheet and `emomae embed` carry the face step."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from pathlib import Path

import cv2
import decord
import numpy as np
import pytest
from PIL import Image
from shard_factory import read_samples

from data_pipelines.adapters import scan_folder
from data_pipelines.decode import crop_resize
from data_pipelines.face_track import square_in_frame
from data_pipelines.faces import FULL_RANGE, MODEL_FILE, FaceDetector, blazeface_anchors
from data_pipelines.manifests import ManifestRow, read_manifest, write_manifest
from data_pipelines.shards import ShardConfig, shard_urls, write_shards
from data_pipelines.shards_cli import main
from data_pipelines.synthetic import write_mp4

# 4 frames 8 grid steps apart per window, 2 windows: 8 sampled frames (0.32 s apart) per clip.
REAL_CFG = ShardConfig(
    num_frames=4,
    frame_stride=8,
    img_size=32,
    max_windows=2,
    samples_per_shard=32,
    group_by="none",
    precompute_fbank=False,
    face="auto",
)
# the generated clips: one window of 48 x 48
CFG = dataclasses.replace(REAL_CFG, img_size=48, max_windows=1, samples_per_shard=64)
HAAR = cv2.data.haarcascades + "haarcascade_frontalface_default.xml"


def haar_face(frame: np.ndarray, haar: cv2.CascadeClassifier) -> tuple[int, int, int, int] | None:
    """Largest Haar-cascade face (x0, y0, x1, y1) of an RGB frame, or None."""
    found = haar.detectMultiScale(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), 1.1, 5, minSize=(30, 30))
    if len(found) == 0:
        return None
    x, y, w, h = max(found, key=lambda d: d[2] * d[3])
    return x, y, x + w, y + h


@pytest.fixture(scope="module")
def real_shards(realdata_dir, tmp_path_factory) -> tuple[Path, dict]:
    """face=auto shards of all 35 real clips (2 windows of 4 frames of 32 x 32 each)."""
    tmp = tmp_path_factory.mktemp("real_face_shards")
    manifest = write_manifest(scan_folder(realdata_dir), tmp / "manifest.csv")
    return tmp / "shards", write_shards(manifest, tmp / "shards", REAL_CFG, workers=2, progress=False)


@pytest.fixture(scope="module")
def real_tracks(real_shards) -> dict[str, dict]:
    """Per real clip, from its samples' json: its face share, and on how many of the frames where the
    Haar cascade sees a face the crop centre lies inside the Haar box."""
    haar = cv2.CascadeClassifier(HAAR)
    metas: dict[str, list[dict]] = {}
    for sample in samples_of_all(real_shards[0]):
        meta = json.loads(sample["json"])
        metas.setdefault(meta["path"], []).append(meta)
    results = {}
    for path, windows in metas.items():
        crop_of = {i: box for m in windows for i, box in zip(m["frame_indices"], m["face"]["boxes"])}
        indices = sorted(crop_of)
        frames = decord.VideoReader(path).get_batch(indices).asnumpy()
        inside = seen = 0
        for i, frame in zip(indices, frames):
            ref = haar_face(frame, haar)
            if ref is None:
                continue
            x0, y0, x1, y1 = crop_of[i]
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            seen += 1
            inside += ref[0] <= cx <= ref[2] and ref[1] <= cy <= ref[3]
        results[f"{Path(path).parent.name}/{Path(path).name}"] = {
            "share": windows[0]["face"]["clip_share"],
            "frames": len(indices),
            "haar_frames": seen,
            "inside": inside,
        }
    return results


def test_anchors_are_the_896_ssd_centres_of_the_short_range_model():
    anchors = blazeface_anchors()
    assert anchors.shape == (896, 2)
    assert np.allclose(anchors[0], [0.5 / 16, 0.5 / 16]) and np.allclose(anchors[1], anchors[0])  # 2 per cell
    assert np.allclose(anchors[512], [0.5 / 8, 0.5 / 8]) and np.allclose(
        anchors[512:518], anchors[512]
    )  # 6 per cell
    assert np.allclose(anchors[-1], [7.5 / 8, 7.5 / 8])
    full = blazeface_anchors(FULL_RANGE)
    assert full.shape == (2304, 2) and np.allclose(full[1], [1.5 / 48, 0.5 / 48])


def test_the_face_is_found_on_at_least_90_percent_of_the_sampled_frames_of_every_real_clip(
    real_shards, real_tracks
):
    assert real_shards[1]["totals"]["clips"] == 35 and real_shards[1]["totals"]["skipped"] == {}
    assert len(real_tracks) == 35
    low = {k: r["share"] for k, r in real_tracks.items() if r["share"] < 0.9}
    assert not low, f"face found on < 90 % of sampled frames: {low}"


def test_crop_centres_lie_inside_the_haar_cascade_face_on_at_least_90_percent_of_frames(real_tracks):
    for key, r in real_tracks.items():
        assert r["haar_frames"] >= 0.5 * r["frames"], f"{key}: the reference detector saw too few faces: {r}"
        assert r["inside"] >= 0.9 * r["haar_frames"], f"{key}: crop centre off the Haar face: {r}"


def test_the_detector_box_lands_on_the_face_of_a_frame_much_wider_than_the_face(realdata_dir):
    # GRID: 360 x 288, the face a quarter of the frame, as on CREMA-D's 480 x 360 frames.
    frame = decord.VideoReader(str(realdata_dir / "grid_lipnet" / "bbaf2n.mpg"))[40].asnumpy()
    faces = FaceDetector().detect(frame)
    ref = haar_face(frame, cv2.CascadeClassifier(HAAR))
    assert len(faces) == 1 and faces[0].score > 0.8
    x0, y0, x1, y1 = faces[0].box
    assert 60 < x1 - x0 < 200, "a face box, not the frame"
    inter = max(0, min(x1, ref[2]) - max(x0, ref[0])) * max(0, min(y1, ref[3]) - max(y0, ref[1]))
    assert inter / ((ref[2] - ref[0]) * (ref[3] - ref[1])) > 0.6


def test_the_crop_square_moves_inside_the_frame_instead_of_being_cut():
    assert square_in_frame(10, 50, 40, 100, 100) == (0.0, 30.0, 40.0, 70.0)
    assert square_in_frame(60, 50, 300, 120, 100) == (10.0, 0.0, 110.0, 100.0)  # shrunk to the frame


# ---------------------------------------------------------------- shards with face=auto


def still_clip(path: Path, frames: np.ndarray, seconds: float = 1.6) -> Path:
    """A clip repeating `frames` (K, H, W, 3) for `seconds` at 25 fps, with a quiet tone."""
    n = round(seconds * 25)
    video = np.stack([frames[i % len(frames)] for i in range(n)])
    wave = 0.1 * np.sin(2 * np.pi * 220 * np.arange(round(seconds * 16000)) / 16000).astype(np.float32)
    write_mp4(path, video, wave, 25, 16000)
    return path


def two_faces(realdata_dir: Path) -> np.ndarray:
    """Frames of a 512 px face beside the same frames of a 224 px face, on one 736 x 512 canvas."""
    big = decord.VideoReader(str(realdata_dir / "hdtf_sadtalker" / "RD_Radio2_000.mp4")).get_batch(
        range(0, 40, 4)
    )
    small = decord.VideoReader(str(realdata_dir / "voxceleb2_pcavs" / "00015.mp4")).get_batch(range(0, 40, 4))
    canvas = np.zeros((10, 512, 736, 3), np.uint8)
    canvas[:, :, :512] = big.asnumpy()
    canvas[:, 144:368, 512:] = small.asnumpy()
    return canvas


FAR_OFFSET = (700, 300)  # where the GRID frame sits on the 1280 x 720 canvas


def far_face(realdata_dir: Path) -> np.ndarray:
    """GRID frames (360 x 288, a 128 px face) on a 1280 x 720 canvas: the face a tenth of the frame's
    width, as far as RAVDESS's speakers and too small for the short-range model."""
    grid = (
        decord.VideoReader(str(realdata_dir / "grid_lipnet" / "bbaf2n.mpg"))
        .get_batch(range(0, 40, 4))
        .asnumpy()
    )
    canvas = np.full((10, 720, 1280, 3), 200, np.uint8)
    x, y = FAR_OFFSET
    canvas[:, y : y + 288, x : x + 360] = grid
    return canvas


@pytest.fixture(scope="module")
def face_shards(realdata_dir, tmp_path_factory) -> tuple[Path, dict, str]:
    """face=auto shards of 4 real clips (GRID 360 x 288, VoxCeleb2 224, HDTF 512, 844 px), a clip
    with no face (smooth noise), one with two faces, and one real clip whose manifest bbox wins."""
    tmp = tmp_path_factory.mktemp("face_shards")
    rows = [
        r
        for r in scan_folder(realdata_dir)
        if r.key.endswith(("bbaf2n", "00015", "RD_Radio2_000", "examples-2"))
    ]
    noise = np.random.default_rng(0).integers(0, 255, (4, 18, 24, 3), np.uint8)
    noise = np.stack(
        [np.asarray(Image.fromarray(f).resize((240, 180), Image.Resampling.BICUBIC)) for f in noise]
    )
    rows.append(ManifestRow("noface", str(still_clip(tmp / "noface.mp4", noise))))
    rows.append(ManifestRow("twofaces", str(still_clip(tmp / "twofaces.mp4", two_faces(realdata_dir)))))
    rows.append(ManifestRow("farface", str(still_clip(tmp / "farface.mp4", far_face(realdata_dir)))))
    grid = next(r for r in scan_folder(realdata_dir / "grid_lipnet") if r.key.endswith("bbaf2n"))
    rows.append(ManifestRow("boxed", grid.video, bbox="0 0 120 120"))
    manifest = write_manifest(rows, tmp / "manifest.csv")
    out = tmp / "shards"
    index = write_shards(manifest, out, CFG, workers=1, progress=False)
    return out, index, manifest


def samples_of_all(out: Path) -> list[dict[str, bytes]]:
    """Every sample of a shard folder as {extension: bytes}."""
    return list(read_samples(*shard_urls(out)).values())


def samples_of(out: Path) -> dict[str, dict]:
    """The (one, max_windows=1) sample of each clip, by clip key."""
    return {json.loads(s["json"])["clip_key"]: s for s in samples_of_all(out)}


def test_face_auto_crops_the_face_and_records_each_frames_box_in_the_json(face_shards, realdata_dir):
    out, _, _ = face_shards
    samples = samples_of(out)
    grid = next(s for k, s in samples.items() if k.endswith("bbaf2n"))
    meta = json.loads(grid["json"])
    assert meta["face"]["clip_share"] == 1.0 and not meta["face"]["multi_face"]
    assert len(meta["face"]["boxes"]) == 4
    x0, y0, x1, y1 = meta["face"]["boxes"][0]
    assert x1 - x0 == pytest.approx(y1 - y0) and 100 < x1 - x0 < 250  # a face square, not the 288 px frame
    source = decord.VideoReader(str(realdata_dir / "grid_lipnet" / "bbaf2n.mpg"))[
        meta["frame_indices"][0]
    ].asnumpy()
    expected = crop_resize(source, 48, tuple(meta["face"]["boxes"][0]))
    stored = np.asarray(Image.open(io.BytesIO(grid["f00.jpg"])))
    centre_crop = crop_resize(source, 48)
    assert np.abs(stored.astype(int) - expected).mean() < 8  # JPEG noise only (48 px, saturated blue)
    assert np.abs(stored.astype(int) - centre_crop).mean() > 20  # not what face=none writes


def test_a_clip_without_a_face_is_skipped_and_counted_with_its_reason(face_shards):
    out, index, _ = face_shards
    errors = {e["key"]: e for e in map(json.loads, (out / "errors.jsonl").read_text().splitlines())}
    assert errors["noface"]["kind"] == "no_face" and "noface.mp4" in errors["noface"]["reason"]
    assert "face_min_share" in errors["noface"]["reason"]
    assert index["totals"]["skipped"] == {"no_face": 1}
    assert index["totals"]["clips"] == 7
    assert json.loads((out / "provenance.json").read_text())["face"]["no_face_skipped"] == 1


def test_of_two_faces_the_largest_is_cropped_and_the_clip_counted_as_multi_face(face_shards, capsys):
    out, index, _ = face_shards
    meta = json.loads(samples_of(out)["twofaces"]["json"])
    x0, y0, x1, y1 = meta["face"]["boxes"][0]
    assert meta["face"]["multi_face"] and x1 <= 512 and x1 - x0 > 200  # the 512 px face, not the 224 px one
    assert index["totals"]["multi_face"] == 1
    assert json.loads((out / "provenance.json").read_text())["face"]["multi_face"] == ["twofaces"]


def test_a_face_too_far_for_the_short_range_model_is_found_by_the_full_range_one(face_shards, realdata_dir):
    out, _, _ = face_shards
    meta = json.loads(samples_of(out)["farface"]["json"])
    assert "full-range" in meta["face"]["detector"] and meta["face"]["clip_share"] >= 0.9
    frame = decord.VideoReader(str(realdata_dir / "grid_lipnet" / "bbaf2n.mpg"))[0].asnumpy()
    (near,) = FaceDetector().detect(frame)  # the same face at full size, by the short-range model
    cx = (near.box[0] + near.box[2]) / 2 + FAR_OFFSET[0]
    cy = (near.box[1] + near.box[3]) / 2 + FAR_OFFSET[1]
    x0, y0, x1, y1 = meta["face"]["boxes"][0]
    assert abs((x0 + x1) / 2 - cx) < 20 and abs((y0 + y1) / 2 - cy) < 20
    assert 120 < x1 - x0 < 260  # the face's square, not the 720 px frame


def test_a_manifest_bbox_overrides_face_auto(face_shards, realdata_dir):
    out, _, _ = face_shards
    boxed = samples_of(out)["boxed"]
    meta = json.loads(boxed["json"])
    assert "face" not in meta
    source = decord.VideoReader(str(realdata_dir / "grid_lipnet" / "bbaf2n.mpg"))[
        meta["frame_indices"][0]
    ].asnumpy()
    stored = np.asarray(Image.open(io.BytesIO(boxed["f00.jpg"])))
    assert np.abs(stored.astype(int) - crop_resize(source, 48, (0, 0, 120, 120))).mean() < 8


def test_provenance_names_the_detector_its_sha256_and_the_settings(face_shards):
    out, _, _ = face_shards
    face = json.loads((out / "provenance.json").read_text())["face"]
    assert face["mode"] == "auto"
    assert face["detector"]["sha256"] == hashlib.sha256(MODEL_FILE.read_bytes()).hexdigest()
    assert "BlazeFace" in face["detector"]["model"] and "OpenCV" in face["detector"]["runtime"]
    assert face["settings"] == {"min_share": 0.5, "scale": 1.3, "smooth": 5}
    assert face["clips"] == 6  # every written clip but the one with a manifest bbox
    assert face["share_below_1"] == {}  # the face is on every sampled frame of each
    shas = {m["file"]: m["sha256"] for m in face["detector"]["models"]}
    assert (
        shas["face_detection_full_range.tflite"] == hashlib.sha256(FULL_RANGE.path.read_bytes()).hexdigest()
    )
    assert face["full_range"] == ["farface"]


def test_the_built_in_synthetic_faces_shard_with_face_auto(synth_manifest, tmp_path):
    rows = read_manifest(synth_manifest)[:6]
    manifest = write_manifest(rows, tmp_path / "manifest.csv")
    index = write_shards(manifest, tmp_path / "shards", CFG, workers=1, progress=False)
    assert index["totals"]["clips"] == 6 and index["totals"]["skipped"] == {}
    face = json.loads((tmp_path / "shards" / "provenance.json").read_text())["face"]
    assert face["clips"] == 6 and min(face["share_below_1"].values(), default=1.0) >= 0.9


def test_preview_writes_a_contact_sheet_of_n_clips_and_no_shards(face_shards, tmp_path, capsys):
    _, _, manifest = face_shards
    out = tmp_path / "preview"
    assert (
        main(
            [
                str(manifest),
                str(out),
                "--preview",
                "3",
                "--face",
                "auto",
                "num_frames=4",
                "frame_stride=8",
                "img_size=48",
            ]
        )
        == 0
    )
    sheet = Image.open(out / "preview.png")
    assert sheet.height >= 2 * 192 and sheet.width >= 2 * 2 * 192  # 3 tiles in 2 columns
    assert not list(out.glob("*.tar"))
    # The red crop square is drawn on the source frame.
    red = np.asarray(sheet.convert("RGB")).astype(int)
    assert ((red[..., 0] > 200) & (red[..., 1] < 60) & (red[..., 2] < 60)).sum() > 300


def test_cli_face_flag_and_bad_values(face_shards, tmp_path, capsys):
    _, _, manifest = face_shards
    assert main([str(manifest), str(tmp_path / "x"), "face=maybe"]) == 2
    assert "face must be 'auto' or 'none'" in capsys.readouterr().err
    assert main([str(manifest), str(tmp_path / "y"), "face=auto", "face_min_share=1.5"]) == 2
    assert "face_min_share" in capsys.readouterr().err
