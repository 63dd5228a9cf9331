"""`emomae export --ema`: the EMA weights of a real tiny `emomae pretrain` run (Lightning file) and of a
real DeepSpeed ZeRO-2 bf16 engine's checkpoint directory (the average in the client state, where
Lightning's DeepSpeed strategy puts it); a clear error naming the file when they are absent, and a
one-line note when they exist but were not asked for."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import launch
import pytest
import torch
from demo_run import DEMO, tiny_run
from tiny_model import tiny

from finetune import load_encoder
from finetune.export import main as export_main

REPO = Path(__file__).resolve().parents[2]
ENCODER = "model.encoder."
TINY = tiny()


def encoder_of(state: dict[str, torch.Tensor], prefix: str = ENCODER) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v.float() for k, v in state.items() if k.startswith(prefix)}


def assert_exported(out: Path, want: dict[str, torch.Tensor]) -> None:
    got = load_encoder(out).state_dict()
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


# ---------------------------------------------------------------- Lightning checkpoint of a real run


@pytest.fixture(scope="module")
def ema_run(synth_shards, tmp_path_factory) -> Path:
    from emomae.cli import main as emomae

    run_dir = tmp_path_factory.mktemp("ema") / "run"
    changes = {"trainer.max_steps": 4, "trainer.ckpt_every_n_steps": 4, "optim.warmup_steps": 1}
    ema = {"optim.ema": "true", "optim.ema_decay": 0.5, "logging.image_every_n_steps": 0}
    assert emomae(["pretrain", DEMO, *tiny_run(synth_shards, run_dir, **changes, **ema)]) == 0
    return run_dir / "checkpoints" / "last.ckpt"


def test_export_ema_of_a_lightning_checkpoint_writes_the_averaged_encoder(ema_run, tmp_path, capsys):
    ckpt = torch.load(ema_run, map_location="cpu", weights_only=True)
    averaged, trained = encoder_of(ckpt["ema_state_dict"]), encoder_of(ckpt["state_dict"])
    assert any(not torch.equal(averaged[k], trained[k]) for k in averaged)  # the two are different weights

    assert export_main([str(ema_run), str(tmp_path / "ema"), "--ema"]) == 0
    assert "note:" not in capsys.readouterr().out
    assert_exported(tmp_path / "ema", averaged)
    config = json.loads((tmp_path / "ema" / "config.json").read_text())
    assert config["weights"] == "ema"
    assert "exponential moving average" in (tmp_path / "ema" / "MODEL_CARD.md").read_text()
    # the HF layout takes the option the same way
    assert export_main([str(ema_run), str(tmp_path / "hf"), "--ema", "--layout", "hf"]) == 0
    assert_exported(tmp_path / "hf", averaged)
    assert "exponential moving average" in (tmp_path / "hf" / "README.md").read_text()


def test_export_without_ema_takes_the_trained_weights_and_notes_the_average_in_one_line(
    ema_run, tmp_path, capsys
):
    assert export_main([str(ema_run), str(tmp_path / "trained")]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and str(ema_run) in notes[0] and "--ema" in notes[0]
    assert_exported(tmp_path / "trained", encoder_of(torch.load(ema_run, weights_only=True)["state_dict"]))
    assert "weights" not in json.loads((tmp_path / "trained" / "config.json").read_text())


def test_export_ema_without_an_average_names_the_file(ema_run, tmp_path, capsys):
    ckpt = torch.load(ema_run, map_location="cpu", weights_only=True)
    del ckpt["ema_state_dict"]  # what a run with optim.ema=false writes
    plain = tmp_path / "plain.ckpt"
    torch.save(ckpt, plain)
    assert export_main([str(plain), str(tmp_path / "out"), "--ema"]) == 1
    err = capsys.readouterr().err
    assert str(plain) in err and "ema_state_dict" in err and "optim.ema" in err
    assert not (tmp_path / "out").exists()
    assert export_main([str(plain), str(tmp_path / "out")]) == 0
    assert "note:" not in capsys.readouterr().out


# ---------------------------------------------------------------- DeepSpeed ZeRO-2 checkpoint directory


def deepspeed_worker(out: Path) -> None:
    """One CPU rank (gloo) of the real DeepSpeed engine with configs/deepspeed/zero2.yaml and bf16: its
    module's parameters are bf16 copies of fp32 master partitions, as on a GPU. The EMA callback
    averages them after each step; the checkpoint is written as Lightning's DeepSpeedStrategy writes
    it: the LightningModule under `_forward_module.`, the Lightning checkpoint dict (minus state_dict
    and optimizer states) as client state."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops
    from torch import nn

    from pretrain.callbacks import EMA
    from pretrain.deepspeed import CONFIG_DIR, build_deepspeed_config, load_zero_yaml
    from pretrain.encoders import ModelConfig
    from pretrain.mae import MaskedAVAutoencoder

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no JIT-compiled CPU kernel
    torch.set_num_threads(1)
    zero = load_zero_yaml(CONFIG_DIR / "zero2.yaml")
    for key in [k for k in zero["zero_optimization"] if "bucket_size" in k]:
        zero["zero_optimization"][key] = 200_000
    config = build_deepspeed_config(zero, micro_batch=2, world_size=1, precision="bf16-mixed")
    deepspeed.init_distributed(dist_backend="gloo")

    class LightningLayout(nn.Module):
        def __init__(self, mae: nn.Module) -> None:
            super().__init__()
            self._forward_module = nn.Module()
            self._forward_module.model = mae

        def forward(self, video, fbank):
            # CPU autocast feeds the bf16 module bf16 activations (the uint8 video is normalised in fp32)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self._forward_module.model(video, fbank).loss

    torch.manual_seed(0)
    model_cfg = ModelConfig(**TINY)
    model = LightningLayout(MaskedAVAutoencoder(model_cfg))
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2), config=config
    )
    mae = engine.module._forward_module.model
    ema = EMA(0.5)
    ema.start(mae)
    weights, gen = {}, torch.Generator().manual_seed(0)
    for step in (1, 2, 3):
        video = torch.randint(0, 256, (2, 4, 3, 32, 32), dtype=torch.uint8, generator=gen)
        loss = engine(video, torch.randn(2, 64, 32, generator=gen))
        engine.backward(loss)
        engine.step()
        ema.update(mae, step)
        weights[step] = {k: v.detach().clone() for k, v in mae.state_dict().items()}
    checkpoint = {
        "global_step": 3,
        "emomae": {
            "model": model_cfg.to_dict(),
            "config": {"optim": {"ema_decay": 0.5}, "shard_sampling": {"frame_stride": 4}},
        },
    }
    ema.on_save_checkpoint(None, None, checkpoint)
    engine.save_checkpoint(str(out / "last.ckpt"), tag="checkpoint", client_state=checkpoint)
    torch.save(weights, out / "weights.pt")


