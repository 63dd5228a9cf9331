"""Heads, AV mixup/cutmix, modality dropout and layer-wise lr decay (heads.py, mixup.py, modality.py, optim.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_model import tiny

from finetune.cache import FeatureCache, speaker_normalized
from finetune.full_model import FullFinetuneModel
from finetune.heads import AttentiveProbe, FeatureFusionHead, fusion_tokens
from finetune.mixup import AVMixup
from finetune.modality import drop_modality_per_sample
from finetune.optim import build_optimizer, layer_decay_param_groups
from finetune.probe import train_probe
from finetune.protocols import RecipeConfig
from pretrain.encoders import AVEncoder, ModelConfig
from pretrain.pooling import pool_tokens

CFG = ModelConfig(**tiny(fusion_depth=2, decoder_depth=2, skip_layers=[3]))


def test_feature_fusion_and_attentive_heads_give_logits_and_learnable_layer_weights():
    torch.manual_seed(0)
    enc = AVEncoder(CFG).eval()
    out = enc.forward_features(torch.randn(2, 4, 3, 32, 32), torch.randn(2, 64, 32))
    pooled = pool_tokens(out)
    assert pooled["video_layers"].shape == (2, 3, 64) and pooled["fused_audio"].shape == (2, 64)
    head = FeatureFusionHead(64, 3, 3, num_outputs=6)
    assert head.feature_fusion(pooled).shape == (2, 256)  # 4 x width
    logits = head(pooled)
    assert logits.shape == (2, 6)
    logits.sum().backward()
    assert head.video_layer_weights.grad is not None and head.video_layer_weights.grad.abs().sum() > 0
    probe = AttentiveProbe(64, 6, num_heads=2)
    assert probe(fusion_tokens(out)).shape == (2, 6)


def test_av_mixup_uses_one_lambda_and_one_pairing_for_video_and_audio():
    mix = AVMixup(mixup=1.0, cutmix=0.0, prob=1.0, switch_prob=0.0, smoothing=0.0, num_classes=3)
    video = torch.arange(4.0).view(4, 1, 1, 1, 1).expand(4, 2, 3, 4, 4).clone()
    fbank = (10 * torch.arange(4.0)).view(4, 1, 1).expand(4, 8, 2).clone()
    v, a, y = mix(video, fbank, torch.tensor([0, 1, 2, 0]), np.random.default_rng(0))
    # video sample i = lam * i + (1 - lam) * j; audio the same with 10x values: same lam and partner j
    assert torch.allclose(a[:, 0, 0], 10 * v[:, 0, 0, 0, 0])
    lam = y.max(dim=1).values.min()
    assert 0 < lam < 1 and torch.allclose(y.sum(1), torch.ones(4))


def test_av_cutmix_cuts_the_same_fraction_of_video_and_audio():
    mix = AVMixup(mixup=0.0, cutmix=1.0, prob=1.0, switch_prob=1.0, smoothing=0.1, num_classes=2)
    video, fbank = torch.zeros(2, 2, 3, 16, 16), torch.zeros(2, 100, 4)
    video[1], fbank[1] = 1.0, 1.0
    v, a, y = mix(video, fbank, torch.tensor([0, 1]), np.random.default_rng(3))
    pasted_v = [float(v[i, 0, 0].mean()) if i == 0 else 1 - float(v[i, 0, 0].mean()) for i in range(2)]
    pasted_a = [float(a[i, :, 0].mean()) if i == 0 else 1 - float(a[i, :, 0].mean()) for i in range(2)]
    # a sample paired with itself pastes nothing; the other pastes 1 - lam of both modalities
    assert pasted_v == pytest.approx(pasted_a, abs=0.02)
    assert (v[:, 0] == v[:, 1]).all(), "one box for every frame"


def test_layer_decay_orders_embeddings_blocks_fusion_then_head():
    enc, head = AVEncoder(CFG), FeatureFusionHead(64, 3, 3, 6)
    groups = layer_decay_param_groups(
        enc, head, CFG.depth, CFG.fusion_depth, 0.75, 0.05, enc.no_weight_decay()
    )
    scale = {name: g["lr_scale"] for g in groups for name in g["names"]}
    top = CFG.depth + CFG.fusion_depth + 1
    assert scale["video_embed.proj.weight"] == pytest.approx(0.75**top)
    assert scale["audio_blocks.0.attn.proj.weight"] == pytest.approx(0.75 ** (top - 1))
    assert scale["video_blocks.2.mlp.fc1.weight"] == pytest.approx(0.75 ** (top - 3))
    assert scale["fusion.video_blocks.1.attn.proj.weight"] == pytest.approx(0.75 ** (top - CFG.depth - 2))
    assert scale["video_norm.weight"] == scale["head.fc.weight"] == 1.0
    no_decay = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    assert "video_blocks.0.attn.proj.bias" in no_decay and "head.norm.weight" in no_decay
    assert "video_blocks.0.attn.proj.weight" not in no_decay
    assert sum(len(g["params"]) for g in groups) == len(list(enc.parameters())) + len(list(head.parameters()))


def test_modality_dropout_zeroes_exactly_one_input_of_the_dropped_samples():
    video, fbank = torch.ones(4000, 1, 1, 1, 1), torch.ones(4000, 2, 2)
    v, a = drop_modality_per_sample(video, fbank, 0.3, np.random.default_rng(0))
    has_video, has_audio = v.flatten(1).any(1), a.flatten(1).any(1)
    assert (has_video | has_audio).all(), "no sample may lose both inputs"
    assert (~has_video).float().mean().item() == pytest.approx(0.15, abs=0.02)
    assert (~has_audio).float().mean().item() == pytest.approx(0.15, abs=0.02)
    same_v, same_a = drop_modality_per_sample(video, fbank, 0.0, np.random.default_rng(0))
    assert same_v is video and same_a is fbank


def test_lp_ft_trains_the_head_alone_then_warms_the_encoder_up_from_zero():
    torch.manual_seed(0)
    enc, head = AVEncoder(CFG), FeatureFusionHead(64, CFG.depth, CFG.depth, 6)
    model = FullFinetuneModel(enc, head)
    groups = layer_decay_param_groups(
        enc, head, CFG.depth, CFG.fusion_depth, 0.75, 0.05, enc.no_weight_decay()
    )
    recipe = RecipeConfig(epochs=4, warmup_epochs=1, freeze_epochs=2, weight_decay=0.05)
    optimizer, scheduler = build_optimizer(groups, recipe, peak_lr=1e-3, steps_per_epoch=2)
    encoder_before = {k: v.clone() for k, v in enc.state_dict().items()}
    head_before = {k: v.clone() for k, v in head.state_dict().items()}
    is_head = [g["head"] for g in optimizer.param_groups]

    def step() -> list[float]:
        loss = model(torch.randn(2, 4, 3, 32, 32), torch.randn(2, 64, 32)).logsumexp(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        return [g["lr"] for g in optimizer.param_groups]

    for _ in range(4):  # the two frozen epochs
        step()
    assert all(torch.equal(v, encoder_before[k]) for k, v in enc.state_dict().items()), (
        "encoder moved while frozen"
    )
    assert any(not torch.equal(v, head_before[k]) for k, v in head.state_dict().items())
    lrs = [step()]
    encoder_lr = [lr for lr, h in zip(lrs[-1], is_head) if not h]
    # one step into the encoder's own 2-step warm-up: half the peak at its top layer (lr_scale 1)
    assert max(encoder_lr) == pytest.approx(0.5e-3)


def _scaled_cache(n: int = 360, dim: int = 16, layers: int = 2, seed: int = 0) -> tuple[FeatureCache, dict]:
    """Pooled features whose dimensions span six orders of magnitude (with large offsets, like raw
    token-means); the class signal (3 classes) lives only in the three smallest-scale dimensions."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    scale = 10.0 ** torch.linspace(-3, 3, dim)
    offset = 50 * scale * torch.randn(dim, generator=gen)

    def feature(*shape: int) -> torch.Tensor:
        x = torch.randn(n, *shape, dim, generator=gen)
        signal = torch.zeros(n, dim)
        signal[:, :3] = 4.0 * torch.nn.functional.one_hot(y, 3)
        return (x + signal.view(n, *[1] * len(shape), dim)) * scale + offset

    features = {
        "video_layers": feature(layers),
        "audio_layers": feature(layers),
        "fused_video": feature(),
        "fused_audio": feature(),
    }
    keys = [f"w{i:04d}" for i in range(n)]
    cache = FeatureCache(keys, keys, y.numpy(), {"av": features})
    order = np.random.default_rng(seed).permutation(n)
    index = {
        "train": np.sort(order[: n // 2]),
        "val": np.sort(order[n // 2 : 3 * n // 4]),
        "test": np.sort(order[3 * n // 4 :]),
    }
    return cache, index


PROBE_RECIPE = dict(
    epochs=15, batch_size=64, blr=5e-2, warmup_epochs=1, weight_decay=0.0, label_smoothing=0.0
)


@pytest.mark.parametrize("refit", [False, True])
def test_linear_probe_learns_a_signal_hidden_in_the_smallest_of_wildly_scaled_dimensions(refit):
    cache, index = _scaled_cache()
    torch.manual_seed(0)
    head = FeatureFusionHead(16, 2, 2, num_outputs=3)
    result = train_probe(
        head,
        cache,
        index,
        RecipeConfig(**PROBE_RECIPE, refit=refit),
        "classification",
        ["a", "b", "c"],
        [],
        ["av"],
    )
    # without per-dimension standardisation the LayerNorm is swamped by the 1e3-scale dimensions and
    # the probe stays near chance (1/3)
    assert result["test"]["av"]["uar"] > 0.9
    # the statistics are the TRAINING windows' (with refit: training + validation speakers), kept as
    # buffers in the head's state so evaluation and a saved head apply the same transform
    fitted = np.concatenate([index["train"], index["val"]]) if refit else index["train"]
    expected = cache.features["av"]["video_layers"][fitted].mean(0)
    assert torch.allclose(head.standardize["video_layers"].mean, expected, rtol=1e-4)
    assert "standardize.fused_audio.std" in head.state_dict()
    assert result["windows"].get("refit", len(index["train"])) == len(fitted)


def test_fresh_feature_fusion_head_does_not_standardise_so_full_finetuning_is_unchanged():
    head = FeatureFusionHead(8, 2, 2, num_outputs=3)
    x = 100 * torch.randn(5, 2, 8)
    assert torch.equal(head.standardize["video_layers"](x), x)


def test_refit_probe_picks_its_epoch_without_looking_at_the_test_fold():
    cache, index = _scaled_cache(seed=1)
    recipe = RecipeConfig(**{**PROBE_RECIPE, "blr": 5e-3}, refit=True)
    runs = []
    for test_labels in ("true", "shuffled"):
        if test_labels == "shuffled":
            cache.targets[index["test"]] = np.random.default_rng(0).permutation(cache.targets[index["test"]])
        torch.manual_seed(0)
        runs.append(
            train_probe(
                FeatureFusionHead(16, 2, 2, num_outputs=3),
                cache,
                index,
                recipe,
                "classification",
                ["a", "b", "c"],
                [],
                ["av"],
            )
        )
    assert runs[0]["selected_epoch"] == runs[1]["selected_epoch"]
    assert [c["val_uar"] for c in runs[0]["curve"]] == [c["val_uar"] for c in runs[1]["curve"]]
    assert runs[0]["test"]["av"]["uar"] != runs[1]["test"]["av"]["uar"]


def test_speaker_normalisation_zscores_each_speakers_windows_and_only_centres_constant_features():
    gen = torch.Generator().manual_seed(0)
    speakers = ["a", "b", "a", "b", "a", "c"]  # c has one window: centred, not scaled
    offset = torch.tensor([0.0, 10.0, 0.0, 10.0, 0.0, -5.0])[:, None, None]  # identity shifts every feature
    tokens = (torch.randn(6, 3, 4, generator=gen) * 3 + offset).half()
    pooled = torch.randn(6, 4, generator=gen) + offset[:, 0]
    pooled[:, 0] = 7.0  # constant, as the blanked modality's features are in an audio-only evaluation
    cache = FeatureCache(
        [f"w{i}" for i in range(6)],
        [f"c{i}" for i in range(6)],
        np.arange(6),
        {"av": {"fused_video": pooled, "tokens": tokens}},
    )
    out = speaker_normalized(cache, speakers).features["av"]
    for speaker in "ab":
        rows = [i for i, s in enumerate(speakers) if s == speaker]
        x = out["fused_video"][rows]
        torch.testing.assert_close(x[:, 1:].mean(0), torch.zeros(3), atol=1e-5, rtol=0)
        torch.testing.assert_close(x[:, 1:].std(0), torch.ones(3), atol=1e-5, rtol=0)
        assert out["tokens"].dtype == torch.float16
        torch.testing.assert_close(out["tokens"][rows].float().mean(0), torch.zeros(3, 4), atol=2e-3, rtol=0)
    assert torch.equal(out["fused_video"][:, 0], torch.zeros(6))
    assert torch.equal(out["fused_video"][5], torch.zeros(4))
    with pytest.raises(ValueError, match="5 speakers for 6 cached windows"):
        speaker_normalized(cache, speakers[:5])
