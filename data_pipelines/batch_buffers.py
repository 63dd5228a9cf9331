"""Batch buffers that a stream reuses once its consumer has let go of them; shared memory in a loader
worker.

A DataLoader worker builds each batch in shared memory, which the main process then maps. Fresh
shared memory costs the worker a page fault per 4 kB page as it writes the batch: on the VM of
benchmarks/bench_loader.py that is ~1.3 ms per decoded 16 x 160 px clip, about as much as decoding
it. So each worker keeps a few buffers, and writes each batch into one that nobody reads any more.

Each buffer crosses to the main process once. Sending a shared tensor normally passes its file
descriptor over a socket and the receiver maps it anew, batch after batch: ~0.2 ms per segment in the
worker, and in the main process ~0.5 ms plus a page fault per 4 kB page it then reads (~1.2 ms more
for a 5 MB batch of JPEG bytes; benchmarks/bench_loader.py, "main process"). So the stream hands
its batches to `wire_batch` just before they leave the worker: the tensors that view the batch's
pooled buffer become `PooledView`s, which pickle to (pool, slot, offset, shape, stride). The buffer
itself travels only with the first batch of its slot (and again if the worker replaces it with a
larger one); the main process keeps that mapping (`receive_buffer`) and builds every later batch of
the slot on it. Other small tensors (labels, ...) travel by value, which costs less than a segment.

How the worker knows a buffer is free again: in the main process each batch's tensors view a fresh
numpy view of the kept mapping (`torch.from_numpy`), and that view's finaliser runs when the last
tensor on it dies: the batch was dropped, or copied to pinned memory or to the GPU. It marks the
buffer free in a small shared flag tensor, which the worker reads. A buffer is reused only once it is
marked free. If the mark never comes (a batch left in the queue at shutdown, or a batch kept), the
buffer stays taken and the worker allocates another one. It never writes to memory that someone may
still read. The main process forgets a pool's mappings once its worker process has ended (checked
whenever a new pool's first batch arrives), so an ended epoch's buffers are freed by then.

A stream iterated in the process that consumes it (`num_workers=0`) reuses its buffers the same way,
without leases: each batch's memory is a fresh numpy view of a pooled array, handed to torch with
`torch.from_numpy`, and the view's finaliser runs when the last tensor using it dies. This saves
the page faults of a new batch tensor (~0.3 ms per decoded clip in process on that VM).
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger("emomae.data")

FREE, TAKEN = 0, 1
# Tensors up to this size travel pickled by value: cheaper than a shared-memory segment of their own.
BY_VALUE_BYTES = 64 * 1024
BY_VALUE_DTYPES = frozenset(
    {
        torch.bool,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.float16,
        torch.float32,
        torch.float64,
    }
)  # the ones numpy has
# Grow a replaced buffer by this much, so batches of JPEG bytes (their size varies) fit the next time.
HEADROOM = 1.25
PAGE = 4096


def shared_bytes(nbytes: int) -> Tensor:
    """A uint8 tensor of `nbytes` in shared memory, as `default_collate` allocates in a worker."""
    storage = torch.UntypedStorage._new_shared(nbytes)
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (nbytes,))


class BatchBufferPool:
    """At most `size` buffers of one stream, each taken by one batch at a time: shared memory whose
    batches carry leases (`shared`, in a loader worker), or plain memory freed by finalisers.

    `flags` (shared with the receiver): per buffer FREE / TAKEN, then per buffer the generation of it
    the receiver has mapped, then whether the receiver has these flags."""

    def __init__(self, size: int, shared: bool = True) -> None:
        # the pid (the receiver checks whether it has ended) and a token: a later worker may get the pid
        self.id = f"{os.getpid()}-{secrets.token_hex(6)}"
        self.shared = shared
        flags = 2 * size + 1
        with torch.inference_mode(False):  # not an inference tensor: finalisers update it in any mode
            self.flags = (
                shared_bytes(4 * flags).view(torch.int32).zero_()
                if shared
                else torch.zeros(flags, dtype=torch.int32)
            )
        self.size = size
        self.buffers: list[Tensor | np.ndarray] = []
        self.generations: list[int] = []  # bumped each time a slot gets a new buffer
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
                self.generations.append(1)
            elif free:  # a free buffer that is too small: replace it with a larger one
                slot = free[0]
                self.buffers[slot] = self.new_buffer(math.ceil(nbytes * HEADROOM / PAGE) * PAGE)
                self.generations[slot] += 1
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
                fresh = self.new_buffer(nbytes)
                return (fresh if self.shared else torch.from_numpy(fresh)), None
        self.flags[slot] = TAKEN
        buffer = self.buffers[slot]
        if not self.shared:
            view = buffer[:nbytes]  # a new array object, alive exactly as long as the tensors on it
            weakref.finalize(view, self.flags.__setitem__, slot, FREE)
            return torch.from_numpy(view), None
        return buffer[:nbytes], BufferLease(self, slot, nbytes)


class BufferLease:
    """A pooled batch's claim on its buffer, carried in `batch["stream"]["lease"]` inside the worker.
    `wire_batch` turns it into what the main process needs; `release` hands the buffer back at once
    (for a batch whose rows were copied elsewhere in the worker)."""

    def __init__(self, pool: BatchBufferPool, slot: int, nbytes: int) -> None:
        self.pool, self.slot, self.nbytes = pool, slot, nbytes

    def release(self) -> None:
        self.pool.flags[self.slot] = FREE

    def wire(self) -> PooledMemory:
        pool, slot = self.pool, self.slot
        generation = pool.generations[slot]
        size = pool.size
        return PooledMemory(
            pool.id,
            slot,
            generation,
            self.nbytes,
            pool.buffers[slot].untyped_storage().data_ptr(),
            # the buffer and the flags travel until the receiver says it has them
            None if pool.flags[size + slot].item() == generation else pool.buffers[slot],
            None if pool.flags[2 * size].item() == TAKEN else pool.flags,
        )


@dataclass(eq=False)  # identity matters: pickle sends one object once however many views use it
class PooledMemory:
    """One batch's pooled buffer on the wire; unpickled, the batch's memory (`receive_buffer`)."""

    pool_id: str
    slot: int
    generation: int
    nbytes: int
    data_ptr: int
    buffer: Tensor | None
    flags: Tensor | None

    def __reduce__(self):
        return (
            receive_buffer,
            (self.pool_id, self.slot, self.generation, self.nbytes, self.buffer, self.flags),
        )


class PooledView:
    """A tensor viewing a pooled buffer, sent as its place in the buffer; unpickled, the tensor."""

    def __init__(self, memory: PooledMemory, tensor: Tensor) -> None:
        self.memory, self.dtype = memory, tensor.dtype
        self.shape, self.stride, self.offset = tuple(tensor.shape), tensor.stride(), tensor.storage_offset()

    def __reduce__(self):
        return (view_of, (self.memory, self.dtype, self.shape, self.stride, self.offset))


class ByValue:
    """A small tensor sent pickled by value (no shared-memory segment); unpickled, the tensor."""

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor

    def __reduce__(self):
        return (tensor_from_array, (self.tensor.numpy(),))


class LeaseTag:
    """`batch["stream"]["lease"]` on the wire: unpickled, the plain `(pool id, slot)`. It carries the
    batch's memory too, so a buffer none of whose views were sent is freed at once in the receiver."""

    def __init__(self, memory: PooledMemory) -> None:
        self.memory = memory

    def __reduce__(self):
        return (lease_tag, (self.memory.pool_id, self.memory.slot, self.memory))


