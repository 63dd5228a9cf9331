from __future__ import annotations

import math

import pytest
import torch
from torchaudio.compliance import kaldi

from data_pipelines.features import (
    AUDIOSET_MEAN,
    AUDIOSET_STD,
    KALDI_FBANK_ARGS,
    LOG_FLOOR,
    FbankConfig,
    SpecAugment,
    batched_fbank,
    finish_log_mels,
    gain_shift,
    kaldi_fbank,
    normalise,
    num_fbank_frames,
    precomputed_fbank,
    waveform_to_fbank,
)

SR = 16000


def sine(freq: float, seconds: float = 2.56, amp: float = 0.3) -> torch.Tensor:
    t = torch.arange(int(seconds * SR)) / SR
    return amp * torch.sin(2 * math.pi * freq * t)


def test_fbank_of_a_2_56_s_clip_is_256_by_128():
    wave = sine(440)
    assert num_fbank_frames(len(wave)) == 254  # 1 + (40960 - 400) // 160
    fbank = waveform_to_fbank(wave)
    assert fbank.shape == (256, 128) and fbank.dtype == torch.float32


def test_short_audio_is_zero_padded_before_normalising_and_long_audio_is_cut():
    cfg = FbankConfig(fbank_frames=100)
    short = waveform_to_fbank(sine(440, 0.5), cfg)  # 48 real frames
    assert short.shape == (100, 128)
    padded_value = (0.0 - AUDIOSET_MEAN) / (2 * AUDIOSET_STD)
    assert torch.allclose(short[48:], torch.full((52, 128), padded_value))
    assert not torch.allclose(short[47], torch.full((128,), padded_value))
    long = waveform_to_fbank(sine(440, 3.0), cfg)
    assert torch.equal(long, normalise(kaldi_fbank(sine(440, 3.0))[:100]))
    # Shorter than one 25 ms window: no frames at all, only padding (Kaldi itself would assert).
    assert torch.allclose(waveform_to_fbank(sine(440, 0.01), cfg), torch.full((100, 128), padded_value))


def test_kaldi_settings_are_the_reference_recipe():
    assert KALDI_FBANK_ARGS == dict(
        htk_compat=True,
        window_type="hanning",
        frame_length=25.0,
        frame_shift=10.0,
        use_energy=False,
        dither=0.0,
    )
    wave = sine(1000) + 0.01 * torch.randn(int(2.56 * SR), generator=torch.Generator().manual_seed(0))
    ours = kaldi_fbank(wave)
    reference = kaldi.fbank(
        (wave - wave.mean()).unsqueeze(0),
        htk_compat=True,
        sample_frequency=SR,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=128,
        dither=0.0,
        frame_shift=10,
    )
    assert torch.equal(ours, reference)
    # No dither: deterministic. Mean removed: a DC offset changes nothing.
    assert torch.equal(kaldi_fbank(wave), ours)
    assert torch.allclose(kaldi_fbank(wave + 0.2), ours, atol=1e-3)
    # A 1 kHz tone peaks in the mel bin whose HTK-mel centre is closest to 1 kHz.
    mel = lambda f: 1127 * math.log(1 + f / 700)  # noqa: E731
    lo, hi = mel(20), mel(8000)
    centres = [lo + (hi - lo) * (i + 1) / 129 for i in range(128)]
    expected = min(range(128), key=lambda i: abs(centres[i] - mel(1000)))
    assert abs(int(ours.mean(0).argmax()) - expected) <= 1


def test_normalisation_uses_configured_mean_and_twice_the_std():
    fbank = kaldi_fbank(sine(300) + sine(2000, amp=0.1))
    mean, std = fbank.mean().item(), fbank.std().item()
    out = normalise(fbank, mean, std)
    assert abs(out.mean().item()) < 1e-4
    assert abs(out.std().item() - 0.5) < 1e-4
    cfg = FbankConfig(fbank_frames=254, mean=mean, std=std)
    assert torch.allclose(waveform_to_fbank(sine(300) + sine(2000, amp=0.1), cfg), out)
    assert torch.allclose(normalise(torch.full((2, 3), AUDIOSET_MEAN + 2 * AUDIOSET_STD)), torch.ones(2, 3))


def test_batched_fbank_equals_per_clip_kaldi_for_ragged_batches():
    g = torch.Generator().manual_seed(1)
    lengths = [40960, 40000, 30001, 399, 41500]
    waves = 0.1 * torch.randn(len(lengths), max(lengths), generator=g)
    expected = torch.stack([waveform_to_fbank(waves[i, :n]) for i, n in enumerate(lengths)])
    got = batched_fbank(waves, lengths)
    assert got.shape == (5, 256, 128)
    assert torch.allclose(got, expected, atol=1e-4)


def test_spec_augment_masks_deterministically_per_seed_without_touching_global_rng():
    fbank = waveform_to_fbank(sine(440))
    aug = SpecAugment(freq_mask=24, time_mask=48)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b, c = aug(fbank, seed=1), aug(fbank, seed=1), aug(fbank, seed=2)
    assert torch.equal(torch.get_rng_state(), before)
    assert a.shape == fbank.shape and torch.equal(a, b) and not torch.equal(a, c)
    masked = a == 0
    assert masked.any() and not torch.equal(a, fbank)
    # Masks are whole mel bins and whole frames.
    assert masked.all(0).any() or masked.all(1).any()
    assert torch.equal(SpecAugment(0, 0)(fbank, seed=1), fbank)


