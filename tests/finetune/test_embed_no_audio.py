"""`emomae embed` on clips without audio (issue 13): a window flagged `audio_present` False is embedded
with its audio input blanked exactly as missing-modality evaluation blanks it
(`finetune.module.drop_modality(..., "video")`: zeros after normalisation), per window."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from data_pipelines.features import FbankConfig
from data_pipelines.stream import StreamConfig, eval_pipeline
from finetune.embed import embed_batch, embed_clip, window_embeddings
from finetune.module import drop_modality
from pretrain.encoders import AVEncoder, ModelConfig, normalize_video

REPO = Path(__file__).resolve().parents[2]
NO_AUDIO = frozenset({0, 3})  # sample indices written without audio
TINY = dict(num_frames=4, img_size=32, fbank_frames=32, mel_bins=32, width=64, heads=2, depth=4, fusion_depth=1,
            decoder_width=32, decoder_heads=1, decoder_depth=3, skip_layers=[2, 4])


def read_batch(out: Path, no_audio: frozenset[int]) -> dict:
    """The one eval batch of 5 real shard samples (4 frames of 32 x 32, a 32 x 32 fbank)."""
    sys.path.insert(0, str(REPO / "tests" / "data_pipelines"))
    from shard_factory import write_shard_dir

    urls = write_shard_dir(out, [5], no_audio=no_audio)
    cfg = StreamConfig(batch_size=5, num_frames=4, img_size=32, fbank=FbankConfig(fbank_frames=32, mel_bins=32))
    (batch,) = list(eval_pipeline(urls, cfg, rank=0, world_size=1))
    return batch


@pytest.fixture(scope="module")
def encoder() -> AVEncoder:
    torch.manual_seed(0)
    return AVEncoder(ModelConfig(**TINY)).eval()


def missing_modality_embedding(encoder: AVEncoder, video: torch.Tensor, fbank: torch.Tensor, modality: str):
    """One window's embedding with `drop_modality` applied to its normalised inputs."""
    _, fbank = drop_modality(normalize_video(video), fbank, modality)
    return window_embeddings(encoder, video, fbank)


def test_embedding_samples_without_audio_equals_the_video_only_missing_modality_embedding(encoder, tmp_path):
    batch = read_batch(tmp_path, NO_AUDIO)
    embedded = embed_batch(encoder, batch)
    assert embedded.shape == (5, 4 * TINY["width"])
    for i in range(5):
        modality = "video" if i in NO_AUDIO else "av"
        expected = missing_modality_embedding(encoder, batch["video"][i : i + 1], batch["fbank"][i : i + 1], modality)
        torch.testing.assert_close(embedded[i : i + 1], expected, msg=f"sample {i} ({modality})")


def test_embed_blanks_the_audio_of_each_flagged_window_whatever_fbank_it_carries(encoder, tmp_path):
    batch = read_batch(tmp_path, frozenset())  # every window has real audio; two are flagged here
    video, fbank = batch["video"], batch["fbank"]
    present = torch.tensor([True, False, True, False, True])
    per_window = torch.cat([missing_modality_embedding(encoder, video[i : i + 1], fbank[i : i + 1],
                                                       "av" if present[i] else "video") for i in range(5)])
    clip = embed_clip(encoder, video, fbank, present)
    torch.testing.assert_close(torch.from_numpy(clip), per_window.mean(0))
    # the blanking changes the embedding: without the flags the audio would have counted
    assert not torch.allclose(torch.from_numpy(embed_clip(encoder, video, fbank)), per_window.mean(0))
