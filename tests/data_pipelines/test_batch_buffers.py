"""Loader workers reuse their shared batch buffers (data_pipelines/batch_buffers.py) only once the
main process has dropped every view of a batch: real DataLoader workers, real shards."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.data import DataLoader

from data_pipelines.augment import VideoAugConfig
from data_pipelines.features import FbankConfig
from data_pipelines.shards import shard_urls
from data_pipelines.stream import StreamConfig, eval_pipeline, pretrain_pipeline

EVAL = StreamConfig(
    batch_size=2, num_frames=8, img_size=48, fbank=FbankConfig(fbank_frames=64), batch_buffers=3
)
TRAIN = dataclasses.replace(
    EVAL,
    video_aug=VideoAugConfig(img_size=48, crop_scale=(0.3, 1.0), hflip=0.5),
    audio_gain_db=3.0,
    shuffle_buffer=4,
    epoch_length=10,
)


def worker_batches(stream) -> DataLoader:
    return DataLoader(stream, batch_size=None, num_workers=1)


def in_process(stream) -> list[dict]:
    return [b for b in stream]


def assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert [b["key"] for b in got] == [b["key"] for b in want]
    for g, w in zip(got, want):
        assert torch.equal(g["video"], w["video"]) and torch.equal(g["fbank"], w["fbank"])


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_dropped_batches_give_their_buffers_back(synth_shards, mode):
    urls = shard_urls(synth_shards)
    make = (
        (lambda: eval_pipeline(urls * 3, EVAL, rank=0, world_size=1))
        if mode == "eval"
        else (lambda: pretrain_pipeline(urls, TRAIN, rank=0, world_size=1))
    )
    want = in_process(make())
    got, slots = [], []
    for batch in worker_batches(make()):
        slots.append(batch["stream"]["lease"][1])  # no lease: a fresh buffer
        got.append({"key": batch["key"], "video": batch["video"].clone(), "fbank": batch["fbank"].clone()})
        del batch  # the clone is all that is kept: the worker may refill this buffer
    assert len(got) >= 10
    assert_same_batches(got, want)
    assert set(slots) <= {0, 1, 2} and len(slots) == len(got)  # every batch was in a pooled buffer


def test_kept_batches_are_never_overwritten(synth_shards):
    urls = shard_urls(synth_shards)
    want = in_process(eval_pipeline(urls * 3, EVAL, rank=0, world_size=1))
    kept = list(worker_batches(eval_pipeline(urls * 3, EVAL, rank=0, world_size=1)))
    assert_same_batches(kept, want)
    leased = [b for b in kept if "lease" in b["stream"]]
    assert len(leased) == EVAL.batch_buffers < len(kept)  # the pool ran dry: the rest got fresh buffers


def test_a_view_outliving_its_batch_keeps_the_buffer_taken(synth_shards):
    """Only the last view counts: a slice of one batch's video, kept while the batch dict goes."""
    urls = shard_urls(synth_shards)
    want = in_process(eval_pipeline(urls * 3, EVAL, rank=0, world_size=1))
    first_frames, slots = None, []
    for i, batch in enumerate(worker_batches(eval_pipeline(urls * 3, EVAL, rank=0, world_size=1))):
        slots.append(batch["stream"].get("lease", (None, None))[1])
        if i == 0:
            first_frames = batch["video"][0, 0]
    assert torch.equal(first_frames, want[0]["video"][0, 0])
    assert slots[0] not in slots[1:]  # never handed out again while the view lived


def test_no_pool_without_workers_or_when_switched_off(synth_shards):
    urls = shard_urls(synth_shards)
    assert all("lease" not in b["stream"] for b in eval_pipeline(urls, EVAL, rank=0, world_size=1))
    off = dataclasses.replace(EVAL, batch_buffers=0)
    assert all(
        "lease" not in b["stream"] for b in worker_batches(eval_pipeline(urls, off, rank=0, world_size=1))
    )


def test_jpeg_bytes_batches_reuse_buffers_too(synth_shards):
    """The JPEG-bytes batches vary in size: a free buffer too small for the next one is replaced."""
    urls = shard_urls(synth_shards)
    cfg = dataclasses.replace(TRAIN, jpeg_bytes=True)
    want = in_process(pretrain_pipeline(urls, cfg, rank=0, world_size=1))
    got = []
    for batch in worker_batches(pretrain_pipeline(urls, cfg, rank=0, world_size=1)):
        jpeg = batch["jpeg"]
        got.append(
            (batch["stream"]["lease"][1], jpeg["data"].clone(), jpeg["offsets"].clone(), jpeg["crop"].clone())
        )
        del batch, jpeg
    assert len(got) == len(want) == TRAIN.epoch_length
    for (_, data, offsets, crop), w in zip(got, want):
        assert torch.equal(data, w["jpeg"]["data"]) and torch.equal(offsets, w["jpeg"]["offsets"])
        assert torch.equal(crop, w["jpeg"]["crop"])
    assert {slot for slot, *_ in got} <= {0, 1, 2}


def test_data_config_sets_the_pool_size_and_refuses_a_negative_one():
    from data_pipelines.datamodule import DataConfig

    assert DataConfig.from_any({"batch_buffers": 2}).stream(train=True).batch_buffers == 2
    assert DataConfig().stream(train=False).batch_buffers == StreamConfig().batch_buffers == 5
    with pytest.raises(
        ValueError, match=r"data.batch_buffers must be >= 0 \(0 turns the reuse off\), got -1"
    ):
        DataConfig(batch_buffers=-1)