@pytest.mark.parametrize("rate", [8000, 16000])
def test_frame_count_follows_the_window_and_shift(rate):
    n = rate  # one second
    assert num_fbank_frames(n, rate) == 1 + (n - rate // 40) // (rate // 100)
    assert kaldi_fbank(torch.randn(n), rate, 40).shape == (num_fbank_frames(n, rate), 40)


def test_spec_augment_in_the_fbank_path_masks_before_normalising_like_padding():
    cfg = FbankConfig(freq_mask=30, time_mask=60)
    plain = waveform_to_fbank(sine(440), cfg)
    masked = waveform_to_fbank(sine(440), cfg, SpecAugment(cfg.freq_mask, cfg.time_mask), seed=5)
    changed = masked != plain
    assert changed.any()
    padded_value = (0.0 - AUDIOSET_MEAN) / (2 * AUDIOSET_STD)
    assert torch.allclose(masked[changed], torch.full_like(masked[changed], padded_value))


def test_loader_fast_fbank_matches_torchaudio_on_speech_like_audio_and_spec_augment():
    from data_pipelines.features import fast_fbank

    g = torch.Generator().manual_seed(3)
    # Harmonics with a slow envelope plus noise and a DC offset: every mel bin carries energy.
    t = torch.arange(int(2.56 * SR)) / SR
    voice = sum(torch.sin(2 * math.pi * 140 * k * t) / k for k in range(1, 30)) * (
        0.5 + 0.5 * torch.sin(2 * math.pi * 3 * t)
    )
    wave = 0.05 * voice + 0.01 * torch.randn(len(t), generator=g) + 0.05
    cfg = FbankConfig(freq_mask=20, time_mask=40)
    aug = SpecAugment(cfg.freq_mask, cfg.time_mask)
    assert torch.allclose(fast_fbank(wave, cfg), waveform_to_fbank(wave, cfg), atol=1e-4)
    assert torch.allclose(
        fast_fbank(wave, cfg, aug, seed=9), waveform_to_fbank(wave, cfg, aug, seed=9), atol=1e-4
    )


def test_stored_float16_log_mel_with_a_gain_matches_the_fbank_of_the_scaled_waveform():
    from data_pipelines.features import decode_log_mel, encode_log_mel, fast_fbank, precomputed_fbank

    g = torch.Generator().manual_seed(0)
    wave = sine(440.0) + 0.02 * torch.randn(int(2.56 * SR), generator=g)
    log_mel = kaldi_fbank(wave)
    stored = decode_log_mel(encode_log_mel(log_mel), 128)
    assert stored.dtype == torch.float16 and stored.shape == (num_fbank_frames(wave.numel()), 128)
    floor = torch.zeros(256, 128, dtype=torch.bool)
    floor[:254] = log_mel <= LOG_FLOOR + 1e-4  # Kaldi's energy floor: the narrow lowest mel bins here
    assert 0 < floor.sum() < 0.02 * floor.numel()
    cfg = FbankConfig()
    for gain_db in (0.0, 3.0, -2.5):
        want = fast_fbank(wave * 10 ** (gain_db / 20), cfg)
        got = precomputed_fbank(stored, cfg, gain_db)
        assert got.shape == want.shape == (256, 128)
        error = (got - want).abs()
        assert error[~floor].max() < 3e-3, gain_db  # float16 storage, ~1e-3 after normalisation
        # At the floor a gain can lift energies the floor hid: off by at most the shift itself.
        assert error[floor].max() <= max(gain_db, 0) / 10 * math.log(10) / (2 * cfg.std) + 3e-3, gain_db
        assert torch.allclose(got[254:], want[254:], atol=1e-6)  # padding reads the same on both paths


def test_stored_log_mel_must_be_a_float16_matrix_of_the_loaders_mel_bins():
    import io

    import numpy as np

    from data_pipelines.features import decode_log_mel, encode_log_mel

    assert decode_log_mel(encode_log_mel(torch.zeros(3, 8)), 8).shape == (3, 8)
    with pytest.raises(ValueError, match=r"\(frames, 128\)"):
        decode_log_mel(encode_log_mel(torch.zeros(3, 8)), 128)
    for bad in (np.zeros((3, 128), np.float32), np.array([{"a": 1}], dtype=object)):
        buf = io.BytesIO()
        np.save(buf, bad, allow_pickle=True)
        with pytest.raises(ValueError):
            decode_log_mel(buf.getvalue(), 128)


def test_finishing_a_batch_of_stored_log_mels_equals_precomputed_fbank_row_by_row():
    """The JPEG-bytes loader ships stored log-mels as float16 and `device_decode` finishes them as a
    batch (`finish_log_mels`); the decoding loader finishes each in its worker (`precomputed_fbank`).
    Rows: short (padded), long (cut), no gain, values under Kaldi's floor (float16 rounding)."""
    cfg = FbankConfig(fbank_frames=50, mel_bins=8)
    g = torch.Generator().manual_seed(0)
    rows = [(30, 2.5), (50, -1.7), (80, 0.0), (10, 0.0), (45, -3.0)]
    log_mels = [(torch.randn(n, 8, generator=g) * 6 - 6).clamp(min=LOG_FLOOR - 0.01).half() for n, _ in rows]
    assert any((m.float() < LOG_FLOOR).any() for m in log_mels)
    padded = torch.zeros(len(rows), 50, 8, dtype=torch.float16)
    for b, m in enumerate(log_mels):
        padded[b, : min(len(m), 50)] = m[:50]
    frames = torch.tensor([min(n, 50) for n, _ in rows])
    shifts = torch.tensor([gain_shift(gain) if gain else 0.0 for _, gain in rows], dtype=torch.float32)
    finished = finish_log_mels(padded, frames, shifts, cfg)
    for b, (m, (_, gain)) in enumerate(zip(log_mels, rows)):
        assert torch.equal(finished[b], precomputed_fbank(m, cfg, gain)), b
    assert not torch.equal(finished[0], finish_log_mels(padded, frames, torch.zeros(5), cfg)[0])
