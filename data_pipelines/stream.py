"""WebDataset pipelines that turn shards into the batch dict of docs/architecture.md.

Two modes, one function each, both built from small named stages and batched inside the workers:

- `pretrain_pipeline`: resampled shards -> raw samples -> filter -> shuffle buffer -> number ->
  skip (resume) -> decode + augment -> batch, `epoch_length` batches per rank per epoch. Everything
  random is seeded from (seed, epoch, rank, worker), and augmentation per sample from its position in
  that worker's stream, so a stream can be resumed mid-epoch by skipping raw samples before decoding.
- `eval_pipeline`: every sample exactly once across ranks x workers. The samples of all shards, in
  order, are cut into `world_size * num_workers` contiguous ranges whose sizes differ by at most one
  (sizes from index.json); a worker reads only the shards its range touches and skips, undecoded, the
  samples outside it. Nothing is padded or repeated, so ranks may see one batch more or less than
  others: evaluation code must not run a collective per step (torchmetrics / an epoch-end gather do).

Corrupt input (unreadable or truncated tar, garbage JPEG, missing members, wrong frame count, bad
audio or JSON) never stops a stream and is never replaced by another sample: it is skipped, counted
per worker, logged with rank, worker, shard URL and key, appended to `<log_dir>/corrupt-*.jsonl` when
a `log_dir` is given, and each batch carries its worker's running count in `batch["stream"]`.
Decoding one sample and collation live in `samples.py`, tar parsing in `tar_reader.py`, the
exact-once split in `exact_once.py`, corrupt-sample accounting in `corrupt.py`; docs/loader.md
explains the guarantees.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import random
import wave
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.gopen import gopen

from data_pipelines.augment import VideoAugConfig
from data_pipelines.batch_buffers import BatchBufferPool, wire_batch
from data_pipelines.corrupt import CorruptLog, CorruptSampleError, read_corrupt_logs
from data_pipelines.exact_once import exact_once_split, shard_sizes
from data_pipelines.features import FbankConfig
from data_pipelines.jpeg_bytes import JpegBatchBuilder, JpegBytesDecoder
from data_pipelines.samples import BatchBuilder, SampleDecoder
from data_pipelines.shard_index import indexed_sample_count
from data_pipelines.tar_reader import tar_samples

# Re-exported: these lived here before the split and are imported from here.
__all__ = [
    "AVStream",
    "CorruptLog",
    "EvalStream",
    "PipeUrlError",
    "PretrainStream",
    "SampleFilter",
    "StreamConfig",
    "StreamStart",
    "WorkerContext",
    "check_pipe_urls",
    "eval_pipeline",
    "exact_once_split",
    "pretrain_pipeline",
    "read_corrupt_logs",
    "resolve_rank",
    "shard_sizes",
]

log = logging.getLogger("emomae.data")

SampleFilter = Callable[[dict], bool]

# Shard read buffer: a sample's ~40 small reads then cost one syscall per 256 kB instead of per 8 kB
# (~0.05 ms per sample, benchmarks/bench_loader.py).
READ_BUFFER = 1 << 18

# What bad bytes in a sample raise while it is decoded: `CorruptSampleError` (samples.py's own checks,
# including undecodable JPEGs), ValueError (json, UTF-8 text, numpy buffers), soundfile's errors, and
# the `wave` module's. Other exceptions (TypeError, AttributeError, KeyError, a torch RuntimeError, ...)
# are bugs in the code and stop the stream instead of being counted as corrupt samples.
DECODE_ERRORS = (CorruptSampleError, ValueError, sf.SoundFileError, wave.Error, EOFError)
PIPE_PREFIX = "pipe:"


@dataclass(frozen=True)
class StreamConfig:
    """What a pipeline produces. `video_aug` is used in pretrain mode only (eval: resize/centre crop)."""

    batch_size: int = 8
    num_frames: int = 16
    img_size: int = 160
    fbank: FbankConfig = field(default_factory=FbankConfig)
    video_aug: VideoAugConfig = field(default_factory=VideoAugConfig)
    audio_gain_db: float = 0.0  # pretrain: random gain in [-g, g] dB (the reference's audio augmentation)
    shuffle_buffer: int = 1000
    epoch_length: int = 1000  # pretrain: batches per rank per epoch
    seed: int = 0
    # A worker that meets this many corrupt samples in a row stops with an error: that is a wrong
    # config (e.g. num_frames) or a broken dataset, not an occasional bad clip.
    max_consecutive_errors: int = 200
    # Workers ship undecoded JPEG bytes + drawn augmentation; the frames are decoded on the device
    # (jpeg_bytes.py, device_decode.py, docs/loader.md).
    jpeg_bytes: bool = False
    # Shared-memory batch buffers each loader worker keeps and reuses once the main process has
    # dropped the batch (batch_buffers.py); 0 allocates every batch anew, as default_collate does.
    batch_buffers: int = 5


# ---------------------------------------------------------------- who am I


@dataclass(frozen=True)
class WorkerContext:
    """Where a stream runs: resolved inside the loader worker when iteration starts."""

    rank: int
    world_size: int
    worker: int  # logical worker id (see `StreamStart.offset`)
    num_workers: int
    epoch: int

    @property
    def slot(self) -> int:
        return self.rank * self.num_workers + self.worker

    @property
    def num_slots(self) -> int:
        return self.world_size * self.num_workers

    def seed(self, base: int, *extra: int) -> int:
        """A well-mixed 32-bit seed from (base, epoch, rank, worker, *extra); stable across processes."""
        entropy = [base, self.epoch, self.rank, self.worker, *extra]
        return int(np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in entropy]).generate_state(1)[0])


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Explicit values, else the initialised process group, else env RANK/WORLD_SIZE, else (0, 1)."""
    if rank is not None and world_size is not None:
        found = (rank, world_size)
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        found = (torch.distributed.get_rank(), torch.distributed.get_world_size())
    else:
        found = (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))
    if not 0 <= found[0] < found[1]:
        raise ValueError(f"rank must be in [0, world_size), got rank {found[0]} of {found[1]}")
    return found


