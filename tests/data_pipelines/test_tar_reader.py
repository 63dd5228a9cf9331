from __future__ import annotations

import io
import tarfile

import pytest
import webdataset as wds
from shard_factory import make_sample

from data_pipelines.tar_reader import ShardReadError, tar_samples


def reference_samples(path: str) -> list[dict]:
    return [
        {k: v for k, v in s.items() if k != "__local_path__"} for s in wds.tarfile_samples([{"url": path}])
    ]


def test_reader_groups_members_exactly_like_webdataset(tmp_path):
    path = str(tmp_path / "a-000000.tar")
    with wds.TarWriter(path) as sink:  # pax headers (float mtimes) on every member
        for i in range(5):
            sink.write(make_sample(f"clip{i}_w000", num_frames=3, size=16, caption="é" * i, seed=i))
    with open(path, "rb") as fh:
        ours = list(tar_samples(fh, path))
    assert ours == reference_samples(path)
    assert [s["__key__"] for s in ours] == [f"clip{i}_w000" for i in range(5)]


def test_reader_handles_gnu_long_names_ustar_prefixes_and_directories(tmp_path):
    path = str(tmp_path / "b.tar")
    long_dir = "d" * 120
    for fmt in (tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT):
        with tarfile.open(path, "w", format=fmt) as tf:
            tf.addfile(tarfile.TarInfo(f"{long_dir[:90]}/README"))  # no extension: not part of a sample
            info = tarfile.TarInfo(f"{long_dir[:90]}/sub")
            info.type = tarfile.DIRTYPE
            tf.addfile(info)
            for name, data in (
                (f"{long_dir[:90]}/k1.json", b"{}"),
                (f"{long_dir[:90]}/k1.wav", b"RIFF"),
                (f"{long_dir[:90]}/k2.json", b"[]"),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        with open(path, "rb") as fh:
            ours = list(tar_samples(fh, path))
        assert ours == reference_samples(path), fmt
        assert [s["__key__"] for s in ours] == [f"{long_dir[:90]}/k1", f"{long_dir[:90]}/k2"]


def test_truncated_stream_yields_complete_samples_then_the_partial_one_then_raises(tmp_path):
    path = str(tmp_path / "c.tar")
    with wds.TarWriter(path) as sink:
        for i in range(3):
            sink.write(make_sample(f"k{i}_w000", num_frames=2, size=16, seed=i))
    data = open(path, "rb").read()
    with tarfile.open(path) as tf:
        cut = next(m for m in tf.getmembers() if m.name == "k2_w000.json")
    got = []
    with pytest.raises(ShardReadError, match="unexpected end of data"):
        for sample in tar_samples(io.BytesIO(data[: cut.offset_data + 3]), path):
            got.append(sample)
    assert [s["__key__"] for s in got] == ["k0_w000", "k1_w000", "k2_w000"]
    assert "json" in got[1] and set(got[2]) == {"__key__", "__url__", "f00.jpg", "f01.jpg"}
    with pytest.raises(ShardReadError, match="tar header"):
        list(tar_samples(io.BytesIO(b"not a tar file at all".ljust(1024, b"x")), path))


def test_plain_ustar_shards_read_like_webdataset_and_garbage_is_rejected(tmp_path):
    path = str(tmp_path / "d.tar")
    with wds.TarWriter(path, mtime=1_700_000_000) as sink:  # whole-second mtime: no pax headers
        for i in range(3):
            sink.write(make_sample(f"k{i}_w000", num_frames=2, size=16, seed=i))
    with tarfile.open(path) as tf:
        assert not any(m.pax_headers for m in tf.getmembers())
        second = next(m for m in tf.getmembers() if m.name == "k1_w000.f00.jpg")
    data = open(path, "rb").read()
    assert list(tar_samples(io.BytesIO(data), path)) == reference_samples(path)

    with pytest.raises(ShardReadError, match="checksum"):
        list(tar_samples(io.BytesIO(b"\x01" * 4096), path))  # not a tar at all
    # A header damaged in the middle of a shard: the samples before it, then an error.
    broken = bytearray(data)
    broken[second.offset + 257 : second.offset + 262] = b"XXXXX"  # magic gone -> full checksum check
    broken[second.offset + 100] ^= 0xFF
    got = []
    with pytest.raises(ShardReadError, match="checksum"):
        for sample in tar_samples(io.BytesIO(bytes(broken)), path):
            got.append(sample["__key__"])
    assert got == ["k0_w000"]  # k1 starts at the damaged header


class Trickle(io.RawIOBase):
    """A stream that hands out at most `step` bytes per call, as a pipe may, and has no `readinto`
    beyond `read`'s."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data, self.pos, self.step = data, 0, step

    def read(self, n: int = -1) -> bytes:
        n = self.step if n < 0 else min(n, self.step)
        self.pos += len(chunk := self.data[self.pos : self.pos + n])
        return chunk

    readinto = None


def test_members_larger_than_a_read_chunk_and_short_reads_give_the_same_samples(tmp_path):
    path = str(tmp_path / "e.tar")
    with wds.TarWriter(path) as sink:
        for i in range(3):  # a 1.5 MB caption: more than the reader's 1 MB chunk
            sink.write(make_sample(f"k{i}_w000", num_frames=2, size=16, seed=i, caption="x" * (i * 750_000)))
    data = open(path, "rb").read()
    expected = reference_samples(path)
    assert len(expected[2]["txt"]) == 1_500_000
    assert list(tar_samples(io.BytesIO(data), path)) == expected
    assert list(tar_samples(Trickle(data, 777), path)) == expected
    with pytest.raises(ShardReadError, match="unexpected end of data"):
        list(tar_samples(Trickle(data[: len(data) - 600_000], 777), path))
