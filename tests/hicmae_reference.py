"""HiCMAE's log-mel call (github sunlicai/HiCMAE, `kinetics_av.py`), restated as the tests' oracle."""

from __future__ import annotations

import torch
from torchaudio.compliance import kaldi


def reference_fbank(wave: torch.Tensor, sample_rate: int = 16000) -> torch.Tensor:
    """`kaldi.fbank` of a (1, N) waveform with the reference's arguments: 128 mel bins, a 10 ms hop,
    a Hanning window, no dither and no energy term."""
    return kaldi.fbank(
        wave,
        htk_compat=True,
        sample_frequency=sample_rate,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=128,
        dither=0.0,
        frame_shift=10,
    )