@dataclass(frozen=True)
class StreamStart:
    """Where a resumed pretraining epoch starts.

    batches: batches of this epoch already consumed (all workers together).
    positions: per logical worker, raw samples of its stream already consumed.
    A DataLoader always starts its round robin at worker 0, while an uninterrupted run would take
    the next batch from worker `batches % W`; the resumed stream therefore renumbers its workers by
    `offset = batches % W` so the interleaving continues where it stopped.
    """

    batches: int = 0
    positions: tuple[int, ...] = ()

    def offset(self, num_workers: int) -> int:
        return self.batches % num_workers

    def consumed(self, worker: int, num_workers: int) -> int:
        return self.batches // num_workers + int(worker < self.batches % num_workers)

    def position(self, worker: int) -> int:
        return self.positions[worker] if worker < len(self.positions) else 0


# ---------------------------------------------------------------- stages


def read_shard(url: str, errors: CorruptLog, start: int = 0, stop: int | None = None) -> Iterator[dict]:
    """Raw samples `start <= index < stop` of one tar (member bytes + __key__/__url__/__index__).

    A read error (truncated or missing tar, a pipe command that fails, a header that is not tar) is
    recorded once and ends this shard only; a sample cut in half by it is yielded as it is and rejected
    by `decode_sample` for its missing members. A tar that ends cleanly but early (cut at a member
    boundary) is recorded too, against the sample count `index.json` lists for it.
    """
    read = 0  # samples met in the tar, before `start` included
    try:
        with gopen(url, bufsize=READ_BUFFER) as stream:
            for index, sample in enumerate(tar_samples(stream, url)):
                read = index + 1
                if index < start:
                    continue
                if stop is not None and index >= stop:
                    return
                sample["__index__"] = index
                yield sample
    except OSError as exn:  # I/O and tar format failures (ShardReadError is one); the next shard still runs
        errors.record(url, "", f"unreadable shard: {type(exn).__name__}: {exn}", "shard")
        return
    report_early_end(url, read, start, stop, errors)


def report_early_end(url: str, read: int, start: int, stop: int | None, errors: CorruptLog) -> None:
    """Record the samples of `[start, stop)` a tar did not hold: without this a shard truncated at a
    member boundary reads as a valid, shorter tar and its remaining samples vanish unnoticed."""
    indexed = indexed_sample_count(url)
    end = stop if stop is not None else indexed
    if end is None or read >= end:
        return
    lost = end - max(read, start)
    errors.record(
        url,
        "",
        f"shard ended early: the tar holds {read} samples, index.json lists {indexed}; "
        f"{lost} samples of this read are missing (truncated or replaced file? rewrite it with "
        "`emomae shards`)",
        "shard",
        lost=lost,
    )


