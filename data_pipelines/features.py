"""Audio features: Kaldi-compatible log-mel filterbanks, AudioSet normalisation and SpecAugment.

The settings follow docs/data.md (the AST/HiCMAE recipe): the waveform mean is removed, 25 ms
Hanning windows every 10 ms, 128 mel bins, htk_compat, no energy, no dither. The fbank is zero-padded
or cut to `fbank_frames` *before* normalisation, as the reference does, so padded frames read
`-mean / (2 std)` after it.

`waveform_to_fbank` calls `torchaudio.compliance.kaldi.fbank` (the reference). `batched_log_mel` does
the same arithmetic vectorised (signal-wise pre-emphasis, frames by `unfold`, one FFT, one matmul,
cached mel matrix and window) and agrees with it to float rounding (tested against torchaudio). The
loader uses it one clip at a time (`fast_fbank`): about half the CPU of torchaudio's per clip, and
batching 8 clips gained nothing more (benchmarks/bench_loader.py measures all three).

Shards can also carry the log-mel itself (`fbank.npy`, float16, written by `shards.py` with the
parameters of `fbank_params` in each sample's json): the loader then only pads, augments and
normalises it (`precomputed_fbank`), which saves ~0.7 ms of the ~3 ms a clip costs a loader worker.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio
from torch import Tensor
from torchaudio.compliance import kaldi

# AudioSet statistics of this exact fbank (as used by AST and HiCMAE).
AUDIOSET_MEAN = -4.2677393
AUDIOSET_STD = 4.5689974

# The arguments handed to torchaudio.compliance.kaldi.fbank (sample rate and bins come from the config).
KALDI_FBANK_ARGS = dict(
    htk_compat=True,
    window_type="hanning",
    frame_length=25.0,
    frame_shift=10.0,
    use_energy=False,
    dither=0.0,
)


# Bump when the stored log-mel's arithmetic changes, so old `fbank.npy` members stop matching.
FBANK_VERSION = 1
# Kaldi floors mel energies at float32 eps before the log.
LOG_FLOOR = math.log(torch.finfo(torch.float32).eps)


@dataclass(frozen=True)
class FbankConfig:
    """How a waveform becomes the model's `(fbank_frames, mel_bins)` input."""

    sample_rate: int = 16000
    mel_bins: int = 128
    fbank_frames: int = 256
    mean: float = AUDIOSET_MEAN
    std: float = AUDIOSET_STD
    # SpecAugment: largest mask widths in bins / frames, 0 switches the mask off.
    freq_mask: int = 0
    time_mask: int = 0


def fbank_params(sample_rate: int = 16000, mel_bins: int = 128) -> dict:
    """Everything that determines a stored log-mel: written into each sample's json as `fbank` next
    to an `fbank.npy` member, and compared by the loader before it uses one (plain JSON types)."""
    return {
        "version": FBANK_VERSION,
        "sample_rate": int(sample_rate),
        "mel_bins": int(mel_bins),
        "dtype": "float16",
        **KALDI_FBANK_ARGS,
    }


def encode_log_mel(log_mel: Tensor) -> bytes:
    """(F, M) log-mel -> `.npy` bytes of float16 (|values| < 100, so ~0.01 absolute error; after
    normalisation ~0.001, far below what the models resolve)."""
    buf = io.BytesIO()
    np.save(buf, log_mel.numpy().astype(np.float16), allow_pickle=False)
    return buf.getvalue()


# The header `np.save` writes for a C-order float16 matrix; parsing it with a regex instead of
# numpy's `literal_eval` makes reading a stored fbank ~5x cheaper. Anything else goes through numpy.
_NPY_F16_MATRIX = re.compile(
    rb"^\x93NUMPY\x01\x00..\{'descr': '<f2', 'fortran_order': False, 'shape': \((\d+), (\d+)\), \} *\n",
    re.DOTALL,
)


def decode_log_mel(data: bytes, mel_bins: int) -> Tensor:
    """`.npy` bytes -> (F, mel_bins) float16 tensor; raises ValueError for anything else (no pickles)."""
    match = _NPY_F16_MATRIX.match(data)
    if match is not None:
        shape = (int(match[1]), int(match[2]))
        array = np.frombuffer(data, np.float16, shape[0] * shape[1], match.end()).reshape(shape)
    else:
        array = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    if array.ndim != 2 or array.shape[1] != mel_bins or array.dtype != np.float16:
        raise ValueError(f"fbank.npy must be float16 (frames, {mel_bins}), got {array.dtype} {array.shape}")
    with warnings.catch_warnings():  # read-only bytes: the tensor is only read (copied by precomputed_fbank)
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def precomputed_fbank(
    log_mel: Tensor,
    cfg: FbankConfig = FbankConfig(),
    gain_db: float = 0.0,
    spec_augment: SpecAugment | None = None,
    seed: int = 0,
) -> Tensor:
    """Model input from a stored log-mel (F, M): what `fast_fbank(waveform * gain)` gives, up to the
    float16 storage.

    A gain g multiplies every power by g^2, i.e. adds `gain_db / 10 * ln 10` to every log-mel value;
    only cells at Kaldi's energy floor (digital silence) differ, by at most that shift. Padding frames
    stay 0 before normalisation, as on the waveform path. Works in place on one fresh (fbank_frames, M)
    float32 tensor.
    """
    n = min(log_mel.shape[0], cfg.fbank_frames)
    fbank = torch.empty(cfg.fbank_frames, log_mel.shape[1])
    fbank[:n] = log_mel[:n]  # float16 -> float32
    fbank[n:] = 0.0
    if gain_db:
        fbank[:n].add_(gain_shift(gain_db)).clamp_(min=LOG_FLOOR)
    if spec_augment is not None:
        fbank = spec_augment(fbank, seed)
    return fbank.sub_(cfg.mean).mul_(0.5 / cfg.std)


