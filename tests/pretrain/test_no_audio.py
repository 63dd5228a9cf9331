"""Pretraining on clips without audio (issue 13): batches read from real shards in which some samples
say `"audio_missing": true` (zero waveform). Such samples must leave the audio reconstruction and the
contrastive loss exactly as if they were not in the batch (on one rank and across gathered ranks),
a batch without any audio must give zero audio terms with clean gradients, and a batch where every
clip has audio must give today's loss bit for bit."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import launch
import pytest
import torch
from tiny_model import TINY

from data_pipelines.features import FbankConfig
from data_pipelines.stream import StreamConfig, eval_pipeline
from pretrain.encoders import ModelConfig, normalize_video
from pretrain.losses import initial_logit_scale
from pretrain.mae import MaskedAVAutoencoder, ObjectiveConfig
from pretrain.masking import Mask
from pretrain.objective import PretrainObjective
from pretrain.pooling import token_mean

REPO = Path(__file__).resolve().parents[2]
NO_AUDIO = frozenset({1, 4})  # sample indices written without audio
AUDIO_TERMS = ("recon_audio", "contrastive", "contrastive_l2", "contrastive_l3", "contrastive_l4")


def shard_factory():
    sys.path.insert(0, str(REPO / "tests" / "data_pipelines"))
    import shard_factory

    return shard_factory


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> dict:
    """One eval batch of 6 samples (4 frames of 32 x 32, a 32 x 32 fbank: the TINY model's input),
    samples 1 and 4 without audio."""
    urls = shard_factory().write_shard_dir(tmp_path_factory.mktemp("no_audio"), [6], no_audio=NO_AUDIO)
    cfg = StreamConfig(
        batch_size=6, num_frames=4, img_size=32, fbank=FbankConfig(fbank_frames=32, mel_bins=32)
    )
    (batch,) = list(eval_pipeline(urls, cfg, rank=0, world_size=1))
    assert batch["audio_present"].tolist() == [i not in NO_AUDIO for i in range(6)]
    return batch


def tiny_autoencoder() -> MaskedAVAutoencoder:
    torch.manual_seed(0)
    # contrastive weight 1 so the contrastive terms weigh in the total; gathered negatives as in training
    objective = ObjectiveConfig(contrastive_weight=1.0, gather_negatives=True, learnable_temperature=True)
    return MaskedAVAutoencoder(ModelConfig(**TINY), objective).eval()


def rows_of(mask: Mask, rows: torch.Tensor) -> Mask:
    return Mask(mask.ids_keep[rows], mask.ids_masked[rows], mask.ids_restore[rows], mask.mask[rows])


def masks_and_kept(model: MaskedAVAutoencoder, batch: dict):
    """Masks of the whole batch, the same masks for the sub-batch of clips with audio, its row indices."""
    masks = model.random_masking(6, torch.device("cpu"), torch.Generator().manual_seed(1))
    kept = batch["audio_present"].nonzero().squeeze(1)
    return masks, tuple(rows_of(m, kept) for m in masks), kept


def test_audio_terms_equal_those_of_the_batch_without_the_clips_that_have_no_audio(batch):
    model = tiny_autoencoder()
    masks, sub_masks, kept = masks_and_kept(model, batch)
    video, fbank, present = batch["video"], batch["fbank"], batch["audio_present"]
    with torch.no_grad():
        flagged = model(video, fbank, masks=masks, audio_present=present).terms
        sub = model(video[kept], fbank[kept], masks=sub_masks).terms
        unflagged = model(video, fbank, masks=masks).terms
    for name in AUDIO_TERMS:
        torch.testing.assert_close(flagged[name], sub[name], msg=name)
        # the clips without audio would have changed it: the comparison can tell
        assert not torch.allclose(unflagged[name], sub[name]), name
    # the video is there: its reconstruction still covers every clip
    assert torch.equal(flagged["recon_video"], unflagged["recon_video"])


def test_clips_without_audio_are_neither_anchors_nor_negatives_in_the_contrastive_logits(batch):
    model = tiny_autoencoder()
    masks, sub_masks, kept = masks_and_kept(model, batch)
    video, fbank, present = normalize_video(batch["video"]), batch["fbank"], batch["audio_present"]
    with torch.no_grad():
        flagged = model.contrastive_logits(model.forward_encoder(video, fbank, *masks), present)
        sub = model.contrastive_logits(model.forward_encoder(video[kept], fbank[kept], *sub_masks))
    assert flagged.keys() == sub.keys()
    for name, pair in flagged.items():
        for ours, theirs in zip(pair, sub[name], strict=True):
            torch.testing.assert_close(ours[kept][:, kept], theirs, msg=name)
            assert torch.isneginf(ours[:, ~present]).all(), f"{name}: a clip without audio is a candidate"


def test_a_batch_where_every_clip_has_audio_gives_the_unflagged_loss_bit_for_bit(batch):
    model = tiny_autoencoder()
    masks, _, _ = masks_and_kept(model, batch)
    everywhere = torch.ones(6, dtype=torch.bool)
    with torch.no_grad():
        flagged = model(batch["video"], batch["fbank"], masks=masks, audio_present=everywhere)
        unflagged = model(batch["video"], batch["fbank"], masks=masks)
    assert torch.equal(flagged.loss, unflagged.loss)
    for name, value in unflagged.terms.items():
        assert torch.equal(flagged.terms[name], value), name


def test_a_batch_without_any_audio_gives_zero_audio_terms_and_finite_gradients(batch):
    model = tiny_autoencoder().train()
    masks, _, _ = masks_and_kept(model, batch)
    out = model(batch["video"], batch["fbank"], masks=masks, audio_present=torch.zeros(6, dtype=torch.bool))
    for name in AUDIO_TERMS:
        assert out.terms[name].item() == 0.0, name
    assert torch.isfinite(out.loss) and out.loss.item() == pytest.approx(out.terms["recon_video"].item())
    out.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), "a NaN or missing gradient"
    # nothing pulls on the audio decoder or the temperature; the video objective still trains
    assert grads["audio_decoder.head.weight"].abs().max() == 0
    assert grads["temperature.logit_scale"] == 0
    assert grads["video_decoder.head.weight"].abs().max() > 0


# ---------------------------------------------------------------- across ranks (gathered negatives)

WORLD, ROWS, LEVELS, DIM = 2, 3, 2, 8
# rank 0's clips all have audio, rank 1 has two without: rank 0's loss must still leave those out
GLOBAL_PRESENT = torch.tensor([True, True, True, False, True, False])


def global_features() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(WORLD * ROWS, LEVELS, 4, DIM, generator=g), torch.randn(
        WORLD * ROWS, LEVELS, 5, DIM, generator=g
    )


def contrastive(video: torch.Tensor, audio: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
    """The objective's contrastive sum over LEVELS levels of (B, LEVELS, N, D) tokens, mean-pooled as
    the model's `predict` pools them."""
    objective = PretrainObjective(ObjectiveConfig(gather_negatives=True), ModelConfig(**TINY))
    pooled = [token_mean([x[:, k] for k in range(LEVELS)]) for x in (video, audio)]
    levels = list(range(1, LEVELS + 1))
    return objective.contrastive_terms(*pooled, levels, initial_logit_scale(0.07), present)["contrastive"]


def _rank(rank: int) -> dict:
    rows = slice(rank * ROWS, (rank + 1) * ROWS)
    video, audio = (x[rows].clone().requires_grad_() for x in global_features())
    loss = contrastive(video, audio, GLOBAL_PRESENT[rows])
    loss.backward()
    return {"loss": loss, "video_grad": video.grad, "audio_grad": audio.grad}


def test_gathered_ranks_leave_every_rank_s_clips_without_audio_out_of_the_contrastive_loss(tmp_path):
    ranks = launch.gloo_ranks(_rank, WORLD, tmp_path)

    video, audio = global_features()
    kept = GLOBAL_PRESENT.nonzero().squeeze(1)
    sub_video, sub_audio = video[kept].requires_grad_(), audio[kept].requires_grad_()
    loss = contrastive(sub_video, sub_audio, None)
    loss.backward()
    # the mean of the rank losses is the single-process loss of the clips with audio alone
    torch.testing.assert_close(sum(r["loss"] for r in ranks) / WORLD, loss.detach())
    # each rank's gradients are WORLD x the single-process ones (DDP averages them back); none reach
    # the clips without audio
    video_grad = torch.cat([r["video_grad"] for r in ranks]) / WORLD
    audio_grad = torch.cat([r["audio_grad"] for r in ranks]) / WORLD
    torch.testing.assert_close(video_grad[kept], sub_video.grad)
    torch.testing.assert_close(audio_grad[kept], sub_audio.grad)
    assert video_grad[~GLOBAL_PRESENT].abs().max() == 0 and audio_grad[~GLOBAL_PRESENT].abs().max() == 0


# ---------------------------------------------------------------- `emomae pretrain` on such shards


def test_pretraining_runs_on_shards_with_clips_without_audio_and_logs_how_many_had_audio(tmp_path):
    from emomae.cli import main as emomae

    # the demo model's input: 8 frames of 64 x 64, 1.28 s of audio; 5 of 16 clips without audio
    no_audio = frozenset({0, 3, 5, 10, 11})
    shard_factory().write_shard_dir(
        tmp_path / "shards", [8, 8], num_frames=8, size=64, seconds=1.28, no_audio=no_audio
    )
    run_dir = tmp_path / "run"
    overrides = {
        "data.shards": tmp_path / "shards",
        "run_dir": run_dir,
        "data.batch_size": 4,
        "data.num_workers": 0,
        "data.shuffle_buffer": 16,
        "trainer.max_steps": 4,
        "trainer.log_every_n_steps": 1,
        "trainer.ckpt_every_n_steps": 4,
        "trainer.progress_bar": "false",
        "optim.warmup_steps": 1,
        "logging.logger": "[csv]",
        "logging.image_every_n_steps": 100,
    }
    demo = str(REPO / "configs" / "pretrain" / "demo.yaml")
    assert emomae(["pretrain", demo, *[f"{k}={v}" for k, v in overrides.items()]]) == 0
    with open(run_dir / "csv" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("loss/total")]
    assert len(rows) == 4
    counts = [float(r["train/audio_samples"]) for r in rows]
    assert all(c.is_integer() and 0 <= c <= 4 for c in counts) and min(counts) < 4, counts
    for r in rows:
        assert all(math.isfinite(float(r[f"loss/{name}"])) for name in ("total", *AUDIO_TERMS)), r
