"""PretrainModule pieces that need no Trainer: parameter groups, the lr rule and schedule, masking
seeds, reconstruction pictures and the checkpoint metadata."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from emomae.optim import no_decay_names, param_groups, warmup_cosine_factor
from pretrain.encoders import ModelConfig
from pretrain.mae import MaskedAVAutoencoder, ObjectiveConfig
from pretrain.module import PretrainModule, mask_seed
from pretrain.optim import OptimConfig, build_optimizer, scaled_lr

REPO = Path(__file__).resolve().parents[2]


def micro_config(**changes) -> ModelConfig:
    raw = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / "micro.yaml"))
    raw.pop("base", None)
    raw.update(changes)
    return ModelConfig.from_dict(raw)


def test_no_weight_decay_on_norms_biases_and_tokens_but_on_every_matrix():
    model = MaskedAVAutoencoder(micro_config(kind="unified"))
    groups = param_groups(model, weight_decay=0.05)
    no_decay = no_decay_names(model, groups)
    params = dict(model.named_parameters())
    assert {g["weight_decay"] for g in groups} == {0.0, 0.05}
    assert sum(len(g["params"]) for g in groups) == len(params)
    for name in (
        "video_decoder.mask_token",
        "audio_decoder.mask_token",
        "encoder.video_embed.modality_token",
        "encoder.audio_embed.modality_token",
    ):
        assert name in no_decay, name
    for name, p in params.items():
        if p.ndim <= 1 or name.endswith(".bias"):
            assert name in no_decay, f"{name} ({tuple(p.shape)}) should not decay"
        elif name not in model.no_weight_decay():
            assert name not in no_decay, f"matrix {name} should decay"
    assert any("norm" in n for n in no_decay)
    assert "encoder.video_embed.proj.weight" not in no_decay


def test_extra_no_weight_decay_patterns_are_honoured():
    model = MaskedAVAutoencoder(micro_config())
    no_decay = no_decay_names(model, param_groups(model, 0.05, ["video_decoder.head.*"]))
    assert "video_decoder.head.weight" in no_decay
    assert "audio_decoder.head.weight" not in no_decay


def test_lr_is_blr_times_global_batch_over_256_unless_absolute():
    cfg = OptimConfig(blr=3e-4, min_blr=1e-5)
    peak, final = scaled_lr(cfg, 160)
    assert peak == pytest.approx(1.875e-4)  # the reference's batch 160 (docs/pretrain.md)
    assert final == pytest.approx(1e-5 * 160 / 256)
    assert scaled_lr(OptimConfig(lr=1e-3, min_lr=0.0), 4096) == (1e-3, 0.0)
    with pytest.raises(ValueError, match="min_lr"):
        scaled_lr(OptimConfig(lr=1e-4, min_lr=1e-3), 8)


def test_schedule_warms_up_linearly_from_zero_then_follows_a_cosine_to_min_lr():
    f = lambda s: warmup_cosine_factor(s, warmup_steps=10, max_steps=110, final_ratio=0.1)  # noqa: E731
    assert f(0) == 0.0
    assert f(5) == pytest.approx(0.5)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way down the cosine
    assert f(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert f(110) == pytest.approx(0.1)
    assert f(500) == pytest.approx(0.1)  # flat after max_steps


def test_scheduler_drives_the_optimizer_lr_per_step():
    model = MaskedAVAutoencoder(micro_config())
    cfg = OptimConfig(warmup_steps=4, weight_decay=0.05)
    opt, sched = build_optimizer(model, cfg, peak_lr=1e-3, final_lr=1e-5, max_steps=12)
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[:5] == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert seen[-1] < seen[5] and seen[-1] > 1e-5
    assert all(g["lr"] == opt.param_groups[0]["lr"] for g in opt.param_groups)
    assert opt.defaults["betas"] == (0.9, 0.95)
    # the scheduler's state is plain numbers (weights_only checkpoints)
    state = sched.state_dict()
    torch.save(state, buf := __import__("io").BytesIO())
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["last_epoch"] == 12


def test_mask_seed_depends_on_seed_rank_and_micro_batch():
    seeds = {mask_seed(s, r, m) for s in (0, 1) for r in (0, 1, 7) for m in range(50)}
    assert len(seeds) == 2 * 3 * 50
    assert mask_seed(3, 1, 10) == mask_seed(3, 1, 10)


def _module(**kw) -> PretrainModule:
    return PretrainModule(
        micro_config(),
        ObjectiveConfig(),
        OptimConfig(),
        {"run_dir": "x", "seed": 0},
        peak_lr=1e-3,
        final_lr=1e-5,
        max_steps=10,
        **kw,
    )


def _batch(b=2):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (b, 8, 3, 64, 64), dtype=torch.uint8, generator=g), torch.randn(
        b, 128, 128, generator=g
    )


def test_same_micro_batch_count_draws_the_same_masks_and_loss():
    torch.manual_seed(0)
    a, b = _module(), _module()
    b.load_state_dict(a.state_dict())
    video, fbank = _batch()
    la = a(video, fbank, a.mask_generator()).loss
    lb = b(video, fbank, b.mask_generator()).loss
    assert la.item() == lb.item()
    b._micro_batches = 1
    assert b(video, fbank, b.mask_generator()).loss.item() != la.item()


def test_reconstruction_keeps_visible_pixels_and_fills_masked_ones():
    module = _module()
    video, fbank = _batch()
    rec = module.reconstruct(video, fbank)
    for key in ("video", "video_masked", "video_recon"):
        assert rec[key].shape == (2, 8, 3, 64, 64)
    for key in ("fbank", "fbank_masked", "fbank_recon"):
        assert rec[key].shape == (2, 128, 128)
    assert module.model.training  # restored after the eval-mode pass
    # at 90 % tube masking most pixels are grey in the masked view and the reconstruction differs there
    grey = (rec["video_masked"] == 0.5).float().mean()
    assert 0.8 < grey < 0.95
    visible = rec["video_masked"] != 0.5
    assert torch.allclose(rec["video_recon"][visible], rec["video"][visible], atol=1e-5)
    assert not torch.allclose(rec["video_recon"][~visible], rec["video"][~visible], atol=1e-2)


def test_reconstruction_figure_renders_all_panels(tmp_path):
    from pretrain.callbacks import reconstruction_figure

    module = _module()
    fig = reconstruction_figure(module.reconstruct(*_batch()), num_frames=3, title="t")
    assert len(fig.axes) == 2 * (3 * 3 + 3)
    fig.savefig(tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_checkpoint_metadata_is_plain_and_loads_weights_only(tmp_path):
    module = _module()
    module._micro_batches = 5
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "c.ckpt")
    loaded = torch.load(tmp_path / "c.ckpt", weights_only=True)
    assert loaded["emomae"]["model"] == micro_config().to_dict()
    assert loaded["emomae"]["config"]["run_dir"] == "x"
    assert any(k.startswith("model.encoder.") for k in loaded["state_dict"])
    other = _module()
    other.on_load_checkpoint(loaded)
    assert other._micro_batches == 5
