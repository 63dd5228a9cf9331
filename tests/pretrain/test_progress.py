"""StepProgressBar: one bar over the optimizer steps of the whole fit, whose rate and time left stay
honest across the epoch boundaries of a resampled stream and after a resume. Real Lightning fits of a
one-layer model over epochs of 3 batches; the bar writes to a captured (non-terminal) stdout."""

from __future__ import annotations

import re
import time

import pytorch_lightning as pl
import torch
from torch import nn

from pretrain.callbacks import StepProgressBar

STEP_SECONDS = 0.02  # each step sleeps this long, so no honest rate can exceed 1 / STEP_SECONDS


class ShortEpochs(torch.utils.data.IterableDataset):
    """A stream with an epoch boundary every 3 batches, like AVDataModule's `epoch_length`."""

    def __iter__(self):
        for _ in range(3):
            yield torch.randn(4, 2)


class Sleepy(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        time.sleep(STEP_SECONDS)
        loss = self.model(batch).pow(2).mean()
        self.log("loss/total", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class BarWatch(pl.Callback):
    """What the bar looked like after every step: (n, total, initial, start time, description)."""

    def __init__(self) -> None:
        self.seen: list[tuple] = []

    def on_train_batch_end(self, trainer, *_):
        bar = trainer.progress_bar_callback.train_progress_bar
        self.seen.append((bar.n, bar.total, bar.initial, bar.start_t, bar.desc))


def fit(tmp_path, max_steps: int, ckpt_path=None) -> tuple[pl.Trainer, BarWatch]:
    watch = BarWatch()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[StepProgressBar(refresh_rate=1), watch],
        default_root_dir=tmp_path,
    )
    trainer.fit(
        Sleepy(),
        train_dataloaders=torch.utils.data.DataLoader(ShortEpochs(), batch_size=None),
        ckpt_path=ckpt_path,
    )
    return trainer, watch


def last_rate(printed: str) -> float:
    """Steps per second in the last rendering of the bar (tqdm writes `\\r`-separated frames)."""
    frames = [f for f in re.split(r"[\r\n]", printed) if f.startswith("pretrain")]
    match = re.search(r"([\d.]+)(it/s|s/it)", frames[-1])
    value = float(match.group(1))
    return value if match.group(2) == "it/s" else 1.0 / value


def test_one_bar_counts_every_step_across_epoch_boundaries_with_an_honest_rate(tmp_path, capsys):
    trainer, watch = fit(tmp_path, max_steps=10)
    assert trainer.current_epoch >= 3  # the 10 steps crossed three epoch boundaries
    assert [n for n, *_ in watch.seen] == list(range(1, 11))
    assert {(total, initial) for _, total, initial, *_ in watch.seen} == {(10, 0)}
    # one clock for the whole fit: Lightning's bar restarted it at every epoch
    assert len({start for *_, start, _ in watch.seen}) == 1
    assert {desc for *_, desc in watch.seen} == {"pretrain"}  # not "Epoch N"
    printed = capsys.readouterr().out
    assert "Epoch" not in printed and "Training" not in printed and "10/10" in printed
    assert 1.0 < last_rate(printed) <= 1.0 / STEP_SECONDS


def test_a_resumed_bar_starts_at_the_restored_step_and_rates_only_new_steps(tmp_path, capsys):
    first, _ = fit(tmp_path, max_steps=4)
    first.save_checkpoint(tmp_path / "four.ckpt")
    capsys.readouterr()
    trainer, watch = fit(tmp_path, max_steps=10, ckpt_path=tmp_path / "four.ckpt")
    assert trainer.global_step == 10
    assert [n for n, *_ in watch.seen] == list(range(5, 11))
    assert {(total, initial) for _, total, initial, *_ in watch.seen} == {(10, 4)}
    assert len({start for *_, start, _ in watch.seen}) == 1
    printed = capsys.readouterr().out
    assert "10/10" in printed and "Epoch" not in printed
    # 6 steps of >= STEP_SECONDS each: counting the 4 restored ones as well would read up to 10 / 6 faster
    assert 1.0 < last_rate(printed) <= 1.0 / STEP_SECONDS
