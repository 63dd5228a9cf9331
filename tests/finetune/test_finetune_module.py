"""FinetuneModule under a real Lightning Trainer: training mode, epoch selection on validation."""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from finetune.heads import FeatureFusionHead
from finetune.module import FinetuneModule, FullFinetuneModel
from finetune.protocols import RecipeConfig
from pretrain.encoders import AVEncoder, ModelConfig

CFG = ModelConfig(num_frames=4, img_size=32, fbank_frames=64, mel_bins=32, width=64, heads=2, depth=2, fusion_depth=1,
                  decoder_width=32, decoder_heads=2, decoder_depth=2, skip_layers=[2], drop_path=0.2)


def _batches(n: int, seed: int) -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader([{"video": torch.randint(0, 255, (4, 4, 3, 32, 32), dtype=torch.uint8, generator=gen),
             "fbank": torch.randn(4, 64, 32, generator=gen), "label": torch.arange(4) % 3,
             "clip_key": [f"s{seed}b{b}c{i}" for i in range(4)]} for b in range(n)], batch_size=None)


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
    module = FinetuneModule(model, "classification", ["a", "b", "c"], [], recipe, peak_lr=1e-3, steps_per_epoch=2)
    modes = RecordModes()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[modes], default_root_dir=str(tmp_path))
    trainer.fit(module, train_dataloaders=_batches(2, 0), val_dataloaders=[_batches(1, 1), _batches(1, 2)])
    assert modes.modes and all(modes.modes), "drop path and dropout must be active in every training step"
    assert [h["epoch"] for h in module.tracker.history] == [0, 1]
    assert module.tracker.best_state is not None and 0.0 <= module.tracker.best_val["val"]["uar"] <= 1.0