def wire_batch(batch: dict) -> dict:
    """In a loader worker, just before the batch leaves: views of its pooled buffer become
    `PooledView`s, other CPU tensors of up to `BY_VALUE_BYTES` go by value (module docstring)."""
    lease = batch.get("stream", {}).get("lease")
    memory = lease.wire() if isinstance(lease, BufferLease) else None

    def on_wire(value):
        if isinstance(value, Tensor) and value.device.type == "cpu":
            if memory is not None and value.untyped_storage().data_ptr() == memory.data_ptr:
                return PooledView(memory, value)
            if value.nbytes <= BY_VALUE_BYTES and value.dtype in BY_VALUE_DTYPES and not value.requires_grad:
                return ByValue(value.contiguous())
            return value
        if isinstance(value, dict):
            return {k: on_wire(v) for k, v in value.items()}
        return value

    wired = on_wire(batch)
    if memory is not None:
        wired["stream"]["lease"] = LeaseTag(memory)
    return wired


# ---------------------------------------------------------------- in the receiving process


@dataclass
class ReceivedPool:
    """What the receiving process keeps of one worker's pool: its flags and each slot's mapping.

    The flags are written through numpy: a tensor unpickled inside `torch.inference_mode()` (a
    validation loop) is an inference tensor, which torch refuses to update in place outside it, where
    a finaliser may well run."""

    flags: np.ndarray
    buffers: dict[int, tuple[int, np.ndarray]] = field(default_factory=dict)  # slot -> (generation, memory)
    received: int = 0  # buffers received (a slot's first batch, or after the worker replaced it)

    @property
    def size(self) -> int:
        return (self.flags.size - 1) // 2


