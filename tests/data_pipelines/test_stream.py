from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import random
import tarfile
from collections import Counter
from functools import partial
from pathlib import Path

import pytest
import torch
import webdataset as wds
from shard_factory import keys_of, make_sample, stream_config, write_shard_dir
from torch.utils.data import DataLoader

from data_pipelines.augment import VideoAugConfig
from data_pipelines.features import FbankConfig
from data_pipelines.stream import (
    StreamConfig,
    StreamStart,
    eval_pipeline,
    exact_once_split,
    pretrain_pipeline,
    read_corrupt_logs,
)

CFG = stream_config(
    batch_size=4,
    video_aug=VideoAugConfig(img_size=32, crop_scale=(0.5, 1.0), hflip=0.5),
    audio_gain_db=3.0,
    shuffle_buffer=8,
    epoch_length=5,
)
SEVEN_UNEVEN = [5, 3, 4, 6, 2, 5, 3]  # 28 samples; 6 slots do not divide 7 shards


def batches(stream, workers: int) -> list[dict]:
    return list(DataLoader(stream, batch_size=None, num_workers=workers))


def keys(batch_list: list[dict]) -> list[str]:
    return [k for b in batch_list for k in b["key"]]


@pytest.fixture(scope="module")
def seven_shards(tmp_path_factory) -> list[str]:
    return write_shard_dir(tmp_path_factory.mktemp("seven"), SEVEN_UNEVEN)


def test_eval_reads_every_sample_exactly_once_over_3_ranks_x_2_workers_x_7_uneven_shards(seven_shards):
    per_rank = []
    for rank in range(3):
        per_rank.append(keys(batches(eval_pipeline(seven_shards, CFG, rank=rank, world_size=3), workers=2)))
    seen = [k for ks in per_rank for k in ks]
    assert Counter(seen) == Counter(keys_of(SEVEN_UNEVEN))  # no duplicates, no drops, no padding
    assert sorted(len(ks) for ks in per_rank) == [9, 9, 10]  # balanced to within one sample


def test_eval_reads_rank_and_world_size_from_the_environment(seven_shards, monkeypatch):
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        seen += keys(batches(eval_pipeline(seven_shards, CFG), workers=0))
    assert sorted(seen) == keys_of(SEVEN_UNEVEN)


def test_eval_without_index_falls_back_to_whole_shards_and_stays_exact_once(tmp_path):
    urls = write_shard_dir(tmp_path, SEVEN_UNEVEN)
    (tmp_path / "index.json").unlink()
    seen = []
    for rank in range(3):
        seen += keys(batches(eval_pipeline(urls, CFG, rank=rank, world_size=3), workers=2))
    assert sorted(seen) == keys_of(SEVEN_UNEVEN)


def test_exact_once_split_covers_every_position_once_for_any_slot_count():
    rng = random.Random(0)
    for _ in range(60):
        sizes = [rng.randint(0, 9) for _ in range(rng.randint(1, 9))]
        urls = [f"s{i}.tar" for i in range(len(sizes))]
        slots = rng.randint(1, 12)
        covered = Counter()
        for slot in range(slots):
            for piece in exact_once_split(urls, sizes, slot, slots):
                n = sizes[urls.index(piece["url"])]
                stop = n if piece["stop"] is None else piece["stop"]
                covered.update((piece["url"], i) for i in range(piece["start"], stop))
        assert covered == Counter((u, i) for u, n in zip(urls, sizes) for i in range(n)), (sizes, slots)
        # Every shard is read to its end by exactly one slot (stale index counts lose nothing).
        to_end = Counter(
            p["url"]
            for s in range(slots)
            for p in exact_once_split(urls, sizes, s, slots)
            if p["stop"] is None
        )
        assert to_end == Counter(urls)


def test_eval_with_a_stale_index_still_reads_the_extra_samples_once(tmp_path):
    urls = write_shard_dir(tmp_path, [6, 6])
    index = json.loads((tmp_path / "index.json").read_text())
    index["shards"][0]["samples"] = 4  # two samples more in the tar than the index says
    (tmp_path / "index.json").write_text(json.dumps(index))
    seen = []
    for rank in range(2):
        seen += keys(batches(eval_pipeline(urls, CFG, rank=rank, world_size=2), workers=2))
    assert sorted(seen) == keys_of([6, 6])


def test_pretrain_yields_exactly_epoch_length_full_batches(seven_shards):
    for workers in (0, 2):
        stream = pretrain_pipeline(seven_shards, CFG, rank=0, world_size=1)
        out = batches(stream, workers)
        assert len(out) == len(stream) == CFG.epoch_length == 5
        assert all(b["video"].shape == (4, 4, 3, 32, 32) for b in out)
        # The round robin interleaves workers 0, 1, 0, 1, 0.
        assert [b["stream"]["worker"] for b in out] == [i % max(workers, 1) for i in range(5)]


