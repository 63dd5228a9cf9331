"""A clip's JPEG frames -> one channels-last uint8 array, decoded in place by simplejpeg.

simplejpeg (libjpeg-turbo) decodes into memory it is given, so the T frames of a clip land in one
(T, H, W, 3) array, and a loader worker can reuse that array from clip to clip. torchvision's
`decode_jpeg` allocates every frame anew: fresh pages each time, which made decoding ~25 % slower
per clip in a loader worker (benchmarks/bench_loader.py, "raw JPEG decode" rows). Both run
libjpeg-turbo with its defaults (accurate integer IDCT, fancy upsampling) and give the same pixels
(tests/data_pipelines/test_frame_decode.py), which is why the GPU path's `decode_jpeg` matches.

A frame simplejpeg declines (damage libjpeg only warns about, or a size other than the first frame's)
and the frames of a CMYK / YCCK clip (its first frame's header says so) go through torchvision's
`decode_jpeg`, so what decodes, what is refused, the pixels and the error text are as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import simplejpeg
import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg

from data_pipelines.corrupt import CorruptSampleError

# JPEG colour spaces libjpeg itself turns into RGB, as torchvision has it do; torchvision converts
# CMYK / YCCK with its own arithmetic, so those frames go to torchvision.
LIBJPEG_TO_RGB = frozenset({"YCbCr", "Gray", "RGB"})


class ClipFrameDecoder:
    """T JPEG frames -> (T, 3, H, W) uint8, a view of (T, H, W, 3) memory.

    With `reuse_buffer` the memory is one array kept from call to call (grown when a clip needs
    more): each result is valid until the next call, so the caller must copy it out first, as
    `samples.BatchBuilder` does the moment a sample arrives.
    """

    def __init__(self, reuse_buffer: bool = False) -> None:
        self.reuse_buffer = reuse_buffer
        self._buffer = np.empty(0, dtype=np.uint8)

    def __call__(self, jpegs: Sequence[bytes]) -> Tensor:
        height, width, by_libjpeg = clip_header(jpegs[0])
        frames = self.frames_array(len(jpegs), height, width)
        for t, data in enumerate(jpegs):
            decode_into(data, frames[t], t, by_libjpeg)
        return torch.from_numpy(frames).permute(0, 3, 1, 2)

    def frames_array(self, count: int, height: int, width: int) -> np.ndarray:
        shape = (count, height, width, 3)
        if not self.reuse_buffer:
            return np.empty(shape, dtype=np.uint8)
        size = count * height * width * 3
        if self._buffer.size < size:
            self._buffer = np.empty(size, dtype=np.uint8)
        return self._buffer[:size].reshape(shape)


def clip_header(data: bytes) -> tuple[int, int, bool]:
    """(height, width, whether libjpeg makes the RGB) from the clip's first frame's JPEG header; a
    header simplejpeg cannot read is decoded by torchvision, which either raises the corrupt-sample
    error or finds the size.

    Only the first frame's header is read (reading all 16 cost ~1.5 % of a pretraining clip): a clip
    is one camera's frames, so its colour space is the first frame's.
    """
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        height, width = torchvision_frame(data).shape[:2]
        return height, width, False
    return height, width, colorspace in LIBJPEG_TO_RGB


def decode_into(data: bytes, out: np.ndarray, index: int, by_libjpeg: bool = True) -> None:
    """Frame `index` of a clip into `out`, (H, W, 3) uint8, the size of the clip's first frame;
    `by_libjpeg` False sends it to torchvision (the clip is CMYK / YCCK)."""
    try:
        # No header read first: a frame larger than `out` is refused for the buffer's size and a
        # smaller one comes back in another shape; both go to torchvision, which names the sizes.
        if by_libjpeg and simplejpeg.decode_jpeg(data, "rgb", buffer=out, strict=True).shape == out.shape:
            return
    except ValueError:  # libjpeg's error, or a warning about damaged data
        pass
    frame = torchvision_frame(data)
    if frame.shape != out.shape:
        raise CorruptSampleError(
            f"frames differ in size: frame 0 is {out.shape[0]}x{out.shape[1]}, "
            f"frame {index} is {frame.shape[0]}x{frame.shape[1]}"
        )
    out[...] = frame


def torchvision_frame(data: bytes) -> np.ndarray:
    """One frame through torchvision's decode_jpeg -> (H, W, 3) uint8; libjpeg's error is the
    corrupt sample's reason."""
    try:
        frame = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as err:  # libjpeg's complaint about these bytes (torchvision raises no narrower type)
        raise CorruptSampleError(f"bad JPEG frame member: {str(err).splitlines()[-1]}") from None
    return frame.permute(1, 2, 0).numpy()
