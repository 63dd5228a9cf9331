"""Side concerns of pretraining as Lightning callbacks: reconstruction pictures, EMA weights,
the final / on-signal checkpoint, memory logging and a step-based progress bar with ETA."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, TQDMProgressBar
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_info


class StepCallback(Callback):
    """A callback that acts after optimizer steps, not after the micro-batches of gradient accumulation.

    `trainer.global_step` (public) counts optimizer steps: it moves during a batch exactly when that
    batch ends in an optimizer step, which is what Lightning's private `fit_loop._should_accumulate()`
    tells. Subclasses that define `on_train_batch_start` call this one."""

    _step_at_batch_start: int | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        self._step_at_batch_start = trainer.global_step

    def stepped(self, trainer: pl.Trainer) -> bool:
        """In `on_train_batch_end`: whether this batch ended with an optimizer step."""
        return self._step_at_batch_start is not None and trainer.global_step != self._step_at_batch_start


class LastCheckpoint(StepCallback):
    """Keep `last.ckpt` current when training ends early or late: at the end of training, and when the
    job is told to stop, after the step in flight: SIGTERM (preemption, scancel, the time limit) or
    SIGUSR1 (SLURM's `--signal=USR1@<s>` warning; under SLURM the job then requeues itself with
    `scontrol requeue` and resumes from this checkpoint). A preempted run loses at most one step, and
    a finished run's last.ckpt is its final step even when max_steps is not a multiple of the interval.

    The signal handlers only raise a flag. Lightning's own handlers run collectives inside the handler
    (a broadcast on SIGTERM, save + barrier on SIGUSR1): a rank that takes the signal while its peer is
    blocked in a gradient all-reduce waits on a collective that never comes, and both hang until the
    scheduler kills them, with no checkpoint (seen on a 2-rank gloo job). So these handlers replace
    Lightning's during fit, and after every optimizer step the ranks agree on the flag (a MAX
    all-reduce of one integer): all of them save at the same step and stop together.
    """

    def __init__(self, ckpt_path: str | Path) -> None:
        self.ckpt_path = Path(ckpt_path)
        self.received: int | None = None  # signal number, once the ranks agreed that one arrived
        self._local = 0  # raised by this process's handler only
        self._previous: dict[int, Any] = {}
        self._saved_step = -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning registered its handlers before fit and restores the original ones at teardown.
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
            if signum is not None:
                self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._local = max(self._local, int(signum))

    def _agreed_signal(self, trainer: pl.Trainer) -> int:
        flag = self._local
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            t = torch.tensor([flag], dtype=torch.int64, device=trainer.strategy.root_device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = int(t.item())
        return flag

    def _save(self, trainer: pl.Trainer, why: str) -> None:
        if self._saved_step == trainer.global_step:
            return
        rank_zero_info(f"{why}: saving {self.ckpt_path} at step {trainer.global_step}")
        trainer.save_checkpoint(self.ckpt_path)
        self._saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        if self.received is not None or not self.stepped(trainer):
            return
        signum = self._agreed_signal(trainer)  # every rank runs this collective at the same step
        if not signum:
            return
        self.received = signum
        self._save(trainer, f"signal {signal.Signals(signum).name}")
        if (
            signum == getattr(signal, "SIGUSR1", None)
            and trainer.is_global_zero
            and SLURMEnvironment.detect()
        ):
            _slurm_requeue()
        trainer.should_stop = True

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # SIGTERM can land after this callback's on_train_batch_end but before Lightning checks the
        # flag and raises; the step is complete by then, so save it on the way out
        if isinstance(exception, SIGTERMException):
            self.received = self.received or signal.SIGTERM
            self._save(trainer, "signal SIGTERM")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ckpt_cb = trainer.checkpoint_callback
        # private ModelCheckpoint attribute (no public one says at which step it last saved): it spares a
        # second save of the final step when ModelCheckpoint just wrote it; if a Lightning release drops
        # it, getattr gives None and last.ckpt is saved once more, still correct (pyproject pins Lightning)
        if getattr(ckpt_cb, "_last_global_step_saved", None) != trainer.global_step:
            self._save(trainer, "end of training")
        for signum, handler in self._previous.items():
            if handler is not None:
                signal.signal(signum, handler)
        self._previous = {}


def _slurm_requeue() -> None:
    """Put this SLURM job back in the queue; it keeps its id, so run directory and W&B run carry over."""
    import subprocess

    job = os.environ.get("SLURM_JOB_ID", "")
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode:
        rank_zero_info(f"scontrol requeue {job} failed ({result.stderr.strip()}); resubmit the job to resume")
    else:
        rank_zero_info(f"requeued SLURM job {job}; it resumes from last.ckpt")


class EMA(StepCallback):
    """Exponential moving average of the model's weights, updated after every optimizer step and stored
    in checkpoints as `checkpoint["ema_state_dict"]` with the same keys as `checkpoint["state_dict"]`
    (`emomae export --ema` takes it; under DeepSpeed it travels in the client state).

    Decay as timm's ModelEmaV3 without warm-up: the first update copies the weights, every later one
    is `ema = decay * ema + (1 - decay) * w`. The average is kept in fp32 whatever the weights' dtype:
    DeepSpeed with bf16 makes the module's parameters bf16 copies of its fp32 master partitions, and a
    bf16 average would never move (a step of 1 - 0.9998 = 2e-4 is below bf16's resolution of 4e-3).
    Under ZeRO-2 every rank holds whole parameters after each step, so every rank averages the same
    tensors. Under ZeRO-3 a rank holds a shard only: the config check refuses that combination
    (pretrain/train.py) and `on_fit_start` refuses it again for callers that build the Trainer themselves.
    """

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.ema: dict[str, torch.Tensor] | None = None  # state-dict name (without "model.") -> average
        self._pending: dict | None = None  # a stored average read before on_fit_start
        self._fitting = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if getattr(trainer.strategy, "zero_stage_3", False):
            raise RuntimeError(
                "EMA (optim.ema=true) cannot average ZeRO-3 parameters: each rank holds only a shard of them; "
                "use trainer.strategy=deepspeed_stage_2 or ddp"
            )
        self.start(pl_module.model)
        self._fitting = True
        if self._pending is not None:  # on_load_checkpoint ran first (DDP and single-device resume)
            self._restore(self._pending)
            self._pending = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._fitting = False

    def start(self, model: torch.nn.Module) -> None:
        """Begin the average at the current weights of `model` (floating-point entries in fp32)."""
        self.ema = {
            k: v.detach().float().clone() if v.is_floating_point() else v.detach().clone()
            for k, v in model.state_dict().items()
        }

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """Fold the current weights of `model` into the average; `step` is the optimizer step just taken."""
        decay = self.decay if step > 1 else 0.0
        averaged, current = [], []
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                averaged.append(self.ema[name])
                current.append(value.float())
            else:
                self.ema[name].copy_(value)
        if averaged:
            torch._foreach_lerp_(averaged, current, 1.0 - decay)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        if self.stepped(trainer):
            self.update(pl_module.model, trainer.global_step)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict
    ) -> None:
        if self.ema is not None:
            checkpoint["ema_state_dict"] = {f"model.{k}": v for k, v in self.ema.items()}

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict
    ) -> None:
        stored = checkpoint.get("ema_state_dict")
        if stored is None:
            return
        stored = {k.removeprefix("model."): v for k, v in stored.items()}
        if self._fitting:  # DeepSpeed restores callbacks after setup, so after on_fit_start
            self._restore(stored)
        else:
            self._pending = stored

    def _restore(self, stored: dict[str, torch.Tensor]) -> None:
        missing, unexpected = sorted(set(self.ema) - set(stored)), sorted(set(stored) - set(self.ema))
        if missing or unexpected:
            raise KeyError(
                f"checkpoint['ema_state_dict'] does not fit the model: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}"
            )
        for name, value in stored.items():
            self.ema[name].copy_(value)


class MemoryMonitor(Callback):
    """Logs peak memory every `log_every_n_steps`: CUDA allocator peak on GPU, process RSS on CPU.
    Through `pl_module.log`, so Lightning's logger connector keeps the `log_every_n_steps` cadence."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        device = trainer.strategy.root_device
        if device.type == "cuda":
            name, value = "train/gpu_mem_peak_gib", torch.cuda.max_memory_allocated(device) / 2**30
        else:
            name, value = "train/rss_peak_gib", peak_rss_bytes() / 2**30
        pl_module.log(name, value, on_step=True, on_epoch=False)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux/macOS)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if os.uname().sysname == "Darwin" else peak * 1024


