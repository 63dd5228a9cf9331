from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch
import webdataset as wds
from pytorch_lightning.callbacks import ModelCheckpoint
from shard_factory import keys_of, make_sample, write_shard_dir

from data_pipelines.datamodule import AVDataModule, DataConfig
from emomae.config import load_config

SMALL = dict(
    num_frames=4,
    img_size=24,
    fbank_frames=64,
    batch_size=3,
    epoch_length=5,
    shuffle_buffer=6,
    crop_scale=[0.5, 1.0],
    hflip=0.5,
    audio_gain_db=2.0,
    seed=7,
)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("dm_shards")
    write_shard_dir(out, [6, 5], group="fold0")
    write_shard_dir(out, [4], group="fold1", first_index=11, labelled=False)
    # One undecodable sample inside the training stream: resuming must still line up.
    bad = make_sample("zbad_w000", num_frames=4, size=32, seed=99)
    bad["f01.jpg"] = b"garbage"
    good = [make_sample(k, num_frames=4, size=32, label=i % 6, seed=i) for i, k in enumerate(keys_of([5], 6))]
    with wds.TarWriter(str(out / "fold0-000001.tar")) as sink:
        for s in good[:2] + [bad] + good[2:]:
            sink.write(s)
    index = json.loads((out / "index.json").read_text())
    index["shards"][1]["samples"] = 6
    (out / "index.json").write_text(json.dumps(index))
    return out


def module(shard_dir, **over) -> AVDataModule:
    cfg = dict(
        SMALL,
        shards=str(shard_dir),
        train_groups=["fold0"],
        val_groups=["fold1"],
        test_groups=["fold0", "fold1"],
    )
    return AVDataModule({**cfg, **over}, rank=0, world_size=1)


def test_batches_follow_the_contract(shard_dir):
    dm = module(shard_dir, num_workers=0)
    train = next(iter(dm.train_dataloader()))
    val = list(dm.val_dataloader())
    for batch in (train, val[0]):
        assert batch["video"].dtype == torch.uint8 and batch["video"].shape == (3, 4, 3, 24, 24)
        assert batch["fbank"].dtype == torch.float32 and batch["fbank"].shape == (3, 64, 128)
        assert batch["label"].dtype == torch.int64 and batch["label"].shape == (3,)
        assert batch["has_caption"].dtype == torch.bool and batch["has_caption"].shape == (3,)
        assert all(isinstance(k, str) for k in batch["key"] + batch["clip_key"] + batch["caption"])
        assert torch.isfinite(batch["fbank"]).all()
    assert [k for b in val for k in b["key"]] == keys_of([4], 11)
    assert torch.equal(val[0]["label"], torch.full((3,), -1))  # fold1 is unlabelled
    assert all(0 <= label < 6 for label in train["label"].tolist())
    assert sorted(k for b in dm.test_dataloader() for k in b["key"]) == keys_of([11, 4])


def test_loaders_hand_batches_on_as_the_stream_built_them(shard_dir):
    """No collation in the loaders: the streams batch in the worker, and torch's default_convert
    would walk every value of every batch (~3 % of a worker's time)."""
    from data_pipelines.stream import as_built
    from finetune.streams import loader

    dm = module(shard_dir, num_workers=0)
    loaders = [dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()]
    loaders.append(loader(dm.train_dataloader().dataset, num_workers=0))
    assert [dl.collate_fn for dl in loaders] == [as_built] * 4
    batch = {"video": torch.zeros(1), "key": ["a"]}
    assert as_built(batch) is batch