def read_shards(sources: Iterable[dict], errors: CorruptLog) -> Iterator[dict]:
    """Stage: `{"url", "start"?, "stop"?}` items -> raw samples of each."""
    for src in sources:
        yield from read_shard(src["url"], errors, src.get("start", 0), src.get("stop"))


class PipeUrlError(ValueError):
    """`pipe:` shard URLs without the opt-in: each one runs its text through a shell."""


def pipe_commands(urls: Iterable[str]) -> list[str]:
    """The shell commands of the `pipe:` URLs among `urls` (what `gopen` will run, one per shard read)."""
    return [u[len(PIPE_PREFIX) :].strip() for u in urls if u.startswith(PIPE_PREFIX)]


def check_pipe_urls(urls: Iterable[str], allowed: bool, key: str = "data.allow_pipe_urls") -> list[str]:
    """The commands `pipe:` URLs will run; a PipeUrlError naming `key` when there are some and they are
    not allowed. A shard URL is usually a config value, and a config value must not run a shell unasked."""
    commands = pipe_commands(urls)
    if commands and not allowed:
        raise PipeUrlError(
            f"shard URL {PIPE_PREFIX + commands[0]!r} would run a shell command; set {key}=true "
            "to allow shard URLs that run commands (or point at the shard files themselves)"
        )
    return commands


def keep_samples(
    samples: Iterable[dict], sample_filter: SampleFilter | None, errors: CorruptLog
) -> Iterator[dict]:
    """Stage: parse each sample's JSON once and drop those `sample_filter(meta)` rejects."""
    for raw in samples:
        try:
            raw["__meta__"] = json.loads(raw["json"])
        except (KeyError, ValueError) as err:
            errors.record(raw["__url__"], raw["__key__"], f"missing or invalid json member: {err!r}")
            continue
        if sample_filter is None or sample_filter(raw["__meta__"]):
            yield raw


def number_samples(samples: Iterable[dict]) -> Iterator[dict]:
    """Stage: each raw sample's position in this worker's (shuffled) stream, for resuming."""
    for position, raw in enumerate(samples):
        raw["__pos__"] = position
        yield raw


def skip_consumed(samples: Iterable[dict], first: int) -> Iterator[dict]:
    """Stage: drop the first `first` raw samples, before any decoding (the cheap part of a resume)."""
    for raw in samples:
        if raw["__pos__"] >= first:
            yield raw


def decode_samples(
    samples: Iterable[dict], decode: Callable[[dict], dict], errors: CorruptLog
) -> Iterator[dict]:
    """Stage: decode each raw sample; a sample whose bytes do not decode is recorded and skipped (never
    replaced)."""
    for raw in samples:
        try:
            sample = decode(raw)
        except DECODE_ERRORS as err:  # bad bytes in this sample; anything else is a bug and propagates
            errors.record(raw["__url__"], raw["__key__"], f"{type(err).__name__}: {err}")
            continue
        errors.ok()
        yield sample


def batch_samples(
    samples: Iterable[dict],
    batch_size: int,
    partial: bool,
    new_builder: Callable[[int], BatchBuilder] = BatchBuilder,
) -> Iterator[dict]:
    """Stage: decoded samples -> batches, each sample copied into the batch tensors on arrival
    (`samples.BatchBuilder`, or `new_builder(batch_size)`); `partial` keeps a short last batch."""
    builder = new_builder(batch_size)
    for sample in samples:
        builder.add(sample)
        if builder.full:
            yield builder.build()
            builder = new_builder(batch_size)
    if partial and len(builder):
        yield builder.build()


def sample_decoder(cfg: StreamConfig, train: bool) -> SampleDecoder:
    """The decoding `SampleDecoder`, or with `cfg.jpeg_bytes` the one that ships JPEG bytes. Its
    frames go into one reused array: `batch_samples` copies each sample into its batch before the
    next is decoded."""
    if cfg.jpeg_bytes:
        return JpegBytesDecoder(cfg, train)
    return SampleDecoder(cfg, train, reuse_frame_buffer=True)


def batch_builder(
    cfg: StreamConfig, train: bool, pool: BatchBufferPool | None = None
) -> Callable[[int], BatchBuilder]:
    """What `batch_samples` builds batches with for `sample_decoder(cfg, train)`'s samples, their
    buffers taken from `pool` when there is one (`AVStream.buffer_pool`)."""
    if not cfg.jpeg_bytes:
        return lambda size: BatchBuilder(size, pool)
    return lambda size: JpegBatchBuilder(size, cfg.num_frames, cfg.img_size, train, cfg.fbank, pool)


