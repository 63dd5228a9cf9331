"""Training batches that mix captioned and plain clips, for stage 2's caption alignment (docs/vaemo.md).

Captions usually cover a small subset of the clips, which would be rare in a batch drawn from the
full stream. `CaptionMixDataModule` fills `round(caption_ratio * batch_size)` rows of every training
batch from a stream of captioned samples and the rest from the full stream; validation and test are
`AVDataModule`'s. Built only from `AVDataModule`'s public loader parts (`shard_urls`, `train_stream`,
`train_loader`), so the resume state and the rank split are the plain datamodule's.
"""

from __future__ import annotations

import math
import tarfile
from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from data_pipelines.batch_buffers import wire_batch
from data_pipelines.datamodule import AVDataModule, StreamLoader

# the captioned stream's seed offset: it must not replay the plain stream's order
CAPTIONED_SEED_OFFSET = 7919


def captioned_keys(urls: list[str]) -> frozenset[str]:
    """Sample keys that have a `txt` member, from tar headers only (no member data is read)."""
    keys = set()
    for url in urls:
        with tarfile.open(url) as tar:
            keys.update(name.rsplit(".", 1)[0] for name in tar.getnames() if name.endswith(".txt"))
    return frozenset(keys)


def key_in(meta: dict, keys: frozenset[str]) -> bool:
    """Sample filter: the sample's key is one of `keys` (bind `keys` with functools.partial)."""
    return meta.get("key") in keys


class CaptionMix(IterableDataset):
    """Zips a plain and a captioned pretraining stream (each batched in the worker) into one batch.

    Epoch and resume point go to the plain stream (whose position the datamodule tracks); the
    captioned stream is resampled and simply restarts its epoch on resume.
    """

    def __init__(self, plain, captioned) -> None:
        super().__init__()
        self.plain, self.captioned = plain, captioned

    @property
    def epoch(self) -> int:
        return self.plain.epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.plain.epoch = self.captioned.epoch = value

    @property
    def start(self):
        return self.plain.start

    @start.setter
    def start(self, value) -> None:
        self.plain.start = value

    def __len__(self) -> int:
        return len(self.plain)

    def __iter__(self):
        in_worker = get_worker_info() is not None
        for plain, captioned in zip(self.plain.batches(), self.captioned.batches()):
            batch = concat_batches(plain, captioned)
            # the rows were copied: both batches' reused buffers can be refilled now
            for lease in (plain["stream"].get("lease"), captioned["stream"].get("lease")):
                if lease is not None:
                    lease.release()
            batch["stream"].pop("lease", None)
            yield wire_batch(batch) if in_worker else batch


def concat_batches(a: dict, b: dict) -> dict:
    """Row-concatenate two batches; `stream` (loader bookkeeping) is taken from `a`."""
    out = {}
    for key, value in a.items():
        if key == "stream":
            out[key] = value
        elif key in b:
            out[key] = torch.cat([value, b[key]]) if isinstance(value, Tensor) else list(value) + list(b[key])
    if "target" in a or "target" in b:  # regression targets of one stream only: NaN rows for the other
        width = (a.get("target") if "target" in a else b["target"]).shape[1]
        rows = [
            x["target"] if "target" in x else torch.full((len(x["key"]), width), math.nan) for x in (a, b)
        ]
        out["target"] = torch.cat(rows)
    return out


class CaptionMixDataModule(AVDataModule):
    """AVDataModule whose training batches hold `round(caption_ratio * batch_size)` samples with a
    caption (from `caption_shards`, default the training shards) and the rest from the full stream.

    The mixed streams decode frames in the loader workers (a batch of JPEG bytes cannot be
    concatenated), whatever `data.decode_device` says.
    """

    def __init__(
        self, cfg: Any, *, caption_ratio: float = 0.5, caption_shards: str | None = None, **kwargs: Any
    ) -> None:
        super().__init__(cfg, **kwargs)
        if not 0.0 <= caption_ratio <= 1.0:
            raise ValueError(f"caption_ratio={caption_ratio!r}: expected a share in [0, 1]")
        self.caption_ratio, self.caption_shards = caption_ratio, caption_shards

    def split_batch(self) -> tuple[int, int]:
        """(plain rows, captioned rows) of a training batch."""
        captioned = round(self.caption_ratio * self.cfg.batch_size)
        return self.cfg.batch_size - captioned, captioned

    def train_dataloader(self) -> StreamLoader:
        plain_rows, caption_rows = self.split_batch()
        if plain_rows == 0:  # every row captioned: train on the captioned stream alone
            return self.train_loader(self.captioned_stream(caption_rows))
        if caption_rows == 0:
            return super().train_dataloader()
        plain = self.train_stream(
            self.shard_urls(self.cfg.train_groups), batch_size=plain_rows, decode_in_workers=True
        )
        return self.train_loader(CaptionMix(plain, self.captioned_stream(caption_rows)))

    def captioned_stream(self, rows: int):
        """The training stream of captioned samples only, `rows` per batch."""
        cfg = self.cfg
        source = self.caption_shards or cfg.shards
        urls = self.shard_urls(cfg.train_groups if source == cfg.shards else None, source)
        keys = captioned_keys(urls)
        if not keys:
            raise ValueError(
                f"caption_ratio={self.caption_ratio} (inject.caption_ratio) but no sample of {source} "
                "has a caption (`txt` member): write shards with `emomae shards --captions FILE` or add "
                "them with `emomae merge-captions`"
            )
        return self.train_stream(
            urls,
            batch_size=rows,
            seed=cfg.seed + CAPTIONED_SEED_OFFSET,
            keep=partial(key_in, keys=keys),
            decode_in_workers=True,
        )
