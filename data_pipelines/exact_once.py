"""Exact-once evaluation: which samples of which shards each (rank, worker) slot reads.

The samples of all shards, concatenated in order, are cut into `world_size * num_workers` contiguous
ranges whose sizes differ by at most one (sample counts from the `index.json` beside the shards);
without an index, whole shards go round robin. docs/loader.md states the guarantee.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def shard_sizes(urls: list[str]) -> list[int] | None:
    """Samples per shard from the `index.json` beside the shards, or None if any is unknown."""
    sizes: dict[str, int] = {}
    for folder in {os.path.dirname(u) for u in urls}:
        index = Path(folder) / "index.json"
        if not index.is_file():
            return None
        for s in json.loads(index.read_text()).get("shards", []):
            sizes[os.path.join(folder, s["name"])] = int(s["samples"])
    found = [sizes.get(u) for u in urls]
    return None if any(n is None for n in found) else found


def exact_once_split(urls: list[str], sizes: list[int] | None, slot: int, num_slots: int) -> list[dict]:
    """The `{"url", "start", "stop"}` pieces slot `slot` of `num_slots` reads; all slots together read
    every sample exactly once.

    With sizes: the concatenated samples are cut into contiguous ranges of sizes differing by at most
    one. The piece holding a shard's last sample reads to the end of the tar (`stop=None`), so samples
    beyond a stale index count are still read once rather than lost. Without sizes: whole shards,
    round robin (exact-once, but slots can differ by a shard).
    """
    if sizes is None:
        return [{"url": u} for i, u in enumerate(urls) if i % num_slots == slot]
    total = sum(sizes)
    lo, hi = slot * total // num_slots, (slot + 1) * total // num_slots
    pieces, offset = [], 0
    for url, n in zip(urls, sizes):
        end = offset + n
        if n == 0:
            # An empty-by-index shard still gets read (once) by the slot whose range holds its offset.
            owner = next(
                (s for s in range(num_slots) if offset < (s + 1) * total // num_slots), num_slots - 1
            )
            if owner == slot:
                pieces.append({"url": url, "start": 0, "stop": None})
        elif lo < end and offset < hi:
            stop = None if hi >= end else hi - offset
            pieces.append({"url": url, "start": max(lo, offset) - offset, "stop": stop})
        offset = end
    return pieces


def split_addresses(addresses: list[tuple[str, int]], slot: int, num_slots: int) -> list[dict]:
    """The pieces slot `slot` of `num_slots` reads when only the samples at `addresses` are wanted
    (`(url, index in its tar)`, in shard order: one part of a fold, found by a scan of the shards).

    The addresses are cut into contiguous runs whose sizes differ by at most one, so every slot gets
    its share of THESE samples wherever they lie (a contiguous split of all samples would leave the
    ranks that read other folds' shards idle). A piece spans a shard from the first to the last sample
    of the run in it (`{"url", "start", "stop"}`); the samples between them that are not wanted are
    the reader's filter to drop. Runs are disjoint and ordered, so no sample falls in two slots' spans.
    """
    lo, hi = slot * len(addresses) // num_slots, (slot + 1) * len(addresses) // num_slots
    pieces: list[dict] = []
    for url, index in addresses[lo:hi]:
        if pieces and pieces[-1]["url"] == url and index >= pieces[-1]["stop"]:
            pieces[-1]["stop"] = index + 1
        else:
            pieces.append({"url": url, "start": index, "stop": index + 1})
    return pieces
