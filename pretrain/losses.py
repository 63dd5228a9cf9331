"""The loss pieces of the pretraining objective (pretrain/objective.py, docs/model.md): reconstruction
targets and the gathered InfoNCE, which gathers negatives across ranks itself (open_clip's shape) so
the training loop never sees all_gather. Nothing here holds a parameter.

Distributed convention: with world size W, every rank gathers all ranks' features (gradient kept)
and returns the symmetric InfoNCE of its *own* rows against *all* columns. The mean of the W rank
losses equals the single-process loss on the concatenated batch, and the gradient that reaches a
rank's features is W times the single-process gradient (each rank's loss also pulls on the others'
features); DDP/DeepSpeed average gradients over ranks, which divides the W back out, so the final
parameter gradient equals the single-process one.

Clips without audio (`audio_present` False, docs/architecture.md) take no part in the audio terms:
the audio reconstruction is the mean over the samples with audio, and in the contrastive loss such a
sample is neither an anchor (its rows) nor a negative (its columns, on every rank). Both weigh the
kept rows by `n / kept` (`sample_weights`), which is exactly 1.0 when every sample has audio, so the
loss is then bit for bit the one without the flags; with none kept the weights are 0, and the loss
is 0 with zero (not NaN) gradients.
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger("emomae.precision")
_FP32_NOTED: set[str] = set()  # what `note_fp32` has already logged in this process


def note_fp32(what: str, why: str, *tensors: Tensor) -> None:
    """Log once per process that `what` computes in fp32 on purpose, when the run computes in lower
    precision: autocast to bf16/fp16 is on, or one of `tensors` is bf16/fp16 (DeepSpeed's bf16 module).
    A warning, so that it reaches a run's log without any logging set-up. Not inside torch.compile: a
    logging call would break the graph, so a compiled forward logs nothing."""
    if torch.compiler.is_compiling() or what in _FP32_NOTED:  # in this order: no guard on the set
        return
    low = (torch.bfloat16, torch.float16)
    devices = {t.device.type for t in tensors} or {"cpu"}
    autocast = any(
        torch.amp.is_autocast_available(d)
        and torch.is_autocast_enabled(d)
        and torch.get_autocast_dtype(d) in low
        for d in devices
    )
    if autocast or any(t.dtype in low for t in tensors):
        _FP32_NOTED.add(what)
        log.warning("low-precision run: %s computes in fp32 on purpose (%s)", what, why)


# ---------------------------------------------------------------- reconstruction targets


def normalize_patches(patches: Tensor, eps: float = 1e-6) -> Tensor:
    """Standardise each patch over its pixels, separately per channel: (..., P, C) -> (..., P, C).
    Unbiased std, as the reference."""
    mean = patches.mean(dim=-2, keepdim=True)
    std = patches.var(dim=-2, unbiased=True, keepdim=True).sqrt()
    return (patches - mean) / (std + eps)


def frame_difference(tubelets: Tensor) -> Tensor:
    """(..., t, P, C) -> same shape, frames 1.. replaced by their difference from frame 0 of the
    tubelet: the target then asks for motion, not a second copy of the appearance."""
    return torch.cat([tubelets[..., :1, :, :], tubelets[..., 1:, :, :] - tubelets[..., :1, :, :]], dim=-3)


def video_target(patches: Tensor, tubelet: int, norm_pix: bool = True, frame_diff: bool = True) -> Tensor:
    """patches: (B, N, tubelet * p * p * 3) of de-normalised [0, 1] pixels in (t, p, p, c) order ->
    target of the same shape."""
    note_fp32(
        "video reconstruction target",
        "per-patch mean/std and frame differences of [0, 1] pixels need more than bf16's 8-bit mantissa",
        patches,
    )
    b, n, d = patches.shape
    x = patches.reshape(b, n, tubelet, d // (tubelet * 3), 3).float()
    if norm_pix:
        x = normalize_patches(x.flatten(2, 3)).view_as(x)
    if frame_diff:
        x = frame_difference(x)
    return x.reshape(b, n, d)


def audio_target(patches: Tensor, norm_pix: bool = True) -> Tensor:
    """patches: (B, N, p * p) fbank patches -> target of the same shape (normalised per patch)."""
    note_fp32("audio reconstruction target", "per-patch mean/std of the fbank in full precision", patches)
    patches = patches.float()
    return normalize_patches(patches.unsqueeze(-1)).squeeze(-1) if norm_pix else patches


def sample_weights(kept: Tensor, among: Tensor | None = None) -> Tensor:
    """(B,) bool rows to keep -> (B,) float weights `kept * n / count(among)`, `among` (default
    `kept`) being the n samples the mean is meant to run over. A mean of weighted per-sample terms is
    then the mean over the kept samples alone; the weights are exactly 1.0 when every sample is kept
    and 0 when none is (count clamped at 1, so no 0 / 0)."""
    among = kept if among is None else among
    return kept.float() * (among.numel() / among.sum().clamp(min=1).float())


def mse_over_present(pred: Tensor, target: Tensor, present: Tensor | None = None) -> Tensor:
    """Mean squared error of `pred` against `target`, both (B, N, D) (the masked tokens, as the
    reconstruction passes them), averaged over every element; `present` (B,) bool: averaged over the
    samples flagged present only (0 when there are none), None: over all samples."""
    note_fp32(
        "reconstruction MSE", "a mean over ~1e5-1e6 squared errors loses digits in a bf16 sum", pred, target
    )
    if present is None:
        return F.mse_loss(pred.float(), target.float())
    errors = F.mse_loss(pred.float(), target.float(), reduction="none")
    return (errors * sample_weights(present.to(errors.device))[:, None, None]).mean()


# ---------------------------------------------------------------- gathered contrastive loss


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for the local slice (one all_reduce);
    works on gloo and NCCL alike."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        ctx.rank, ctx.rows = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_flags(flags: Tensor) -> Tensor:
    """(B,) bool local flags -> (W * B,) all ranks' flags in rank order (no gradient); identity
    without an initialised process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flags
    parts = [torch.empty_like(flags, dtype=torch.uint8) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, flags.to(torch.uint8).contiguous())  # uint8: gloo and NCCL both reduce it
    return torch.cat(parts).bool()


def gather_with_grad(x: Tensor) -> tuple[Tensor, int]:
    """(B, D) local rows -> ((W * B, D) all ranks' rows in rank order, offset of the local rows).
    Identity without an initialised process group. Every rank must pass the same B."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    return _GatherWithGrad.apply(x), dist.get_rank() * x.shape[0]


def initial_logit_scale(temperature: float) -> Tensor:
    """The logit scale that a temperature starts as: log(1 / temperature) (CLIP's parametrisation)."""
    return torch.tensor(math.log(1.0 / temperature))


def logit_multiplier(logit_scale: Tensor) -> Tensor:
    """log(1 / temperature) -> the multiplier of the cosine similarities, clamped at 100 as in CLIP."""
    return logit_scale.float().clamp(max=math.log(100.0)).exp()


class GatheredInfoNCE(nn.Module):
    """Symmetric InfoNCE between paired features, with negatives from all ranks (one all_gather).

    a, b: (B, D) -> scalar, or (B, L, D) -> (L,) one loss per level, the levels sharing the gather.
    No parameters: `logit_scale` (log(1 / temperature), the model's) is an argument of each call."""

    def __init__(self, *, gather_negatives: bool = True):
        super().__init__()
        self.gather_negatives = gather_negatives

    def logits(
        self, a: Tensor, b: Tensor, logit_scale: Tensor, present: Tensor | None = None
    ) -> tuple[Tensor, Tensor, int]:
        """a, b: (B, L, D) paired features -> (a-to-b logits (L, B, W*B), b-to-a logits (L, B, W*B),
        column of the local batch's first row). Row i's positive is column offset + i; with
        `gather_negatives=False` (HiCMAE) the columns are the local batch only and offset is 0.
        `present` (B,) bool: the columns of absent pairs (on any rank) are -inf, no candidate."""
        a_to_b, b_to_a, offset, _ = self.scored(a, b, logit_scale, present)
        return a_to_b, b_to_a, offset

    def scored(
        self, a: Tensor, b: Tensor, logit_scale: Tensor, present: Tensor | None
    ) -> tuple[Tensor, Tensor, int, Tensor | None]:
        """`logits` and the (W*B,) presence of their columns (None without `present`)."""
        return paired_logits(a, b, logit_multiplier(logit_scale), present, self.gather_negatives)

    def forward(self, a: Tensor, b: Tensor, logit_scale: Tensor, present: Tensor | None = None) -> Tensor:
        """`present` (B,) bool: pairs that take part (see the module docstring); None: all of them."""
        single = a.ndim == 2
        if single:
            a, b = a.unsqueeze(1), b.unsqueeze(1)
        loss = symmetric_infonce(*self.scored(a, b, logit_scale, present), present)
        return loss[0] if single else loss


def paired_logits(
    a: Tensor,
    b: Tensor,
    scale: Tensor,
    present: Tensor | None = None,
    gather: bool = True,
    ids: Tensor | None = None,
) -> tuple[Tensor, Tensor, int, Tensor | None]:
    """a, b: (B, L, D) paired features (L2-normalised here, in fp32), `scale` the logit multiplier
    (1 / temperature) -> (a-to-b logits (L, B, W*B), b-to-a logits (L, B, W*B), column of the local
    batch's first row, (W*B,) presence of the columns or None without `present`). Row i's positive is
    column offset + i; with `gather=False` the columns are the local batch only and offset is 0.
    `present` (B,) bool: the columns of absent pairs (on any rank) are -inf, no candidate. `ids` (B,)
    int: a column with the same id as the row (other than its positive) is -inf too, not a negative."""
    note_fp32(
        "contrastive logits (outside autocast)",
        "1 / temperature (14 at 0.07) scales the cosine "
        "similarities, and bf16's 8-bit mantissa would blur the logits",
        a,
        b,
    )
    pairs = F.normalize(torch.stack([a, b], dim=-2).float(), dim=-1)  # (B, L, 2, D)
    everyone, offset = gather_with_grad(pairs) if gather else (pairs, 0)
    # autocast would run the einsum in bf16, whose 8-bit mantissa blurs logits at temperature 0.07
    device = a.device.type
    no_autocast = (
        torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext()
    )
    with no_autocast:
        scale = scale.float()
        a_to_b = scale * torch.einsum("bld,cld->lbc", pairs[:, :, 0], everyone[:, :, 1])
        b_to_a = scale * torch.einsum("bld,cld->lbc", pairs[:, :, 1], everyone[:, :, 0])
    if ids is not None:
        all_ids = gather_with_grad(ids)[0] if gather else ids
        same = ids.to(a.device)[:, None] == all_ids.to(a.device)[None, :]  # (B, W*B)
        rows = torch.arange(a.shape[0], device=a.device)
        same[rows, rows + offset] = False
        a_to_b, b_to_a = a_to_b.masked_fill(same, -math.inf), b_to_a.masked_fill(same, -math.inf)
    if present is None:
        return a_to_b, b_to_a, offset, None
    present = present.to(a.device)
    columns = gather_flags(present) if gather else present
    absent = ~columns
    return a_to_b.masked_fill(absent, -math.inf), b_to_a.masked_fill(absent, -math.inf), offset, columns


def symmetric_infonce(
    a_to_b: Tensor, b_to_a: Tensor, offset: int, columns: Tensor | None, present: Tensor | None = None
) -> Tensor:
    """The symmetric InfoNCE of `paired_logits`' output -> (L,) one loss per level. With `present`,
    absent rows are no anchors and the kept rows are weighed by `sample_weights` among all ranks'
    columns (the module docstring: the rank mean is the mean over every rank's kept pairs)."""
    levels, rows = a_to_b.shape[:2]
    labels = (torch.arange(rows, device=a_to_b.device) + offset).repeat(levels)
    if columns is not None:
        kept = present.to(a_to_b.device)
        weights = sample_weights(kept, among=columns).repeat(levels)
        # an absent row's own positive is -inf: blank the row so its (unused) term stays finite
        a_to_b, b_to_a = (torch.where(kept[:, None], x, 0.0) for x in (a_to_b, b_to_a))

    def one_way(logits: Tensor) -> Tensor:  # (L, B, W*B) -> (L,)
        terms = F.cross_entropy(logits.flatten(0, 1), labels, reduction="none")
        if columns is not None:
            terms = terms * weights
        return terms.view(levels, rows).mean(1)

    return (one_way(a_to_b) + one_way(b_to_a)) / 2
