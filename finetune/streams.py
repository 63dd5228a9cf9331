"""The fine-tuning streams over a protocol's shards: a fold's training windows (resampled, split over
ranks as one global batch), one part of a fold evaluated exactly once over ranks x workers, and the
scan that finds each window's address."""

from __future__ import annotations

import json

import pytorch_lightning as pl
import torch
import webdataset as wds
from webdataset.gopen import gopen

from data_pipelines.augment import VideoAugConfig
from data_pipelines.datamodule import StreamLoader
from data_pipelines.exact_once import split_addresses
from data_pipelines.features import FbankConfig
from data_pipelines.samples import BatchBuilder, SampleDecoder
from data_pipelines.stream import (
    READ_BUFFER,
    EvalStream,
    PretrainStream,
    StreamConfig,
    WorkerContext,
    batch_samples,
    tag_batches,
)
from data_pipelines.tar_reader import tar_samples
from finetune.protocols import FoldSplit


class PartFilter:
    """Sample filter (picklable, for loader workers): keep the windows of one part of a fold."""

    def __init__(self, split: FoldSplit, part: str, clip_meta: dict[str, dict]):
        self.split, self.part, self.clip_meta = split, part, clip_meta

    def __call__(self, meta: dict) -> bool:
        info = self.clip_meta.get(str(meta.get("clip_key")))
        if info is None:
            raise KeyError(f"clip {meta.get('clip_key')!r} is in the shards but not in protocol.manifest")
        return self.split.part(info) == self.part


def stream_config(
    spec: dict, arch: dict, batch_size: int, seed: int, recipe=None, epoch_length: int = 1
) -> StreamConfig:
    """The encoder's input spec as a StreamConfig; training augmentation from the recipe."""
    fb = spec["fbank"]
    fbank = FbankConfig(
        sample_rate=int(spec["sample_rate"]),
        mel_bins=arch["mel_bins"],
        fbank_frames=arch["fbank_frames"],
        mean=float(fb["mean"]),
        std=float(fb["std"]),
        freq_mask=getattr(recipe, "freq_mask", 0),
        time_mask=getattr(recipe, "time_mask", 0),
    )
    aug = VideoAugConfig(img_size=arch["img_size"])
    if recipe is not None and recipe.augment:
        aug = VideoAugConfig(
            img_size=arch["img_size"], crop_scale=tuple(recipe.crop_scale), hflip=recipe.hflip
        )
    return StreamConfig(
        batch_size=batch_size,
        num_frames=arch["num_frames"],
        img_size=arch["img_size"],
        fbank=fbank,
        video_aug=aug,
        shuffle_buffer=256,
        epoch_length=max(1, epoch_length),
        seed=seed,
    )


def scan_windows(urls: list[str]) -> list[tuple[str, int, str]]:
    """`(url, index in its tar, clip_key)` of every window of the shards, in shard order, parsing only
    the json members. The tar reader is the streams' own, so an index addresses the same sample there."""
    windows = []
    for url in urls:
        with gopen(url, bufsize=READ_BUFFER) as stream:
            for index, sample in enumerate(tar_samples(stream, url)):
                if "json" in sample:
                    windows.append(
                        (url, index, str(json.loads(sample["json"]).get("clip_key", sample["__key__"])))
                    )
    return windows


class FoldTrainStream(PretrainStream):
    """Full fine-tuning's training stream: a fold's training windows, resampled from the shards,
    shuffled and augmented as pretraining does, `epoch_length` batches of `batch_size` per rank.

    Every rank builds the stream a single process would (seeded as rank 0 of 1) and keeps the windows
    at positions `rank, rank + W, ...` of it, decoding only those: the ranks' batches j together are
    exactly the global batch j of a 1-process run (same windows, same augmentation), and no window
    goes to two ranks. Each rank reads (not decodes) the whole stream, which costs little beside
    decoding the frames of its share."""

    def build(self, ctx: WorkerContext, errors) -> wds.DataPipeline:
        cfg, rank, world = self.cfg, self.rank, self.world_size
        shared = WorkerContext(0, 1, ctx.worker, ctx.num_workers, ctx.epoch)
        return wds.DataPipeline(
            *self.numbered_samples(shared, errors),
            lambda src: (raw for raw in src if raw["__pos__"] % world == rank),
            self.augmented(SampleDecoder(cfg, train=True, reuse_frame_buffer=True), shared, errors),
            lambda src: batch_samples(
                src,
                cfg.batch_size,
                partial=False,
                new_builder=lambda size: BatchBuilder(size, self.buffer_pool),
            ),
            lambda src: tag_batches(src, ctx, errors),
        ).with_epoch(nbatches=self.batches_per_worker(ctx))


class PartEvalStream(EvalStream):
    """Exact-once evaluation of one part of a fold (its validation or test windows), balanced over
    ranks x workers: the part's window addresses (from `scan_windows`) are cut into contiguous runs of
    sizes differing by at most one (`split_addresses`); `sample_filter` drops the other parts' windows
    inside a run's span."""

    def __init__(
        self, urls: list[str], cfg: StreamConfig, addresses: list[tuple[str, int]], **kwargs
    ) -> None:
        super().__init__(urls, cfg, **kwargs)
        self.addresses = addresses

    def pieces(self, ctx: WorkerContext) -> list[dict]:
        return split_addresses(self.addresses, ctx.slot, ctx.num_slots)


def loader(stream, num_workers: int) -> torch.utils.data.DataLoader:
    return StreamLoader(stream, num_workers=num_workers)


class StreamEpoch(pl.Callback):
    """Tell the training stream which epoch it is, so each epoch gets new shuffles and augmentations."""

    def __init__(self, stream):
        self.stream = stream

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.stream.epoch = trainer.current_epoch