def run_epochs(dm: AVDataModule, epochs: int, stop_after: int | None = None) -> list[tuple[str, ...]]:
    """Iterate the train loader like a training loop; returns each batch's keys."""
    seen = []
    loader = dm.train_dataloader()
    for _ in range(epochs):
        for batch in loader:
            seen.append(tuple(batch["key"]))
            if stop_after is not None and len(seen) == stop_after:
                return seen
    return seen


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_stream_sees_exactly_the_batches_of_an_uninterrupted_one(shard_dir, workers):
    full = run_epochs(module(shard_dir, num_workers=workers), epochs=2)
    assert len(full) == 10
    for stop in (3, 7):  # mid-epoch 0 (odd: worker order rotates) and mid-epoch 1
        first = module(shard_dir, num_workers=workers)
        assert run_epochs(first, epochs=2, stop_after=stop) == full[:stop]
        state = first.state_dict()
        assert state["epoch"] == stop // 5 and state["batches"] == stop % 5
        resumed = module(shard_dir, num_workers=workers)
        resumed.load_state_dict(state)
        assert run_epochs(resumed, epochs=2 - stop // 5) == full[stop:]
        if stop == 3:  # the skipped part held the corrupt sample: positions, not batch counts, line up
            assert sum(first.corrupt_counts["pretrain"].values()) == 1


def test_state_dict_is_plain_and_refuses_a_different_worker_count(shard_dir):
    dm = module(shard_dir, num_workers=0)
    run_epochs(dm, epochs=1, stop_after=2)
    state = dm.state_dict()
    assert all(isinstance(v, (int, list)) for v in state.values())
    other = module(shard_dir, num_workers=2)
    with pytest.raises(ValueError, match="num_workers"):
        other.load_state_dict(state)


class KeyRecorder(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[str, ...]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(tuple(batch["key"]))
        return (self.w * batch["fbank"].mean() - batch["video"].float().mean() / 255).pow(2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def trainer(tmp_path, **kw) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        **kw,
    )


def test_lightning_checkpoint_resume_continues_the_data_stream(shard_dir, tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1, filename="{step}")
    full = KeyRecorder()
    trainer(tmp_path, callbacks=[ckpt]).fit(full, datamodule=module(shard_dir, num_workers=0))
    assert len(full.seen) == 10
    saved = torch.load(tmp_path / "ckpt" / "step=3.ckpt", weights_only=True)
    assert saved["AVDataModule"]["batches"] == 3
    resumed = KeyRecorder()
    trainer(tmp_path).fit(
        resumed, datamodule=module(shard_dir, num_workers=0), ckpt_path=tmp_path / "ckpt" / "step=3.ckpt"
    )
    assert resumed.seen == full.seen[3:]


def test_data_config_errors_name_the_key_or_file(shard_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown data config key.*bach_size"):
        AVDataModule({"shards": str(shard_dir), "bach_size": 2})
    with pytest.raises(ValueError, match="index.json.*num_frames=4.*data.num_frames=16"):
        module(shard_dir, num_frames=16).train_dataloader()
    with pytest.raises(ValueError, match="no shards of group"):
        module(shard_dir, train_groups=["fold9"]).train_dataloader()
    with pytest.raises(ValueError, match="matches no shard files"):
        AVDataModule({**SMALL, "shards": str(tmp_path / "nothing-{000..003}.tar")}).train_dataloader()


def test_data_config_loads_from_yaml_with_overrides(tmp_path, shard_dir):
    path = tmp_path / "data.yaml"
    path.write_text(f"shards: {shard_dir}\nbatch_size: 2\nnum_frames: 4\ncrop_scale: [0.6, 1.0]\n")
    cfg = load_config(DataConfig, path, ["num_workers=0", "img_size=16", "fbank_frames=32"])
    dm = AVDataModule(cfg, rank=0, world_size=1)
    assert dm.cfg.crop_scale == [0.6, 1.0] and dm.cfg.img_size == 16
    batch = next(iter(dm.train_dataloader()))
    assert batch["video"].shape == (2, 4, 3, 16, 16) and batch["fbank"].shape == (2, 32, 128)


def test_datamodule_streams_the_builtin_dataset_shards_exactly_once(synth_shards):
    index = json.loads((synth_shards / "index.json").read_text())
    groups = sorted({s["group"] for s in index["shards"]})
    cfg = dict(
        shards=str(synth_shards),
        train_groups=groups[1:],
        test_groups=groups,
        num_frames=8,
        img_size=48,
        fbank_frames=128,
        batch_size=4,
        epoch_length=2,
        num_workers=0,
    )
    seen = []
    for rank in range(2):
        dm = AVDataModule(cfg, rank=rank, world_size=2)
        for batch in dm.test_dataloader():
            assert batch["video"].shape[1:] == (8, 3, 48, 48) and batch["fbank"].shape[1:] == (128, 128)
            assert (batch["label"] >= 0).all()
            seen += batch["key"]
    assert len(seen) == len(set(seen)) == index["totals"]["samples"]
    train = list(AVDataModule(cfg, rank=0, world_size=1).train_dataloader())
    assert len(train) == 2 and all(b["video"].shape == (4, 8, 3, 48, 48) for b in train)
