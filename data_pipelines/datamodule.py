"""`AVDataModule`: shards -> train (pretrain mode) / val / test (exact-once mode) DataLoaders.

Batches are built inside the loader workers (`batch_size=None` DataLoaders). The train stream's
position is part of the datamodule's `state_dict`, which Lightning stores in every checkpoint: the
epoch, the batches of it consumed, and each worker's raw stream position, for every rank. On resume
each rank's stream skips its own consumed raw samples before decoding them, so the run sees exactly
the batches an uninterrupted run would have seen (same keys, same augmentations, same order).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from data_pipelines.augment import VideoAugConfig
from data_pipelines.device_decode import DeviceFrameDecoder
from data_pipelines.features import AUDIOSET_MEAN, AUDIOSET_STD, FbankConfig
from data_pipelines.stream import (
    AVStream,
    SampleFilter,
    StreamConfig,
    StreamStart,
    as_built,
    eval_pipeline,
    pretrain_pipeline,
    resolve_rank,
)

DECODE_DEVICES = ("auto", "cpu", "cuda")


@dataclass
class DataConfig:
    """Data section of a run config (see docs/loader.md for every key)."""

    shards: str = ""  # shard directory with index.json, or a brace/glob pattern of .tar files
    train_groups: list[str] | None = None  # None: every group of the shard directory
    val_groups: list[str] | None = None  # None: no validation loader
    test_groups: list[str] | None = None  # None: no test loader
    batch_size: int = 8  # per rank
    eval_batch_size: int | None = None  # default: batch_size
    num_workers: int = 4
    pin_memory: bool = True  # only takes effect when CUDA is available
    epoch_length: int = 1000  # training batches per rank per epoch (the stream is resampled)
    shuffle_buffer: int = 1000  # raw samples per worker
    num_frames: int = 16
    img_size: int = 160
    sample_rate: int = 16000
    fbank_frames: int = 256
    mel_bins: int = 128
    fbank_mean: float = AUDIOSET_MEAN
    fbank_std: float = AUDIOSET_STD
    crop_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    hflip: float = 0.0
    color_jitter: float = 0.0
    audio_gain_db: float = 0.0
    freq_mask: int = 0  # SpecAugment, training only
    time_mask: int = 0
    seed: int = 0
    error_log_dir: str | None = None  # corrupt-sample JSONL logs; None: log lines and counters only
    max_consecutive_errors: int = 200
    # Where frames are decoded: auto (cuda when the Trainer runs on a GPU, else cpu), cpu (in the
    # loader workers) or cuda (workers ship JPEG bytes, nvjpeg decodes them; docs/loader.md).
    decode_device: str = "auto"
    # Shared-memory batch buffers each loader worker reuses once the batch is dropped (0: a new one
    # per batch, as default_collate; docs/loader.md "Batch buffers").
    batch_buffers: int = 5
    allow_pipe_urls: bool = False  # `pipe:<command>` shard URLs run a shell command each: opt in explicitly

    def __post_init__(self) -> None:
        if self.decode_device not in DECODE_DEVICES:
            raise ValueError(
                f"data.decode_device must be one of {list(DECODE_DEVICES)}, got {self.decode_device!r}"
            )
        if self.batch_buffers < 0:
            raise ValueError(
                f"data.batch_buffers must be >= 0 (0 turns the reuse off), got {self.batch_buffers}"
            )

    @classmethod
    def from_any(cls, cfg: DataConfig | dict | Any) -> DataConfig:
        """Accept a DataConfig, a plain dict or an OmegaConf node; unknown keys are an error."""
        if isinstance(cfg, cls):
            return cfg
        if not isinstance(cfg, dict):
            from omegaconf import OmegaConf

            cfg = OmegaConf.to_container(cfg, resolve=True)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - names)
        if unknown:
            raise ValueError(f"unknown data config key(s) {unknown}; known keys: {sorted(names)}")
        return cls(**cfg)

    def stream(self, train: bool) -> StreamConfig:
        fbank = FbankConfig(
            self.sample_rate,
            self.mel_bins,
            self.fbank_frames,
            self.fbank_mean,
            self.fbank_std,
            self.freq_mask,
            self.time_mask,
        )
        aug = VideoAugConfig(
            self.img_size, tuple(self.crop_scale), tuple(self.crop_ratio), self.hflip, self.color_jitter
        )
        batch = self.batch_size if train else (self.eval_batch_size or self.batch_size)
        return StreamConfig(
            batch,
            self.num_frames,
            self.img_size,
            fbank,
            aug,
            self.audio_gain_db,
            self.shuffle_buffer,
            self.epoch_length,
            self.seed,
            self.max_consecutive_errors,
            batch_buffers=self.batch_buffers,
        )


def resolve_shards(spec: str, groups: list[str] | None) -> list[str]:
    """Shard URLs of a directory (optionally only `groups`) or of a brace/glob pattern."""
    from data_pipelines.shards import shard_urls

    if not spec:
        raise ValueError(
            "data.shards is empty: set it to a shard directory (with index.json) or a .tar pattern"
        )
    if os.path.isdir(spec):
        return shard_urls(Path(spec), groups)
    if groups:
        raise ValueError(
            f"data.shards={spec!r} is a pattern, not a shard directory, so *_groups cannot select from it"
        )
    import webdataset as wds

    urls = []
    for pattern in wds.shardlists.expand_urls(spec):
        urls += sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not os.path.isfile(u)]
    if not urls or len(missing) == len(urls):
        raise ValueError(f"data.shards={spec!r} matches no shard files")
    if missing:
        raise ValueError(
            f"data.shards={spec!r}: {len(missing)} of {len(urls)} shard files do not exist, e.g. {missing[:3]}"
        )
    return urls


class StreamResumeError(ValueError):
    """A checkpoint's data-stream state cannot continue in this run (worker count, batch size or
    world size differ); the message says what to change."""


class StreamLoader(DataLoader):
    """A DataLoader over an `AVStream` that asks its owner for the epoch (and resume point) each
    time it is iterated, and reports every yielded batch when no Lightning Trainer consumes it."""

    def __init__(
        self,
        dataset: AVStream,
        on_iter: Callable[[AVStream], None] | None = None,
        on_batch: Callable[[dict], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(dataset, batch_size=None, collate_fn=as_built, **kwargs)
        self.on_iter, self.on_batch = on_iter, on_batch

    def __iter__(self) -> Iterator[dict]:
        if self.on_iter is not None:
            self.on_iter(self.dataset)
        iterator = super().__iter__()
        if self.on_batch is None:
            return iterator
        return self._reporting(iterator)

    def _reporting(self, iterator: Iterator[dict]) -> Iterator[dict]:
        for batch in iterator:
            self.on_batch(batch)
            yield batch


class AVDataModule(pl.LightningDataModule):
    """Train / val / test loaders producing the batch dict of docs/architecture.md.

    `train_filter`, `val_filter`, `test_filter`: optional `sample_filter(meta_json) -> bool` per split
    (module-level functions or partials, so loader workers can receive them), e.g. to carve validation
    speakers out of the training folds. `rank`/`world_size` default to the process group.
    """

    def __init__(
        self,
        cfg: DataConfig | dict | Any,
        *,
        train_filter: SampleFilter | None = None,
        val_filter: SampleFilter | None = None,
        test_filter: SampleFilter | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        self.cfg = DataConfig.from_any(cfg)
        self.filters = {"train": train_filter, "val": val_filter, "test": test_filter}
        self._rank, self._world_size = rank, world_size
        self._next_epoch = 0  # epoch counter when no Trainer tells us
        self._resume: dict | None = None
        self._progress = {"epoch": 0, "batches": 0, "positions": []}
        self.corrupt_counts: dict[str, dict[int, int]] = {"pretrain": {}, "eval": {}}
        self.frame_decoder: DeviceFrameDecoder | None = None  # set by the loaders when frames decode on a GPU

    # ------------------------------------------------------------ loaders

    def train_dataloader(self) -> StreamLoader:
        return self.train_loader(self.train_stream(self.shard_urls(self.cfg.train_groups)))

    # The public parts of the train loader, for datamodules that build it differently
    # (data_pipelines/caption_mix.py); each hides the rank, the index checks and the resume state.

    def shard_urls(self, groups: list[str] | None, shards: str | None = None) -> list[str]:
        """URLs of `groups` (None: all) of `shards` (default data.shards), checked against the shard
        folder's index.json (frames per clip and audio rate must be data.*'s)."""
        urls = resolve_shards(shards or self.cfg.shards, groups)
        self._check_index(urls)
        return urls

    def train_stream(
        self,
        urls: list[str],
        *,
        batch_size: int | None = None,
        seed: int | None = None,
        keep: SampleFilter | None = None,
        decode_in_workers: bool = False,
    ) -> AVStream:
        """This rank's resampled training stream over `urls` with data.*'s settings and train filter.

        `batch_size`/`seed` replace data.batch_size/data.seed; `keep(meta) -> bool` (picklable)
        filters on top of the train filter; `decode_in_workers` decodes frames in the loader workers
        whatever data.decode_device says (batches that are combined before they reach the GPU).
        """
        cfg = self.cfg
        stream_cfg = cfg.stream(True) if decode_in_workers else self._stream_config(train=True)
        changes = {name: v for name, v in (("batch_size", batch_size), ("seed", seed)) if v is not None}
        train_filter = self.filters["train"]
        return pretrain_pipeline(
            urls,
            dataclasses.replace(stream_cfg, **changes),
            sample_filter=train_filter if keep is None else partial(_both, keep, train_filter),
            log_dir=cfg.error_log_dir,
            **self._ranks(),
        )

    def train_loader(self, dataset: AVStream) -> StreamLoader:
        """The training DataLoader over `dataset` (an AVStream, or a dataset with its `epoch`, `start`
        and length): each iteration starts at the Trainer's epoch or the resume point, and the
        consumed batches are counted for `state_dict` (by `on_before_batch_transfer` under a Trainer)."""
        return StreamLoader(
            dataset,
            on_iter=self._begin_train_epoch,
            on_batch=None if self.trainer is not None else self._consumed,
            **self._loader_kwargs(persistent=False),
        )

    def val_dataloader(self) -> StreamLoader | list:
        return self._eval_loader(self.cfg.val_groups, "val")

    def test_dataloader(self) -> StreamLoader | list:
        return self._eval_loader(self.cfg.test_groups, "test")

    def _eval_loader(self, groups: list[str] | None, split: str) -> StreamLoader | list:
        if groups is None:
            return []
        stream = eval_pipeline(
            self.shard_urls(groups),
            self._stream_config(train=False),
            sample_filter=self.filters[split],
            log_dir=self.cfg.error_log_dir,
            **self._ranks(),
        )
        return StreamLoader(
            stream,
            on_batch=None if self.trainer is not None else self._count_corrupt,
            **self._loader_kwargs(persistent=self.cfg.num_workers > 0),
        )

    def _stream_config(self, train: bool) -> StreamConfig:
        """`cfg.stream(train)`, shipping JPEG bytes when frames are decoded on a GPU."""
        device = self._decode_device()
        if device is None:
            return self.cfg.stream(train)
        if self.frame_decoder is None or self.frame_decoder.device != device:
            self.frame_decoder = DeviceFrameDecoder(device)
        return dataclasses.replace(self.cfg.stream(train), jpeg_bytes=True)

    def _decode_device(self) -> torch.device | None:
        """The GPU that decodes frames, or None when the loader workers do (data.decode_device)."""
        choice = self.cfg.decode_device
        root = self.trainer.strategy.root_device if self.trainer is not None else None
        if choice == "cuda":
            if not torch.cuda.is_available():
                raise ValueError("data.decode_device=cuda but CUDA is not available here; use auto or cpu")
            return (
                root
                if root is not None and root.type == "cuda"
                else torch.device("cuda", torch.cuda.current_device())
            )
        if choice == "auto" and root is not None and root.type == "cuda":
            return root
        return None

    def _ranks(self) -> dict:
        rank, world_size = resolve_rank(self._rank, self._world_size)
        return {"rank": rank, "world_size": world_size}

    def _loader_kwargs(self, persistent: bool) -> dict:
        # The train loader is never persistent: its workers take the epoch and resume point with them
        # when each epoch starts.
        return {
            "num_workers": self.cfg.num_workers,
            "pin_memory": self.cfg.pin_memory and torch.cuda.is_available(),
            "persistent_workers": persistent,
        }

    def _check_index(self, urls: list[str]) -> None:
        """Fail early, naming the file, when the shards hold a different number of frames."""
        for folder in {os.path.dirname(u) for u in urls}:
            index = Path(folder) / "index.json"
            if not index.is_file():
                continue
            shard_cfg = json.loads(index.read_text()).get("config", {})
            frames = shard_cfg.get("num_frames")
            if frames is not None and frames != self.cfg.num_frames:
                raise ValueError(
                    f"{index} says the shards hold num_frames={frames}, but data.num_frames="
                    f"{self.cfg.num_frames}; set data.num_frames={frames} or rewrite the shards"
                )
            rate = shard_cfg.get("sample_rate")
            if rate is not None and rate != self.cfg.sample_rate:
                raise ValueError(
                    f"{index} says the audio is {rate} Hz, but data.sample_rate={self.cfg.sample_rate}"
                )

    # ------------------------------------------------------------ stream position (resume)

    def _begin_train_epoch(self, stream: AVStream) -> None:
        if self.trainer is not None:
            epoch = self.trainer.current_epoch
        else:
            epoch, self._next_epoch = self._next_epoch, self._next_epoch + 1
        start = StreamStart()
        if self._resume is not None and self._resume["epoch"] == epoch:
            start = StreamStart(self._resume["batches"], tuple(self._resume["positions"]))
        self._resume = None
        stream.epoch, stream.start = epoch, start
        self._progress = {"epoch": epoch, "batches": start.batches, "positions": list(start.positions)}

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Lightning calls this when a batch is about to be used (after its prefetching). A batch of
        JPEG bytes is decoded here, straight onto the GPU: nvjpeg reads the bytes from host memory."""
        if isinstance(batch, dict) and "stream" in batch:
            if self.trainer is not None and self.trainer.training:
                self._consumed(batch)
            else:
                self._count_corrupt(batch)
        if isinstance(batch, dict) and "jpeg" in batch:
            batch = self.frame_decoder(batch)
        return batch

    def _consumed(self, batch: dict) -> None:
        info = batch["stream"]
        positions = self._progress["positions"]
        positions += [0] * (info["worker"] + 1 - len(positions))
        positions[info["worker"]] = info["position"]
        self._progress["batches"] += 1
        self.corrupt_counts["pretrain"][info["worker"]] = info["corrupt"]

    def _count_corrupt(self, batch: dict) -> None:
        info = batch["stream"]
        self.corrupt_counts["eval"][info["worker"]] = info["corrupt"]

    def state_dict(self) -> dict:
        """Training stream position: plain ints, so `torch.load(weights_only=True)` reads it.

        Top level: this rank's position (rank 0's in a written file, the layout older checkpoints
        have). `ranks[r]`: rank r's position, gathered from every rank, and `world_size`. Ranks do not
        share a position: each draws its own shards, and one that skipped a corrupt sample is ahead.
        With a process group this is a collective: Lightning calls it on every rank while it dumps a
        checkpoint (`Trainer.save_checkpoint` must run on all ranks anyway, it ends in a barrier).
        """
        own = {
            "epoch": int(self._progress["epoch"]),
            "batches": int(self._progress["batches"]),
            "positions": [int(p) for p in self._progress["positions"]],
        }
        rank, world_size = resolve_rank(self._rank, self._world_size)
        return {
            **own,
            "num_workers": self.cfg.num_workers,
            "batch_size": self.cfg.batch_size,
            "world_size": world_size,
            "ranks": _gather_positions(own, rank, world_size),
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("num_workers", "batch_size"):
            if key in state and state[key] != getattr(self.cfg, key):
                raise StreamResumeError(
                    f"cannot resume the data stream: the checkpoint used data.{key}={state[key]}, "
                    f"this run has {getattr(self.cfg, key)}; resume with the same value"
                )
        own = self._own_position(state)
        self._resume = {
            "epoch": int(own["epoch"]),
            "batches": int(own["batches"]),
            "positions": [int(p) for p in own["positions"]],
        }
        self._next_epoch = self._resume["epoch"]
        self._progress = dict(self._resume, positions=list(self._resume["positions"]))

    def _own_position(self, state: dict) -> dict:
        """This rank's entry of a saved state (see `state_dict`)."""
        rank, world_size = resolve_rank(self._rank, self._world_size)
        if "ranks" not in state:
            rank_zero_warn(
                "the checkpoint's data-stream state has no per-rank positions (it predates them): every "
                "rank resumes from rank 0's position, which is exact on 1 rank but shifts a rank whose "
                "stream differed from rank 0's (a skipped corrupt sample), and the world size is unchecked"
            )
            return state
        saved = int(state["world_size"])
        if saved != world_size:
            raise StreamResumeError(
                f"cannot resume the data stream: the checkpoint was written by {saved} ranks, this run has "
                f"{world_size}; each rank continues its own shard stream, which exists only at the same world size. "
                f"Resume with {saved} ranks (trainer.devices x trainer.num_nodes), or start a new run (a new run_dir) "
                "with init=<this checkpoint>, which copies the weights only (optimizer, schedule and data start afresh)"
            )
        own = state["ranks"][rank]
        if own is None:  # saved without a process group: only the saving rank's entry is there
            raise StreamResumeError(
                f"cannot resume the data stream: the checkpoint holds no position for rank {rank}"
            )
        return own


def _both(first: SampleFilter, second: SampleFilter | None, meta: dict) -> bool:
    """`first` and (when given) `second` keep the sample; a module-level function, so workers get it."""
    return first(meta) and (second is None or second(meta))


def _gather_positions(own: dict, rank: int, world_size: int) -> list[dict | None]:
    """Every rank's stream position, indexed by global rank (all-gathered when a process group runs)."""
    pairs = [(rank, own)]
    dist = torch.distributed
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        pairs = [None] * dist.get_world_size()
        dist.all_gather_object(pairs, (rank, own))
    ranks: list[dict | None] = [None] * world_size
    for r, position in pairs:
        ranks[r] = position
    return ranks
