"""EMA callback: after real Lightning optimizer steps the average equals one computed by hand from the
weights of every step (fp32 weights, bf16 weights as DeepSpeed's bf16 module has them, gradient
accumulation), a resume continues the stored average whichever order the strategy restores in, and
ZeRO-3 + EMA is refused when the config is checked."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import SingleDeviceStrategy
from torch import nn

from emomae.cli import main as emomae
from emomae.config import ConfigError
from pretrain.callbacks import EMA
from pretrain.train import load_pretrain_config

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "configs" / "pretrain" / "demo.yaml")
DECAY = 0.7


class Regression(pl.LightningModule):
    """A `.model` as PretrainModule has, with float and integer buffers (BatchNorm) besides weights."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return (self.model(x).squeeze(-1).float() - y.float()).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


class Weights(pl.Callback):
    """The model's state after every optimizer step, as the EMA sees it (before the fp32 cast)."""

    def __init__(self) -> None:
        self.after_step: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_start(self, trainer, *_):
        self.step_before = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, *_):
        if trainer.global_step != self.step_before:  # an optimizer step ended this batch
            self.after_step[trainer.global_step] = {
                k: v.detach().clone() for k, v in pl_module.model.state_dict().items()
            }


class RestoreAfterSetup(SingleDeviceStrategy):
    """DeepSpeed's order: the checkpoint (callbacks included) is restored after setup and on_fit_start."""

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True


def data(n: int = 12) -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n * 4, 3, generator=gen)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(-1)), batch_size=4)


def fit(tmp_path, max_steps: int, ema: EMA, ckpt_path=None, strategy="auto", **trainer_kwargs) -> Weights:
    weights = Weights()
    trainer = pl.Trainer(
        accelerator="cpu",
        strategy=strategy,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ema, weights],
        default_root_dir=tmp_path,
        **trainer_kwargs,
    )
    trainer.fit(Regression(), train_dataloaders=data(), ckpt_path=ckpt_path)
    trainer.save_checkpoint(tmp_path / f"step{max_steps}.ckpt")
    return weights


def by_hand(weights: dict[int, dict[str, torch.Tensor]], start: dict[str, torch.Tensor] | None = None):
    """The average in float64: the first step copies the weights (unless resuming from `start`), then
    ema = DECAY * ema + (1 - DECAY) * w; integer entries are copied."""
    ema = None if start is None else {k: v.double() if v.is_floating_point() else v for k, v in start.items()}
    for step in sorted(weights):
        w = weights[step]
        if ema is None:
            ema = {k: v.double() if v.is_floating_point() else v for k, v in w.items()}
            continue
        ema = {
            k: DECAY * ema[k] + (1 - DECAY) * v.double() if v.is_floating_point() else v for k, v in w.items()
        }
    return ema


def assert_equal_average(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, value in want.items():
        if value.is_floating_point():
            assert got[name].dtype == torch.float32, name  # whatever the weights' dtype
            torch.testing.assert_close(got[name].double(), value, rtol=1e-6, atol=1e-7, msg=name)
        else:
            assert torch.equal(got[name], value), name


def test_ema_after_a_few_steps_equals_the_hand_computed_average_and_is_checkpointed(tmp_path):
    ema = EMA(DECAY)
    weights = fit(tmp_path, max_steps=5, ema=ema, accumulate_grad_batches=2)
    assert sorted(weights.after_step) == [1, 2, 3, 4, 5]  # one update per optimizer step, not per batch
    want = by_hand(weights.after_step)
    assert_equal_average(ema.ema, want)
    assert not torch.equal(want["0.weight"].float(), weights.after_step[5]["0.weight"])  # it does lag
    stored = torch.load(tmp_path / "step5.ckpt", weights_only=True)["ema_state_dict"]
    assert_equal_average({k.removeprefix("model."): v for k, v in stored.items()}, want)


def test_ema_of_bf16_weights_is_an_fp32_average(tmp_path):
    # bf16-true makes the module bf16, as DeepSpeed's bf16 engine does under ZeRO-2; a bf16 average
    # would round every update away
    ema = EMA(DECAY)
    weights = fit(tmp_path, max_steps=4, ema=ema, precision="bf16-true")
    assert weights.after_step[4]["0.weight"].dtype == torch.bfloat16
    assert_equal_average(ema.ema, by_hand(weights.after_step))


@pytest.mark.parametrize("strategy", ["auto", "after-setup"])
def test_resume_continues_the_stored_average_whichever_order_the_strategy_restores_in(tmp_path, strategy):
    fit(tmp_path, max_steps=3, ema=EMA(DECAY))
    stored = torch.load(tmp_path / "step3.ckpt", weights_only=True)["ema_state_dict"]
    ema = EMA(DECAY)
    chosen = RestoreAfterSetup(torch.device("cpu")) if strategy == "after-setup" else "auto"
    weights = fit(tmp_path, max_steps=5, ema=ema, ckpt_path=tmp_path / "step3.ckpt", strategy=chosen)
    assert sorted(weights.after_step) == [4, 5]
    start = {k.removeprefix("model."): v for k, v in stored.items()}
    assert_equal_average(ema.ema, by_hand(weights.after_step, start=start))


def tiny(tmp_path) -> list[str]:
    return [
        f"data.shards={tmp_path}",
        f"run_dir={tmp_path / 'run'}",
        "trainer.max_steps=6",
        "optim.warmup_steps=2",
    ]


def test_ema_with_zero3_is_refused_at_config_check_naming_the_key_and_the_alternatives(tmp_path, capsys):
    with pytest.raises(ConfigError) as err:
        load_pretrain_config(DEMO, [*tiny(tmp_path), "optim.ema=true", "trainer.strategy=deepspeed_stage_3"])
    for named in (
        "optim.ema=true",
        "ZeRO-3",
        "trainer.strategy=deepspeed_stage_3",
        "deepspeed_stage_2",
        "ddp",
    ):
        assert named in str(err.value), named
    # the CLI reports it as a config error, before anything runs (on CPU too: it comes before the CUDA check)
    assert (
        emomae(["pretrain", DEMO, *tiny(tmp_path), "optim.ema=true", "trainer.strategy=deepspeed_stage_3"])
        == 2
    )
    assert "optim.ema=true does not work with ZeRO-3" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_zero3_yaml_behind_the_stage2_strategy_is_refused_too(tmp_path):
    yaml = tmp_path / "my_zero.yaml"
    yaml.write_text("zero_optimization:\n  stage: 3\n")
    with pytest.raises(ConfigError, match=r"optim\.ema=true does not work with ZeRO-3.*my_zero\.yaml"):
        load_pretrain_config(
            DEMO,
            [
                *tiny(tmp_path),
                "optim.ema=true",
                "trainer.strategy=deepspeed_stage_2",
                f"trainer.deepspeed_config={yaml}",
            ],
        )


def test_ema_with_zero2_or_zero3_without_ema_pass_the_ema_check(tmp_path):
    for overrides in (
        ["optim.ema=true", "trainer.strategy=deepspeed_stage_2"],
        ["optim.ema=false", "trainer.strategy=deepspeed_stage_3"],
    ):
        try:
            load_pretrain_config(DEMO, [*tiny(tmp_path), *overrides])
        except ConfigError as err:  # on a machine without CUDA, DeepSpeed itself is refused
            assert "needs CUDA" in str(err) and "optim.ema" not in str(err), overrides
