"""emomae feeds its encoders the inputs HiCMAE (github sunlicai/HiCMAE) feeds its model.

Pretrained weights only transfer if the inputs match, so each test writes out the reference's rule
(read from HiCMAE's `kinetics_av.py` and `run_class_finetuning_av.py`, restated here in our own code)
as the oracle and compares emomae's real code path with it:

1. audio: `fbank(waveform - mean)` with the reference's Kaldi arguments, zero-padded or cut to 256
   frames, *then* `(x - mean) / (2 std)` with the AudioSet statistics; for the torchaudio path
   (`waveform_to_fbank`), the loader's vectorised path (`fast_fbank`) and the whole loader
   (`SampleDecoder` on a shard sample, from its wav member and from its stored `fbank.npy`);
2. video: `(x / 255 - IMAGENET_DEFAULT_MEAN) / IMAGENET_DEFAULT_STD` (timm's constants);
3. frame sampling: 16 frames, stride 4, on a 25 fps frame folder, long and short clips.

Where the reference does something not comparable (random offsets, two test clips per video, a
different rule for fine-tuning training), the test pins what is comparable; docs/hicmae.md lists the rest.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from hicmae_reference import reference_fbank
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from data_pipelines.decode import GRID_FPS, load_audio, sample_frame_indices, window_starts
from data_pipelines.features import FbankConfig, fast_fbank, waveform_to_fbank
from data_pipelines.manifests import ManifestRow
from data_pipelines.samples import SampleDecoder
from data_pipelines.shards import ShardConfig, clip_samples
from data_pipelines.stream import StreamConfig
from pretrain.encoders import normalize_video

SR = 16000
TARGET_FRAMES = 256  # HiCMAE --input_size_audio
NORM_MEAN, NORM_STD = -4.2677393, 4.5689974  # HiCMAE's norm_stats['audioset']
NUM_FRAMES, STRIDE = 16, 4  # HiCMAE --num_frames 16 --sampling_rate 4
REAL_CLIP = "voxceleb2_pcavs/00086.mp4"  # 5.26 s, 25 fps, AAC at 16 kHz

# Tolerances, in normalised fbank units (the model's input; 1 unit = 9.14 in log-mel):
# - torchaudio path: the same kaldi.fbank call on the same float32 tensor -> identical (measured 0.0).
# - fast path: the same arithmetic reordered (signal-wise pre-emphasis, one FFT, matmul mel bank);
#   float32 rounding in the quietest mel bins reaches ~1e-4 (measured 2.3e-5 real speech, 1.0e-4 for the
#   synthetic chirp with a DC offset); the tolerance leaves 5x for other CPUs and FFT builds.
#   A parameter slip moves values by far more: hamming or povey window 0.77, frame shift 10.5 ms 1.3,
#   no pre-emphasis 1.0 (measured on the real clip). htk_compat only moves the energy column, which
#   use_energy=False leaves out, so no test can see it.
# - loader from the wav member: the shard stores int16 PCM (one rounding) -> measured 2e-5.
# - loader from `fbank.npy`: the log-mel is stored as float16 (step 2^-6 at |x| in [8, 16], i.e. up
#   to 0.0078 log-mel = 8.5e-4 normalised) -> measured 4.3e-4.
TOL_TORCHAUDIO = 1e-6
TOL_FAST = 5e-4
TOL_FLOAT16 = 1.5e-3


# ---------------------------------------------------------------- the reference's rules, restated


def hicmae_fbank(waveform: torch.Tensor) -> torch.Tensor:
    """HiCMAE's audio input for one clip's waveform: (N,) float -> (256, 128), normalised."""
    wave = waveform.reshape(1, -1).float()
    fbank = reference_fbank(wave - wave.mean(), SR)
    missing = TARGET_FRAMES - fbank.shape[0]
    fbank = F.pad(fbank, (0, 0, 0, missing)) if missing > 0 else fbank[:TARGET_FRAMES]
    return (fbank - NORM_MEAN) / (NORM_STD * 2)


def hicmae_pretrain_indices(n: int, offset: int) -> list[int]:
    """Pretraining (VideoMAE dataset, VoxCeleb2): frames `offset + 4 i`, where the reference draws
    `offset` at random in [0, n - 64] (0 when n < 64); the step is only taken while
    `offset + 1 + 4 < n`, after which the frame repeats."""
    pos, out = offset + 1, []
    for _ in range(NUM_FRAMES):
        out.append(pos - 1)
        if pos + STRIDE < n:
            pos += STRIDE
    return out


def hicmae_test_indices(n: int, chunk: int, num_segments: int = 2) -> list[int]:
    """Fine-tuning test mode (`--test_num_segment 2`): every 4th frame, the list padded with its last
    entry to 16, and clip `chunk` starts `int(chunk * (len - 16) / (num_segments - 1))` entries in."""
    every = list(range(0, n, STRIDE))
    every += [every[-1]] * max(0, NUM_FRAMES - len(every))
    step = max((len(every) - NUM_FRAMES) / (num_segments - 1), 0)
    start = int(chunk * step)
    return every[start : start + NUM_FRAMES]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def real_audio(realdata_dir) -> torch.Tensor:
    """The real clip's track, decoded by emomae's own reader (decord, mono, 16 kHz)."""
    return torch.from_numpy(load_audio(realdata_dir / REAL_CLIP, SR))


def synthetic_audio(seconds: float) -> torch.Tensor:
    """A chirp with noise and a DC offset (so the mean removal has something to remove)."""
    n = int(seconds * SR)
    t = torch.arange(n, dtype=torch.float64) / SR
    noise = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return (0.3 * torch.sin(2 * math.pi * 200 * t * (1 + t)) + 0.05 * noise + 0.1).float()


def audio_cases(real: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "real 1.5 s (padded)": real[: int(1.5 * SR)],
        "real 5.25 s (cut)": real,
        "synthetic 1.25 s (padded)": synthetic_audio(1.25),
        "synthetic 3.75 s (cut)": synthetic_audio(3.75),
    }


# ---------------------------------------------------------------- 1. audio


def test_real_clip_covers_both_cases(real_audio):
    assert len(real_audio) > 2.56 * SR and real_audio.abs().max() > 0.05  # a real, long, non-silent track


@pytest.mark.parametrize("path", [waveform_to_fbank, fast_fbank], ids=["torchaudio", "fast"])
def test_emomae_fbank_equals_hicmae_fbank(real_audio, path):
    tol = TOL_TORCHAUDIO if path is waveform_to_fbank else TOL_FAST
    cfg = FbankConfig()  # the defaults are what the loader and `embed` use
    for name, wave in audio_cases(real_audio).items():
        expected = hicmae_fbank(wave)
        got = path(wave, cfg)
        assert got.shape == expected.shape == (256, 128), name
        diff = (got - expected).abs().max().item()
        assert diff <= tol, f"{name}: max |emomae - HiCMAE| = {diff:.2e} > {tol:.0e}"
        n_real = 1 + (len(wave) - 400) // 160
        if n_real < 256:  # padding is 0 *before* normalisation: it reads -mean / (2 std) after it
            pad = torch.full_like(got[n_real:], -NORM_MEAN / (2 * NORM_STD))
            assert torch.allclose(got[n_real:], pad, atol=1e-6, rtol=0), name


def write_frame_folder(folder: Path, n: int) -> Path:
    """n tiny JPEG frames, as HiCMAE's lists point to (one image per frame, sorted by name)."""
    folder.mkdir()
    for i in range(n):
        Image.fromarray(np.full((24, 24, 3), 8 * i % 256, np.uint8)).save(folder / f"{i:05d}.jpg")
    return folder


