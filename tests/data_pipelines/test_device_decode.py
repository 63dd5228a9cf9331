"""Decoding on the accelerator (data_pipelines/jpeg_bytes.py, device_decode.py) on real small shards.

Every test runs the device code with `device="cpu"`. The "cuda" parameters are GPU CHECKS: they run
only where `torch.cuda.is_available()` and are meant to be run on a GPU machine (they are not skips
to keep forever). On CUDA nvjpeg and the GPU resize round differently from libjpeg-turbo and the CPU
resize, so there the videos are compared within a tolerance; on the CPU they must be identical.
"""

from __future__ import annotations

import dataclasses
import tarfile

import pytest
import torch
import webdataset as wds
from shard_factory import make_sample, stream_config, write_shard_dir
from torch.utils.data import DataLoader
from torchvision.io import decode_jpeg, encode_jpeg

from data_pipelines.augment import VideoAugConfig
from data_pipelines.corrupt import CorruptSampleError, read_corrupt_logs
from data_pipelines.datamodule import AVDataModule
from data_pipelines.device_decode import DeviceFrameDecoder
from data_pipelines.features import FbankConfig
from data_pipelines.jpeg_bytes import clip_frame_size, jpeg_frame_size
from data_pipelines.shards import shard_urls
from data_pipelines.stream import StreamConfig, eval_pipeline, pretrain_pipeline

GPU_CHECK = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="GPU check: needs CUDA (run it on a GPU machine)"
)
DEVICES = ["cpu", pytest.param("cuda", marks=GPU_CHECK)]

# synth_shards hold 8 frames of 64 x 64: a 48 px crop/resize makes every pixel step run.
TRAIN = StreamConfig(
    batch_size=4,
    num_frames=8,
    img_size=48,
    fbank=FbankConfig(fbank_frames=64),
    video_aug=VideoAugConfig(img_size=48, crop_scale=(0.3, 1.0), hflip=0.5, color_jitter=0.4),
    audio_gain_db=3.0,
    shuffle_buffer=8,
    epoch_length=3,
    seed=5,
)


def bytes_mode(cfg: StreamConfig) -> StreamConfig:
    return dataclasses.replace(cfg, jpeg_bytes=True)


def assert_same_video(decoded: torch.Tensor, expected: torch.Tensor, device: str) -> None:
    assert decoded.shape == expected.shape and decoded.dtype == torch.uint8
    assert decoded.device.type == device
    if device == "cpu":
        assert torch.equal(decoded, expected)
    else:  # nvjpeg + GPU resize vs libjpeg-turbo + CPU resize: a few grey levels apart
        assert (decoded.cpu().float() - expected.float()).abs().mean() < 2.0


def assert_same_rows(bytes_batch: dict, classic: dict) -> None:
    for name in ("key", "clip_key", "caption"):
        assert bytes_batch[name] == classic[name]
    for name in ("fbank", "label", "has_caption", "audio_present"):
        assert torch.equal(bytes_batch[name].cpu(), classic[name])


@pytest.mark.parametrize("device", DEVICES)
def test_pretrain_bytes_path_gives_the_decoding_paths_batches(synth_shards, device):
    urls = shard_urls(synth_shards)
    classic = list(DataLoader(pretrain_pipeline(urls, TRAIN, rank=0, world_size=1), batch_size=None))
    # through a real worker: the bytes travel in shared memory
    shipped = list(
        DataLoader(
            pretrain_pipeline(urls, bytes_mode(TRAIN), rank=0, world_size=1), batch_size=None, num_workers=1
        )
    )
    decode = DeviceFrameDecoder(device)
    assert len(shipped) == len(classic) == TRAIN.epoch_length
    for got, want in zip(shipped, classic):
        assert "fbank" not in got and got["jpeg"]["log_mel"].dtype == torch.float16  # finished by decode
        decoded = decode(got)
        assert_same_rows(decoded, want)
        lease = decoded["stream"].pop("lease")  # the worker's reused buffer (batch_buffers.py)
        assert decoded["stream"] == want["stream"] and lease[1] in range(TRAIN.batch_buffers)
        assert_same_video(decoded["video"], want["video"], device)
    assert decode.dropped == []


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("img_size", [48, 64])  # resize + centre crop, and the shards' own size
def test_eval_bytes_path_gives_the_decoding_paths_batches(synth_shards, device, img_size):
    cfg = dataclasses.replace(TRAIN, img_size=img_size, batch_size=5)
    urls = shard_urls(synth_shards, ["fold0"])
    classic = list(eval_pipeline(urls, cfg, rank=0, world_size=1))
    shipped = list(eval_pipeline(urls, bytes_mode(cfg), rank=0, world_size=1))
    decode = DeviceFrameDecoder(device)
    assert len(shipped) == len(classic) > 1
    for got, want in zip(shipped, classic):
        decoded = decode(got)
        assert_same_rows(decoded, want)
        assert_same_video(decoded["video"], want["video"], device)


