"""Host-side collectives over the ranks of a fine-tuning run: rank and world size, one gloo group for
pickled objects and CPU tensors, gathering every rank's items, rank 0's value everywhere.

On several ranks every rank scores its own exact-once share of an evaluation stream, and the window
scores are gathered (`all_ranks`) before any metric: clip averaging and UAR need the whole set.
"""

from __future__ import annotations

import torch


def process_group() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


_CPU_GROUP: dict[str, object] = {}


def cpu_group():
    """A gloo group over every rank, for host-side collectives (gathered scores, cached features, probe
    gradients): the default group when it is gloo; with NCCL, pickled objects would be staged on the
    GPU and CPU tensors cannot be reduced at all. Made once, at the first call, which every rank makes
    at the same point (the first gather)."""
    if torch.distributed.get_backend() == "gloo":
        return None
    if "gloo" not in _CPU_GROUP:
        _CPU_GROUP["gloo"] = torch.distributed.new_group(backend="gloo")
    return _CPU_GROUP["gloo"]


def all_ranks(items: list) -> list:
    """Every rank's `items` (picklable), concatenated in rank order, on every rank; `items` itself in
    a single process. Every rank must call it at the same point, with an empty list if it has nothing."""
    _, world = process_group()
    if world == 1:
        return list(items)
    gathered: list = [None] * world
    torch.distributed.all_gather_object(gathered, list(items), group=cpu_group())
    return [item for part in gathered for item in part]


def from_rank0(value):
    """Rank 0's `value` on every rank (picklable); `value` itself in a single process."""
    if process_group()[1] == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0, group=cpu_group())
    return box[0]