def tag_batches(batches: Iterable[dict], ctx: WorkerContext, errors: CorruptLog) -> Iterator[dict]:
    """Stage: attach `stream` = {worker, position (raw samples consumed), corrupt (running count)}."""
    for batch in batches:
        batch["stream"] = {
            "worker": ctx.worker,
            "position": batch.pop("__last_pos__") + 1,
            "corrupt": errors.count,
        }
        if "__lease__" in batch:  # a reused buffer's (batch_buffers.py); (pool id, slot) once received
            batch["stream"]["lease"] = batch.pop("__lease__")
        yield batch


# ---------------------------------------------------------------- the two pipelines


def ignore_stop_signals() -> None:
    """In a loader worker: leave SIGTERM / SIGUSR1 to the training process.

    SLURM signals every process of a job step (preemption, time limit, `--signal=USR1@<s>`). A worker
    killed by it makes the trainer raise "DataLoader worker ... killed" before it can write its
    checkpoint; the trainer saves, stops and shuts its workers down, and a worker whose parent dies
    exits on its own (PyTorch's worker watchdog).
    """
    import signal

    for name in ("SIGTERM", "SIGUSR1"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def as_built(batch: dict) -> dict:
    """A loader's `collate_fn` for these streams: they batch in the worker, so there is nothing to
    collate, and torch's default (`default_convert`, which walks every value down to each key string)
    took ~3 % of a pretraining worker's time (py-spy, batch 8)."""
    return batch


def kill_loader_workers_at_exit() -> None:
    """In the training process: at interpreter exit, SIGKILL the DataLoader workers still alive.

    A script that dies of an uncaught exception can leave a loader iterator alive (its traceback
    holds it), so its workers were never shut down. multiprocessing's own exit handler then stops
    them with SIGTERM, which they ignore (`ignore_stop_signals`), and waits for them forever. This
    handler is registered after that one (atexit runs the last registered first), so it goes first:
    the first `AVStream` made in a process registers it.
    """
    import multiprocessing

    for process in multiprocessing.active_children():
        try:  # torch names its loader workers' threads so (Linux)
            is_loader_worker = Path(f"/proc/{process.pid}/comm").read_text().strip() == "pt_data_worker"
        except OSError:
            continue
        if is_loader_worker:
            process.kill()
            process.join()


_exit_handler_registered = False


class AVStream(IterableDataset):
    """Base: resolves the worker context at iteration time and runs the pipeline built for it."""

    mode = "base"

    def __init__(
        self,
        urls: list[str] | str,
        cfg: StreamConfig,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        sample_filter: SampleFilter | None = None,
        log_dir: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.urls = wds.shardlists.expand_urls(urls) if isinstance(urls, str) else [str(u) for u in urls]
        if not self.urls:
            raise ValueError(f"{type(self).__name__}: no shard URLs given")
        self.cfg = cfg
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.sample_filter = sample_filter
        self.log_dir = None if log_dir is None else str(log_dir)
        self.epoch = 0
        self.buffer_pool: BatchBufferPool | None = None  # made in `__iter__`, where the stream runs
        self.start = StreamStart()
        global _exit_handler_registered
        if not _exit_handler_registered:
            import multiprocessing.util  # noqa: F401  registers its exit handler now, so ours runs first

            atexit.register(kill_loader_workers_at_exit)
            _exit_handler_registered = True

    def context(self) -> WorkerContext:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        return WorkerContext(self.rank, self.world_size, worker, num_workers, self.epoch)

    def __iter__(self) -> Iterator[dict]:
        """The batches; in a loader worker, ready to leave it (`batch_buffers.wire_batch`)."""
        batches = self.batches()
        return map(wire_batch, batches) if get_worker_info() is not None else batches

    def batches(self) -> Iterator[dict]:
        """The batches as built, for a consumer in the same process (`caption_mix.CaptionMix`)."""
        in_worker = get_worker_info() is not None
        if in_worker:
            ignore_stop_signals()
        pool_size = self.cfg.batch_buffers
        self.buffer_pool = BatchBufferPool(pool_size, shared=in_worker) if pool_size > 0 else None
        ctx = self.context()
        errors = CorruptLog(ctx, self.mode, self.log_dir, self.cfg.max_consecutive_errors)
        return iter(self.build(ctx, errors))

    def build(self, ctx: WorkerContext, errors: CorruptLog) -> Iterable[dict]:
        raise NotImplementedError


class PretrainStream(AVStream):
    """Infinite resampled stream cut into epochs of `epoch_length` batches per rank (see the module
    docstring). Set `.epoch` before each epoch and `.start` (a `StreamStart`) to resume mid-epoch."""

    mode = "pretrain"

    def __len__(self) -> int:
        return self.cfg.epoch_length

    def context(self) -> WorkerContext:
        base = super().context()
        logical = (base.worker + self.start.offset(base.num_workers)) % base.num_workers
        return WorkerContext(base.rank, base.world_size, logical, base.num_workers, base.epoch)

    def batches_per_worker(self, ctx: WorkerContext) -> int:
        """This worker's share of the epoch's `epoch_length` batches (the first workers take the rest)."""
        length, W = self.cfg.epoch_length, ctx.num_workers
        return length // W + int(ctx.worker < length % W)

    def numbered_samples(self, seeds: WorkerContext, errors: CorruptLog) -> list:
        """The stages a training pipeline starts with: the shards resampled forever, read, filtered,
        shuffled and numbered, the draws seeded from `seeds`."""
        cfg = self.cfg
        return [
            wds.ResampledShards(
                self.urls, seed=seeds.seed(cfg.seed, 1), worker_seed=lambda: 0, deterministic=True
            ),
            lambda src: read_shards(src, errors),
            lambda src: keep_samples(src, self.sample_filter, errors),
            wds.shuffle(
                cfg.shuffle_buffer, initial=cfg.shuffle_buffer, rng=random.Random(seeds.seed(cfg.seed, 2))
            ),
            number_samples,
        ]

    def augmented(self, decoder: SampleDecoder, seeds: WorkerContext, errors: CorruptLog) -> Callable:
        """The decoding stage, each sample augmented with a seed from `seeds` and its position, so a
        sample gets the same augmentation wherever and whenever it is decoded."""
        seed = self.cfg.seed
        return lambda src: decode_samples(
            src, lambda raw: decoder(raw, seeds.seed(seed, 3, raw["__pos__"])), errors
        )

    def build(self, ctx: WorkerContext, errors: CorruptLog) -> Iterable[dict]:
        cfg = self.cfg
        batches = self.batches_per_worker(ctx) - self.start.consumed(ctx.worker, ctx.num_workers)
        if batches <= 0:
            return iter(())
        return wds.DataPipeline(
            *self.numbered_samples(ctx, errors),
            lambda src: skip_consumed(src, self.start.position(ctx.worker)),
            self.augmented(sample_decoder(cfg, train=True), ctx, errors),
            lambda src: batch_samples(
                src, cfg.batch_size, partial=False, new_builder=batch_builder(cfg, True, self.buffer_pool)
            ),
            lambda src: tag_batches(src, ctx, errors),
        ).with_epoch(nbatches=batches)


class EvalStream(AVStream):
    """Each sample of `urls` exactly once over all ranks x workers, in shard order, no augmentation
    (see the module docstring). `shard_sizes` default: the shards' index.json."""

    mode = "eval"

    def __init__(self, *args, shard_sizes: list[int] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sizes = shard_sizes
        if self.sizes is not None and len(self.sizes) != len(self.urls):
            raise ValueError(f"shard_sizes has {len(self.sizes)} entries for {len(self.urls)} shard URLs")

    def pieces(self, ctx: WorkerContext) -> list[dict]:
        """This worker's `{"url", "start", "stop"}` ranges of the shards."""
        sizes = self.sizes if self.sizes is not None else shard_sizes(self.urls)
        return exact_once_split(self.urls, sizes, ctx.slot, ctx.num_slots)

    def build(self, ctx: WorkerContext, errors: CorruptLog) -> Iterable[dict]:
        decoder = sample_decoder(self.cfg, train=False)
        pieces = self.pieces(ctx)
        return wds.DataPipeline(
            lambda: iter(pieces),
            lambda src: read_shards(src, errors),
            lambda src: keep_samples(src, self.sample_filter, errors),
            number_samples,
            lambda src: decode_samples(src, decoder, errors),
            lambda src: batch_samples(
                src,
                self.cfg.batch_size,
                partial=True,
                new_builder=batch_builder(self.cfg, False, self.buffer_pool),
            ),
            lambda src: tag_batches(src, ctx, errors),
        )


# The streams under the names the loaders know them by; iterate one through a DataLoader with
# `batch_size=None`.
pretrain_pipeline = PretrainStream
eval_pipeline = EvalStream
