"""Small shards in the format of docs/architecture.md, written with webdataset.TarWriter, for the
loader tests: real JPEG frames and real wav audio, tiny sizes, optional corruptions; and the samples
of any shard files read back."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import webdataset as wds
from torchvision.io import encode_jpeg

from data_pipelines.features import FbankConfig
from data_pipelines.stream import StreamConfig

SAMPLE_RATE = 16000


def make_sample(
    key: str,
    num_frames: int = 4,
    size: int = 32,
    seconds: float = 0.64,
    label=None,
    caption: str | None = None,
    seed: int = 0,
) -> dict:
    """One sample: `num_frames` JPEG frames of size x size, a mono int16 wav, the JSON metadata."""
    g = torch.Generator().manual_seed(seed)
    sample = {"__key__": key}
    base = torch.randint(0, 256, (3, 1, 1), generator=g, dtype=torch.uint8)
    for t in range(num_frames):
        frame = (
            (base.int() + torch.randint(-20, 20, (3, size, size), generator=g)).clamp(0, 255).to(torch.uint8)
        )
        sample[f"f{t:02d}.jpg"] = encode_jpeg(frame, quality=90).numpy().tobytes()
    n = int(seconds * SAMPLE_RATE)
    rng = np.random.default_rng(seed)
    audio = 0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / SAMPLE_RATE) + 0.05 * rng.standard_normal(n)
    buf = io.BytesIO()
    sf.write(buf, (audio * 32767).astype(np.int16), SAMPLE_RATE, format="WAV", subtype="PCM_16")
    sample["wav"] = buf.getvalue()
    meta = {
        "key": key,
        "clip_key": key.rsplit("_w", 1)[0],
        "window": 0,
        "label": label,
        "num_frames": num_frames,
        "sample_rate": SAMPLE_RATE,
        "audio_samples": n,
        "speaker": f"spk{seed % 3}",
    }
    sample["json"] = json.dumps(meta).encode()
    if caption is not None:
        sample["txt"] = caption.encode()
    return sample


def without_audio(sample: dict) -> dict:
    """The sample as `emomae shards --allow-missing-audio` writes a clip that has no audio: a zero
    waveform of the same length and `"audio_missing": true` in the json."""
    audio, rate = sf.read(io.BytesIO(sample["wav"]), dtype="int16")
    buf = io.BytesIO()
    sf.write(buf, np.zeros_like(audio), rate, format="WAV", subtype="PCM_16")
    meta = json.loads(sample["json"]) | {"audio_missing": True}
    return sample | {"wav": buf.getvalue(), "json": json.dumps(meta).encode()}


def write_shard_dir(
    out: Path,
    sizes: list[int],
    group: str = "all",
    num_frames: int = 4,
    size: int = 32,
    seconds: float = 0.64,
    labelled: bool = True,
    first_index: int = 0,
    no_audio: frozenset[int] = frozenset(),
) -> list[str]:
    """Shards `<group>-%06d.tar` holding `sizes[i]` samples each plus index.json; returns their paths.

    Keys are `c{global index:04d}_w000`; label = index % 6 when `labelled`; the samples whose global
    index is in `no_audio` are written `without_audio`.
    """
    out.mkdir(parents=True, exist_ok=True)
    urls, entries, k = [], [], first_index
    for i, n in enumerate(sizes):
        name = f"{group}-{i:06d}.tar"
        with wds.TarWriter(str(out / name)) as sink:
            for _ in range(n):
                sample = make_sample(
                    f"c{k:04d}_w000", num_frames, size, seconds, label=(k % 6) if labelled else None, seed=k
                )
                sink.write(without_audio(sample) if k in no_audio else sample)
                k += 1
        urls.append(str(out / name))
        entries.append({"name": name, "group": group, "samples": n})
    index_path = out / "index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {"shards": []}
    index["shards"] += entries
    index["totals"] = {"samples": sum(s["samples"] for s in index["shards"])}
    index["config"] = {"num_frames": num_frames, "img_size": size}
    index_path.write_text(json.dumps(index))
    return urls


def stream_config(**over) -> StreamConfig:
    """A stream that reads the samples written here as they are (4 frames of 32 x 32, no resize) into a
    64-frame fbank; `over` sets the rest."""
    return StreamConfig(**{"num_frames": 4, "img_size": 32, "fbank": FbankConfig(fbank_frames=64), **over})


def keys_of(sizes: list[int], first_index: int = 0) -> list[str]:
    return [f"c{k:04d}_w000" for k in range(first_index, first_index + sum(sizes))]


def read_samples(*shards: str | Path) -> dict[str, dict[str, bytes]]:
    """Every sample of the shard files as {key: {extension: bytes}} (the key ends at the first dot)."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples
