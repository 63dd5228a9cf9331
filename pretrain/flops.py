"""FLOP counts that include attention on every device.

`torch.utils.flop_counter` has formulas for the CUDA kernels of `scaled_dot_product_attention`
(flash, memory-efficient, cuDNN) but not for the CPU flash kernel, so on the CPU a step's attention
counted 0 FLOPs and the reported utilisation was understated. The CPU ops take (query, key, value)
first, as the CUDA ones do, so PyTorch's own SDPA formulas apply to them unchanged.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry

_aten = torch.ops.aten


def _as_registered(op):
    """The registry's formula for `op`, marked so FlopCounterMode does not wrap it a second time (the
    registered formulas already turn tensors into shapes)."""
    formula = flop_registry[op]

    def count(*args, **kwargs) -> int:
        return formula(*args, **kwargs)

    count._get_raw = True
    return count


CPU_ATTENTION_FORMULAS = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _as_registered(
        _aten._scaled_dot_product_flash_attention
    ),
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _as_registered(
        _aten._scaled_dot_product_flash_attention_backward
    ),
}


def flop_counter() -> FlopCounterMode:
    """A silent `FlopCounterMode` that also counts the CPU attention kernels (a multiply-add is 2 FLOPs)."""
    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FORMULAS)
