"""Batch buffers that a stream reuses once its consumer has let go of them; shared memory in a loader
worker.

A DataLoader worker builds each batch in shared memory, which the main process then maps. Fresh
shared memory costs the worker a page fault per 4 kB page as it writes the batch: on the VM of
benchmarks/bench_loader.py that is ~1.3 ms per decoded 16 x 160 px clip, about as much as decoding
it. So each worker keeps a few buffers, and writes each batch into one that nobody reads any more.

How the worker knows: a pooled batch carries a `BufferLease` (`batch["stream"]["lease"]`). When the
main process unpickles it, the lease puts a finaliser on the batch buffer's storage there. torch keeps
one Python object per storage for as long as any tensor views it, so the finaliser runs when the
last view dies: the batch was dropped, or copied to pinned memory or to the GPU. The finaliser
marks the buffer free in a small shared flag tensor, which the worker reads. A buffer is reused only
once it is marked free. If the mark never comes (a batch left in the queue at shutdown, or a batch
kept), the buffer stays taken and the worker allocates another one. It never writes to memory that
someone may still read.

A stream iterated in the process that consumes it (`num_workers=0`) reuses its buffers the same way,
without leases: each batch's memory is a fresh numpy view of a pooled array, handed to torch with
`torch.from_numpy`, and the view's finaliser runs when the last tensor using it dies. This saves
the page faults of a new batch tensor (~0.3 ms per decoded clip in process on that VM).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import weakref
from collections import OrderedDict

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger("emomae.data")

FREE, TAKEN = 0, 1
# Grow a replaced buffer by this much, so batches of JPEG bytes (their size varies) fit the next time.
HEADROOM = 1.25
PAGE = 4096

_ids = itertools.count()
# In the receiving process: each pool's flag tensor, sent with the pool's leases until the receiver
# has it (it says so in the tensor's last byte: a batch may be dropped in the worker). Bounded, so
# epochs of short-lived workers do not pile up mappings; a lease whose pool fell out of it only
# leaves its buffer taken.
_flags_by_pool: OrderedDict[str, Tensor] = OrderedDict()
MAX_POOLS_REMEMBERED = 1024


def shared_bytes(nbytes: int) -> Tensor:
    """A uint8 tensor of `nbytes` in shared memory, as `default_collate` allocates in a worker."""
    storage = torch.UntypedStorage._new_shared(nbytes)
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (nbytes,))


class BatchBufferPool:
    """At most `size` buffers of one stream, each taken by one batch at a time: shared memory whose
    batches carry leases (`shared`, in a loader worker), or plain memory freed by finalisers."""

    def __init__(self, size: int, shared: bool = True) -> None:
        self.id = f"{os.getpid()}-{next(_ids)}"
        self.shared = shared
        # one FREE / TAKEN flag per buffer, then the receiver's "I have these flags"
        self.flags = shared_bytes(size + 1).zero_() if shared else torch.zeros(size + 1, dtype=torch.uint8)
        self.size = size
        self.buffers: list[Tensor | np.ndarray] = []
        self.fresh = 0  # batches that found no free buffer and got a new, unpooled one

    def new_buffer(self, nbytes: int) -> Tensor | np.ndarray:
        return shared_bytes(nbytes) if self.shared else np.empty(nbytes, dtype=np.uint8)

    def take(self, nbytes: int) -> tuple[Tensor, BufferLease | None]:
        """A uint8 buffer of `nbytes` and, when shared, the lease that frees it; a fresh buffer and
        None when every pooled one is taken."""
        free = [s for s in range(len(self.buffers)) if self.flags[s].item() == FREE]
        slot = next((s for s in free if self.buffers[s].shape[0] >= nbytes), None)
        if slot is None:
            if len(self.buffers) < self.size:
                slot = len(self.buffers)
                self.buffers.append(self.new_buffer(nbytes))
            elif free:  # a free buffer that is too small: replace it with a larger one
                slot = free[0]
                self.buffers[slot] = self.new_buffer(math.ceil(nbytes * HEADROOM / PAGE) * PAGE)
            else:
                if self.fresh == 0:
                    log.log(
                        logging.WARNING if self.shared else logging.INFO,
                        "batch stream (pid %d): all %d batch buffers are still held by the consumer, so "
                        "this batch and any like it go to new memory (slower); keep fewer batches alive "
                        "or raise data.batch_buffers",
                        os.getpid(),
                        self.size,
                    )
                self.fresh += 1
                return (shared_bytes(nbytes) if self.shared else torch.empty(nbytes, dtype=torch.uint8)), None
        self.flags[slot] = TAKEN
        buffer = self.buffers[slot]
        if not self.shared:
            view = buffer[:nbytes]  # a new array object, alive exactly as long as the tensors on it
            weakref.finalize(view, self.flags.__setitem__, slot, FREE)
            return torch.from_numpy(view), None
        received = self.flags[self.size].item() == TAKEN
        return buffer[:nbytes], BufferLease(self.id, slot, buffer[:0], None if received else self.flags)


class BufferLease:
    """What a pooled batch carries so the main process can hand its buffer back (module docstring).

    `anchor` is an empty view of the buffer: pickled with the batch, it arrives as a view of the
    same storage as the batch's tensors. Unpickled, a lease is the plain `(pool id, slot)`."""

    def __init__(self, pool_id: str, slot: int, anchor: Tensor, flags: Tensor | None) -> None:
        self.pool_id, self.slot, self.anchor, self.flags = pool_id, slot, anchor, flags

    def __reduce__(self):
        return (watch_buffer, (self.pool_id, self.slot, self.anchor, self.flags))


def watch_buffer(pool_id: str, slot: int, anchor: Tensor, flags: Tensor | None) -> tuple[str, int]:
    """In the receiving process: free the worker's buffer once no tensor views it any more."""
    # No lock: a finaliser may run inside this function (a collection freeing an old batch) and
    # would deadlock on it; each dict operation is atomic, and a lost eviction race only evicts more.
    if flags is not None:
        _flags_by_pool[pool_id] = flags
        flags[-1] = TAKEN  # the worker may stop sending them
        while len(_flags_by_pool) > MAX_POOLS_REMEMBERED:
            _flags_by_pool.popitem(last=False)
    weakref.finalize(anchor.untyped_storage(), release, pool_id, slot)
    return pool_id, slot


def release(pool_id: str, slot: int) -> None:
    flags = _flags_by_pool.get(pool_id)
    if flags is not None:
        flags[slot] = FREE
