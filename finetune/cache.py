"""Frozen-encoder feature cache for the probes: every window of the dataset is encoded ONCE (per
evaluated modality) and all folds, epochs and heads read the cached tensors.

Linear probe: token-means of every layer and of the fusion outputs (a few KiB per window).
Attentive probe: the fusion encoder's tokens, stored as float16 to halve memory and disk.
Files: `features-<fingerprint>.safetensors` + `.json` (keys, clip keys, targets, timing), where the
fingerprint covers the encoder weights, the shards and what was cached, so a stale cache is never read.

Window order is shard order whatever the number of ranks and loader workers: each rank encodes its
exact-once share (contiguous ranges of the shards, one per worker), keeps its workers' batches in
worker order, and the ranks' parts are joined in rank order (`join_caches`). The probes draw their
batches by window index, so the same cache gives the same training on 1 or 8 GPUs.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from data_pipelines.atomic import atomic_write, write_json
from finetune.heads import fusion_tokens
from finetune.losses import batch_targets
from finetune.modality import drop_modality
from pretrain.encoders import normalize_video
from pretrain.pooling import pool_tokens


@dataclass
class FeatureCache:
    """keys/clip_keys: one per window; targets `(N,)` or `(N, K)`; features[mode][name] `(N, ...)`."""

    keys: list[str]
    clip_keys: list[str]
    targets: np.ndarray
    features: dict[str, dict[str, torch.Tensor]]
    seconds: float = 0.0

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for m in self.features.values() for t in m.values())

    def select(self, mode: str, index: np.ndarray) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(index, dtype=torch.long)
        return {name: t[idx] for name, t in self.features[mode].items()}


@torch.inference_mode()
def build_cache(
    encoder: torch.nn.Module,
    batches: Iterable[dict],
    modes: list[str],
    kind: str,
    task: str,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> FeatureCache:
    """Encode every batch of an exact-once evaluation stream in each mode (av / audio / video); the
    batches are kept in loader-worker order (`batch["stream"]["worker"]`), which is shard order.
    `progress(n)` is told the windows of each batch. A rank's share may be empty: `join_caches`
    checks the whole."""
    if kind not in ("pooled", "tokens"):
        raise ValueError(f"kind must be 'pooled' or 'tokens', got {kind!r}")
    extract, dtype = (pool_tokens, torch.float32) if kind == "pooled" else (fusion_tokens, torch.float16)
    encoder.eval().to(device)
    encoded: list[tuple[int, list[str], list[str], np.ndarray, dict[str, dict[str, torch.Tensor]]]] = []
    start = time.perf_counter()
    for batch in batches:
        video = normalize_video(batch["video"].to(device))
        fbank = batch["fbank"].to(device).float()
        features: dict[str, dict[str, torch.Tensor]] = {}
        for mode in modes:
            out = extract(encoder.forward_features(*drop_modality(video, fbank, mode)))
            features[mode] = {name: t.to("cpu", dtype) for name, t in out.items()}
        encoded.append(
            (
                batch.get("stream", {}).get("worker", 0),
                list(batch["key"]),
                list(batch["clip_key"]),
                batch_targets(batch, task).cpu().numpy(),
                features,
            )
        )
        if progress is not None:
            progress(len(batch["key"]))
    encoded.sort(key=lambda e: e[0])  # stable: each worker's batches stay in their order
    if not encoded:
        return FeatureCache([], [], np.zeros(0), {}, time.perf_counter() - start)
    features = {m: {n: torch.cat([e[4][m][n] for e in encoded]) for n in encoded[0][4][m]} for m in modes}
    return FeatureCache(
        [k for e in encoded for k in e[1]],
        [k for e in encoded for k in e[2]],
        np.concatenate([e[3] for e in encoded]),
        features,
        time.perf_counter() - start,
    )


def join_caches(parts: list[FeatureCache]) -> FeatureCache:
    """The ranks' caches, in rank order, as one; `seconds` is the slowest rank's."""
    parts = [p for p in parts if p.keys] or parts
    if not parts or not parts[0].keys:
        raise RuntimeError("the evaluation stream gave no samples to cache")
    if len(parts) == 1:
        return parts[0]
    features = {
        m: {n: torch.cat([p.features[m][n] for p in parts]) for n in named}
        for m, named in parts[0].features.items()
    }
    return FeatureCache(
        [k for p in parts for k in p.keys],
        [k for p in parts for k in p.clip_keys],
        np.concatenate([p.targets for p in parts]),
        features,
        max(p.seconds for p in parts),
    )


def speaker_normalized(cache: FeatureCache, speakers: list[str], eps: float = 1e-6) -> FeatureCache:
    """The cache with every feature z-scored per speaker: each speaker's windows get their own mean
    and std per feature position (a constant feature is only centred), separately per modality mode.
    Identity (face colour, voice pitch) moves a speaker's features together; expression moves them
    within the speaker. No labels are read, so the test speakers' statistics are fair to use."""
    groups = np.asarray(speakers)
    if len(groups) != len(cache.keys):
        raise ValueError(f"speaker_normalized: {len(groups)} speakers for {len(cache.keys)} cached windows")
    features: dict[str, dict[str, torch.Tensor]] = {}
    for mode, named in cache.features.items():
        features[mode] = {}
        for name, t in named.items():
            out = t.float().clone()
            for speaker in np.unique(groups):
                rows = torch.from_numpy(np.flatnonzero(groups == speaker))
                x = out[rows]
                std = x.std(0) if len(rows) > 1 else torch.ones_like(x[0])
                out[rows] = (x - x.mean(0)) / torch.where(std > eps, std, torch.ones_like(std))
            features[mode][name] = out.to(t.dtype)
    return FeatureCache(cache.keys, cache.clip_keys, cache.targets, features, cache.seconds)


def fingerprint(*parts: object) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_cache(cache: FeatureCache, path: Path) -> None:
    """Write `<path>.safetensors`, then `<path>.json`, each through a temporary file and a rename:
    the fold tasks of a SLURM array may share one `cache_dir`, and a reader must never see a
    half-written cache (the .json, renamed last, marks it complete)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {f"{m}.{n}": t.contiguous() for m, d in cache.features.items() for n, t in d.items()}
    meta = {
        "keys": cache.keys,
        "clip_keys": cache.clip_keys,
        "targets": cache.targets.tolist(),
        "seconds": cache.seconds,
        "modes": list(cache.features),
    }
    atomic_write(path.with_suffix(".safetensors"), lambda tmp: save_file(flat, str(tmp)))
    write_json(path.with_suffix(".json"), meta, indent=None)


def load_cache(path: Path) -> FeatureCache | None:
    """The cache at `path` (without suffix), or None when it is not there."""
    tensors, meta = path.with_suffix(".safetensors"), path.with_suffix(".json")
    if not (tensors.is_file() and meta.is_file()):
        return None
    info = json.loads(meta.read_text())
    flat = load_file(str(tensors))
    features: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in flat.items():
        mode, key = name.split(".", 1)
        features.setdefault(mode, {})[key] = t
    return FeatureCache(
        info["keys"], info["clip_keys"], np.asarray(info["targets"]), features, info["seconds"]
    )
