"""decode.py on real clips and on small clips written here with PyAV (real mp4 files)."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from data_pipelines.decode import (
    DecodeError,
    SamplingConfig,
    crop_resize,
    decode_clip,
    sample_frame_indices,
    window_starts,
)

SR = 16000


def write_clip(
    path: Path, seconds: float, fps: int, size: int = 64, audio_seconds: float | None = None
) -> Path:
    """An mpeg4 mp4 whose frame i is filled with grey level 4*i (so frames can be identified), and
    an optional AAC 440 Hz mono track."""
    with av.open(str(path), "w") as c:
        v = c.add_stream("mpeg4", rate=fps)
        v.width = v.height = size
        v.pix_fmt = "yuv420p"
        a = None
        if audio_seconds is not None:
            a = c.add_stream("aac", rate=SR)
            a.layout = "mono"
        for i in range(round(seconds * fps)):
            frame = np.full((size, size, 3), min(4 * i, 255), np.uint8)
            for p in v.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(p)
        for p in v.encode():
            c.mux(p)
        if a is not None:
            n = round(audio_seconds * SR)
            tone = (0.3 * np.sin(np.arange(n) * 2 * np.pi * 440 / SR)).astype(np.float32)
            af = av.AudioFrame.from_ndarray(tone[None], format="fltp", layout="mono")
            af.sample_rate = SR
            for p in [*a.encode(af), *a.encode()]:
                c.mux(p)
    return path


def test_window_starts_keeps_full_windows_and_drops_the_tail():
    assert window_starts(3.0, 1.28, None) == [0.0, 1.28]
    assert window_starts(2.56, 1.28, None) == [0.0, 1.28]  # exactly two spans: no float loss


def test_window_starts_gives_one_window_for_a_short_clip():
    assert window_starts(0.5, 2.56, None) == [0.0]


def test_max_windows_spreads_the_kept_windows_over_the_clip():
    starts = window_starts(10 * 1.0, 1.0, 3)
    assert len(starts) == 3 and starts[0] < 2 and starts[-1] > 7
    assert window_starts(10.0, 1.0, 1) == [5.0]  # one window: the middle one


def test_frames_are_sampled_by_time_so_30fps_covers_the_same_span_as_25fps():
    span = 16 * 4 / 25
    at25, _ = sample_frame_indices(np.arange(100) / 25, 4.0, 0.0, 16, 4)
    at30, _ = sample_frame_indices(np.arange(120) / 30, 4.0, 0.0, 16, 4)
    assert at25 == list(range(0, 64, 4))
    # The last sampled frame of each shows the same moment (2.4 s) of the clip.
    assert at30[-1] / 30 == pytest.approx(at25[-1] / 25, abs=1 / 30)
    assert at30[-1] / 30 < span


def test_short_clip_indices_are_padded_with_the_last_frame():
    idx, padded = sample_frame_indices(np.arange(10) / 25, 0.4, 0.0, 8, 4)
    assert idx == [0, 4, 8, 9, 9, 9, 9, 9]
    assert padded == 5


def test_crop_box_takes_voxceleb2_rows_0_160_and_columns_32_192():
    # Pixel value = column index in the red channel, row index in the green channel.
    cols, rows = np.meshgrid(np.arange(224), np.arange(224))
    frame = np.stack([cols, rows, np.zeros_like(cols)], -1).astype(np.uint8)
    out = crop_resize(frame, 160, crop_box=(32, 0, 192, 160))
    assert out.shape == (160, 160, 3)
    assert out[0, 0, 0] == 32 and out[0, -1, 0] == 191
    assert out[0, 0, 1] == 0 and out[-1, 0, 1] == 159


def test_resize_takes_the_centre_square_of_a_wide_frame():
    frame = np.zeros((100, 200, 3), np.uint8)
    frame[:, 50:150] = 255  # the centre square is white, the sides black
    out = crop_resize(frame, 32)
    assert out.shape == (32, 32, 3) and out.min() == 255


def test_bbox_crops_before_resizing():
    frame = np.zeros((120, 160, 3), np.uint8)
    frame[20:60, 100:140] = 200
    out = crop_resize(frame, 16, bbox=(100, 20, 140, 60))
    assert out.min() == 200


def test_real_30fps_clip_gives_the_25fps_time_span_and_exact_audio(realdata_dir):
    cfg = SamplingConfig(num_frames=8, frame_stride=4, img_size=32)
    clip = decode_clip(realdata_dir / "videoretalking_examples" / "4.mp4", cfg)
    assert clip.source_fps == pytest.approx(30.0, abs=0.1)
    w = clip.windows[0]
    assert w.frames.shape == (8, 32, 32, 3) and w.frames.dtype == np.uint8
    assert w.frame_indices == [round(i * 4 / 25 * 30 - 0.49) for i in range(8)]  # frame shown at t = 0.16 i
    assert w.audio.shape == (20480,) and w.audio_padded == 0
    assert np.abs(w.audio).max() > 0.01  # real speech, not silence


def test_long_real_clip_is_cut_into_every_full_window(realdata_dir):
    cfg = SamplingConfig(num_frames=8, frame_stride=4, img_size=32)
    clip = decode_clip(realdata_dir / "edtalk_testdata" / "uncrop_Obama.mp4", cfg)
    assert clip.duration == pytest.approx(20.0, abs=0.05)
    assert [w.index for w in clip.windows] == list(range(15))  # floor(20 / 1.28)
    assert [w.frame_indices[0] for w in clip.windows] == [32 * k for k in range(15)]
    assert all(len(w.audio) == 20480 and w.audio_padded == 0 for w in clip.windows)


def test_short_clip_pads_frames_with_the_last_and_audio_with_zeros(tmp_path):
    path = write_clip(tmp_path / "short.mp4", seconds=1.0, fps=25, audio_seconds=0.5)
    clip = decode_clip(path, SamplingConfig(num_frames=8, frame_stride=4, img_size=32))
    (w,) = clip.windows
    assert w.frame_indices == [0, 4, 8, 12, 16, 20, 24, 24]
    assert w.frames_padded == 1  # t = 1.12 s is past the 1.0 s clip
    assert w.audio.shape == (20480,) and w.audio_padded > 16000 - 12000
    assert not w.audio[-w.audio_padded :].any()
    # Frames decoded in order: grey levels grow with the frame index.
    levels = w.frames.reshape(8, -1).mean(1)
    assert np.all(np.diff(levels[:7]) > 0) and levels[7] == pytest.approx(levels[6], abs=1)


def test_video_without_audio_track_is_an_error_naming_the_file_and_the_flag(tmp_path):
    path = write_clip(tmp_path / "mute.mp4", seconds=0.5, fps=25)
    with pytest.raises(DecodeError, match=r"mute\.mp4: no audio .*no audio stream.*--allow-missing-audio"):
        decode_clip(path, SamplingConfig(num_frames=4, frame_stride=1, img_size=16))


def test_random_bytes_are_an_error_naming_the_file(tmp_path):
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(np.random.default_rng(0).bytes(4000))
    with pytest.raises(DecodeError, match=r"corrupt\.mp4"):
        decode_clip(bad, SamplingConfig(num_frames=4, frame_stride=1, img_size=16))


def test_separate_wav_is_resampled_to_16k_mono(tmp_path):
    video = write_clip(tmp_path / "v.mp4", seconds=1.0, fps=25)
    wav = tmp_path / "a.wav"
    t = np.arange(44100) / 44100
    sf.write(wav, np.stack([0.5 * np.sin(2 * np.pi * 300 * t)] * 2, 1), 44100)  # 1 s stereo 44.1 kHz
    (w,) = decode_clip(video, SamplingConfig(num_frames=4, frame_stride=4, img_size=16), audio=wav).windows
    assert len(w.audio) == 10240 and w.audio_padded == 0
    spectrum = np.abs(np.fft.rfft(w.audio))
    assert np.argmax(spectrum) * SR / len(w.audio) == pytest.approx(300, abs=5)


def test_frame_directory_spanning_its_wav_is_read_at_frames_per_audio_second(tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(20):
        Image.fromarray(np.full((40, 30, 3), 10 * i, np.uint8)).save(frames / f"frame_det_00_{i + 1:06d}.bmp")
    wav = tmp_path / "a.wav"
    sf.write(wav, np.zeros(12800, np.float32), SR)  # 0.8 s: 20 frames at 25 fps
    clip = decode_clip(frames, SamplingConfig(num_frames=4, frame_stride=4, img_size=16), audio=wav)
    assert (clip.source_fps, clip.fps_source, clip.duration) == (25.0, "audio", 0.8)
    (w,) = clip.windows
    assert w.frame_indices == [0, 4, 8, 12]
    assert [int(f.mean()) for f in w.frames] == [0, 40, 80, 120]
    with pytest.raises(
        DecodeError, match=r"frames has no paired audio and no frame rate: add an `fps` column"
    ):
        decode_clip(frames, SamplingConfig(num_frames=4, frame_stride=4, img_size=16))


def write_patterned_clip(path: Path, width: int, height: int, frames: int = 10) -> np.ndarray:
    """An mpeg4 mp4 of `width` x `height` gradient frames (each row and column distinct, so a wrong
    row stride shows); returns its frames as PyAV decodes them, (T, H, W, 3) uint8."""
    with av.open(str(path), "w") as c:
        v = c.add_stream("mpeg4", rate=25)
        v.width, v.height, v.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            frame = np.zeros((height, width, 3), np.uint8)
            frame[..., 0] = np.arange(width) * 255 // width
            frame[..., 1] = (np.arange(height) * 255 // height)[:, None]
            frame[..., 2] = 20 * i
            for p in v.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(p)
        for p in v.encode():
            c.mux(p)
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


@pytest.mark.parametrize(("width", "height"), [(16, 16), (24, 24), (48, 48), (72, 40)])
def test_widths_decord_reads_with_row_padding_decode_to_the_pixels_pyav_sees(tmp_path, width, height):
    # decord 0.6.0's get_batch fails on exactly these widths (it counts the row padding as channels).
    video = tmp_path / f"w{width}.mp4"
    reference = write_patterned_clip(video, width, height)
    wav = tmp_path / "a.wav"
    sf.write(wav, np.zeros(SR, np.float32), SR)
    cfg = SamplingConfig(num_frames=4, frame_stride=2, img_size=height)  # centre square, no resize
    (w,) = decode_clip(video, cfg, audio=wav).windows
    assert w.frames.shape == (4, height, height, 3) and w.frames.dtype == np.uint8
    left = (width - height) // 2
    expected = reference[w.frame_indices][:, :, left : left + height]
    np.testing.assert_allclose(w.frames, expected, atol=2)


def test_frames_decord_returns_without_three_channels_are_an_error_naming_the_file():
    from data_pipelines.decode import _strip_row_padding

    with pytest.raises(DecodeError, match=r"clip\.mp4, expected \(H, W, 3\) RGB; re-encode"):
        _strip_row_padding(np.zeros((4, 6, 2), np.uint8), Path("clip.mp4"))
    padded = np.arange(4 * 6 * 4, dtype=np.uint8).reshape(4, 6, 4)  # rows of 24 bytes, 18 used
    np.testing.assert_array_equal(
        _strip_row_padding(padded, Path("clip.mp4")), padded.reshape(4, 24)[:, :18].reshape(4, 6, 3)
    )
