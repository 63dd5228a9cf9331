"""Every real clip -> shards (frames, audio length, metadata), errors.jsonl, resumability, CLI."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from shard_factory import read_samples

from data_pipelines.adapters import scan_folder
from data_pipelines.manifests import read_manifest, write_manifest
from data_pipelines.shards import ShardConfig, shard_urls, write_shards
from data_pipelines.shards_cli import main

CFG = ShardConfig(num_frames=8, frame_stride=4, img_size=64, max_windows=1, samples_per_shard=8)
AUDIO_SAMPLES = 8 * 4 * 16000 // 25  # the frames' span, 1.28 s at 16 kHz


@pytest.fixture(scope="module")
def real_manifest(realdata_dir, tmp_path_factory) -> Path:
    """All 35 real clips plus one file of random bytes named .mp4."""
    tmp = tmp_path_factory.mktemp("real_manifest")
    bad = tmp / "corrupt.mp4"
    bad.write_bytes(np.random.default_rng(1).bytes(20000))
    rows = scan_folder(realdata_dir)
    rows += scan_folder(tmp)
    return write_manifest(rows, tmp / "manifest.csv")


@pytest.fixture(scope="module")
def real_shards(real_manifest, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("real_shards")
    index = write_shards(real_manifest, out, CFG, workers=2, progress=False)
    return out, index


def test_every_real_clip_becomes_a_sample_with_the_configured_frames_and_audio(real_shards, real_manifest):
    out, index = real_shards
    rows = {r.key: r for r in read_manifest(real_manifest)}
    seen = {}
    for url in shard_urls(out):
        for key, s in read_samples(Path(url)).items():
            seen[key] = s
            assert sorted(k for k in s if k.endswith(".jpg")) == [f"f{t:02d}.jpg" for t in range(8)]
            for t in range(8):
                img = Image.open(io.BytesIO(s[f"f{t:02d}.jpg"]))
                assert img.size == (64, 64) and img.mode == "RGB"
            audio, sr = sf.read(io.BytesIO(s["wav"]), dtype="int16")
            assert sr == 16000 and audio.shape == (AUDIO_SAMPLES,)
            meta = json.loads(s["json"])
            row = rows[meta["clip_key"]]
            assert meta["key"] == key and meta["window"] == 0 and meta["path"] == row.video
            assert meta["num_frames"] == 8 and len(meta["frame_indices"]) == 8
            assert meta["audio_samples"] == AUDIO_SAMPLES and meta["sample_rate"] == 16000
            assert meta["label"] is None and meta["fold"] is None
            assert meta["source_fps"] > 20 and meta["duration"] > 2.9
            # None of the real clips is cut short, silent or without audio (no false alarms).
            assert (meta["partial"], meta["audio_silent"], meta["audio_missing"]) == (False, False, False)
            assert meta["fps_source"] == "container"
    assert len(seen) == 35 == index["totals"]["samples"] == index["totals"]["clips"]
    assert {json.loads(s["json"])["clip_key"] for s in seen.values()} == set(rows) - {"corrupt"}


def test_real_speech_survives_as_audible_audio(real_shards):
    out, _ = real_shards
    s = read_samples(Path(shard_urls(out)[0]))
    levels = [np.abs(sf.read(io.BytesIO(x["wav"]), dtype="int16")[0]).max() for x in s.values()]
    assert min(levels) > 300  # int16: no silent or zero-padded tracks among real clips


def test_corrupt_file_is_listed_in_errors_and_counted_while_the_rest_is_written(real_shards, capsys):
    out, index = real_shards
    errors = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert [(e["key"], Path(e["path"]).name) for e in errors] == [("corrupt", "corrupt.mp4")]
    assert "cannot read video" in errors[0]["reason"]
    assert index["totals"]["errors"] == 1
    assert errors[0]["kind"] == "broken" and index["totals"]["skipped"] == {"broken": 1}
    assert (
        index["totals"]["partial_clips"],
        index["totals"]["silent_audio"],
        index["totals"]["missing_audio"],
    ) == (0, 0, 0)


def test_index_and_provenance_describe_the_shards(real_shards):
    out, index = real_shards
    on_disk = json.loads((out / "index.json").read_text())
    assert on_disk["totals"] == index["totals"]
    assert [s["name"] for s in index["shards"]] == [f"all-{i:06d}.tar" for i in range(5)]
    assert sum(s["samples"] for s in index["shards"]) == 35
    assert index["config"]["img_size"] == 64 and index["totals"]["groups"]["all"]["shards"] == 5
    assert index["timing"]["clips_per_s"] > 0
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["versions"]["decord"] and prov["versions"]["torch"] and prov["versions"]["PIL"]
    assert prov["jpeg_quality"] == 90 and prov["audio"]["sample_rate"] == 16000
    assert "25 fps" in prov["frame_sampling"] and prov["interpolation"].startswith("bilinear")
    assert prov["manifest"]["sha256"] and prov["argv"] and prov["time"]


def test_rerun_skips_finished_shards_and_rewrites_only_a_deleted_one(real_manifest, tmp_path):
    cfg = ShardConfig(num_frames=4, frame_stride=4, img_size=32, max_windows=1, samples_per_shard=12)
    first = write_shards(real_manifest, tmp_path, cfg, workers=1, progress=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")}
    assert len(stamps) == 3

    again = write_shards(real_manifest, tmp_path, cfg, workers=1, progress=False)
    assert again["timing"]["shards_skipped"] == 3 and again["timing"]["shards_written"] == 0
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")} == stamps
    assert again["totals"] == first["totals"]  # errors and counts come back from progress.jsonl

    (tmp_path / "all-000001.tar").unlink()
    third = write_shards(real_manifest, tmp_path, cfg, workers=1, progress=False)
    assert third["timing"]["shards_written"] == 1
    now = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")}
    assert (
        now["all-000000.tar"] == stamps["all-000000.tar"]
        and now["all-000002.tar"] == stamps["all-000002.tar"]
    )
    assert now["all-000001.tar"] != stamps["all-000001.tar"]
    assert third["totals"] == first["totals"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_changed_config_rewrites_every_shard(real_manifest, tmp_path):
    rows = read_manifest(real_manifest)[:3]
    manifest = write_manifest(rows, tmp_path / "m.csv")
    cfg = ShardConfig(num_frames=2, frame_stride=4, img_size=16, max_windows=1, samples_per_shard=2)
    write_shards(manifest, tmp_path / "s", cfg, progress=False)
    cfg.img_size = 24
    index = write_shards(manifest, tmp_path / "s", cfg, progress=False)
    assert index["timing"]["shards_written"] == 2
    sample = next(iter(read_samples(tmp_path / "s" / "all-000000.tar").values()))
    assert Image.open(io.BytesIO(sample["f00.jpg"])).size == (24, 24)


def test_cli_cuts_a_long_clip_into_every_window_grouped_by_fold(realdata_dir, tmp_path, capsys):
    rows = scan_folder(realdata_dir / "edtalk_testdata")  # pose_source2 (60 s), uncrop_Obama (20 s)
    rows = [r for r in rows if "Obama" in r.key] + scan_folder(realdata_dir / "grid_lipnet")[:1]
    rows[0].fold, rows[1].fold = 1, 0
    manifest = write_manifest(rows, tmp_path / "m.csv")
    rc = main(
        [
            str(manifest),
            str(tmp_path / "out"),
            "--workers",
            "1",
            "--no-progress",
            "num_frames=4",
            "frame_stride=8",
            "img_size=32",
            "audio_format=flac",
        ]
    )
    assert rc == 0
    # 15 windows of the 20 s clip + 2 of the 3 s GRID clip
    assert "wrote 17 samples in 2 shards; skipped 0 files" in capsys.readouterr().out
    assert [Path(u).name for u in shard_urls(tmp_path / "out", ["fold1"])] == ["fold1-000000.tar"]
    samples = read_samples(tmp_path / "out" / "fold1-000000.tar")
    metas = sorted((json.loads(s["json"]) for s in samples.values()), key=lambda m: m["window"])
    assert [m["window"] for m in metas] == list(range(15))  # floor(20 s / 1.28 s)
    assert [m["start"] for m in metas] == pytest.approx([1.28 * k for k in range(15)])
    assert all(m["frame_indices"] == [32 * m["window"] + 8 * i for i in range(4)] for m in metas)
    audio, sr = sf.read(io.BytesIO(samples[metas[3]["key"]]["flac"]), dtype="int16")
    assert sr == 16000 and len(audio) == AUDIO_SAMPLES


def test_cli_names_a_bad_override(real_manifest, tmp_path, capsys):
    assert main([str(real_manifest), str(tmp_path), "img_sise=64"]) == 2
    assert "img_sise" in capsys.readouterr().err
    assert main([str(real_manifest), str(tmp_path), "audio_format=mp3"]) == 2
    assert "audio_format" in capsys.readouterr().err


def test_shard_urls_names_unknown_groups(real_shards):
    out, _ = real_shards
    with pytest.raises(ValueError, match=r"fold3.*groups there: \['all'\]"):
        shard_urls(out, ["fold3"])


def test_shards_store_the_log_mel_of_their_own_wav_and_record_its_parameters(real_shards):
    import torch

    from data_pipelines.features import decode_log_mel, fbank_params, kaldi_fbank, num_fbank_frames
    from data_pipelines.samples import read_pcm16_wav

    out, index = real_shards
    params = fbank_params(16000, 128)
    assert index["config"]["precompute_fbank"] is True
    assert json.loads((out / "provenance.json").read_text())["fbank"]["params"] == params
    with tarfile.open(out / "all-000000.tar") as tar:
        assert not any(m.pax_headers for m in tar.getmembers())  # plain ustar headers
    samples = read_samples(out / "all-000000.tar")
    assert samples
    for sample in samples.values():
        meta = json.loads(sample["json"])
        assert meta["fbank"] == params
        audio, _ = read_pcm16_wav(sample["wav"])
        want = kaldi_fbank(torch.from_numpy(audio[:, 0].copy()))
        got = decode_log_mel(sample["fbank.npy"], 128)
        assert got.shape == want.shape == (num_fbank_frames(AUDIO_SAMPLES), 128)
        assert (got.float() - want).abs().max() < 0.02  # float16 of values |x| < 20


def test_shards_without_a_stored_fbank_have_no_fbank_member_or_params(realdata_dir, tmp_path):
    rows = scan_folder(realdata_dir)[:1]
    manifest = write_manifest(rows, tmp_path / "manifest.csv")
    cfg = ShardConfig(num_frames=4, frame_stride=4, img_size=32, max_windows=1, precompute_fbank=False)
    write_shards(manifest, tmp_path / "s", cfg, progress=False)
    (sample,) = read_samples(tmp_path / "s" / "all-000000.tar").values()
    assert "fbank.npy" not in sample and "fbank" not in json.loads(sample["json"]) and "wav" in sample
    assert json.loads((tmp_path / "s" / "provenance.json").read_text())["fbank"] is None