def gain_shift(gain_db: float) -> float:
    """What a gain of `gain_db` adds to every log-mel value (a power ratio of 10^(dB/10))."""
    return gain_db / 10 * math.log(10)


def finish_log_mels(
    log_mel: Tensor, frames: Tensor, shift: Tensor, cfg: FbankConfig = FbankConfig()
) -> Tensor:
    """`precomputed_fbank` of a batch, on any device, without SpecAugment: log_mel (B, fbank_frames,
    M) float16 zero-padded after each row's `frames` (B,), `shift` (B,) float32 `gain_shift` of each
    row's gain (0: none) -> (B, fbank_frames, M) float32, equal to it element for element (the
    same float32 operations, row by row)."""
    fbank = log_mel.float()
    steps = torch.arange(fbank.shape[1], device=fbank.device)
    gained = ((steps[None, :] < frames[:, None]) & (shift != 0)[:, None])[:, :, None]
    fbank = torch.where(gained, (fbank + shift[:, None, None]).clamp_(min=LOG_FLOOR), fbank)
    return fbank.sub_(cfg.mean).mul_(0.5 / cfg.std)


def num_fbank_frames(num_samples: int, sample_rate: int = 16000) -> int:
    """Frames Kaldi produces for `num_samples` samples (snip_edges: only whole windows)."""
    window, shift = _window_sizes(sample_rate)
    return 0 if num_samples < window else 1 + (num_samples - window) // shift


def kaldi_fbank(waveform: Tensor, sample_rate: int = 16000, mel_bins: int = 128) -> Tensor:
    """Log-mel fbank of one mono waveform.

    waveform: (N,) or (1, N) float in [-1, 1]. Returns (num_fbank_frames(N), mel_bins) float32.
    """
    wave = waveform.reshape(1, -1).float()
    if (
        num_fbank_frames(wave.shape[1], sample_rate) == 0
    ):  # Kaldi asserts; shorter than one window = no frames
        return wave.new_zeros(0, mel_bins)
    wave = wave - wave.mean()
    return kaldi.fbank(wave, sample_frequency=sample_rate, num_mel_bins=mel_bins, **KALDI_FBANK_ARGS)


def pad_or_crop(fbank: Tensor, frames: int) -> Tensor:
    """Zero-pad at the end or cut `fbank` (..., F, M) to `frames` frames."""
    n = fbank.shape[-2]
    if n < frames:
        return F.pad(fbank, (0, 0, 0, frames - n))
    return fbank[..., :frames, :]


def normalise(fbank: Tensor, mean: float = AUDIOSET_MEAN, std: float = AUDIOSET_STD) -> Tensor:
    """`(x - mean) / (2 std)`: the AST convention, which puts AudioSet fbanks at roughly unit scale / 2."""
    return (fbank - mean) / (2.0 * std)


def waveform_to_fbank(
    waveform: Tensor, cfg: FbankConfig = FbankConfig(), spec_augment: SpecAugment | None = None, seed: int = 0
) -> Tensor:
    """Model input of one waveform: (N,) float -> (fbank_frames, mel_bins) float32, normalised.

    With `spec_augment`, masks are drawn from `seed` and applied before normalisation (as the
    reference does), so masked cells read the same value as padding.
    """
    fbank = pad_or_crop(kaldi_fbank(waveform, cfg.sample_rate, cfg.mel_bins), cfg.fbank_frames)
    if spec_augment is not None:
        fbank = spec_augment(fbank, seed)
    return normalise(fbank, cfg.mean, cfg.std)


def fast_fbank(
    waveform: Tensor, cfg: FbankConfig = FbankConfig(), spec_augment: SpecAugment | None = None, seed: int = 0
) -> Tensor:
    """`waveform_to_fbank` through the vectorised path (what the loader uses; torchaudio rebuilds its
    mel banks and window and walks every frame on each call)."""
    fbank = batched_log_mel(waveform.reshape(1, -1), None, cfg)[0]
    if spec_augment is not None:
        fbank = spec_augment(fbank, seed)
    return normalise(fbank, cfg.mean, cfg.std)


