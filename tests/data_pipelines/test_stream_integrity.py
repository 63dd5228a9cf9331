"""What the stream counts as corrupt and what it does not: a shard cut at a member boundary (held
against index.json's count), tar format errors, decode errors versus bugs, and `pipe:` URLs."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch
from shard_factory import keys_of, stream_config, write_shard_dir
from torch.utils.data import DataLoader

from data_pipelines.corrupt import CorruptLog
from data_pipelines.stream import (
    PipeUrlError,
    StreamConfig,
    WorkerContext,
    check_pipe_urls,
    decode_samples,
    eval_pipeline,
    pretrain_pipeline,
    read_corrupt_logs,
    read_shard,
)

CFG = stream_config(batch_size=2, shuffle_buffer=4, epoch_length=4)


def cut_before_sample(url: str, key: str) -> None:
    """Truncate a tar right before the first header of sample `key`: a valid tar, just shorter."""
    with tarfile.open(url) as tf:
        offset = min(m.offset for m in tf.getmembers() if m.name.startswith(f"{key}."))
    data = Path(url).read_bytes()
    Path(url).write_bytes(data[:offset])


def worker_log(log_dir: Path | None = None) -> CorruptLog:
    return CorruptLog(WorkerContext(0, 1, 0, 1, 0), "eval", None if log_dir is None else str(log_dir), 200)


@pytest.fixture
def cut_shards(tmp_path) -> tuple[list[str], list[str]]:
    """Two shards of 5 samples; the second ends cleanly after its 2nd sample (3 lost). -> urls, keys left."""
    urls = write_shard_dir(tmp_path / "shards", [5, 5])
    keys = keys_of([5, 5])
    cut_before_sample(urls[1], keys[7])
    return urls, keys[:7]


def test_a_shard_cut_at_a_member_boundary_is_reported_against_index_json_in_eval(cut_shards, tmp_path):
    urls, left = cut_shards
    cfg = StreamConfig(
        **{**CFG.__dict__, "batch_size": 4}
    )  # the short shard's samples end in a partial batch
    out = list(
        DataLoader(
            eval_pipeline(urls, cfg, rank=0, world_size=1, log_dir=tmp_path / "log"),
            batch_size=None,
            num_workers=2,
        )
    )
    assert sorted(k for b in out for k in b["key"]) == left
    events = read_corrupt_logs(tmp_path / "log")
    assert [(e["kind"], e["url"], e["lost"]) for e in events] == [("shard", urls[1], 3)]
    assert "ended early" in events[0]["reason"] and "index.json lists 5" in events[0]["reason"]
    assert max(b["stream"]["corrupt"] for b in out) == 1  # counted in the batch that follows it too


def test_a_shard_cut_at_a_member_boundary_is_counted_in_pretraining(cut_shards, tmp_path):
    urls, _ = cut_shards
    out = list(
        DataLoader(
            pretrain_pipeline(urls[1:], CFG, rank=0, world_size=1, log_dir=tmp_path / "log"),
            batch_size=None,
            num_workers=0,
        )
    )
    events = read_corrupt_logs(tmp_path / "log")
    assert events and all(e["kind"] == "shard" and e["lost"] == 3 for e in events)
    assert out[-1]["stream"]["corrupt"] == len(events)  # every read of the short shard is counted


def test_an_intact_shard_and_a_stop_inside_it_report_nothing(tmp_path):
    urls = write_shard_dir(tmp_path / "shards", [5])
    errors = worker_log()
    assert len(list(read_shard(urls[0], errors))) == 5
    assert len(list(read_shard(urls[0], errors, start=1, stop=3))) == 2
    assert errors.count == 0


def test_a_read_range_past_the_end_of_a_cut_shard_counts_only_its_own_missing_samples(cut_shards):
    urls, _ = cut_shards
    errors = worker_log()
    assert [s["__index__"] for s in read_shard(urls[1], errors, start=1, stop=4)] == [1]
    assert errors.count == 1  # samples 2 and 3 of this range are missing


def test_a_member_name_that_is_not_utf8_is_a_counted_shard_error(tmp_path):
    url = str(tmp_path / "bad-000000.tar")
    with tarfile.open(url, "w", format=tarfile.USTAR_FORMAT, encoding="latin-1") as tf:
        info = tarfile.TarInfo("k\xff\xfe.json")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"{}"))
    errors = worker_log()
    assert list(read_shard(url, errors)) == []
    assert errors.count == 1


def test_a_bug_in_the_decoder_propagates_instead_of_being_counted_as_corrupt(tmp_path):
    urls = write_shard_dir(tmp_path / "shards", [3])
    errors = worker_log()
    raws = list(read_shard(urls[0], errors))

    def buggy_decode(raw: dict) -> dict:
        return {"video": raw["json"] + 1}  # bytes + int: a TypeError, a bug, not bad bytes

    with pytest.raises(TypeError):
        list(decode_samples(raws, buggy_decode, errors))
    assert errors.count == 0


def test_a_bug_reached_through_the_real_pipeline_stops_it(tmp_path):
    urls = write_shard_dir(tmp_path / "shards", [3])
    cfg = StreamConfig(**{**CFG.__dict__, "img_size": "32"})  # a str where the resize needs an int
    with pytest.raises(TypeError):
        list(eval_pipeline(urls, cfg, rank=0, world_size=1))


def test_bad_bytes_are_still_counted_not_raised(tmp_path):
    urls = write_shard_dir(tmp_path / "shards", [2])
    errors = worker_log()
    raws = list(read_shard(urls[0], errors))
    raws[0]["f01.jpg"] = b"\xff\xd8 not a jpeg"
    raws[1]["wav"] = b"RIFF but not a wav at all"
    from data_pipelines.samples import SampleDecoder

    assert list(decode_samples(raws, SampleDecoder(CFG, train=False), errors)) == []
    assert errors.count == 2


def test_pipe_urls_need_the_opt_in_and_name_the_key():
    urls = ["pipe:curl -s https://example.org/a-000000.tar", "shards/a-000001.tar"]
    with pytest.raises(PipeUrlError, match="data.allow_pipe_urls=true"):
        check_pipe_urls(urls, allowed=False)
    assert check_pipe_urls(urls, allowed=True) == ["curl -s https://example.org/a-000000.tar"]
    assert check_pipe_urls(urls[1:], allowed=False) == []


def test_a_pipe_url_reads_the_shard_the_command_prints(tmp_path):
    urls = write_shard_dir(tmp_path / "shards", [3])
    out = list(eval_pipeline([f"pipe:cat {urls[0]}"], CFG, rank=0, world_size=1, shard_sizes=[3]))
    assert sum(len(b["key"]) for b in out) == 3 and torch.is_tensor(out[0]["video"])
