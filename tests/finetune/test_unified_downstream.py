"""Everything downstream of pretraining works for both encoder kinds (HiCMAE's separate encoders and
VAEmo's unified shared-block encoder): export round trip, probes, full fine-tuning with layer decay."""

from __future__ import annotations

import pytest
import torch
from tiny_model import tiny

from finetune import load_encoder
from finetune.export import export
from finetune.full_model import FullFinetuneModel
from finetune.heads import AttentiveProbe, FeatureFusionHead, fusion_tokens
from finetune.optim import layer_decay_param_groups
from pretrain.encoders import ModelConfig
from pretrain.mae import MaskedAVAutoencoder
from pretrain.pooling import pool_tokens

SMALL = tiny()


@pytest.mark.parametrize("kind", ["separate", "unified"])
def test_export_probe_and_finetune_work_for_both_encoder_kinds(tmp_path, kind):
    torch.manual_seed(0)
    cfg = ModelConfig(kind=kind, **SMALL)
    mae = MaskedAVAutoencoder(cfg).eval()
    ckpt = tmp_path / "last.ckpt"
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in mae.state_dict().items()},
            "global_step": 1,
            "emomae": {"model": cfg.to_dict(), "config": {"shard_sampling": {"frame_stride": 4}}},
        },
        ckpt,
    )
    encoder = load_encoder(export(ckpt, tmp_path / "export"))
    video, fbank = torch.randn(2, 4, 3, 32, 32), torch.randn(2, 64, 32)
    with torch.no_grad():
        want, got = mae.encoder.forward_features(video, fbank), encoder.forward_features(video, fbank)
    assert all(
        torch.equal(a, b)
        for a, b in zip(want.video_layers + want.audio_layers, got.video_layers + got.audio_layers)
    )
    assert torch.equal(want.fused_video, got.fused_video) and torch.equal(want.fused_audio, got.fused_audio)

    pooled = pool_tokens(got)
    assert FeatureFusionHead(64, 3, 3, num_outputs=6)(pooled).shape == (2, 6)
    assert AttentiveProbe(64, 6, num_heads=2)(fusion_tokens(got)).shape == (2, 6)

    model = FullFinetuneModel(encoder, FeatureFusionHead(64, 3, 3, 6)).train()
    groups = layer_decay_param_groups(
        model.encoder, model.head, cfg.depth, cfg.fusion_depth, 0.75, 0.05, model.encoder.no_weight_decay()
    )
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    # layer decay must reach the shared blocks too: the embeddings get the smallest scale, the head 1.0
    scales = sorted({round(g["lr_scale"], 6) for g in groups})
    assert len(scales) == cfg.depth + cfg.fusion_depth + 2 and scales[-1] == 1.0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([{**{k: v for k, v in g.items() if k != "names"}} for g in groups], lr=1e-3)
    torch.nn.functional.cross_entropy(model(video, fbank), torch.tensor([1, 4])).backward()
    opt.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(before[n], p)]
    assert any(n.startswith("encoder.") for n in changed) and any(n.startswith("head.") for n in changed)
