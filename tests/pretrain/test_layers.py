"""pretrain/layers.py: the transformer layers shared by encoders and decoders."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import torch

from pretrain.layers import Attention, Block, CrossSelfBlock, gather_tokens

REPO = Path(__file__).resolve().parents[2]


def test_encoder_modules_import_only_torch_timm_einops_and_the_standard_library():
    # Exports and fine-tuning load these without training code (STYLE.md lesson 1).
    allowed = {"torch", "timm", "einops", "pretrain"} | set(sys.stdlib_module_names) | {"__future__"}
    for name in ("layers.py", "encoders.py"):
        tree = ast.parse((REPO / "pretrain" / name).read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert {m.split(".")[0] for m in imported} <= allowed, name
        assert {m for m in imported if m.startswith("pretrain")} <= {"pretrain.layers"}, name


def test_cross_attention_treats_the_context_as_a_set():
    torch.manual_seed(0)
    attn = Attention(16, 4, cross=True)
    x, context = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    out = attn(x, context)
    torch.testing.assert_close(attn(x, context[:, torch.randperm(7)]), out)
    assert not torch.allclose(attn(x, torch.randn(2, 7, 16)), out)


def test_blocks_carry_no_positions_so_permuting_queries_permutes_outputs():
    torch.manual_seed(0)
    perm = torch.randperm(6)
    x, context = torch.randn(2, 6, 16), torch.randn(2, 3, 16)
    block, cross = Block(16, 4).eval(), CrossSelfBlock(16, 4).eval()
    torch.testing.assert_close(block(x[:, perm]), block(x)[:, perm])
    torch.testing.assert_close(cross(x[:, perm], context), cross(x, context)[:, perm])


def test_gather_tokens_picks_each_rows_own_indices():
    x = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    ids = torch.tensor([[3, 0], [1, 1]])
    torch.testing.assert_close(gather_tokens(x, ids), torch.stack([x[0, [3, 0]], x[1, [1, 1]]]))