def test_the_pool_refills_free_buffers_grows_small_ones_and_says_once_when_it_runs_dry(caplog):
    from data_pipelines.batch_buffers import FREE, HEADROOM, BatchBufferPool

    pool = BatchBufferPool(1)
    first, lease = pool.take(1000)
    assert lease.slot == 0 and lease.pool is pool and first.is_shared()
    with caplog.at_level("WARNING", logger="emomae.data"):
        spare, none = pool.take(1000)
        pool.take(1000)
    assert none is None and spare.data_ptr() != first.data_ptr() and pool.fresh == 2
    assert [r.getMessage().count("all 1 batch buffers are still held") for r in caplog.records] == [1]

    pool.flags[0] = FREE  # what the consumer's finaliser does
    again, lease = pool.take(800)
    assert again.data_ptr() == first.data_ptr() and again.numel() == 800 and lease.slot == 0
    pool.flags[0] = FREE
    larger, _ = pool.take(5000)  # the free buffer is too small: replaced, with headroom
    assert larger.numel() == 5000 and pool.buffers[0].numel() >= 5000 * HEADROOM


def test_in_process_batches_reuse_memory_only_once_dropped(synth_shards):
    urls = shard_urls(synth_shards)
    off = [
        b for b in eval_pipeline(urls * 3, dataclasses.replace(EVAL, batch_buffers=0), rank=0, world_size=1)
    ]
    kept = list(eval_pipeline(urls * 3, EVAL, rank=0, world_size=1))
    assert_same_batches(kept, off)
    assert len({b["video"].data_ptr() for b in kept}) == len(kept)  # none shares memory with another

    got, pointers = [], []
    for batch in eval_pipeline(urls * 3, EVAL, rank=0, world_size=1):
        pointers.append(batch["video"].data_ptr())
        got.append({"key": batch["key"], "video": batch["video"].clone(), "fbank": batch["fbank"].clone()})
        del batch
    assert_same_batches(got, off)
    assert len(set(pointers)) <= EVAL.batch_buffers < len(pointers)  # recycled


def test_the_device_decoder_keeps_a_batchs_bytes_until_the_next_batch(synth_shards):
    """The GPU path's main process: a buffer goes back to the pool one batch after it was decoded."""
    from data_pipelines.batch_buffers import FREE, TAKEN
    from data_pipelines.device_decode import DeviceFrameDecoder

    stream = eval_pipeline(
        shard_urls(synth_shards) * 3, dataclasses.replace(EVAL, jpeg_bytes=True), rank=0, world_size=1
    )
    batches, decode = iter(stream), DeviceFrameDecoder("cpu")
    first = decode(next(batches))
    del first
    flags = stream.buffer_pool.flags
    assert flags[0].item() == TAKEN  # decoded and dropped, still held by the decoder
    second = decode(next(batches))
    del second
    assert flags[0].item() == FREE and flags[1].item() == TAKEN


def test_each_buffer_crosses_to_the_main_process_once(synth_shards):
    """A pooled buffer is sent with the first batch of its slot only; later batches of the slot are
    built on the mapping this process kept, and the small per-sample fields come by value."""
    from data_pipelines.batch_buffers import _received

    urls = shard_urls(synth_shards)
    want = in_process(eval_pipeline(urls * 3, EVAL, rank=0, world_size=1))
    got, mapped = [], set()
    for batch in worker_batches(eval_pipeline(urls * 3, EVAL, rank=0, world_size=1)):
        pool_id, slot = batch["stream"]["lease"]
        pool = _received[pool_id]
        generation, memory = pool.buffers[slot]
        assert batch["video"].untyped_storage().data_ptr() == memory.ctypes.data  # on the kept mapping
        assert not batch["label"].is_shared() and not batch["video"].is_shared()
        mapped.add((slot, generation))
        got.append({"key": batch["key"], "video": batch["video"].clone(), "fbank": batch["fbank"].clone()})
        received = pool.received
        del batch
    assert_same_batches(got, want)
    assert len(got) > 2 * EVAL.batch_buffers
    assert received == len(mapped) <= EVAL.batch_buffers  # one sending per buffer, not per batch


def test_the_mappings_of_an_ended_worker_are_dropped(synth_shards):
    from data_pipelines.batch_buffers import _received

    urls = shard_urls(synth_shards)
    first = {b["stream"]["lease"][0] for b in worker_batches(eval_pipeline(urls, EVAL, rank=0, world_size=1))}
    assert len(first) == 1 and first <= set(_received)  # the worker has ended; nothing new arrived yet
    batch = next(iter(worker_batches(eval_pipeline(urls, EVAL, rank=0, world_size=1))))
    assert batch["stream"]["lease"][0] in _received and not first & set(_received)


def test_a_batch_received_in_inference_mode_gives_its_buffer_back_outside_it(synth_shards):
    """A validation loop receives batches under torch.inference_mode(); the batch may die, and its
    finaliser run, outside it."""
    urls = shard_urls(synth_shards)
    batches = iter(worker_batches(eval_pipeline(urls * 3, EVAL, rank=0, world_size=1)))
    with torch.inference_mode():
        first = next(batches)  # the pool's flags arrive here too
    slot = first["stream"]["lease"][1]
    del first
    later = [b["stream"]["lease"][1] for b in batches]
    assert slot in later  # freed, so handed out again


def test_an_in_process_stream_started_in_inference_mode_still_recycles_its_buffers(synth_shards):
    """The in-process pool's flags are made where the stream starts, maybe under inference_mode();
    a batch dropped outside it must still free its buffer."""
    stream = eval_pipeline(shard_urls(synth_shards) * 3, EVAL, rank=0, world_size=1)
    with torch.inference_mode():
        batches = iter(stream)
        first = next(batches)
    pointer = first["video"].data_ptr()
    del first
    assert pointer in [b["video"].data_ptr() for b in batches]