_received: dict[str, ReceivedPool] = {}


def receive_buffer(
    pool_id: str, slot: int, generation: int, nbytes: int, buffer: Tensor | None, flags: Tensor | None
) -> Tensor:
    """A batch's memory in the receiving process: a fresh view of the slot's kept mapping, whose
    finaliser frees the worker's buffer once no tensor uses it."""
    # No lock: a finaliser may run inside this function (a collection freeing an old batch) and
    # would deadlock on it; each dict operation is atomic.
    pool = _received.get(pool_id)
    if pool is None and flags is not None:
        forget_ended_pools()
        pool = _received[pool_id] = ReceivedPool(flags.numpy())
        flags[-1] = TAKEN  # the worker may stop sending them
    if pool is None:
        raise RuntimeError(
            f"a batch from loader worker pool {pool_id} arrived in a process that never received that "
            "pool's flags: pooled batches can only be read by the process the loader hands them to"
        )
    if buffer is not None:
        pool.buffers[slot] = (generation, buffer.numpy())
        pool.received += 1
        pool.flags[pool.size + slot] = generation  # the worker may stop sending it
    kept_generation, memory = pool.buffers.get(slot, (None, None))
    if kept_generation != generation:
        raise RuntimeError(
            f"batch buffer {slot} of loader worker pool {pool_id}: generation {generation} was never "
            f"received here (have {kept_generation})"
        )
    view = memory[:nbytes]  # a new array object, alive exactly as long as the tensors on it
    weakref.finalize(view, release, pool_id, slot)
    return torch.from_numpy(view)


def view_of(memory: Tensor, dtype: torch.dtype, shape: tuple, stride: tuple, offset: int) -> Tensor:
    return torch.empty(0, dtype=dtype).set_(memory.untyped_storage(), offset, shape, stride)


def tensor_from_array(array: np.ndarray) -> Tensor:
    return torch.from_numpy(array)


def lease_tag(pool_id: str, slot: int, memory: Tensor) -> tuple[str, int]:
    return pool_id, slot


def release(pool_id: str, slot: int) -> None:
    pool = _received.get(pool_id)
    if pool is not None:
        pool.flags[slot] = FREE


def forget_ended_pools() -> None:
    """Drop the mappings of pools whose worker process has ended (a pool id starts with its pid);
    batches still alive keep their own views."""
    for pool_id in list(_received):
        pid = int(pool_id.split("-")[0])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            _received.pop(pool_id, None)
        except PermissionError:  # alive, someone else's: a reused pid
            pass
