"""Multi-process correctness without SLURM: two single-process torchrun "nodes" rendezvous on
127.0.0.1 (gloo) and train the real PretrainModule under Lightning's DDP.

- 2 ranks x batch B follow the same loss curve as 1 rank x batch 2B and end at the same weights:
  gradients are averaged by DDP and the contrastive loss gathers its negatives (with gradient) from
  every rank, so how a global batch is split must not matter. Both runs see the same fixed list of
  global batches, and masks are drawn for the global batch and sliced per rank, which makes the
  samples' masks independent of the split too.
- In evaluation mode every sample of the shards is seen exactly once across 2 ranks x 2 loader workers.

This file is also the worker script that torchrun starts (`python test_multiprocess.py worker ...`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
from pathlib import Path

import launch
import pytest
import torch
from tiny_model import SHARD_TINY

REPO = Path(__file__).resolve().parents[2]
STEPS, LOCAL_BATCH = 4, 4


# ---------------------------------------------------------------- the worker (runs under torchrun)


def tiny_model():
    from pretrain.encoders import ModelConfig
    from pretrain.mae import ObjectiveConfig

    model = ModelConfig(**SHARD_TINY)
    # a contrastive weight of 1 (not 0.0025) so a wrong gather would move the loss visibly
    return model, ObjectiveConfig(contrastive_weight=1.0, gather_negatives=True)


def stream_config(batch_size: int):
    from data_pipelines.features import FbankConfig
    from data_pipelines.stream import StreamConfig

    return StreamConfig(batch_size=batch_size, num_frames=8, img_size=64, fbank=FbankConfig(fbank_frames=128))


def global_batches(shards: Path, world_size: int, rank: int) -> list[dict]:
    """The first STEPS global batches of the shards in their stored order (identical in every process),
    each cut to this rank's rows."""
    from data_pipelines.shards import shard_urls
    from data_pipelines.stream import eval_pipeline

    stream = eval_pipeline(shard_urls(shards), stream_config(LOCAL_BATCH * 2), rank=0, world_size=1)
    width = LOCAL_BATCH * 2 // world_size
    rows = slice(rank * width, (rank + 1) * width)
    out = []
    for batch in stream:
        out.append({k: batch[k][rows] for k in ("video", "fbank", "key")})
        if len(out) == STEPS:
            return out
    raise RuntimeError(f"{shards} holds fewer than {STEPS} batches of {LOCAL_BATCH * 2}")


def split_invariant_module(world_size: int):
    """PretrainModule whose masks are drawn for the whole global batch (one rank-independent seed per
    step) and sliced to this rank's rows: a sample gets the same mask however the batch is split."""
    from pretrain.module import PretrainModule, mask_seed
    from pretrain.optim import OptimConfig

    class SplitInvariantMasks(PretrainModule):
        def mask_generator(self) -> torch.Generator:
            return torch.Generator(device=self.device).manual_seed(
                mask_seed(self.seed, 0, self._micro_batches)
            )

        def on_fit_start(self) -> None:
            draw, rank = self.model.random_masking, self.global_rank

            def sliced(batch: int, device, generator=None):
                video, audio = draw(batch * world_size, device, generator)
                rows = slice(rank * batch, (rank + 1) * batch)
                return tuple(
                    type(m)(m.ids_keep[rows], m.ids_masked[rows], m.ids_restore[rows], m.mask[rows])
                    for m in (video, audio)
                )

            self.model.random_masking = sliced

    model_cfg, objective = tiny_model()
    optim = OptimConfig(warmup_steps=1)
    return SplitInvariantMasks(
        model_cfg, objective, optim, peak_lr=1e-3, final_lr=1e-4, max_steps=STEPS, seed=0
    )


def worker(argv: list[str]) -> None:
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import Callback
    from pytorch_lightning.strategies import DDPStrategy
    from torch.utils.data import DataLoader

    from data_pipelines.shards import shard_urls
    from data_pipelines.stream import eval_pipeline

    p = argparse.ArgumentParser()
    p.add_argument("--shards", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    torch.set_num_threads(1)

    class Record(Callback):
        """This rank's own (not averaged) loss terms after every optimizer step."""

        def __init__(self) -> None:
            self.steps: list[dict] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            m = trainer.callback_metrics
            self.steps.append(
                {k: float(m[f"loss/{k}"]) for k in ("total", "contrastive", "recon_video", "recon_audio")}
            )

    pl.seed_everything(0, verbose=False)
    module, record = split_invariant_module(world_size), Record()
    batches = global_batches(args.shards, world_size, rank)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        num_nodes=world_size,
        precision="32-true",
        max_steps=STEPS,
        strategy=DDPStrategy(process_group_backend="gloo") if world_size > 1 else "auto",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[record],
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None, collate_fn=None))

    # exact-once evaluation: the stream takes rank and world size from the live process group
    stream = eval_pipeline(shard_urls(args.shards), stream_config(5))
    keys = [k for b in DataLoader(stream, batch_size=None, num_workers=2) for k in b["key"]]

    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "rank": rank,
        "world_size": world_size,
        "stream_rank": stream.rank,
        "stream_world": stream.world_size,
        "steps": record.steps,
        "train_keys": [list(b["key"]) for b in batches],
        "eval_keys": keys,
    }
    (args.out / f"rank{rank}.json").write_text(json.dumps(report))
    if rank == 0:
        torch.save(
            {k: v.detach().clone() for k, v in module.model.state_dict().items()}, args.out / "final.pt"
        )


