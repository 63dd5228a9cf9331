"""`emomae embed` on clips without audio (issue 13): a window flagged `audio_present` False is embedded
with its audio input blanked exactly as missing-modality evaluation blanks it
(`finetune.modality.drop_modality(..., "video")`: zeros after normalisation), per window."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from tiny_model import tiny

from data_pipelines.features import FbankConfig
from data_pipelines.stream import StreamConfig, eval_pipeline
from finetune.embed import embed_batch, embed_clip, window_embeddings
from finetune.modality import drop_modality
from pretrain.encoders import AVEncoder, ModelConfig, normalize_video

REPO = Path(__file__).resolve().parents[2]
NO_AUDIO = frozenset({0, 3})  # sample indices written without audio
TINY = tiny(fbank_frames=32, depth=4, decoder_heads=1, skip_layers=[2, 4])


def read_batch(out: Path, no_audio: frozenset[int]) -> dict:
    """The one eval batch of 5 real shard samples (4 frames of 32 x 32, a 32 x 32 fbank)."""
    sys.path.insert(0, str(REPO / "tests" / "data_pipelines"))
    from shard_factory import write_shard_dir

    urls = write_shard_dir(out, [5], no_audio=no_audio)
    cfg = StreamConfig(
        batch_size=5, num_frames=4, img_size=32, fbank=FbankConfig(fbank_frames=32, mel_bins=32)
    )
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
        expected = missing_modality_embedding(
            encoder, batch["video"][i : i + 1], batch["fbank"][i : i + 1], modality
        )
        torch.testing.assert_close(embedded[i : i + 1], expected, msg=f"sample {i} ({modality})")


def test_embed_blanks_the_audio_of_each_flagged_window_whatever_fbank_it_carries(encoder, tmp_path):
    batch = read_batch(tmp_path, frozenset())  # every window has real audio; two are flagged here
    video, fbank = batch["video"], batch["fbank"]
    present = torch.tensor([True, False, True, False, True])
    per_window = torch.cat(
        [
            missing_modality_embedding(
                encoder, video[i : i + 1], fbank[i : i + 1], "av" if present[i] else "video"
            )
            for i in range(5)
        ]
    )
    clip = embed_clip(encoder, video, fbank, present)
    torch.testing.assert_close(torch.from_numpy(clip), per_window.mean(0))
    # the blanking changes the embedding: without the flags the audio would have counted
    assert not torch.allclose(torch.from_numpy(embed_clip(encoder, video, fbank)), per_window.mean(0))


def test_emomae_embed_on_a_video_without_audio_blanks_its_audio_when_allowed(
    encoder, realdata_dir, tmp_path, capsys
):
    import av
    import numpy as np

    from finetune.embed import clip_inputs
    from finetune.embed import main as embed_main
    from finetune.export import input_spec, save_export

    source = realdata_dir / "voxceleb2_pcavs" / "00015.mp4"
    mute = tmp_path / "mute.mp4"  # the same video stream, no audio stream (copied, not re-encoded)
    with av.open(str(source)) as inp, av.open(str(mute), "w") as out:
        (video_in,) = inp.streams.video
        video_out = out.add_stream_from_template(video_in)
        for packet in inp.demux(video_in):
            if packet.dts is not None:
                packet.stream = video_out
                out.mux(packet)
    export = save_export(
        encoder, encoder.cfg.to_dict(), input_spec({}, encoder.cfg.to_dict()), tmp_path / "export", "test"
    )
    spec = input_spec({}, encoder.cfg.to_dict())

    assert embed_main([str(mute), "--encoder", str(export)]) == 1
    assert "--allow-missing-audio" in capsys.readouterr().err
    assert (
        embed_main(
            [
                str(mute),
                "--encoder",
                str(export),
                "--allow-missing-audio",
                "--out",
                str(tmp_path / "e.npy"),
                "--max-windows",
                "2",
            ]
        )
        == 0
    )
    assert "has no audio; its audio input is blanked" in capsys.readouterr().err
    video, fbank, has_audio = clip_inputs(source, spec, max_windows=2)  # the clip with its audio, same frames
    assert has_audio
    expected = missing_modality_embedding(encoder, video, fbank, "video").mean(0)
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), expected.numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(
        expected.numpy(), window_embeddings(encoder, video, fbank).mean(0).numpy(), atol=1e-4
    )
