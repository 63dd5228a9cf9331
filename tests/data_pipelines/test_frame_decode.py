"""data_pipelines/frame_decode.py: simplejpeg decodes in place, with the pixels and errors of
torchvision's decode_jpeg (which the GPU path and every earlier loader used)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from data_pipelines.corrupt import CorruptSampleError
from data_pipelines.frame_decode import ClipFrameDecoder


def picture(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth colour gradients plus noise: chroma that subsampling and upsampling really change."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    return np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)


def jpeg(pixels: np.ndarray, mode: str = "RGB", **save) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(out, format="JPEG", **save)
    return out.getvalue()


def torchvision_clip(frames: list[bytes]) -> torch.Tensor:
    decoded = decode_jpeg(
        [torch.frombuffer(bytearray(f), dtype=torch.uint8) for f in frames], mode=ImageReadMode.RGB
    )
    return torch.stack(decoded)


FLAVOURS = {
    "4:2:0": dict(quality=85, subsampling=2),
    "4:2:2": dict(quality=85, subsampling=1),
    "4:4:4": dict(quality=95, subsampling=0),
    "progressive": dict(quality=80, progressive=True),
    "restart markers": dict(quality=75, restart_marker_blocks=2),
    "grayscale": dict(mode="L", quality=90),
    "CMYK (torchvision's fallback)": dict(mode="CMYK", quality=90),
}


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("size", [(160, 160), (37, 53)])
def test_frames_equal_torchvision_decode_jpeg(flavour, size):
    save = dict(FLAVOURS[flavour])
    mode = save.pop("mode", "RGB")
    frames = [jpeg(picture(*size, seed), mode, **save) for seed in range(3)]
    clip = ClipFrameDecoder()(frames)
    assert clip.shape == (3, 3, *size)
    assert clip.permute(0, 2, 3, 1).is_contiguous()  # channels-last memory, as the batch is made of
    assert torch.equal(clip, torchvision_clip(frames))


def test_a_reused_buffer_is_overwritten_by_the_next_clip_and_grows_for_larger_ones():
    small = [jpeg(picture(32, 32, s)) for s in range(2)]
    other = [jpeg(picture(32, 32, s + 10)) for s in range(2)]
    large = [jpeg(picture(64, 48, s)) for s in range(3)]
    reused = ClipFrameDecoder(reuse_buffer=True)
    first = reused(small)
    second = reused(other)
    assert first.data_ptr() == second.data_ptr()
    assert torch.equal(first, torchvision_clip(other))  # the contract: valid until the next call
    third = reused(large)
    assert torch.equal(third, torchvision_clip(large))
    assert torch.equal(reused(small), torchvision_clip(small))

    fresh = ClipFrameDecoder()
    kept, later = fresh(small), fresh(other)
    assert kept.data_ptr() != later.data_ptr()
    assert torch.equal(kept, torchvision_clip(small))


@pytest.mark.parametrize("odd_size", [(24, 32), (48, 32)], ids=["smaller", "larger"])
def test_a_frame_of_another_size_is_a_corrupt_sample(odd_size):
    frames = [jpeg(picture(32, 32, 0)), jpeg(picture(*odd_size, 1)), jpeg(picture(32, 32, 2))]
    with pytest.raises(
        CorruptSampleError,
        match=rf"frames differ in size: frame 0 is 32x32, frame 1 is {odd_size[0]}x{odd_size[1]}",
    ):
        ClipFrameDecoder(reuse_buffer=True)(frames)


@pytest.mark.parametrize("position", [0, 1])
def test_bytes_that_are_no_jpeg_give_libjpegs_reason(position):
    frames = [jpeg(picture(32, 32, 0)), jpeg(picture(32, 32, 1))]
    frames[position] = b"\xff\xd8 not a jpeg at all"
    with pytest.raises(CorruptSampleError, match="bad JPEG frame member: "):
        ClipFrameDecoder()(frames)


def test_damage_libjpeg_only_warns_about_decodes_as_torchvision_decodes_it():
    good = jpeg(picture(64, 64, 0))
    cut = good[: len(good) * 2 // 3] + b"\xff\xd9"  # scan data cut short: libjpeg warns, pads with grey
    clip = ClipFrameDecoder()([good, cut])
    assert torch.equal(clip[1], torchvision_clip([cut])[0])
    assert not torch.equal(clip[1], clip[0])