def deepspeed_worker(argv: list[str]) -> None:
    """Train the tiny autoencoder with DeepSpeed ZeRO-2 and ZeRO-3 (the project's YAMLs) on CPU ranks
    over gloo, and checkpoint each the way Lightning's DeepSpeedStrategy does: a directory with a
    `checkpoint` tag, the LightningModule under `_forward_module.`, the run metadata as client state."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops
    from torch import nn

    from pretrain.deepspeed import CONFIG_DIR, build_deepspeed_config, load_zero_yaml
    from pretrain.mae import MaskedAVAutoencoder

    # DeepSpeed's CPU backend would JIT-compile a shared-memory all-reduce kernel (minutes of C++)
    # meant for inference; without it the collectives go through torch.distributed (gloo).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    out = Path(argv[argv.index("--out") + 1])
    torch.set_num_threads(1)
    # the project's ZeRO YAMLs completed as the pretraining CLI does it: before the process group is up
    configs = {}
    for stage, yaml in ((2, "zero2.yaml"), (3, "zero3.yaml")):
        zero = load_zero_yaml(CONFIG_DIR / yaml)
        for key in [k for k in zero["zero_optimization"] if "bucket_size" in k]:
            zero["zero_optimization"][key] = 200_000  # elements: the YAML sizes buckets (5e8) for GPU memory
        configs[stage] = build_deepspeed_config(zero, micro_batch=2, world_size=2, precision="32")
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()

    class LightningLayout(nn.Module):  # parameter names as Lightning's DeepSpeed wrapper has them
        def __init__(self, mae: nn.Module) -> None:
            super().__init__()
            self._forward_module = nn.Module()
            self._forward_module.model = mae

        def forward(self, video, fbank):
            return self._forward_module.model(video, fbank).loss

    model_cfg, objective = tiny_model()
    for stage, config in configs.items():
        torch.manual_seed(stage)
        model = LightningLayout(MaskedAVAutoencoder(model_cfg, objective))
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2), config=config
        )
        gen = torch.Generator().manual_seed(rank)
        for _ in range(2):
            video = torch.randint(0, 256, (2, 8, 3, 64, 64), dtype=torch.uint8, generator=gen)
            loss = engine(video, torch.randn(2, 128, 128, generator=gen))
            engine.backward(loss)
            engine.step()
        meta = {
            "emomae": {
                "model": model_cfg.to_dict(),
                "config": {"data": {"num_frames": 8, "img_size": 64}, "shard_sampling": {"frame_stride": 4}},
            },
            "global_step": 2,
        }
        engine.save_checkpoint(str(out / f"zero{stage}" / "last.ckpt"), tag="checkpoint", client_state=meta)
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):  # full tensors on every rank
            trained = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
        if rank == 0:
            torch.save(trained, out / f"zero{stage}" / "trained.pt")


# ---------------------------------------------------------------- the test


def shard_keys(shards: Path) -> list[str]:
    keys = set()
    for tar in sorted(shards.glob("*.tar")):
        with tarfile.open(tar) as t:
            keys |= {os.path.basename(name).split(".", 1)[0] for name in t.getnames()}
    return sorted(keys)


@pytest.mark.slow
def test_two_torchrun_nodes_match_one_process_with_the_double_batch_and_evaluate_each_sample_once(
    synth_shards, tmp_path
):
    env = launch.child_env(WANDB_MODE="disabled")
    me = [str(Path(__file__).resolve()), "worker", "--shards", str(synth_shards)]
    port = launch.free_port()
    # two "nodes" of one process each: separate torchrun agents meeting at a c10d rendezvous
    nodes = [
        launch.start(
            launch.torchrun(
                "--rdzv_id=emomae-test",
                f"--node_rank={k}",
                *me,
                "--out",
                tmp_path / "ddp",
                nproc=1,
                nnodes=2,
                port=port,
            ),
            env,
        )
        for k in range(2)
    ]
    # the 1-rank reference runs at the same time (same seed, same global batches)
    single = launch.start([sys.executable, *me, "--out", str(tmp_path / "single")], env)
    try:
        outs = [p.communicate(timeout=400)[0] for p in (*nodes, single)]
    finally:
        for p in (*nodes, single):
            if p.poll() is None:
                p.kill()
    for p, out in zip((*nodes, single), outs):
        assert p.returncode == 0, out[-6000:]

    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in range(2)]
    ref = json.loads((tmp_path / "single" / "rank0.json").read_text())
    assert [(r["rank"], r["world_size"], r["stream_rank"], r["stream_world"]) for r in ranks] == [
        (0, 2, 0, 2),
        (1, 2, 1, 2),
    ]

    # the two ranks' halves make up exactly the reference's global batches
    for step in range(STEPS):
        assert ranks[0]["train_keys"][step] + ranks[1]["train_keys"][step] == ref["train_keys"][step]

    # loss curve: the mean of the ranks' own losses is the global-batch loss at every step
    assert len(ref["steps"]) == STEPS
    for step in range(STEPS):
        for term in ("total", "contrastive", "recon_video", "recon_audio"):
            split = (ranks[0]["steps"][step][term] + ranks[1]["steps"][step][term]) / 2
            whole = ref["steps"][step][term]
            assert split == pytest.approx(whole, rel=2e-4, abs=1e-5), (step, term, split, whole)
    # the curve moved: equal values are not an artefact of a model that does not train
    assert ref["steps"][-1]["total"] != pytest.approx(ref["steps"][0]["total"], rel=1e-3)

    # same updates: the runs differ by far less than either moved from its start
    import pytorch_lightning as pl

    a = torch.load(tmp_path / "ddp" / "final.pt", weights_only=True)
    b = torch.load(tmp_path / "single" / "final.pt", weights_only=True)
    pl.seed_everything(0, verbose=False)  # the workers' initial weights
    init = split_invariant_module(1).model.state_dict()
    moved = torch.sqrt(sum(((b[k] - init[k]).double() ** 2).sum() for k in b))
    apart = torch.sqrt(sum(((a[k] - b[k]).double() ** 2).sum() for k in b))
    assert moved > 0
    assert apart < 1e-3 * moved, (float(apart), float(moved))

    # exact-once evaluation over 2 ranks x 2 workers: every sample once, none twice, nothing padded
    seen = ranks[0]["eval_keys"] + ranks[1]["eval_keys"]
    assert sorted(seen) == shard_keys(synth_shards)
    assert set(ranks[0]["eval_keys"]).isdisjoint(ranks[1]["eval_keys"])


@pytest.mark.slow
def test_deepspeed_zero2_and_zero3_checkpoints_of_two_cpu_ranks_export_to_the_trained_encoder(tmp_path):
    """The real DeepSpeed engine (ZeRO-2 and ZeRO-3 from configs/deepspeed, 2 ranks, gloo) writes its
    partitioned checkpoint; `emomae export` consolidates it with DeepSpeed's converter and the encoder
    it writes holds exactly the trained weights."""
    from finetune import load_encoder
    from finetune.export import export

    cmd = launch.torchrun(Path(__file__).resolve(), "deepspeed-worker", "--out", tmp_path)
    launch.run_ok(cmd, launch.child_env(DS_ACCELERATOR="cpu"), timeout=500)

    for stage in (2, 3):
        ckpt = tmp_path / f"zero{stage}" / "last.ckpt"
        # one optimizer partition per rank: the state really is sharded
        assert len(list((ckpt / "checkpoint").glob("*zero_pp_rank_*_optim_states.pt"))) == 2, stage
        trained = torch.load(tmp_path / f"zero{stage}" / "trained.pt", weights_only=True)
        prefix = "_forward_module.model.encoder."
        want = {k.removeprefix(prefix): v for k, v in trained.items() if k.startswith(prefix)}
        got = load_encoder(export(ckpt, tmp_path / f"export{stage}")).state_dict()
        assert set(got) == set(want), stage
        for name, tensor in want.items():
            assert torch.equal(got[name], tensor.float()), (stage, name)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    if sys.argv[1:2] == ["worker"]:
        worker(sys.argv[2:])
    elif sys.argv[1:2] == ["deepspeed-worker"]:
        deepspeed_worker(sys.argv[2:])
    else:
        sys.exit("usage: test_multiprocess.py worker --shards DIR --out DIR | deepspeed-worker --out DIR")
