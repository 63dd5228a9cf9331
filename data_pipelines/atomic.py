"""Files that readers (other processes, other array tasks) must never see half-written."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` a temporary file beside `path`, then rename it over `path`. The temporary name is
    unique per call, so concurrent writers of the same file never interleave (the last rename wins)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: Path, obj: object, indent: int | None = 1) -> Path:
    """JSON (newline-terminated when indented) written through `atomic_write`."""
    text = json.dumps(obj, indent=indent) + ("\n" if indent is not None else "")
    return atomic_write(path, lambda tmp: tmp.write_text(text))
