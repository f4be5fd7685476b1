"""Self-attention over padded batches without a dense additive mask where it can be avoided (issue 11.2).

The encoder prepares the padding mask once per forward (`padding_mask`), the layers call `attend`. Paths
(`_Encoder.attention_impl`):
- no mask at all (`attention_mask=None`: every token real, as the data loader can say from the host without a
  device sync): SDPA with `attn_mask=None`, so an H100 runs FlashAttention. Every impl takes this path.
- "sdpa" (the reference): SDPA with an additive `[B, 1, 1, L]` bias, built once in the scores' dtype (not cast per
  layer). -1e4, not -inf: exp(-1e4) is exactly 0 in fp32, it fits bf16/fp16, and a row with no real key gets a
  uniform softmax instead of NaN. On an H100 a mask means the memory-efficient kernel, not flash.
- "flex": FlexAttention with a padding `BlockMask` built from the `[B, L]` mask in O(B x L) (per key block: all
  real = full, none = skipped, else partial and masked elementwise); no `[B, L, L]` mask is ever formed. FlexAttention
  has no attention dropout, so this path refuses to train with `attention_probs_dropout_prob > 0`. Eager on a GPU
  it runs through a `torch.compile`d flex_attention; inside a compiled step it is lowered with the rest. On a CPU,
  eager, it is PyTorch's unfused reference (tests). A row without any real key gives zeros here (uniform under
  "sdpa"); no loss reads such a row.
- "auto" (default): "flex" on CUDA when attention dropout is inactive (eval, or p = 0), else "sdpa". Pretraining
  with ELECTRA's attention dropout 0.1 therefore takes "sdpa" for padded batches and flash for unpadded ones:
  neither FlexAttention nor torch's varlen flash attention (`torch.nn.attention.varlen`) applies dropout.
"""
from __future__ import annotations

import functools
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

ATTENTION_IMPLS = ("auto", "sdpa", "flex")
MASK_FILL = -1e4
FLEX_BLOCK = 128  # FlexAttention's default (and its kernels') block size

PaddingMask = Union[torch.Tensor, BlockMask]  # additive bias ("sdpa") or block mask ("flex")


def attention_bias(attention_mask: Optional[torch.Tensor], dtype: torch.dtype = torch.float32
                   ) -> Optional[torch.Tensor]:
    """`[B, L]` 1/0 mask -> additive `[B, 1, 1, L]` bias in `dtype` (None stays None, so SDPA may pick flash)."""
    if attention_mask is None:
        return None
    return ((attention_mask == 0).to(dtype) * MASK_FILL)[:, None, None, :]


def padding_block_mask(attention_mask: torch.Tensor, block_size: int = FLEX_BLOCK) -> BlockMask:
    """`[B, L]` 1/0 mask -> FlexAttention `BlockMask` letting every query see exactly the real keys of its row.

    Built from per-block counts of real keys (O(B x L), no sync, static shapes): a key block with only real keys
    is "full" (no mask evaluated), one with some is "partial" (mask_mod per element), one with none is skipped.
    """
    real = attention_mask != 0
    b, n = real.shape
    blocks = -(-n // block_size)
    counts = F.pad(real, (0, blocks * block_size - n)).view(b, blocks, block_size).sum(-1)
    # [B, query block, key block]. A block cut by the sequence end (L not a multiple of block_size), on either
    # side, is partial, as in create_block_mask: its mask_mod and bounds are evaluated per element.
    whole = torch.arange(1, blocks + 1, device=real.device) * block_size <= n
    full = (counts == block_size)[:, None, :] & whole[None, :, None]
    partial = (counts > 0)[:, None, :] & ~full

    def ordered(selected):  # -> (count, indices with the selected key blocks first), one head dim
        idx = torch.argsort((~selected).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return selected.sum(-1, dtype=torch.int32)[:, None], idx[:, None]

    def key_is_real(batch, head, q_idx, kv_idx):
        return real[batch, kv_idx]

    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size,
                                    mask_mod=key_is_real, seq_lengths=(n, n))


def padding_mask(attention_mask: Optional[torch.Tensor], impl: str, *, dtype: torch.dtype,
                 dropout: bool) -> Optional[PaddingMask]:
    """What `attend` takes, built once per encoder forward (module docstring).

    Args:
        attention_mask: `[B, L]`, nonzero = real token; None = every token real (no mask at all).
        impl: one of `ATTENTION_IMPLS`.
        dtype: the attention scores' dtype (the additive bias is made in it).
        dropout: whether attention dropout is active (training with p > 0): "flex" cannot apply it.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if attention_mask is None:
        return None
    if impl == "auto":
        impl = "flex" if attention_mask.is_cuda and not dropout else "sdpa"
    if impl == "sdpa":
        return attention_bias(attention_mask, dtype)
    if dropout:
        raise ValueError("attention_impl='flex' cannot apply attention dropout (FlexAttention has none): use "
                         "'sdpa' or 'auto' to train with attention_probs_dropout_prob > 0, or set it to 0")
    return padding_block_mask(attention_mask)


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[PaddingMask],
           dropout_p: float = 0.0) -> torch.Tensor:
    """Attention of `[B, heads, L, D]` q, k, v under a `padding_mask` result -> `[B, heads, L, D]`."""
    if isinstance(mask, BlockMask):
        fn = _compiled_flex() if q.is_cuda and not torch.compiler.is_compiling() else flex_attention
        return fn(q, k, v, block_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