@pytest.mark.parametrize("num_source_frames", [30, 150], ids=["short 1.2 s", "long 6 s"])
def test_loader_audio_of_a_shard_sample_equals_hicmae_fbank(tmp_path, real_audio, num_source_frames):
    """The whole loader: frame folder + wav -> shard samples (`clip_samples`) -> `SampleDecoder`, from
    the wav member and from the stored fbank.npy. A short clip's window is zero-padded to 2.56 s in
    the shard; HiCMAE takes the fbank of the real audio and pads the fbank, so must the loader."""
    frames = write_frame_folder(tmp_path / "frames", num_source_frames)
    seconds = num_source_frames / GRID_FPS
    pcm = np.round(real_audio[: int(seconds * SR)].numpy() * 32768).clip(-32768, 32767).astype(np.int16)
    sf.write(tmp_path / "audio.wav", pcm, SR, subtype="PCM_16")
    reference_wave = torch.from_numpy(pcm.astype(np.float32) / 32768)  # what torchaudio.load gives HiCMAE

    # fps: the folder is 25 fps by construction; the real track may be shorter than 6 s, and a folder's
    # rate would otherwise follow its audio's duration.
    samples = clip_samples(
        ManifestRow(key="clip", video=str(frames), audio=str(tmp_path / "audio.wav"), fps=25),
        ShardConfig(img_size=16),
    )
    assert len(samples) == max(1, num_source_frames // (NUM_FRAMES * STRIDE))
    decoder = SampleDecoder(StreamConfig(img_size=16), train=False)
    for sample in samples:
        meta = json.loads(sample["json"])
        start = round(meta["start"] * SR)
        expected = hicmae_fbank(reference_wave[start : start + round(2.56 * SR)])
        from_npy = decoder.audio_features(dict(sample), meta)
        from_wav = decoder.audio_features({k: v for k, v in sample.items() if k != "fbank.npy"}, meta)
        for got, tol, name in ((from_wav, TOL_FAST, "wav member"), (from_npy, TOL_FLOAT16, "fbank.npy")):
            diff = (got - expected).abs().max().item()
            assert diff <= tol, (
                f"window {meta['window']}, {name}: max |emomae - HiCMAE| = {diff:.2e} > {tol:.0e}"
            )
        # The real frames are the reference's every-4th-frame too (padding: see the sampling tests).
        every_4th = list(range(round(meta["start"] * GRID_FPS), num_source_frames, STRIDE))[:NUM_FRAMES]
        assert meta["frame_indices"][: len(every_4th)] == every_4th


# ---------------------------------------------------------------- 2. video


def test_normalize_video_equals_hicmae_imagenet_normalisation():
    video = torch.randint(
        0, 256, (2, 16, 3, 20, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    video[0, 0, :, 0, 0], video[0, 0, :, 0, 1] = 0, 255  # both ends of the range
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 1, 3, 1, 1)
    expected = (video.float() / 255 - mean) / std  # emomae's layout: (B, T, 3, H, W)
    got = normalize_video(video)
    assert got.dtype == torch.float32 and got.shape == video.shape
    assert (got - expected).abs().max().item() <= 1e-6
    # HiCMAE's loaders hand the model (B, 3, T, H, W); the same numbers, channel and time swapped.
    hicmae_layout = (video.permute(0, 2, 1, 3, 4).float() / 255 - mean.view(1, 3, 1, 1, 1)) / std.view(
        1, 3, 1, 1, 1
    )
    assert torch.allclose(got.permute(0, 2, 1, 3, 4), hicmae_layout, atol=1e-6, rtol=0)
    # A channel mix-up (BGR, or mean/std of the wrong channel) would be far outside the tolerance.
    assert (normalize_video(video.flip(2)) - expected).abs().max() > 0.1


# ---------------------------------------------------------------- 3. frame sampling


def emomae_windows(n: int) -> list[tuple[list[int], int]]:
    """emomae's (indices, padded count) for every window of an n-frame folder (25 fps assumed, as
    decode.py does for frame folders)."""
    span = NUM_FRAMES * STRIDE / GRID_FPS
    starts = np.arange(n) / GRID_FPS
    return [
        sample_frame_indices(starts, n / GRID_FPS, s, NUM_FRAMES, STRIDE)
        for s in window_starts(n / GRID_FPS, span, None)
    ]


@pytest.mark.parametrize("n", [64, 65, 100, 127, 128, 150, 257, 640])
def test_long_clip_windows_are_hicmae_stride_4_clips(n):
    windows = emomae_windows(n)
    assert len(windows) == n // 64  # non-overlapping 64-frame windows; the tail is dropped
    for w, (idx, padded) in enumerate(windows):
        # HiCMAE pretraining takes `offset + 4 i` for a random offset; emomae's offsets are 0, 64, ...
        assert idx == hicmae_pretrain_indices(n, 64 * w) == list(range(64 * w, 64 * w + 64, 4)), (n, w)
        assert padded == 0
    # Fine-tuning test clip 0 (the first 16 of every 4th frame) is emomae's first window.
    assert windows[0][0] == hicmae_test_indices(n, 0)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 17, 29, 30, 31, 32, 61, 63])
def test_short_clip_takes_every_4th_frame_then_pads(n):
    """Fewer than 64 frames: one window. The real frames are the reference's; the padding differs by
    design: emomae repeats the clip's last frame (n - 1), HiCMAE's test clips repeat the last
    sampled frame (4 floor((n - 1) / 4)); they agree when n - 1 is a multiple of 4."""
    ((idx, padded),) = emomae_windows(n)
    real = len(range(0, n, STRIDE))
    reference = hicmae_test_indices(n, 0)
    assert reference == hicmae_test_indices(n, 1)  # both test clips of a short video are the same clip
    assert idx[:real] == reference[:real] == list(range(0, n, STRIDE))
    assert padded == NUM_FRAMES - real
    assert idx[real:] == [n - 1] * padded
    assert reference[real:] == [4 * ((n - 1) // 4)] * padded
    assert (idx == reference) == ((n - 1) % 4 == 0 or padded == 0)
    # HiCMAE's pretraining rule agrees on every real frame except possibly the last one (it never
    # steps onto frame n - 1), and pads with its own last frame.
    pretrain = hicmae_pretrain_indices(n, 0)
    assert pretrain[: real - 1] == idx[: real - 1]
