"""The layout plan of flash's variable-length attention over a padded batch: `[B, L]` mask -> (order, inverse,
cu_seqlens), one kernel on a GPU (the PyTorch reference takes ~12).

Each row is reordered real tokens first, each kind in its original order; `electra_fast.model.attention` ("varlen")
packs the hidden states with `order` before the first layer and restores them with `inverse` after the last. Both
hold flat indices into the `[B x L]` tokens (row offsets included), so a reorder is one `index_select`. The
flattened packed tokens form 2B sequences: row b's real tokens from b x L, its padding (possibly none) from
b x L + length_b; `cu_seqlens [2B + 1]` (int32, as flash takes it) lists their starts and then B x L.
"""
from __future__ import annotations

from typing import Optional

import torch

from electra_fast.ops._backend import resolve
from electra_fast.ops._checks import check_tensor
from electra_fast.ops._contract import varlen_plan_fake

MASK_DTYPES = (torch.int64, torch.int32, torch.bool)


def varlen_plan_reference(attention_mask: torch.Tensor):
    real = attention_mask != 0
    b, n = real.shape
    flat = torch.arange(b * n, device=real.device).view(b, n)
    starts = torch.arange(b, device=real.device)[:, None] * n
    before = real.cumsum(1)  # real tokens up to and including each position
    lengths = real.sum(1, keepdim=True)
    # A real token goes after the real ones before it; padding after all real ones and the padding before it.
    inverse = torch.where(real, starts + before - 1, flat + lengths - before)
    order = torch.empty_like(inverse).view(-1).scatter_(0, inverse.view(-1), flat.view(-1)).view(b, n)
    cu_seqlens = torch.cat([starts, starts + lengths], 1).view(-1)
    cu_seqlens = torch.cat([cu_seqlens, cu_seqlens.new_full((1,), b * n)]).to(torch.int32)
    return order, inverse, cu_seqlens


@torch.library.custom_op("electra_fast::varlen_plan", mutates_args=())
def _varlen_plan_op(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return varlen_plan_reference(attention_mask)


_varlen_plan_op.register_fake(varlen_plan_fake)


def varlen_plan(attention_mask: torch.Tensor, *, backend: Optional[str] = None):
    """`[B, L]` padding mask (nonzero = real token) -> `(order, inverse, cu_seqlens)` (module docstring).

    `packed.view(B * L, ...)[k] = x.view(B * L, ...)[order.view(-1)[k]]` puts each row's real tokens first;
    `inverse` undoes it. `cu_seqlens`: int32 `[2B + 1]`. No device sync, static shapes.
    """
    check_tensor(attention_mask, "attention_mask", ndim=2, dtypes=MASK_DTYPES)
    b, n = attention_mask.shape
    if b * n >= 2**31:
        raise ValueError(f"attention_mask must have fewer than 2**31 elements (cu_seqlens are int32), got shape "
                         f"{(b, n)}")
    _, kernel = resolve("varlen_plan", backend, attention_mask.device)
    return (kernel or _varlen_plan_op)(attention_mask.contiguous())