@pytest.fixture(scope="module")
def deepspeed_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zero2")
    env = launch.child_env(
        DS_ACCELERATOR="cpu",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(launch.free_port()),
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
    )
    launch.run_ok([sys.executable, str(Path(__file__).resolve()), "deepspeed-worker", str(out)], env)
    return out


def test_deepspeed_zero2_bf16_ema_is_the_fp32_average_and_exports_from_the_client_state(
    deepspeed_run, tmp_path, capsys
):
    weights = torch.load(deepspeed_run / "weights.pt", weights_only=True)
    assert weights[3]["encoder.video_embed.proj.weight"].dtype == torch.bfloat16  # DeepSpeed's bf16 module
    by_hand = {k: v.double() for k, v in weights[1].items()}  # the first update copies the weights
    for step in (2, 3):
        by_hand = {k: 0.5 * by_hand[k] + 0.5 * v.double() for k, v in weights[step].items()}
    client = torch.load(
        deepspeed_run / "last.ckpt" / "checkpoint" / "mp_rank_00_model_states.pt", weights_only=True
    )
    stored = client["ema_state_dict"]
    for name, value in by_hand.items():
        assert stored[f"model.{name}"].dtype == torch.float32, name
        torch.testing.assert_close(stored[f"model.{name}"].double(), value, rtol=1e-6, atol=1e-7, msg=name)

    ckpt = deepspeed_run / "last.ckpt"
    assert export_main([str(ckpt), str(tmp_path / "ema"), "--ema"]) == 0
    assert_exported(tmp_path / "ema", encoder_of(stored))
    assert export_main([str(ckpt), str(tmp_path / "trained")]) == 0  # ZeRO partitions, consolidated
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and str(ckpt) in notes[0]
    trained = load_encoder(tmp_path / "trained").state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in encoder_of(stored).items())


def test_deepspeed_export_ema_without_an_average_names_the_model_states_file(deepspeed_run, tmp_path, capsys):
    ckpt = tmp_path / "last.ckpt"
    shutil.copytree(deepspeed_run / "last.ckpt", ckpt)
    states = ckpt / "checkpoint" / "mp_rank_00_model_states.pt"
    client = torch.load(states, weights_only=True)
    del client["ema_state_dict"]
    torch.save(client, states)
    assert export_main([str(ckpt), str(tmp_path / "out"), "--ema"]) == 1
    err = capsys.readouterr().err
    assert str(states) in err and "ema_state_dict" in err


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    if sys.argv[1:2] == ["deepspeed-worker"]:
        deepspeed_worker(Path(sys.argv[2]))
    else:
        sys.exit("usage: test_export_ema.py deepspeed-worker OUT_DIR")
