"""`emomae embed` repeats the face step of the shards the encoder was trained on: the export's
`input.face` (from the shards' index.json) says face=auto, and the embedded frames are the face
crops the shards hold, not the centre crop."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_model import tiny

from data_pipelines.adapters import scan_folder
from data_pipelines.decode import SamplingConfig, decode_clip
from data_pipelines.face_track import FaceConfig
from data_pipelines.faces import model_sha256
from data_pipelines.manifests import write_manifest
from data_pipelines.shards import ShardConfig, write_shards
from finetune.embed import clip_inputs, embed_clip
from finetune.embed import main as embed_main
from finetune.export import input_spec, read_export_config, save_export
from pretrain.encoders import AVEncoder, ModelConfig

TINY = tiny(fbank_frames=32, depth=4, decoder_heads=1, skip_layers=[2, 4])
CLIP = "grid_lipnet/bbaf2n.mpg"  # 360 x 288: the face is a small part of the frame


@pytest.fixture(scope="module")
def face_export(realdata_dir, tmp_path_factory):
    """An export whose run config points at face=auto shards (one real clip), and its encoder."""
    tmp = tmp_path_factory.mktemp("face_export")
    rows = [r for r in scan_folder(realdata_dir / "grid_lipnet") if r.key.endswith("bbaf2n")]
    shards = tmp / "shards"
    cfg = ShardConfig(
        num_frames=4,
        frame_stride=4,
        img_size=32,
        max_windows=1,
        group_by="none",
        face="auto",
        face_scale=1.5,
        precompute_fbank=False,
    )
    write_shards(write_manifest(rows, tmp / "manifest.csv"), shards, cfg, workers=1, progress=False)
    torch.manual_seed(0)
    encoder = AVEncoder(ModelConfig(**TINY)).eval()
    spec = input_spec({"data": {"shards": str(shards)}}, encoder.cfg.to_dict())
    return save_export(encoder, encoder.cfg.to_dict(), spec, tmp / "export", "test"), encoder


def test_the_export_records_the_shards_face_step(face_export):
    export, _ = face_export
    face = read_export_config(export)["input"]["face"]
    assert face == {
        "mode": "auto",
        "min_share": 0.5,
        "scale": 1.5,
        "smooth": 5,
        "detector": face["detector"],
        "sha256": model_sha256(),
    }
    assert "BlazeFace" in face["detector"]


def test_an_export_of_shards_without_the_face_step_records_none(face_export):
    _, encoder = face_export
    assert input_spec({}, encoder.cfg.to_dict())["face"] == {"mode": "none"}


def test_embed_feeds_the_face_crops_the_shards_hold(face_export, realdata_dir, tmp_path):
    export, encoder = face_export
    spec = read_export_config(export)["input"]
    video, fbank, _ = clip_inputs(realdata_dir / CLIP, spec, max_windows=1)
    sampling = SamplingConfig(num_frames=4, frame_stride=4, img_size=32, max_windows=1)
    faces = decode_clip(realdata_dir / CLIP, sampling, face=FaceConfig(scale=1.5)).windows[0].frames
    centre = decode_clip(realdata_dir / CLIP, sampling).windows[0].frames
    assert torch.equal(video[0], torch.from_numpy(faces).permute(0, 3, 1, 2))
    assert np.abs(faces.astype(int) - centre).mean() > 20

    one_window = [str(realdata_dir / CLIP), "--encoder", str(export), "--max-windows", "1"]
    assert embed_main([*one_window, "--out", str(tmp_path / "e.npy")]) == 0
    np.testing.assert_allclose(
        np.load(tmp_path / "e.npy"), embed_clip(encoder, video, fbank), rtol=1e-5, atol=1e-6
    )
    assert embed_main([*one_window, "--face", "none", "--out", str(tmp_path / "plain.npy")]) == 0
    assert not np.allclose(np.load(tmp_path / "plain.npy"), np.load(tmp_path / "e.npy"))
    assert json.loads((export / "config.json").read_text())["input"]["face"]["mode"] == "auto"
