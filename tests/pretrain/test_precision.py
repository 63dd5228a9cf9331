"""Every place of the pretraining objective that computes in fp32 on purpose says so once per process
in a low-precision run (CPU bf16 autocast here, or bf16 tensors as DeepSpeed's bf16 module makes them),
and says nothing in an fp32 run."""

from __future__ import annotations

import logging

import pytest
import torch

from pretrain import losses
from pretrain.encoders import ModelConfig
from pretrain.losses import GatheredInfoNCE, initial_logit_scale, mse_over_present
from pretrain.mae import MaskedAVAutoencoder

TINY = dict(
    num_frames=4,
    img_size=32,
    fbank_frames=64,
    mel_bins=32,
    width=64,
    heads=2,
    depth=3,
    fusion_depth=1,
    decoder_width=32,
    decoder_heads=2,
    decoder_depth=3,
    skip_layers=[1, 3],
)
FP32_PLACES = (
    "video reconstruction target",
    "audio reconstruction target",
    "reconstruction MSE",
    "contrastive logits",
    "reconstruction pictures",
)


@pytest.fixture(autouse=True)
def fresh_process_log(caplog):
    """Each test starts as a new process would: nothing logged yet."""
    losses._FP32_NOTED.clear()
    caplog.set_level(logging.INFO, logger="emomae.precision")
    yield
    losses._FP32_NOTED.clear()


def run_steps(steps: int = 3) -> None:
    torch.manual_seed(0)
    model = MaskedAVAutoencoder(ModelConfig(**TINY))
    video = torch.randint(0, 256, (2, 4, 3, 32, 32), dtype=torch.uint8)
    fbank = torch.randn(2, 64, 32)
    for _ in range(steps):
        out = model(video, fbank)
        out.loss.backward()
        model.reconstruct(video, fbank, out)


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "emomae.precision"]


def test_each_fp32_place_logs_once_under_bf16_autocast(caplog):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        run_steps()
    logged = messages(caplog)
    for place in FP32_PLACES:
        assert sum(place in m for m in logged) == 1, (place, logged)
    assert len(logged) == len(FP32_PLACES)
    assert all(r.levelno == logging.WARNING for r in caplog.records if r.name == "emomae.precision")
    # each line says why, not only what
    assert all("fp32 on purpose (" in m and m.endswith(")") for m in logged)


def test_an_fp32_run_logs_nothing(caplog):
    run_steps()
    assert messages(caplog) == []


def test_bf16_tensors_without_autocast_log_too(caplog):
    """DeepSpeed's bf16 engine runs a bf16 module without autocast: the tensors carry the precision."""
    a, b = torch.randn(4, 8).bfloat16(), torch.randn(4, 8).bfloat16()
    for _ in range(2):
        mse_over_present(a, b)
        logits, _, _ = GatheredInfoNCE().logits(a.unsqueeze(1), b.unsqueeze(1), initial_logit_scale(0.07))
    assert logits.dtype == torch.float32
    assert [m.split(" computes")[0] for m in messages(caplog)] == [
        "low-precision run: reconstruction MSE",
        "low-precision run: contrastive logits (outside autocast)",
    ]