class StepProgressBar(TQDMProgressBar):
    """One TQDM bar over optimizer steps up to `max_steps` for the whole fit, so a streamed (length-less)
    dataset still gets a total, a rate and the time left.

    Lightning resets its bar at every epoch start (and names it `Epoch N`), and the resampled stream has
    an epoch boundary every `data.epoch_length` batches: tqdm's clock restarted there while the count
    jumped to the global step, so the rate read millions of steps per second and the time left zero.
    Here the bar is made once, when training starts, and epoch starts leave it alone. A resumed run
    starts it at the restored step as tqdm's `initial`, so the rate counts the steps this process took."""

    @property
    def train_description(self) -> str:
        return "pretrain"

    def on_train_start(self, trainer: pl.Trainer, *_: Any) -> None:
        bar = self.train_progress_bar = self.init_train_tqdm()
        if bar.disable:
            return
        bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else None)
        bar.initial = bar.n = bar.last_print_n = trainer.global_step
        if bar.n:
            bar.refresh()

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        pass  # an epoch of the resampled stream is no unit of progress: the bar runs on

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        bar, step = self.train_progress_bar, trainer.global_step
        if bar is None or not self.is_enabled or bar.disable:
            return
        if step % self.refresh_rate == 0 or step == (bar.total or 0):
            bar.n = step
            bar.refresh()
            bar.set_postfix(self.get_metrics(trainer, pl_module))


