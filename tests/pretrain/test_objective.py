"""The model and the objective apart: `MaskedAVAutoencoder.predict` (masks -> encoder -> decoders ->
pooled levels) and the parameter-free `PretrainObjective`, which takes the model's temperature as an
argument. Checked against HiCMAE's own numbers (the parity fixture) and against the loss written out
by hand; and checkpoints of the layout where the loss held the temperature still load."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file
from tiny_model import TINY

from finetune.hicmae_import import pretraining_model, read_hicmae_checkpoint
from pretrain.encoders import ModelConfig
from pretrain.hicmae import model_config_from_kwargs
from pretrain.mae import MaskedAVAutoencoder, ObjectiveConfig, Prediction
from pretrain.masking import Mask
from pretrain.objective import PretrainObjective
from pretrain.warm_start import load_initial_weights

REPO = Path(__file__).resolve().parents[2]
FIXTURE = Path(
    os.environ.get("EMOMAE_HICMAE_FIXTURE", REPO / ".." / "shared" / "fixtures" / "hicmae" / "small")
)
OLD_KEY, NEW_KEY = "contrastive.info_nce.logit_scale", "temperature.logit_scale"


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.double() - reference.double()).abs().max() / reference.double().abs().max())


@pytest.fixture(scope="module")
def hicmae():
    """HiCMAE's converted pretraining model with its loss settings, the fixture's inputs and masks."""
    if not (FIXTURE / "meta.json").is_file():
        pytest.fail(f"HiCMAE parity fixture not found at {FIXTURE} (set EMOMAE_HICMAE_FIXTURE)")
    meta = json.loads((FIXTURE / "meta.json").read_text())
    t = load_file(str(FIXTURE / "tensors.safetensors"))
    cfg = ModelConfig.from_dict(model_config_from_kwargs(meta["pretrain_config"], t["video"].shape[2]))
    state, args = read_hicmae_checkpoint(FIXTURE / "pretrain_checkpoint.pth")
    objective = ObjectiveConfig(
        contrastive_weight=float(getattr(args, "loss_weight", 0.0025)),
        frame_diff_target=bool(getattr(args, "use_frame_diff_as_target", True)),
        temperature=meta["pretrain_config"]["inter_contrastive_temperature"],
        gather_negatives=False,  # HiCMAE's negatives are the local batch
    )
    model = pretraining_model(state, cfg, objective=objective)
    video, fbank = t["video_uint8"].permute(0, 2, 1, 3, 4), t["audio"][:, 0]
    masks = (Mask.from_bool(t["mask_video"]), Mask.from_bool(t["mask_audio"]))
    return meta, t, model, video, fbank, masks


def test_predict_applies_given_masks_as_given_and_reproduces_hicmae_s_predictions(hicmae):
    _, t, model, video, fbank, masks = hicmae
    with torch.no_grad():
        first = model.predict(video, fbank, *masks)
        again = model.predict(video, fbank, *masks, generator=torch.Generator().manual_seed(7))
    assert first.video_mask is masks[0] and first.audio_mask is masks[1]
    assert torch.equal(first.video_pred, again.video_pred) and torch.equal(first.audio_pred, again.audio_pred)
    # rows in the order of mask.ids_masked, as HiCMAE's `x[mask]`
    assert relative_error(first.video_pred, t["recon_video"]) < 1e-5
    assert relative_error(first.audio_pred, t["recon_audio"]) < 1e-5
    for n in range(3):  # the pooled levels are HiCMAE's, before its L2 normalisation
        for m, pooled in (("video", first.video_pooled), ("audio", first.audio_pooled)):
            assert relative_error(F.normalize(pooled[:, n], dim=-1), t[f"pooled_{m}_l{n}"]) < 1e-5
    assert relative_error(first.encoded.video_layers[-1], t["encoder_video"]) < 1e-5


def test_the_objective_of_predict_gives_hicmae_s_loss_numbers(hicmae):
    meta, _, model, video, fbank, masks = hicmae
    ref = meta["losses"]
    objective = PretrainObjective(model.objective_cfg, model.cfg)  # a separate instance: no state
    with torch.no_grad():
        loss, terms = objective(model.predict(video, fbank, *masks), video, fbank, model.logit_scale)
    levels = [f"contrastive_l{k}" for k in model.cfg.skip_layers]
    expected = {
        "recon_video": ref["loss_video"],
        "recon_audio": ref["loss_audio"],
        "contrastive": ref["loss_hcmcl"],
        **dict(zip(levels, ref["loss_hcmcl_levels"], strict=True)),
    }
    assert set(terms) == set(expected)
    for name, value in expected.items():
        assert float(terms[name]) == pytest.approx(value, rel=1e-5), name
    assert float(loss) == pytest.approx(ref["loss"], rel=1e-5)


def test_the_objective_holds_no_parameter_and_no_buffer_and_the_model_holds_the_temperature():
    model = MaskedAVAutoencoder(ModelConfig(**TINY), ObjectiveConfig(learnable_temperature=True))
    assert not list(model.objective.parameters()) and not list(model.objective.buffers())
    assert not any(k.startswith("objective.") for k in model.state_dict())
    assert dict(model.named_parameters())[NEW_KEY] is model.logit_scale
    assert math.isclose(model.temperature.value, 0.07, rel_tol=1e-6)
    fixed = MaskedAVAutoencoder(ModelConfig(**TINY), ObjectiveConfig(temperature=0.1))
    assert NEW_KEY not in dict(fixed.named_parameters()) and NEW_KEY not in fixed.state_dict()
    assert math.isclose(fixed.temperature.value, 0.1, rel_tol=1e-6)


def test_learnable_temperature_is_a_model_parameter_that_receives_gradient():
    torch.manual_seed(0)
    model = MaskedAVAutoencoder(ModelConfig(**TINY), ObjectiveConfig(learnable_temperature=True))
    video = torch.randint(0, 256, (3, 4, 3, 32, 32), dtype=torch.uint8)
    model(video, torch.randn(3, 32, 32)).loss.backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad != 0


def by_hand(model: MaskedAVAutoencoder, p: Prediction, video, fbank, present: torch.Tensor) -> dict:
    """The pretraining loss written out from its definition (docs/model.md), with none of
    pretrain.losses / pretrain.objective: per-patch normalised targets with frame differences, MSE
    over the masked tokens (audio over the clips with audio), and at every level a symmetric InfoNCE
    of L2-normalised token means among the clips with audio."""
    c = model.cfg
    v = rearrange(
        video.float() / 255,
        "b (t p0) c (h p1) (w p2) -> b (t h w) p0 (p1 p2) c",
        p0=c.tubelet,
        p1=c.patch,
        p2=c.patch,
    )
    flat = v.flatten(2, 3)
    v = ((flat - flat.mean(2, keepdim=True)) / (flat.std(2, keepdim=True) + 1e-6)).view_as(v)
    v = torch.cat([v[:, :, :1], v[:, :, 1:] - v[:, :, :1]], dim=2).flatten(2)
    a = rearrange(fbank, "b (f p1) (m p2) -> b (f m) (p1 p2)", p1=c.patch, p2=c.patch)
    a = (a - a.mean(-1, keepdim=True)) / (a.std(-1, keepdim=True) + 1e-6)
    rows = torch.arange(len(video))[:, None]
    terms = {
        "recon_video": ((p.video_pred - v[rows, p.video_mask.ids_masked]) ** 2).mean(),
        "recon_audio": ((p.audio_pred - a[rows, p.audio_mask.ids_masked]) ** 2)[present].mean(),
    }
    kept = present.nonzero().squeeze(1)
    temperature = float(1 / model.logit_scale.exp())
    for level in p.levels:
        pv = F.normalize(p.encoded.video_layers[level - 1][kept].mean(1), dim=-1)
        pa = F.normalize(p.encoded.audio_layers[level - 1][kept].mean(1), dim=-1)
        logits, labels = pv @ pa.T / temperature, torch.arange(len(kept))
        terms[f"contrastive_l{level}"] = (
            F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)
        ) / 2
    terms["contrastive"] = sum(terms[f"contrastive_l{k}"] for k in p.levels)
    return terms


def test_the_objective_equals_the_loss_written_out_by_hand():
    torch.manual_seed(0)
    objective_cfg = ObjectiveConfig(contrastive_weight=0.3, temperature=0.2, learnable_temperature=True)
    model = MaskedAVAutoencoder(ModelConfig(**TINY), objective_cfg)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1 / 0.15))  # a learned value, not the configured one
    g = torch.Generator().manual_seed(1)
    video = torch.randint(0, 256, (5, 4, 3, 32, 32), dtype=torch.uint8, generator=g)
    fbank = torch.randn(5, 32, 32, generator=g)
    present = torch.tensor([True, False, True, True, False])
    with torch.no_grad():
        p = model.predict(video, fbank, generator=torch.Generator().manual_seed(2))
        loss, terms = model.objective(p, video, fbank, model.logit_scale, present)
        expected = by_hand(model, p, video, fbank, present)
    assert (
        set(terms)
        == set(expected)
        == {"recon_video", "recon_audio", "contrastive"} | {f"contrastive_l{k}" for k in TINY["skip_layers"]}
    )
    for name, value in expected.items():
        torch.testing.assert_close(terms[name], value, rtol=1e-5, atol=1e-6, msg=name)
    total = expected["recon_video"] + expected["recon_audio"] + 0.3 * expected["contrastive"]
    torch.testing.assert_close(loss, total, rtol=1e-5, atol=1e-6)
    # the temperature is the argument's: another logit scale, other contrastive terms
    _, hotter = model.objective(p, video, fbank, torch.tensor(0.0), present)
    assert not torch.allclose(hotter["contrastive"], terms["contrastive"])
    assert torch.equal(hotter["recon_video"], terms["recon_video"])


# -- checkpoints written while the loss held the temperature ------------------------------------------


def learned(value: float) -> MaskedAVAutoencoder:
    torch.manual_seed(0)
    model = MaskedAVAutoencoder(ModelConfig(**TINY), ObjectiveConfig(learnable_temperature=True))
    with torch.no_grad():
        model.logit_scale.fill_(value)
    return model


def old_layout(state: dict, prefix: str = "") -> dict:
    """A state dict as the model wrote it when the temperature lived in the `contrastive` loss."""
    return {(prefix + OLD_KEY if k == prefix + NEW_KEY else k): v for k, v in state.items()}


def test_an_old_layout_state_dict_loads_strictly_with_its_learned_temperature():
    source = learned(2.5)
    state = old_layout(source.state_dict())
    assert OLD_KEY in state and NEW_KEY not in state
    target = learned(0.0)
    target.load_state_dict(state)  # strict
    assert target.logit_scale.item() == 2.5
    for name, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], value), name
    with pytest.raises(RuntimeError, match="Missing key"):  # strictness is kept for every other weight
        target.load_state_dict({k: v for k, v in state.items() if k != "video_decoder.mask_token"})


def test_a_lightning_checkpoint_of_the_old_layout_resumes_weights_and_ema(tmp_path):
    from pretrain.module import PretrainModule
    from pretrain.optim import OptimConfig

    def module():
        return PretrainModule(
            ModelConfig(**TINY),
            ObjectiveConfig(learnable_temperature=True),
            OptimConfig(),
            peak_lr=1e-4,
            final_lr=1e-5,
            max_steps=10,
        )

    source = module()
    with torch.no_grad():
        source.model.logit_scale.fill_(3.0)
    state = old_layout(source.state_dict(), prefix="model.")
    checkpoint = {"state_dict": state, "ema_state_dict": {k: v.clone() for k, v in state.items()}}
    target = module()
    target.on_load_checkpoint(checkpoint)  # what Lightning calls before it loads the weights
    target.load_state_dict(checkpoint["state_dict"])  # strict, as Lightning
    assert target.model.logit_scale.item() == 3.0
    assert "model." + NEW_KEY in checkpoint["ema_state_dict"]
    assert set(checkpoint["ema_state_dict"]) == set(target.state_dict())


@pytest.mark.parametrize(
    ("source_learns", "target_learns", "expected"),
    [
        (True, True, 2.5),  # the old layout's learned temperature carries over
        (True, False, math.log(1 / 0.07)),  # a fixed temperature is configuration: the config wins
        (False, True, math.log(1 / 0.07)),  # nothing learned yet: the configured start
    ],
)
def test_warm_start_takes_either_layout_and_either_temperature_kind(
    tmp_path, source_learns, target_learns, expected
):
    cfg = ModelConfig(**TINY)
    source = learned(2.5) if source_learns else MaskedAVAutoencoder(cfg)
    ckpt = tmp_path / "stage1.ckpt"
    state = {f"model.{k}": v for k, v in old_layout(source.state_dict()).items()}
    torch.save({"state_dict": state, "emomae": {"model": cfg.to_dict(), "config": {}}}, ckpt)
    target = MaskedAVAutoencoder(cfg, ObjectiveConfig(learnable_temperature=target_learns))
    load_initial_weights(target, cfg, ckpt)
    assert target.logit_scale.item() == pytest.approx(expected)
    assert torch.equal(target.video_decoder.mask_token, source.video_decoder.mask_token)
