"""A streaming reader for WebDataset tar shards that parses headers without `tarfile`.

Why not `tarfile` (which `webdataset.tarfile_samples` uses): our shards have ~18 members per sample,
each with a pax header (TarWriter stores a float mtime), and `tarfile` parses those in Python objects
at ~1.1 ms per sample, about half of what decoding the sample's 16 JPEGs costs
(benchmarks/bench_loader.py). This reader handles the tar subset shard writers produce (ustar, pax
`x`/`g` records, GNU long names) with a few slices per header, reads from any stream (`wds.gopen`
URLs: files, `pipe:`, http) and groups members into samples exactly as WebDataset does (key = path
up to the first dot of the file name).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

BLOCK = 512


class ShardReadError(IOError):
    """A tar stream that ends early or holds a header we cannot parse."""


def _octal(field: bytes) -> int:
    text = field.rstrip(b"\0 ").strip()
    if not text:
        return 0
    if field[0] & 0x80:  # GNU base-256 for large sizes
        return int.from_bytes(field[1:], "big")
    try:
        return int(text, 8)
    except ValueError:
        raise ShardReadError(f"bad octal field {field!r} in tar header") from None


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    data = stream.read(n)
    while len(data) < n:
        more = stream.read(n - len(data))
        if not more:
            raise ShardReadError(f"unexpected end of data: wanted {n} bytes, got {len(data)}")
        data += more
    return data


def _pax_records(data: bytes) -> dict[str, str]:
    records, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key.decode("utf-8")] = value.decode("utf-8")
        pos += length
    return records


def tar_members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(path, content) of each regular file in a tar stream, in order."""
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = stream.read(BLOCK)
        if not header:
            return  # no end-of-archive blocks: tolerated, as tarfile does
        if len(header) < BLOCK:
            header += _read_exact(stream, BLOCK - len(header))
        if header.count(0) == BLOCK:
            return  # end-of-archive marker
        checksum = _octal(header[148:156])
        if checksum != sum(header[:148]) + 256 + sum(header[156:]):
            raise ShardReadError("tar header checksum mismatch (not a tar file, or corrupt)")
        size = _octal(header[124:136])
        kind = header[156:157]
        if "size" in pax:
            size = int(pax["size"])
        padded = size + (-size % BLOCK)
        data = _read_exact(stream, padded)  # content and its padding in one read
        if padded != size:
            data = data[:size]
        if kind == b"x":
            pax = _pax_records(data)
            continue
        if kind == b"L":
            long_name = data.rstrip(b"\0").decode("utf-8")
            continue
        if kind == b"g":
            continue
        name = header[0:100].rstrip(b"\0").decode("utf-8")
        prefix = header[345:500].rstrip(b"\0") if header[257:262] == b"ustar" else b""
        if prefix:
            name = prefix.decode("utf-8") + "/" + name
        name = pax.get("path", long_name or name)
        long_name, pax = None, {}
        if kind in (b"0", b"\0", b"7"):
            yield name, data


def split_key(path: str) -> tuple[str, str] | tuple[None, None]:
    """WebDataset's key/extension split: `dir/key.ext.more` -> (`dir/key`, `ext.more`)."""
    slash = path.rfind("/") + 1
    dot = path.find(".", slash)
    if dot < 0:
        return None, None
    return path[:dot], path[dot + 1 :]


def tar_samples(stream: BinaryIO, url: str) -> Iterator[dict]:
    """Group consecutive members with the same key into samples `{"__key__", "__url__", ext: bytes}`.

    Raises ShardReadError (after yielding every complete sample before it) on a truncated stream;
    the sample being read when the stream broke is yielded first, as far as it got.
    """
    current: dict | None = None
    try:
        for path, data in tar_members(stream):
            key, ext = split_key(path)
            if key is None or key.startswith("__") or ext.startswith("__"):
                continue
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__url__": url}
            if ext.lower() in current:
                raise ShardReadError(f"{path}: duplicate member in tar file")
            current[ext.lower()] = data
    except ShardReadError:
        if current is not None:
            yield current
        raise
    if current is not None:
        yield current
