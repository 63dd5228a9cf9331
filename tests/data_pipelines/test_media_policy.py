"""Real clips as people have them: cut short, with a silent track, or with no audio at all. Each is
made here from a real clip (stream copies with PyAV, byte cuts, zero wavs) and sharded; the policy of
docs/data.md decides what is kept, and index.json, provenance.json, errors.jsonl and the summary line
count it."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
from shard_factory import read_samples

from data_pipelines.decode import SILENCE_DBFS, explain, rms_dbfs
from data_pipelines.manifests import ManifestRow, write_manifest
from data_pipelines.samples import SampleDecoder
from data_pipelines.shards import ShardConfig, shard_urls, write_shards
from data_pipelines.shards_cli import main
from data_pipelines.stream import StreamConfig

CLIP = "voxceleb2_pcavs/00015.mp4"  # 7.02 s, 25 fps, H.264 + AAC at 16 kHz, index (moov) at the end
CFG = ShardConfig(num_frames=8, frame_stride=4, img_size=32, samples_per_shard=64, group_by="none")
SPAN = 8 * 4 / 25  # 1.28 s per window
AUDIO_SAMPLES = round(SPAN * 16000)


def remux(src: Path, dst: Path, kinds: tuple[str, ...] = ("video", "audio")) -> Path:
    """Copy the `kinds` streams of `src` into `dst` (container from the suffix), no re-encoding."""
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        streams = {s.index: out.add_stream_from_template(s) for s in inp.streams if s.type in kinds}
        for packet in inp.demux(*[s for s in inp.streams if s.index in streams]):
            if packet.dts is None:  # the demuxer's flush packets
                continue
            packet.stream = streams[packet.stream.index]
            out.mux(packet)
    return dst


def cut(src: Path, dst: Path, share: float) -> Path:
    """The first `share` of the bytes of `src`, as a transfer broken off would leave it."""
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * share)])
    return dst


def samples_in(out_dir: Path) -> dict[str, dict[str, bytes]]:
    return read_samples(*shard_urls(out_dir))


def metas_by_clip(out_dir: Path) -> dict[str, list[dict]]:
    by_clip: dict[str, list[dict]] = {}
    for s in samples_in(out_dir).values():
        meta = json.loads(s["json"])
        by_clip.setdefault(meta["clip_key"], []).append(meta)
    return by_clip


def errors_of(out_dir: Path) -> dict[str, dict]:
    return {e["key"]: e for e in map(json.loads, (out_dir / "errors.jsonl").read_text().splitlines())}


# ---------------------------------------------------------------- truncated files


@pytest.fixture(scope="module")
def truncated(realdata_dir, tmp_path_factory) -> tuple[Path, dict, str]:
    """Shards of one real clip cut at 48 % and 98 % of its bytes, as mkv (header first: the frames
    before the cut decode) and as its own mp4 (index last: nothing decodes), plus an mkv cut at 10 %
    (less than one window decodes). Returns (shard dir, index, printed summary)."""
    tmp = tmp_path_factory.mktemp("truncated")
    mkv = remux(realdata_dir / CLIP, tmp / "whole.mkv")
    rows = [ManifestRow(f"mkv{p}", str(cut(mkv, tmp / f"mkv{p}.mkv", p / 100))) for p in (10, 48, 98)]
    rows += [
        ManifestRow(f"mp4{p}", str(cut(realdata_dir / CLIP, tmp / f"mp4{p}.mp4", p / 100))) for p in (48, 98)
    ]
    rows.append(ManifestRow("whole", str(mkv)))
    manifest = write_manifest(rows, tmp / "manifest.csv")
    out = tmp / "shards"
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        index = write_shards(manifest, out, CFG, progress=False)
    return out, index, summary.getvalue()


def test_a_cut_container_is_used_for_the_part_that_decodes_and_counted_as_partial(truncated):
    out, index, summary = truncated
    metas = metas_by_clip(out)
    assert sorted(metas) == ["mkv48", "mkv98", "whole"]
    # Measured: 3.20 s of the mkv cut at 48 % decode, 6.76 s of the one cut at 98 %; 7.02 s declared.
    for key, kept, windows in (("mkv48", 3.2, 2), ("mkv98", 6.76, 5)):
        assert len(metas[key]) == windows == int(kept // SPAN)
        for m in metas[key]:
            assert m["partial"] is True and m["duration"] == pytest.approx(kept, abs=0.05)
            assert m["declared_duration"] == pytest.approx(7.02, abs=0.01)
            assert m["audio_padded"] == 0  # windows lie inside the decoded part
    assert all(m["partial"] is False and "declared_duration" not in m for m in metas["whole"])

    assert index["totals"]["partial_clips"] == 2
    errors = errors_of(out)
    for key in ("mkv48", "mkv98"):
        assert errors[key]["kind"] == "partial" and errors[key]["skipped"] is False
        assert "truncated: kept the" in errors[key]["reason"]
    prov = json.loads((out / "provenance.json").read_text())["media"]
    assert [(p["key"], p["declared_s"]) for p in prov["partial"]] == [("mkv48", 7.024), ("mkv98", 7.024)]
    assert prov["partial_seconds_kept"] == pytest.approx(3.2 + 6.76, abs=0.1)
    assert "2 partial clips (kept 9.96 s of 14.048 s declared)" in summary


def test_a_cut_file_without_a_whole_decodable_window_is_skipped_with_one_readable_line(truncated):
    out, index, summary = truncated
    errors = errors_of(out)
    assert index["totals"]["errors"] == 3 and index["totals"]["skipped"] == {"broken": 2, "truncated": 1}
    assert errors["mkv10"]["kind"] == "truncated"
    assert "mkv10.mkv is truncated: " in errors["mkv10"]["reason"]
    assert "less than one window (1.28 s)" in errors["mkv10"]["reason"]
    for key in ("mp448", "mp498"):  # the index (moov) is at the end: the 98 % cut loses it too
        reason = errors[key]["reason"]
        assert errors[key]["kind"] == "broken" and f"{key}.mp4: " in reason
        assert "truncated" in reason and "\n" not in reason
        assert ".cc:" not in reason and "[bt]" not in reason and "Stack trace" not in reason
    assert "skipped by kind: {'broken': 2, 'truncated': 1}" in summary


def test_decoder_backtraces_become_one_line_saying_what_failed():
    raw = RuntimeError(
        "[10:00:07] /github/workspace/src/video/video_reader.cc:430: [x.ts]Unable to handle EOF because the "
        "video might have corrupted frames and `DECORD_REWIND_RETRY_MAX=16`. You may override the limit by "
        "`export DECORD_REWIND_RETRY_MAX=32` for example\n\nStack trace:\n  [bt] (0) libdecord.so(+0x1a2b)\n"
        "  [bt] (1) libdecord.so(decord::runtime::Foo+0x33)"
    )
    line = explain(raw)
    assert line.startswith("frames near the end do not decode: the file is truncated or corrupt (decoder: ")
    assert "\n" not in line and "[bt]" not in line and ".cc:" not in line and "override" not in line


# ---------------------------------------------------------------- silent audio


def silent_rows(realdata_dir: Path, tmp: Path) -> list[ManifestRow]:
    """The real clip three times: its own track, an all-zero wav of its length, and -70 dBFS noise."""
    video = realdata_dir / CLIP
    n = round(7.0 * 16000)
    sf.write(tmp / "zeros.wav", np.zeros(n, np.float32), 16000, subtype="PCM_16")
    hiss = np.random.default_rng(0).standard_normal(n) * 10 ** (-70 / 20)
    sf.write(tmp / "hiss.wav", hiss.astype(np.float32), 16000, subtype="FLOAT")
    return [
        ManifestRow("speech", str(video)),
        ManifestRow("zeros", str(video), audio=str(tmp / "zeros.wav")),
        ManifestRow("hiss", str(video), audio=str(tmp / "hiss.wav")),
    ]


def test_silence_threshold_is_minus_60_dbfs():
    assert SILENCE_DBFS == -60.0
    assert rms_dbfs(np.zeros(100, np.float32)) < -200
    assert rms_dbfs(np.full(100, 0.5, np.float32)) == pytest.approx(-6.02, abs=0.01)


def test_silent_tracks_are_kept_flagged_and_counted_by_default(realdata_dir, tmp_path, capsys):
    manifest = write_manifest(silent_rows(realdata_dir, tmp_path), tmp_path / "m.csv")
    index = write_shards(manifest, tmp_path / "out", CFG, progress=False)
    metas = metas_by_clip(tmp_path / "out")
    assert sorted(metas) == ["hiss", "speech", "zeros"]
    assert {k: {m["audio_silent"] for m in ms} for k, ms in metas.items()} == {
        "speech": {False},
        "zeros": {True},
        "hiss": {True},
    }
    assert index["totals"]["silent_audio"] == 2 and index["totals"]["skipped"] == {}
    assert "2 silent audio tracks (kept, flagged audio_silent)" in capsys.readouterr().out


def test_silent_audio_skip_from_the_command_line_skips_and_counts_them(realdata_dir, tmp_path, capsys):
    manifest = write_manifest(silent_rows(realdata_dir, tmp_path), tmp_path / "m.csv")
    out = tmp_path / "out"
    argv = [
        str(manifest),
        str(out),
        "--workers",
        "1",
        "--no-progress",
        "--silent-audio",
        "skip",
        "num_frames=8",
        "img_size=32",
        "group_by=none",
    ]
    assert main(argv) == 0
    assert sorted(metas_by_clip(out)) == ["speech"]
    errors = errors_of(out)
    assert {k: e["kind"] for k, e in errors.items()} == {"zeros": "silent_audio", "hiss": "silent_audio"}
    assert "silent audio (-70 dBFS < -60 dBFS) and silent_audio=skip" in errors["hiss"]["reason"]
    index = json.loads((out / "index.json").read_text())
    assert index["totals"]["silent_audio"] == 2 and index["totals"]["skipped"] == {"silent_audio": 2}
    assert index["config"]["silent_audio"] == "skip"
    assert "2 silent audio tracks (skipped)" in capsys.readouterr().out


# ---------------------------------------------------------------- video-only clips


@pytest.fixture(scope="module")
def video_only(realdata_dir, tmp_path_factory) -> Path:
    """A manifest of the real clip with its audio stream removed (video stream copied as is) and the
    original clip."""
    tmp = tmp_path_factory.mktemp("video_only")
    mute = remux(realdata_dir / CLIP, tmp / "mute.mp4", kinds=("video",))
    with av.open(str(mute)) as box:
        assert [s.type for s in box.streams] == ["video"]
    rows = [ManifestRow("mute", str(mute)), ManifestRow("speech", str(realdata_dir / CLIP))]
    return write_manifest(rows, tmp / "manifest.csv")


def test_a_clip_without_audio_is_skipped_and_the_message_names_the_flag(video_only, tmp_path, capsys):
    index = write_shards(video_only, tmp_path, CFG, progress=False)
    assert sorted(metas_by_clip(tmp_path)) == ["speech"]
    (err,) = errors_of(tmp_path).values()
    assert err["key"] == "mute" and err["kind"] == "missing_audio"
    assert "mute.mp4: no audio (the video has no audio stream); pass --allow-missing-audio" in err["reason"]
    assert index["totals"]["missing_audio"] == 1 and index["totals"]["skipped"] == {"missing_audio": 1}
    assert "1 clips without audio (skipped; --allow-missing-audio keeps them)" in capsys.readouterr().out


def test_allow_missing_audio_writes_zero_audio_of_the_normal_length_flagged_audio_missing(
    video_only, tmp_path
):
    argv = [
        str(video_only),
        str(tmp_path),
        "--workers",
        "1",
        "--no-progress",
        "--allow-missing-audio",
        "num_frames=8",
        "img_size=32",
        "group_by=none",
    ]
    assert main(argv) == 0
    samples = samples_in(tmp_path)
    mute = {k: s for k, s in samples.items() if k.startswith("mute_")}
    speech = {k: s for k, s in samples.items() if k.startswith("speech_")}
    assert len(mute) == len(speech) == 5  # every full 1.28 s window of the 7 s video
    for s in mute.values():
        meta = json.loads(s["json"])
        assert meta["audio_missing"] is True and meta["audio_silent"] is False
        assert meta["audio_samples"] == AUDIO_SAMPLES and meta["audio_padded"] == 0  # zeros, not padding
        audio, sr = sf.read(io.BytesIO(s["wav"]), dtype="int16")
        assert sr == 16000 and audio.shape == (AUDIO_SAMPLES,) and not audio.any()
        assert np.load(io.BytesIO(s["fbank.npy"])).shape == (126, 128)  # the normal fbank of 1.28 s
    for s in speech.values():
        assert json.loads(s["json"])["audio_missing"] is False
    # Today's loader reads both kinds to the same fbank shape, from the wav and from fbank.npy.
    loader = SampleDecoder(StreamConfig(img_size=32), train=False)
    (mute_sample, *_), (speech_sample, *_) = mute.values(), speech.values()
    shapes = {
        tuple(loader.audio_features(raw, json.loads(s["json"])).shape)
        for s in (mute_sample, speech_sample)
        for raw in (s, {k: v for k, v in s.items() if k != "fbank.npy"})
    }
    assert len(shapes) == 1, shapes
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["totals"]["missing_audio"] == 1 and index["totals"]["errors"] == 0
    assert index["config"]["allow_missing_audio"] is True
