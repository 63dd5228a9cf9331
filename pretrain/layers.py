"""Generic transformer layers shared by the encoders and the MAE decoders (docs/model.md): SDPA attention
with q/v biases only, pre-norm self-attention blocks, "cross then self" blocks, fixed sinusoidal
position tables and the reference initialisation. Imports only torch, timm and einops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import DropPath, Mlp
from torch import Tensor, nn

LN_EPS = 1e-6


def sinusoid_table(num_tokens: int, dim: int) -> Tensor:
    """Fixed 1-D sin/cos position table over a flattened token grid: (1, N, dim)."""
    # float64 throughout, cast once at the end (as HiCMAE's numpy table): a float32 table is ~1e-6 off
    pos = torch.arange(num_tokens, dtype=torch.float64)[:, None]
    rates = 1.0 / 10000 ** (2 * (torch.arange(dim, dtype=torch.float64) // 2) / dim)
    angles = pos * rates[None, :]
    table = torch.where(torch.arange(dim) % 2 == 0, torch.sin(angles), torch.cos(angles))
    return table.float().unsqueeze(0)


def gather_tokens(x: Tensor, ids: Tensor) -> Tensor:
    """x: (B, N, D), ids: (B, K) -> (B, K, D)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class Attention(nn.Module):
    """Multi-head attention through SDPA with q and v biases only; `cross=True` takes keys/values
    from a separate context sequence."""

    def __init__(self, dim: int, heads: int, qv_bias: bool = True, cross: bool = False):
        super().__init__()
        self.heads, self.cross = heads, cross
        if cross:
            self.q = nn.Linear(dim, dim, bias=qv_bias)
            self.kv = nn.Linear(dim, 2 * dim, bias=False)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=False)
            self.q_bias = nn.Parameter(torch.zeros(dim)) if qv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qv_bias else None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """x: (B, N, D), context: (B, M, D) for cross attention -> (B, N, D)."""
        if self.cross:
            q = self.q(x)
            kv_bias = None if self.v_bias is None else torch.cat([torch.zeros_like(self.v_bias), self.v_bias])
            k, v = F.linear(context, self.kv.weight, kv_bias).chunk(2, dim=-1)
        else:
            bias = None
            if self.q_bias is not None:
                bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
            q, k, v = F.linear(x, self.qkv.weight, bias).chunk(3, dim=-1)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


def _mlp(dim: int, mlp_ratio: float) -> Mlp:
    return Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)


class Block(nn.Module):
    """Pre-norm transformer block: self-attention, then MLP."""

    def __init__(
        self, dim: int, heads: int, mlp_ratio: float = 4.0, qv_bias: bool = True, drop_path: float = 0.0
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, heads, qv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = _mlp(dim, mlp_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class CrossSelfBlock(nn.Module):
    """ "Cross then self" block: the query stream attends to a context stream (separate norms for
    query and context), then to itself, then MLP."""

    def __init__(
        self, dim: int, heads: int, mlp_ratio: float = 4.0, qv_bias: bool = True, drop_path: float = 0.0
    ):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim, eps=LN_EPS)
        self.norm_context = nn.LayerNorm(dim, eps=LN_EPS)
        self.cross_attn = Attention(dim, heads, qv_bias, cross=True)
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, heads, qv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = _mlp(dim, mlp_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """x: (B, N, D), context: (B, M, D) -> (B, N, D)."""
        x = x + self.drop_path(self.cross_attn(self.norm_q(x), self.norm_context(context)))
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def init_weights(m: nn.Module) -> None:
    """The reference's init (docs/model.md): xavier-uniform linears with zero bias, LayerNorm (1, 0)."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