def batched_fbank(
    waveforms: Tensor, lengths: Tensor | list[int] | None = None, cfg: FbankConfig = FbankConfig()
) -> Tensor:
    """`waveform_to_fbank` for a batch in one vectorised pass.

    waveforms: (B, N) float, each row valid up to `lengths[b]` (default N; the rest is ignored).
    Returns (B, fbank_frames, mel_bins) float32, equal to stacking `waveform_to_fbank` of each row
    to float rounding (tests check it against torchaudio).
    """
    return normalise(batched_log_mel(waveforms, lengths, cfg), cfg.mean, cfg.std)


def batched_log_mel(waveforms: Tensor, lengths: Tensor | list[int] | None, cfg: FbankConfig) -> Tensor:
    """Kaldi's fbank arithmetic, vectorised: (B, N) -> (B, fbank_frames, mel_bins), zero-padded, not
    normalised."""
    waves = waveforms.float()
    batch, total = waves.shape
    lengths = [total] * batch if lengths is None else [int(n) for n in lengths]
    window, shift = _window_sizes(cfg.sample_rate)
    counts = [min(num_fbank_frames(n, cfg.sample_rate), cfg.fbank_frames) for n in lengths]
    frames_out = max(counts) if counts else 0
    fbank = waves.new_zeros(batch, cfg.fbank_frames, cfg.mel_bins)
    if frames_out == 0:
        return fbank
    # Kaldi per frame: remove the frame's mean m, pre-emphasise (first sample replicated), Hann window,
    # FFT. All linear, so: window the signal-wise pre-emphasised signal s_j = x_j - 0.97 x_(j-1) (the
    # frame's first sample differs, but the Hann window is 0 there) and subtract 0.03 m DFT(window).
    # Removing the waveform mean first changes nothing after the per-frame mean removal.
    span = window + shift * (frames_out - 1)
    x = waves[:, :span]
    emphasised = torch.zeros_like(x)
    emphasised[:, 1:] = x[:, 1:] - 0.97 * x[:, :-1]
    frame_means = x.unfold(-1, window, shift).mean(-1)  # (B, frames_out)
    spectrum = torch.fft.rfft(emphasised.unfold(-1, window, shift) * _hann(window), n=_padded_window(window))
    spectrum -= (0.03 * frame_means).unsqueeze(-1) * _window_dft(window)
    power = spectrum.real.square() + spectrum.imag.square()
    mel = power.reshape(-1, power.shape[-1]) @ _mel_matrix(cfg.mel_bins, cfg.sample_rate)
    mel = mel.clamp_(min=torch.finfo(torch.float32).eps).log_().reshape(batch, frames_out, cfg.mel_bins)
    for b, n in enumerate(counts):  # frames past a row's own length do not exist: they stay padding (0)
        fbank[b, :n] = mel[b, :n]
    return fbank


class SpecAugment:
    """Frequency and time masking (torchaudio transforms) on an fbank (F, M); masked cells become 0.

    torchaudio draws from the global torch RNG; we fork it and seed it per call so the masks are
    a function of `seed` only, whatever process (main or loader worker) runs them.
    """

    def __init__(self, freq_mask: int, time_mask: int) -> None:
        self.freq = torchaudio.transforms.FrequencyMasking(freq_mask) if freq_mask > 0 else None
        self.time = torchaudio.transforms.TimeMasking(time_mask) if time_mask > 0 else None

    @property
    def active(self) -> bool:
        return self.freq is not None or self.time is not None

    def __call__(self, fbank: Tensor, seed: int) -> Tensor:
        if not self.active:
            return fbank
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            spec = fbank.transpose(-1, -2).unsqueeze(0)  # torchaudio wants (..., freq, time)
            if self.freq is not None:
                spec = self.freq(spec)
            if self.time is not None:
                spec = self.time(spec)
        return spec.squeeze(0).transpose(-1, -2).contiguous()


def _window_sizes(sample_rate: int) -> tuple[int, int]:
    return int(sample_rate * KALDI_FBANK_ARGS["frame_length"] / 1000), int(
        sample_rate * KALDI_FBANK_ARGS["frame_shift"] / 1000
    )


def _padded_window(window: int) -> int:
    return 1 << (window - 1).bit_length()  # Kaldi's round_to_power_of_two


@lru_cache(maxsize=8)
def _hann(window: int) -> Tensor:
    return torch.hann_window(window, periodic=False)


@lru_cache(maxsize=8)
def _window_dft(window: int) -> Tensor:
    return torch.fft.rfft(_hann(window), n=_padded_window(window))


@lru_cache(maxsize=8)
def _mel_matrix(mel_bins: int, sample_rate: int) -> Tensor:
    """(padded_window // 2 + 1, mel_bins): Kaldi's triangular filters (20 Hz to Nyquist), transposed
    and contiguous for the power-spectrum matmul."""
    padded = _padded_window(_window_sizes(sample_rate)[0])
    banks, _ = kaldi.get_mel_banks(mel_bins, padded, float(sample_rate), 20.0, 0.0, 100.0, -500.0, 1.0)
    return F.pad(banks.float(), (0, 1)).T.contiguous()