class ReconstructionImages(StepCallback):
    """Every `every_n_steps`: original vs masked vs reconstructed frames and fbank for the first
    `num_samples` clips of the batch, as a PNG under `<out_dir>/step<N>.png`, also sent to every
    logger that takes images (W&B, TensorBoard)."""

    def __init__(
        self, out_dir: str | Path, every_n_steps: int, num_samples: int = 2, num_frames: int = 4
    ) -> None:
        self.out_dir = Path(out_dir)
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.num_frames = num_frames
        self.saved: list[Path] = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, *_: Any
    ) -> None:
        step = trainer.global_step
        if self.every_n_steps <= 0 or step % self.every_n_steps or not self.stepped(trainer):
            return
        sample = {k: batch[k][: self.num_samples] for k in ("video", "fbank")}
        # every rank runs the forward (ZeRO-3 needs all ranks to gather sharded weights); rank 0 draws
        recon = pl_module.reconstruct(sample["video"], sample["fbank"])
        if not trainer.is_global_zero:
            return
        fig = reconstruction_figure(recon, num_frames=self.num_frames, title=f"step {step}")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"step{step:07d}.png"
        fig.savefig(path, dpi=80)
        self.saved.append(path)
        _log_image(trainer, path, fig, step)
        import matplotlib.pyplot as plt

        plt.close(fig)


def _log_image(trainer: pl.Trainer, path: Path, fig: Any, step: int) -> None:
    from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key="reconstruction", images=[str(path)], step=step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_figure("reconstruction", fig, global_step=step, close=False)


def reconstruction_figure(recon: dict[str, torch.Tensor], num_frames: int = 4, title: str = ""):
    """Matplotlib figure, one row per clip: `num_frames` frames as original | masked | reconstructed,
    then the fbank the same three ways.

    recon: `video` (B, T, 3, H, W) in [0, 1], `video_masked` and `video_recon` likewise (masked
    regions greyed / masked regions predicted, visible ones copied), `fbank`, `fbank_masked`,
    `fbank_recon` (B, F, M).
    """
    import matplotlib

    matplotlib.use("Agg")  # headless nodes; never opens a window
    import matplotlib.pyplot as plt

    video = recon["video"].float().cpu()
    b, t = video.shape[:2]
    frames = torch.linspace(0, t - 1, min(num_frames, t)).round().long()
    cols = 3 * len(frames) + 3
    fig, axes = plt.subplots(b, cols, figsize=(1.3 * cols, 1.5 * b), squeeze=False)
    for i in range(b):
        col = 0
        for key in ("video", "video_masked", "video_recon"):
            for f in frames:
                img = recon[key][i, f].float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
                axes[i, col].imshow(img)
                if i == 0:
                    axes[i, col].set_title(
                        f"{key.removeprefix('video_') if key != 'video' else 'orig'} t{int(f)}", fontsize=6
                    )
                col += 1
        for key in ("fbank", "fbank_masked", "fbank_recon"):
            # time on x, mel bins upwards, as spectrograms are read
            axes[i, col].imshow(
                recon[key][i].float().cpu().T.numpy(), origin="lower", aspect="auto", cmap="magma"
            )
            if i == 0:
                axes[i, col].set_title(key, fontsize=6)
            col += 1
    for ax in axes.flat:
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig
