"""pretrain/layers.py: the transformer layers shared by encoders and decoders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from pretrain.layers import Attention, Block, CrossSelfBlock, gather_tokens

REPO = Path(__file__).resolve().parents[2]


def test_encoder_modules_import_without_training_dependencies():
    code = (
        "import sys, pretrain.layers, pretrain.encoders; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'lightning', 'pytorch_lightning', 'deepspeed', 'wandb', 'omegaconf', 'data_pipelines', 'finetune'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


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