def test_a_bytes_batch_holds_the_frames_compressed_and_no_decoded_pixels(synth_shards):
    urls = shard_urls(synth_shards, ["fold0"])
    batch = next(iter(eval_pipeline(urls, bytes_mode(TRAIN), rank=0, world_size=1)))
    assert "video" not in batch
    jpeg = batch["jpeg"]
    with tarfile.open(urls[0]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")}
    expected = b"".join(members[f"{key}.f{t:02d}.jpg"] for key in batch["key"] for t in range(8))
    assert bytes(jpeg["data"].numpy()) == expected
    assert jpeg["offsets"].tolist()[-1] == len(expected) and len(jpeg["offsets"]) == 4 * 8 + 1
    assert jpeg["frame_hw"].tolist() == [[64, 64]] * 4
    pixels = 4 * 8 * 3 * 64 * 64
    assert all(t.numel() < pixels for t in jpeg.values() if isinstance(t, torch.Tensor))


def test_the_header_gives_the_decoded_frame_size_and_rejects_damaged_files(synth_shards):
    frame = make_sample("k", num_frames=1, size=40)["f00.jpg"]
    decoded = decode_jpeg(torch.frombuffer(bytearray(frame), dtype=torch.uint8))
    assert jpeg_frame_size(frame) == tuple(decoded.shape[1:]) == (40, 40)
    for damaged, reason in (
        (b"garbage", "not a JPEG"),
        (frame[: len(frame) // 2], "truncated"),
        (frame[:2] + b"\xff\xda" + frame[-2:], "no readable frame header"),
    ):
        with pytest.raises(CorruptSampleError, match=reason):
            jpeg_frame_size(damaged)


def test_a_clips_frame_size_is_checked_on_every_frame_whatever_its_header(synth_shards):
    frames = [make_sample("k", num_frames=3, size=40, seed=s)[f"f0{t}.jpg"] for s in (1, 2) for t in range(3)]
    assert clip_frame_size(frames) == (40, 40)
    pixels = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    other_quality = encode_jpeg(pixels, quality=50).numpy().tobytes()  # other tables: parsed, not compared
    assert not other_quality.startswith(frames[0][:200])
    assert clip_frame_size([*frames, other_quality]) == (40, 40)
    wider = encode_jpeg(torch.zeros(3, 40, 48, dtype=torch.uint8), quality=90).numpy().tobytes()
    for bad, reason in (
        (wider, "differ in size"),
        (frames[1][:-2], "truncated"),  # the first frame's header, no end marker
        (frames[1][:2] + b"\xff\xda" + frames[1][-2:], "no readable frame header"),
    ):
        with pytest.raises(CorruptSampleError, match=reason):
            clip_frame_size([*frames, bad])
        if reason != "differ in size":
            with pytest.raises(CorruptSampleError, match=reason):
                clip_frame_size([bad, *frames])


def damaged_inside(frame: bytes) -> bytes:
    """Frame size and end marker intact, a bogus Huffman table after them: only decoding can tell
    (libjpeg-turbo skips most garbage inside the scan data with a warning, so that would not do)."""
    table = frame.index(b"\xff\xc4", frame.index(b"\xff\xc0"))  # a DHT segment after the frame header
    return frame[: table + 5] + b"\xff" * 16 + frame[table + 21 :]  # its 16 code counts


@pytest.fixture(scope="module")
def shard_with_bad_frames(tmp_path_factory):
    out = tmp_path_factory.mktemp("bad_frames")
    samples = [make_sample(f"c{i:04d}_w000", num_frames=4, size=32, seed=i) for i in range(6)]
    samples[1]["f02.jpg"] = b"garbage"  # caught by the worker's header check
    samples[4]["f01.jpg"] = damaged_inside(samples[4]["f01.jpg"])  # caught when decoding on the device
    with wds.TarWriter(str(out / "all-000000.tar")) as sink:
        for sample in samples:
            sink.write(sample)
    return str(out / "all-000000.tar")


@pytest.mark.parametrize("device", DEVICES)
def test_bad_jpegs_in_bytes_mode_are_dropped_and_named(shard_with_bad_frames, tmp_path, device):
    cfg = stream_config(batch_size=6)
    classic = next(iter(eval_pipeline([shard_with_bad_frames], cfg, rank=0, world_size=1, shard_sizes=[6])))
    batch = next(
        iter(
            eval_pipeline(
                [shard_with_bad_frames],
                bytes_mode(cfg),
                rank=0,
                world_size=1,
                shard_sizes=[6],
                log_dir=tmp_path,
            )
        )
    )
    # the worker rejects the garbage frame by its header, naming the sample
    assert [(e["key"], "not a JPEG" in e["reason"]) for e in read_corrupt_logs(tmp_path)] == [
        ("c0001_w000", True)
    ]
    assert batch["stream"]["corrupt"] == 1 and len(batch["key"]) == 5
    decode = DeviceFrameDecoder(device)
    video = decode(batch)["video"]
    # the device decode finds the clip damaged inside, drops it from every field and names it
    assert [d["key"] for d in decode.dropped] == ["c0004_w000"]
    assert batch["key"] == [k for k in classic["key"] if k != "c0004_w000"]
    assert len(batch["fbank"]) == len(batch["label"]) == len(batch["has_caption"]) == len(video) == 4
    # the classic path drops the same clip in the worker (libjpeg-turbo fails on it too)
    assert classic["key"] == batch["key"]
    assert_same_video(video, classic["video"], device)


def data_module(shards, **over) -> AVDataModule:
    cfg = dict(
        shards=str(shards),
        train_groups=["fold0"],
        val_groups=["fold1"],
        num_frames=8,
        img_size=48,
        fbank_frames=64,
        batch_size=4,
        epoch_length=2,
        shuffle_buffer=4,
        num_workers=0,
        hflip=0.5,
    )
    return AVDataModule({**cfg, **over}, rank=0, world_size=1)


def test_decode_device_cpu_and_auto_without_a_gpu_trainer_keep_decoding_in_the_workers(synth_shards):
    for choice in ("cpu", "auto"):
        batch = next(iter(data_module(synth_shards, decode_device=choice).train_dataloader()))
        assert "jpeg" not in batch and batch["video"].shape == (4, 8, 3, 48, 48)


def test_decode_device_must_be_auto_cpu_or_cuda(synth_shards):
    with pytest.raises(ValueError, match="decode_device"):
        data_module(synth_shards, decode_device="gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_decode_device_cuda_without_cuda_is_refused_by_name(synth_shards):
    with pytest.raises(ValueError, match="data.decode_device=cuda"):
        data_module(synth_shards, decode_device="cuda").train_dataloader()


@GPU_CHECK
def test_gpu_check_datamodule_decodes_train_and_val_batches_on_cuda(synth_shards):
    dm = data_module(synth_shards, decode_device="cuda")
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        batch = next(iter(loader))
        assert "jpeg" in batch and "video" not in batch
        batch = dm.on_before_batch_transfer(batch, 0)
        assert batch["video"].is_cuda and batch["video"].shape[1:] == (8, 3, 48, 48)


def test_the_bytes_path_carries_the_missing_audio_flag_and_blank_fbank(tmp_path):
    urls = write_shard_dir(tmp_path, [5], no_audio=frozenset({1, 3}))
    cfg = StreamConfig(
        batch_size=5, num_frames=4, img_size=32, fbank=FbankConfig(fbank_frames=32, mel_bins=32)
    )
    (classic,) = list(eval_pipeline(urls, cfg, rank=0, world_size=1))
    (shipped,) = list(eval_pipeline(urls, bytes_mode(cfg), rank=0, world_size=1))
    assert shipped["audio_present"].tolist() == [True, False, True, False, True]
    assert_same_rows(shipped, classic)
    assert not shipped["fbank"][1].any() and shipped["fbank"][0].any()
