"""HiCMAE's own layout end to end: its CREMA-D lists over OpenFace face-frame folders (about 30 fps)
and 16 kHz wavs -> `emomae manifest hicmae` -> shards whose frames and audio cover the same seconds.

The frame folders carry no rate; it is frame count / the paired wav's duration (docs/data.md). Read
at the 25 fps a folder used to be given, 30 frames would span 1.2 s against 1.0 s of audio, and
each window's frames would trail its audio by a further 20 %."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import hicmae_layout as hl
import numpy as np
import pytest
import soundfile as sf

from data_pipelines.adapters.hicmae import scan_hicmae
from data_pipelines.decode import GRID_FPS
from data_pipelines.manifests import write_manifest
from data_pipelines.shards import ShardConfig, write_shards

NUM_FRAMES, STRIDE = 2, 5  # 0.4 s windows: two per 1 s clip (three if the folder were read at 25 fps)


@pytest.fixture(scope="module")
def shards(realdata_dir, tmp_path_factory) -> tuple[Path, list]:
    out = tmp_path_factory.mktemp("hicmae_frames")
    layout = hl.build(realdata_dir, out / "layout")
    rows = scan_hicmae(layout.lists / "crema-d", rewrite_root=[f"{hl.AUTHORS_ROOT}={layout.root}"])
    manifest = write_manifest(rows, out / "manifest.csv")
    config = ShardConfig(num_frames=NUM_FRAMES, frame_stride=STRIDE, img_size=hl.SIZE, samples_per_shard=64)
    write_shards(manifest, out / "shards", config, workers=1, progress=False)
    return out / "shards", rows


def samples(shard_dir: Path) -> dict[str, dict[str, bytes]]:
    found: dict[str, dict[str, bytes]] = {}
    for tar in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for member in tf.getmembers():
                key, ext = member.name.split(".", 1)
                found.setdefault(key, {})[ext] = tf.extractfile(member).read()
    return found


def test_every_listed_clip_is_sharded_with_the_rate_of_its_paired_audio(shards):
    shard_dir, rows = shards
    metas = [json.loads(s["json"]) for s in samples(shard_dir).values()]
    assert {m["clip_key"] for m in metas} == {r.key for r in rows}
    for m in metas:
        assert m["fps_source"] == "audio" and m["source_fps"] == pytest.approx(hl.FPS, abs=0.1)
        assert m["duration"] == pytest.approx(hl.FRAMES / hl.FPS, abs=0.01)
    per_clip = {r.key: sum(m["clip_key"] == r.key for m in metas) for r in rows}
    assert set(per_clip.values()) == {2}, per_clip


def test_each_window_s_frames_and_audio_start_at_the_same_second(shards):
    shard_dir, rows = shards
    audio_of = {r.key: r.audio for r in rows}
    for sample in samples(shard_dir).values():
        meta = json.loads(sample["json"])
        times = meta["start"] + np.arange(NUM_FRAMES) * STRIDE / GRID_FPS
        assert meta["frame_indices"] == np.round(times * hl.FPS).astype(int).tolist()  # the 30 fps frames
        wave, rate = sf.read(io.BytesIO(sample["wav"]), dtype="float32")
        source, source_rate = sf.read(audio_of[meta["clip_key"]], dtype="float32")
        first = round(meta["start"] * source_rate)
        assert rate == source_rate
        np.testing.assert_allclose(wave, source[first : first + len(wave)], atol=1 / 32768)
