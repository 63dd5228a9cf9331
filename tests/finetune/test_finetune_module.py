"""FinetuneModule under a real Lightning Trainer: training mode, epoch selection on validation."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from tiny_model import tiny

from finetune.full_model import FullFinetuneModel
from finetune.heads import FeatureFusionHead
from finetune.module import FinetuneModule
from finetune.protocols import RecipeConfig
from pretrain.encoders import AVEncoder, ModelConfig, normalize_video

CFG = ModelConfig(**tiny(depth=2, decoder_depth=2, skip_layers=[2], drop_path=0.2))


def _batches(n: int, seed: int) -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        [
            {
                "video": torch.randint(0, 255, (4, 4, 3, 32, 32), dtype=torch.uint8, generator=gen),
                "fbank": torch.randn(4, 64, 32, generator=gen),
                "label": torch.arange(4) % 3,
                "clip_key": [f"s{seed}b{b}c{i}" for i in range(4)],
            }
            for b in range(n)
        ],
        batch_size=None,
    )


class RecordModes(pl.Callback):
    def __init__(self):
        self.modes: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.modes += [m.training for m in pl_module.model.modules()]


def test_finetuning_trains_an_encoder_loaded_in_eval_mode_in_train_mode_and_tracks_every_epoch(tmp_path):
    torch.manual_seed(0)
    encoder = AVEncoder(CFG).eval()  # as finetune.load_encoder returns it
    model = FullFinetuneModel(encoder, FeatureFusionHead(64, CFG.depth, CFG.depth, 3))
    recipe = RecipeConfig(epochs=2, warmup_epochs=0, mixup=0.0, cutmix=0.0, modality_dropout=0.5)
    module = FinetuneModule(
        model, "classification", ["a", "b", "c"], [], recipe, peak_lr=1e-3, steps_per_epoch=2
    )
    modes = RecordModes()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[modes],
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, train_dataloaders=_batches(2, 0), val_dataloaders=[_batches(1, 1), _batches(1, 2)])
    assert modes.modes and all(modes.modes), "drop path and dropout must be active in every training step"
    assert [h["epoch"] for h in module.tracker.history] == [0, 1]
    assert module.tracker.best_state is not None and 0.0 <= module.tracker.best_val["val"]["uar"] <= 1.0


def test_forward_modalities_equals_three_forwards_with_the_missing_input_zeroed():
    torch.manual_seed(0)
    for kind in ("separate", "unified"):
        cfg = ModelConfig(**{**CFG.to_dict(), "kind": kind, "drop_path": 0.0})
        model = FullFinetuneModel(AVEncoder(cfg), FeatureFusionHead(64, cfg.depth, cfg.depth, 3)).eval()
        video, fbank = torch.randn(5, 4, 3, 32, 32), torch.randn(5, 64, 32)
        with torch.no_grad():
            together = model.forward_modalities(video, fbank)
            for modality in ("av", "audio", "video"):
                torch.testing.assert_close(
                    together[modality], model(video, fbank, modality), rtol=1e-4, atol=1e-5
                )
        assert not torch.allclose(together["audio"], together["video"])


def test_unimodal_loss_trains_every_clip_on_all_three_inputs_and_logs_each_loss():
    torch.manual_seed(0)
    cfg = ModelConfig(**{**CFG.to_dict(), "drop_path": 0.0})
    model = FullFinetuneModel(AVEncoder(cfg), FeatureFusionHead(64, cfg.depth, cfg.depth, 3))
    recipe = RecipeConfig(
        epochs=1, warmup_epochs=0, mixup=0.0, cutmix=0.0, label_smoothing=0.0, unimodal_loss=0.5
    )
    module = FinetuneModule(
        model, "classification", ["a", "b", "c"], [], recipe, peak_lr=1e-3, steps_per_epoch=2
    )
    logged: dict[str, float] = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    batch = next(iter(_batches(1, 0)))
    loss = module.training_step(batch, 0)
    assert set(logged) == {"train/loss", "train/epoch_loss", "train/loss_audio", "train/loss_video"}
    assert logged["train/epoch_loss"] == logged["train/loss"]  # the step's share of the epoch mean
    with torch.no_grad():
        video, fbank = normalize_video(batch["video"]), batch["fbank"].float()
        av, audio, only_video = (
            torch.nn.functional.cross_entropy(model(video, fbank, m), batch["label"])
            for m in ("av", "audio", "video")
        )
    torch.testing.assert_close(logged["train/loss_video"], float(only_video), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss.detach(), (av + 0.5 * (audio + only_video)) / 2, rtol=1e-4, atol=1e-6)
