"""The frozen text encoder: bundled model offline, never trainable, each caption embedded once, an
on-disk cache that is reused and refuses another model's embeddings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pretrain.text import (
    DEFAULT_TEXT_ENCODER,
    FrozenTextEncoder,
    TextHeads,
    pool_branches,
    resolve_text_encoder,
)


@pytest.fixture(scope="module")
def encoder() -> FrozenTextEncoder:
    return FrozenTextEncoder(DEFAULT_TEXT_ENCODER)


def test_bundled_name_resolves_to_a_local_model_folder():
    path = Path(resolve_text_encoder(DEFAULT_TEXT_ENCODER))
    assert (path / "modules.json").is_file() and (path / "model.safetensors").is_file()


def test_text_encoder_is_frozen_and_invisible_to_module_trees(encoder):
    assert not encoder.model.training
    assert all(not p.requires_grad for p in encoder.model.parameters())
    holder = nn.Module()
    holder.text = encoder  # what a LightningModule does with it
    assert list(holder.parameters()) == [] and holder.state_dict() == {}


def test_embeddings_are_semantic_and_cached_once_per_distinct_text(encoder):
    texts = ["a person speaking angrily", "a person speaking happily", "a person speaking angrily"]
    before = len(encoder)
    emb = encoder.encode(texts)
    assert emb.shape == (3, encoder.dim) and emb.dtype == torch.float32 and not emb.requires_grad
    assert len(encoder) - before == 2
    assert torch.equal(emb[0], emb[2])
    angry2 = encoder.encode(["someone shouting in anger"])[0]
    cos = torch.nn.functional.cosine_similarity
    assert cos(angry2, emb[0], dim=0) > cos(angry2, emb[1], dim=0)


def test_disk_cache_is_reused_without_loading_the_model(encoder, tmp_path):
    texts = ["a calm voice", "a trembling, fearful face"]
    first = FrozenTextEncoder(DEFAULT_TEXT_ENCODER, cache_dir=tmp_path)
    first._model = encoder.model  # share the loaded weights; loading twice only costs time
    expected = first.encode(texts)
    first.flush()
    assert first.cache_file is not None and first.cache_file.is_file()

    second = FrozenTextEncoder(DEFAULT_TEXT_ENCODER, cache_dir=tmp_path)
    assert torch.equal(second.encode(texts), expected)
    assert second._model is None  # served from disk


def test_disk_cache_of_another_model_is_refused(encoder, tmp_path):
    cache = FrozenTextEncoder(DEFAULT_TEXT_ENCODER, cache_dir=tmp_path)
    cache._model = encoder.model
    cache.encode(["x"])
    cache.flush()
    cache.cache_file.rename(tmp_path / "text-other__model.safetensors")
    with pytest.raises(RuntimeError, match="written for text encoder"):
        FrozenTextEncoder("other/model", cache_dir=tmp_path)


def test_text_heads_project_every_branch_to_unit_vectors():
    heads = TextHeads(width=16, text_dim=8)
    pooled = pool_branches(
        torch.randn(3, 5, 16), torch.randn(3, 4, 16), torch.randn(3, 5, 16), torch.randn(3, 4, 16)
    )
    assert pooled["fused"].shape == (3, 32)
    out = heads(pooled)
    assert set(out) == {"video", "audio", "fused"}
    for z in out.values():
        assert z.shape == (3, 8)
        torch.testing.assert_close(z.norm(dim=-1), torch.ones(3))
    assert heads.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