def test_pretrain_stream_depends_only_on_seed_epoch_and_rank(seven_shards):
    def run(epoch=0, rank=0, seed=0):
        stream = pretrain_pipeline(
            seven_shards, StreamConfig(**{**CFG.__dict__, "seed": seed}), rank=rank, world_size=2
        )
        stream.epoch = epoch
        return batches(stream, workers=2)

    first, again = run(), run()
    assert keys(first) == keys(again)
    assert all(
        torch.equal(a["video"], b["video"]) and torch.equal(a["fbank"], b["fbank"])
        for a, b in zip(first, again)
    )
    assert keys(run(epoch=1)) != keys(first)
    assert keys(run(rank=1)) != keys(first)
    assert keys(run(seed=1)) != keys(first)


def test_pretrain_stream_resumes_from_a_stream_start(seven_shards):
    full = batches(pretrain_pipeline(seven_shards, CFG, rank=0, world_size=1), workers=2)
    done = 3
    positions = [0, 0]
    for b in full[:done]:
        positions[b["stream"]["worker"]] = b["stream"]["position"]
    stream = pretrain_pipeline(seven_shards, CFG, rank=0, world_size=1)
    stream.start = StreamStart(done, tuple(positions))
    rest = batches(stream, workers=2)
    assert keys(rest) == keys(full[done:])
    assert all(torch.equal(a["video"], b["video"]) for a, b in zip(rest, full[done:]))


