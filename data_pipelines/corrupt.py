"""Per-worker accounting of corrupt samples: counter, log line and JSONL record per event.

A corrupt sample is never replaced by another one; it is skipped, counted (the running count rides
in every batch as `batch["stream"]["corrupt"]`), logged with rank, worker, shard URL and key, and
appended to `<log_dir>/corrupt-<mode>-rank<r>-worker<w>.jsonl` when a log folder is given
(docs/loader.md).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from data_pipelines.stream import WorkerContext

log = logging.getLogger("emomae.data")


class CorruptSampleError(ValueError):
    """A sample that cannot be used; the message is the reason that goes to the corrupt log."""


class CorruptLog:
    """Per-worker accounting of skipped samples: counter, log line and JSONL record per event."""

    def __init__(self, ctx: WorkerContext, mode: str, log_dir: str | None, max_consecutive: int) -> None:
        self.ctx, self.mode, self.max_consecutive = ctx, mode, max_consecutive
        self.count = 0
        self.consecutive = 0
        self.path = None
        if log_dir is not None:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self.path = Path(log_dir) / f"corrupt-{mode}-rank{ctx.rank}-worker{ctx.worker}.jsonl"

    def record(self, url: str, key: str, reason: str, kind: str = "sample", lost: int | None = None) -> None:
        """One event: a corrupt sample, or a shard that could not be read (to its end). `lost`: samples
        a shard that ended early was missing (index.json's count minus what the tar held)."""
        self.count += 1
        self.consecutive += 1
        event = {
            "mode": self.mode,
            "epoch": self.ctx.epoch,
            "rank": self.ctx.rank,
            "worker": self.ctx.worker,
            "url": url,
            "key": key,
            "kind": kind,
            "reason": reason,
        }
        if lost is not None:
            event["lost"] = lost
        log.warning(
            "skipping corrupt %s: rank %d worker %d shard %s key %r: %s",
            kind,
            self.ctx.rank,
            self.ctx.worker,
            url,
            key,
            reason,
        )
        if self.path is not None:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(event) + "\n")
        if self.consecutive >= self.max_consecutive:
            raise RuntimeError(
                f"{self.consecutive} corrupt samples in a row in rank {self.ctx.rank} worker {self.ctx.worker} "
                f"(last: {url} key {key!r}: {reason}); check that num_frames/audio match the shards' index.json"
            )

    def ok(self) -> None:
        self.consecutive = 0


def read_corrupt_logs(log_dir: str | Path) -> list[dict]:
    """All corrupt-sample events written under `log_dir` (every rank, worker and epoch)."""
    events = []
    for path in sorted(Path(log_dir).glob("corrupt-*.jsonl")):
        events += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return events
