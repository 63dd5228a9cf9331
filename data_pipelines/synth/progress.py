"""Progress of `emomae synth`: a tqdm bar on a terminal, plain lines anywhere else (a SLURM log, a
pipe, a CI log), where a bar's carriage returns would pile up into one unreadable line."""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO


class ClipProgress:
    """Counts written clips out of `total`. On a terminal (`stream.isatty()`) a tqdm bar; otherwise one
    line per tenth of the job and one at the end, e.g. `synth: 36/72 clips (50 %), 4.1 clips/s, 9 s left`.
    `enabled=False` counts silently (library calls of `generate`)."""

    def __init__(
        self, total: int, stream: TextIO | None = None, desc: str = "synth", enabled: bool = True
    ) -> None:
        self.total, self.desc, self.done, self.enabled = total, desc, 0, enabled
        self.stream = stream if stream is not None else sys.stdout
        self.every = max(1, math.ceil(total / 10))
        self._start = time.perf_counter()
        self._bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="clip", file=self.stream, smoothing=0)

    def update(self, n: int = 1) -> None:
        before, self.done = self.done, self.done + n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and (self.done // self.every > before // self.every or self.done == self.total):
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def line(self) -> str:
        took = time.perf_counter() - self._start
        rate = self.done / took if took > 0 else 0.0
        left = (
            f", {(self.total - self.done) / rate:.0f} s left" if rate > 0 and self.done < self.total else ""
        )
        return (
            f"{self.desc}: {self.done}/{self.total} clips ({100 * self.done / max(self.total, 1):.0f} %), "
            f"{rate:.1f} clips/s{left}"
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> ClipProgress:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