def corrupt_shards(out: Path) -> tuple[list[str], list[str], dict[str, str]]:
    """Four shards: clean; one with a garbage JPEG, a missing wav and a wrong frame count; clean;
    one truncated in the middle of its third sample. Returns urls, keys expected, corrupt keys."""
    urls = write_shard_dir(out, [4, 4, 4, 5])
    expected = keys_of([4, 4, 4, 5])
    bad = {}
    samples = [make_sample(k, num_frames=4, size=32, label=1, seed=i) for i, k in enumerate(expected[4:8])]
    samples[0]["f02.jpg"] = b"\xff\xd8 this is not a jpeg"
    bad[expected[4]] = "jpeg"
    del samples[1]["wav"]
    bad[expected[5]] = "audio"
    samples[2]["f04.jpg"] = samples[2]["f03.jpg"]
    bad[expected[6]] = "frame count"
    with wds.TarWriter(urls[1]) as sink:
        for s in samples:
            sink.write(s)
    with tarfile.open(urls[3]) as tf:
        cut = next(m for m in tf.getmembers() if m.name == f"{expected[14]}.f01.jpg")
    data = Path(urls[3]).read_bytes()
    Path(urls[3]).write_bytes(data[: cut.offset_data + cut.size // 2])
    bad[expected[14]] = "json"  # the half sample: frames f00 only, no json / wav
    lost = expected[15:]  # after the cut: never in the file any more
    return urls, [k for k in expected if k not in bad and k not in lost], bad


def test_truncated_tar_and_corrupt_samples_are_skipped_counted_and_logged_exactly(tmp_path):
    urls, good, bad = corrupt_shards(tmp_path / "shards")
    log_dir = tmp_path / "log"
    seen, reported = [], 0
    for rank in range(2):
        out = batches(eval_pipeline(urls, CFG, rank=rank, world_size=2, log_dir=log_dir), workers=2)
        seen += keys(out)
        last = {}
        for b in out:
            last[b["stream"]["worker"]] = b["stream"]["corrupt"]
        reported += sum(last.values())
    assert sorted(seen) == good  # nothing substituted, nothing duplicated
    events = read_corrupt_logs(log_dir)
    assert reported == len(events) == 5
    shard_events = [e for e in events if e["kind"] == "shard"]
    assert len(shard_events) == 1 and shard_events[0]["url"] == urls[3]
    assert "unexpected end of data" in shard_events[0]["reason"]
    sample_events = {e["key"]: e for e in events if e["kind"] == "sample"}
    assert set(sample_events) == set(bad)
    for key, word in bad.items():
        assert word in sample_events[key]["reason"].lower(), sample_events[key]
    assert all({"rank", "worker", "url", "key", "epoch"} <= set(e) for e in events)


def test_pretrain_skips_corrupt_samples_without_replacing_them(tmp_path, caplog):
    urls, good, bad = corrupt_shards(tmp_path / "shards")
    cfg = StreamConfig(**{**CFG.__dict__, "epoch_length": 12})
    with caplog.at_level("WARNING", logger="emomae.data"):
        out = batches(pretrain_pipeline(urls, cfg, rank=0, world_size=1, log_dir=tmp_path / "log"), workers=0)
    seen = keys(out)
    assert len(seen) == 48 and not set(seen) & set(bad)
    events = read_corrupt_logs(tmp_path / "log")
    assert out[-1]["stream"]["corrupt"] == len(events) > 0
    assert {e["key"] for e in events if e["kind"] == "sample"} <= set(bad)
    lines = [r.getMessage() for r in caplog.records if "skipping corrupt" in r.getMessage()]
    assert len(lines) == len(events)
    assert all("rank 0 worker 0" in line and ".tar" in line for line in lines)


def test_sample_filter_selects_samples_without_counting_them_as_corrupt(seven_shards, tmp_path):
    def speaker_is(meta, name):
        return meta["speaker"] == name

    keep = partial(speaker_is, name="spk1")
    out = batches(
        eval_pipeline(seven_shards, CFG, rank=0, world_size=1, sample_filter=keep, log_dir=tmp_path),
        workers=2,
    )
    expected = [k for i, k in enumerate(keys_of(SEVEN_UNEVEN)) if i % 3 == 1]
    assert sorted(keys(out)) == expected
    assert read_corrupt_logs(tmp_path) == [] and all(b["stream"]["corrupt"] == 0 for b in out)


def test_wrong_num_frames_stops_the_stream_with_a_clear_error(seven_shards):
    cfg = StreamConfig(**{**CFG.__dict__, "num_frames": 8, "max_consecutive_errors": 10})
    with pytest.raises(RuntimeError, match="in a row.*num_frames"):
        batches(pretrain_pipeline(seven_shards, cfg, rank=0, world_size=1), workers=0)


def test_regression_targets_and_captions_reach_the_batch(tmp_path):
    with wds.TarWriter(str(tmp_path / "all-000000.tar")) as sink:
        sink.write(make_sample("a_w000", label=[0.5, -0.25, 1.0], caption="a calm voice", seed=1))
        sink.write(make_sample("b_w000", label=None, seed=2))
        sink.write(make_sample("c_w000", label=[1.0, 2.0, 3.0], seed=3))
    out = batches(eval_pipeline([str(tmp_path / "all-000000.tar")], CFG, rank=0, world_size=1), workers=0)[0]
    assert out["label"].tolist() == [-1, -1, -1] and out["target"].dtype == torch.float32
    assert out["target"][0].tolist() == [0.5, -0.25, 1.0] and out["target"][1].isnan().all()
    assert out["caption"] == ["a calm voice", "", ""] and out["has_caption"].tolist() == [True, False, False]


def test_flac_and_other_sample_rates_are_decoded_to_16k(tmp_path):
    import numpy as np
    import soundfile as sf

    sample = make_sample("a_w000", seconds=0.64, seed=1)
    del sample["wav"]
    buf = io.BytesIO()
    sf.write(buf, np.zeros((int(0.64 * 8000), 2), dtype=np.float32) + 0.1, 8000, format="FLAC")
    sample["flac"] = buf.getvalue()
    with wds.TarWriter(str(tmp_path / "x-000000.tar")) as sink:
        sink.write(sample)
    out = batches(eval_pipeline([str(tmp_path / "x-000000.tar")], CFG, rank=0, world_size=1), workers=0)
    assert out[0]["fbank"].shape == (1, 64, 128) and torch.isfinite(out[0]["fbank"]).all()


def test_pcm16_wav_fast_path_reads_what_soundfile_reads():
    import numpy as np
    import soundfile as sf

    from data_pipelines.samples import read_pcm16_wav

    rng = np.random.default_rng(0)
    for channels, subtype in ((1, "PCM_16"), (2, "PCM_16"), (1, "FLOAT")):
        buf = io.BytesIO()
        sf.write(
            buf,
            rng.uniform(-0.9, 0.9, (1000, channels)).astype(np.float32),
            16000,
            format="WAV",
            subtype=subtype,
        )
        fast, rate = read_pcm16_wav(buf.getvalue())
        if subtype == "FLOAT":
            assert fast is None  # left to soundfile
            continue
        ref, ref_rate = sf.read(io.BytesIO(buf.getvalue()), dtype="float32", always_2d=True)
        assert rate == ref_rate == 16000 and fast.dtype == np.float32 and np.array_equal(fast, ref)


def with_stored_fbank(sample: dict, mel_bins: int = 128, sample_rate: int = 16000) -> dict:
    """The sample plus the `fbank.npy` member and json params the shard writer adds."""
    import numpy as np

    from data_pipelines.features import encode_log_mel, fbank_params, kaldi_fbank
    from data_pipelines.samples import read_pcm16_wav

    audio, _ = read_pcm16_wav(sample["wav"])
    meta = json.loads(sample["json"])
    meta["fbank"] = fbank_params(sample_rate, mel_bins)
    log_mel = kaldi_fbank(torch.from_numpy(np.ascontiguousarray(audio[:, 0])), sample_rate, mel_bins)
    return {**sample, "json": json.dumps(meta).encode(), "fbank.npy": encode_log_mel(log_mel)}


def write_samples(path: Path, samples: list[dict]) -> str:
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)
    return str(path)


def test_stored_fbank_gives_the_batches_of_the_wav_path_in_eval_and_pretrain_mode(tmp_path, caplog):
    plain = [make_sample(f"c{i:02d}_w000", label=i % 3, seed=i) for i in range(8)]
    wav_only = write_samples(tmp_path / "wav-000000.tar", plain)
    stored = write_samples(tmp_path / "npy-000000.tar", [with_stored_fbank(s) for s in plain])
    masked = dataclasses.replace(
        CFG, fbank=FbankConfig(fbank_frames=64, freq_mask=12, time_mask=10), epoch_length=2
    )
    for cfg, pipeline in ((CFG, eval_pipeline), (masked, pretrain_pipeline)):  # pretrain: gain + SpecAugment
        with caplog.at_level(logging.INFO, logger="emomae.data"):
            caplog.clear()
            got = batches(pipeline([stored], cfg, rank=0, world_size=1), workers=0)
            assert "fbank.npy from the shards" in caplog.text
            caplog.clear()
            want = batches(pipeline([wav_only], cfg, rank=0, world_size=1), workers=0)
            assert "the shards have no fbank.npy" in caplog.text
        assert [b["key"] for b in got] == [b["key"] for b in want]
        for a, b in zip(got, want):
            assert torch.equal(a["video"], b["video"]) and torch.equal(a["label"], b["label"])
            error = (a["fbank"] - b["fbank"]).abs()
            # float16 storage: ~1e-3. A gain moves cells at Kaldi's energy floor (the narrowest low
            # mel bins here) by at most the gain itself (features.precomputed_fbank).
            assert (error > 3e-3).float().mean() < 0.02
            assert error.max() <= cfg.audio_gain_db / 10 * math.log(10) / (2 * cfg.fbank.std) + 3e-3


def test_stored_fbank_with_other_parameters_is_ignored_and_the_log_says_why(tmp_path, caplog):
    plain = [make_sample(f"c{i:02d}_w000", seed=i) for i in range(4)]
    other = write_samples(tmp_path / "other-000000.tar", [with_stored_fbank(s, mel_bins=64) for s in plain])
    wav_only = write_samples(tmp_path / "wav-000000.tar", plain)
    with caplog.at_level(logging.INFO, logger="emomae.data"):
        got = batches(eval_pipeline([other], CFG, rank=0, world_size=1), workers=0)
    assert "'mel_bins': 64" in caplog.text and "this loader needs" in caplog.text
    want = batches(eval_pipeline([wav_only], CFG, rank=0, world_size=1), workers=0)
    assert torch.equal(got[0]["fbank"], want[0]["fbank"])  # computed from the wav, bit for bit


def test_garbage_stored_fbank_is_a_counted_corrupt_sample_not_a_silent_fallback(tmp_path):
    samples = [with_stored_fbank(make_sample(f"c{i:02d}_w000", seed=i)) for i in range(4)]
    samples[1]["fbank.npy"] = b"\x93NUMPY garbage"
    samples[2]["fbank.npy"] = samples[2]["fbank.npy"][:-1000]  # frames missing
    url = write_samples(tmp_path / "x-000000.tar", samples)
    out = batches(eval_pipeline([url], CFG, rank=0, world_size=1, log_dir=tmp_path / "log"), workers=0)
    assert keys(out) == ["c00_w000", "c03_w000"] and out[-1]["stream"]["corrupt"] == 2
    reasons = [e["reason"] for e in read_corrupt_logs(tmp_path / "log")]
    assert len(reasons) == 2 and all("fbank.npy" in r for r in reasons)


def test_the_audio_present_flag_and_a_blank_fbank_reach_the_batch_for_clips_without_audio(tmp_path):
    no_audio = frozenset({1, 4, 5})
    urls = write_shard_dir(tmp_path, [4, 4], no_audio=no_audio)
    for stream in (
        eval_pipeline(urls, CFG, rank=0, world_size=1),
        pretrain_pipeline(urls, CFG, rank=0, world_size=1),
    ):
        out = batches(stream, workers=0)
        for batch in out:
            present = batch["audio_present"]
            assert present.dtype == torch.bool and present.shape == (len(batch["key"]),)
            for key, flag, fbank in zip(batch["key"], present.tolist(), batch["fbank"]):
                assert flag == (int(key[1:5]) not in no_audio), key
                # no audio: the zeros of drop_modality, not the log-mel floor of the zero waveform
                assert fbank.eq(0).all() if not flag else fbank.abs().sum() > 0, key
        assert any(not b["audio_present"].all() for b in out) and any(b["audio_present"].any() for b in out)
