"""The stage-2 batch mix from plain arguments (no pretraining config): captioned rows come from the
caption shards, the plain stream's position is the one a checkpoint resumes, and the caption shards
pass the same checks as the training shards. The mix on the built-in dataset, under a real stage-2
run, is in tests/pretrain/test_inject.py."""

from __future__ import annotations

import pytest
import torch
import webdataset as wds
from shard_factory import make_sample, write_shard_dir

from data_pipelines.caption_mix import CaptionMixDataModule

DATA = dict(num_frames=4, img_size=24, fbank_frames=64, shuffle_buffer=4, num_workers=0, seed=3)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """`plain/`: 8 uncaptioned clips (group fold0); `captioned/all-000000.tar`: 4 captioned, 1 not."""
    root = tmp_path_factory.mktemp("caption_mix")
    write_shard_dir(root / "plain", [8], group="fold0")
    (root / "captioned").mkdir()
    with wds.TarWriter(str(root / "captioned" / "all-000000.tar")) as sink:
        for i in range(4):
            sink.write(make_sample(f"k{i:02d}_w000", caption=f"clip {i} sounds calm", seed=50 + i))
        sink.write(make_sample("nocap_w000", seed=60))
    return root


def datamodule(shards, **kwargs) -> CaptionMixDataModule:
    cfg = dict(DATA, shards=str(shards / "plain"), train_groups=["fold0"], batch_size=4, epoch_length=3)
    return CaptionMixDataModule(cfg, rank=0, world_size=1, **kwargs)


def test_rows_split_by_ratio_and_the_plain_stream_position_is_tracked(shards):
    dm = datamodule(shards, caption_ratio=0.5, caption_shards=str(shards / "captioned" / "all-000000.tar"))
    assert dm.split_batch() == (2, 2)
    batches = list(dm.train_dataloader())
    assert len(batches) == 3
    for batch in batches:
        assert batch["video"].shape[0] == 4 and batch["has_caption"].tolist() == [False, False, True, True]
        assert all(k.startswith("c") for k in batch["key"][:2])
        assert all(k.startswith("k") for k in batch["key"][2:])  # never the uncaptioned `nocap`
    assert dm.state_dict()["batches"] == 3


def test_mixed_batches_from_a_worker_hand_both_buffers_back(shards, tmp_path):
    """In a loader worker both streams' rows are copied into the mixed batch, so both reused buffers
    go back to their pools at once: 8 batches through pools of 2 never run either pool dry (which
    the worker would log). The worker is forked, so it logs through the file handler set up here."""
    import logging

    handler = logging.FileHandler(tmp_path / "worker.log")
    logger = logging.getLogger("emomae.data")
    logger.addHandler(handler)
    try:
        cfg = dict(DATA, shards=str(shards / "plain"), train_groups=["fold0"], batch_size=4, epoch_length=8)
        dm = CaptionMixDataModule(
            {**cfg, "num_workers": 1, "batch_buffers": 2},
            rank=0,
            world_size=1,
            caption_ratio=0.5,
            caption_shards=str(shards / "captioned" / "all-000000.tar"),
        )
        want = list(
            datamodule(
                shards, caption_ratio=0.5, caption_shards=str(shards / "captioned" / "all-000000.tar")
            ).train_dataloader()
        )
        got = [(b["key"], b["video"].clone(), b["stream"]) for b in dm.train_dataloader()]
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert len(got) == 8
    assert [k for k, _, _ in got[:3]] == [b["key"] for b in want]
    assert all(torch.equal(v, b["video"]) for (_, v, _), b in zip(got, want))
    assert all("lease" not in stream for _, _, stream in got)
    assert "still held by the consumer" not in (tmp_path / "worker.log").read_text()


def test_all_rows_captioned_uses_the_captioned_stream_alone(shards):
    dm = datamodule(shards, caption_ratio=1.0, caption_shards=str(shards / "captioned" / "all-000000.tar"))
    batch = next(iter(dm.train_dataloader()))
    assert batch["has_caption"].all() and len(batch["key"]) == 4


def test_bad_ratio_missing_captions_and_misfit_caption_shards_are_named(shards, tmp_path):
    with pytest.raises(ValueError, match=r"caption_ratio=1\.5"):
        datamodule(shards, caption_ratio=1.5)
    with pytest.raises(ValueError, match="no sample of .*plain has a caption"):
        datamodule(shards, caption_ratio=0.5).train_dataloader()
    # caption shards cut with other frames are refused like the training shards (their index.json)
    misfit = tmp_path / "misfit"
    write_shard_dir(misfit, [2], num_frames=8)
    with pytest.raises(ValueError, match="num_frames=8"):
        datamodule(shards, caption_ratio=0.5, caption_shards=str(misfit)).train_dataloader()
