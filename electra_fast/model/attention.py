"""Self-attention over padded batches without a dense additive mask where it can be avoided.

The encoder prepares the padding mask once per forward (`padding_mask`), the layers call `attend` on
`[B, L, heads, D]` q, k, v. Paths (`KernelOptions.attention`, in the model config's `options`):
- no mask at all (`attention_mask=None`: every token real, as the data loader can say from the host without a
  device sync): SDPA with `attn_mask=None`, so an H100 runs FlashAttention. Every impl takes this path.
- "sdpa" (the reference): SDPA with an additive `[B, 1, 1, L]` bias, built once in the scores' dtype (not cast per
  layer). -1e4, not -inf: exp(-1e4) is exactly 0 in fp32, it fits bf16/fp16, and a row with no real key gets a
  uniform softmax instead of NaN. On an H100 a mask means the memory-efficient kernel, not flash.
- "varlen": flash attention's variable-length kernel (`aten._flash_attention_forward` with cumulative sequence
  lengths, the kernel behind SDPA on nested tensors), which applies attention dropout. Shapes stay static: the
  encoder reorders each row once, real tokens first (`VarlenMask.pack`; attention is the only op that mixes
  positions, and position embeddings are added before), every layer then treats the flattened `[B x L]` tokens as
  2B sequences, each row's real tokens and each row's padding (possibly empty), and the encoder restores the order
  after the last layer (`unpack`). Real tokens see exactly the real keys of their row, as under "sdpa"; padding
  sees only padding (under "sdpa" it sees the real keys): no loss reads a padding position, and nothing flows from
  one back to a real token. The hidden states at padding positions therefore differ between paths: they are
  unspecified. q, k, v are views of the packed QKV projection and the output is already `[B, L, H]`: no transpose
  copies. Where flash cannot run (`flash_varlen_supported`: CPU, fp32, ...) the same reordered layout goes through
  SDPA with the key bias (padding then sees the real keys, as under "sdpa"). With dropout on, the random draws
  differ from the other paths' (another kernel, and hidden dropout at the reordered positions): the same
  distribution, not the same numbers.
- "flex": FlexAttention with a padding `BlockMask` built from the `[B, L]` mask in O(B x L) (per key block: all
  real = full, none = skipped, else partial and masked elementwise); no `[B, L, L]` mask is ever formed. FlexAttention
  has no attention dropout, so this path refuses to train with `attention_probs_dropout_prob > 0`. Eager on a GPU
  it runs through a `torch.compile`d flex_attention; inside a compiled step it is lowered with the rest. On a CPU,
  eager, it is PyTorch's unfused reference (tests). A row without any real key gives zeros here (uniform under
  "sdpa"); no loss reads such a row.
- "auto" (default): "varlen" where flash can run (CUDA, bf16/fp16 scores: pretraining under autocast, with or
  without dropout), else "flex" on CUDA without attention dropout, else "sdpa". Whether varlen beats the dense
  bias on a padded training step is for `benchmarks/bench_e2e.py --attention auto,sdpa` on a GPU to say.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from electra_fast.ops import varlen_plan
from electra_fast.ops.varlen_plan import MASK_DTYPES

ATTENTION_IMPLS = ("auto", "sdpa", "varlen", "flex")
MASK_FILL = -1e4
FLEX_BLOCK = 128  # FlexAttention's default (and its kernels') block size


class VarlenMask(NamedTuple):
    """The "varlen" path's mask (module docstring): `electra_fast.ops.varlen_plan`'s `order`, `inverse` (flat
    `[B, L]` indices) and `cu_seqlens`; `bias`: None when the flash kernel runs, else the additive key bias in the
    packed order for SDPA (devices and dtypes flash does not take)."""
    order: torch.Tensor
    inverse: torch.Tensor
    cu_seqlens: torch.Tensor
    bias: Optional[torch.Tensor]

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, L, ...]` in the original order -> real tokens first in every row."""
        return _Reorder.apply(x.reshape(-1, *x.shape[2:]), self.order.view(-1), self.inverse.view(-1)).view(x.shape)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of `pack`."""
        return _Reorder.apply(x.reshape(-1, *x.shape[2:]), self.inverse.view(-1), self.order.view(-1)).view(x.shape)


class _Reorder(torch.autograd.Function):
    """Rows of `x` in `index` order, `index` a permutation with inverse `inverse`: the gradient is the reverse
    reorder (one index_select each way; autograd's index_select backward would zero-fill and index_add)."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


PaddingMask = Union[torch.Tensor, BlockMask, VarlenMask]  # additive bias ("sdpa"), "flex", "varlen"


def attention_bias(attention_mask: Optional[torch.Tensor], dtype: torch.dtype = torch.float32
                   ) -> Optional[torch.Tensor]:
    """`[B, L]` 1/0 mask -> additive `[B, 1, 1, L]` bias in `dtype` (None stays None, so SDPA may pick flash)."""
    if attention_mask is None:
        return None
    return ((attention_mask == 0).to(dtype) * MASK_FILL)[:, None, None, :]


@torch.compiler.assume_constant_result
def flash_varlen_supported(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether `aten._flash_attention_forward` runs here, with a backward: a CUDA (not ROCm) build of torch with
    flash attention, fp16/bf16, and torch's own SDPA check of flash for this GPU, dtype and head dim (sm_80 or
    later, head dim a multiple of 8 up to 256, 192 for a backward on sm_86/89, flash not switched off with
    `torch.backends.cuda.enable_flash_sdp(False)`). Host-side facts only: a constant to torch.compile."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16) or torch.version.hip:
        return False
    return _flash_runs(device.index if device.index is not None else torch.cuda.current_device(), dtype, head_dim)


@functools.cache
def _flash_runs(index: int, dtype: torch.dtype, head_dim: int) -> bool:
    if head_dim % 8 or not torch.backends.cuda.is_flash_attention_available():
        return False
    from torch.backends.cuda import SDPAParams, can_use_flash_attention

    q = torch.empty(1, 1, 8, head_dim, device=torch.device("cuda", index), dtype=dtype, requires_grad=True)
    try:
        params = SDPAParams(q, q, q, None, 0.1, False, False)
    except TypeError:  # a torch whose SDPAParams takes other arguments: the rules that are sure
        return head_dim <= 256 and torch.cuda.get_device_capability(index) >= (8, 0)
    return can_use_flash_attention(params)


def varlen_mask(attention_mask: torch.Tensor, flash: bool, dtype: torch.dtype = torch.float32,
                backend: Optional[str] = None) -> VarlenMask:
    """`[B, L]` 1/0 mask -> `VarlenMask` (one kernel on a GPU, `ops.varlen_plan` on `backend`). `flash` False adds
    the SDPA key bias in `dtype` for the packed order."""
    if attention_mask.dtype not in MASK_DTYPES:  # float, uint8, ... masks: what every other path accepts
        attention_mask = attention_mask != 0
    order, inverse, cu_seqlens = varlen_plan(attention_mask, backend=backend)
    bias = None
    if not flash:
        lengths = (cu_seqlens[1::2] - cu_seqlens[:-1:2])[:, None]
        bias = attention_bias((torch.arange(attention_mask.shape[1], device=lengths.device) < lengths).int(), dtype)
    return VarlenMask(order, inverse, cu_seqlens, bias)


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


def padding_mask(attention_mask: Optional[torch.Tensor], impl: str, *, dtype: torch.dtype, dropout: bool,
                 head_dim: int, backend: Optional[str] = None) -> Optional[PaddingMask]:
    """What `attend` takes, built once per encoder forward (module docstring).

    Args:
        attention_mask: `[B, L]`, nonzero = real token; None = every token real (no mask at all).
        impl: one of `ATTENTION_IMPLS`.
        dtype: the attention scores' dtype (the additive bias is made in it; flash needs fp16/bf16).
        dropout: whether attention dropout is active (training with p > 0): "flex" cannot apply it.
        head_dim: per-head width (flash takes multiples of 8 up to 256).
        backend: the backend of the op that plans the "varlen" layout (`ops.varlen_plan`); None: its default.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if attention_mask is None:
        return None
    flash = impl in ("auto", "varlen") and flash_varlen_supported(attention_mask.device, dtype, head_dim)
    if impl == "auto":
        impl = "varlen" if flash else "flex" if attention_mask.is_cuda and not dropout else "sdpa"
    if impl == "sdpa":
        return attention_bias(attention_mask, dtype)
    if impl == "varlen":
        return varlen_mask(attention_mask, flash, dtype, backend)
    if dropout:
        raise ValueError("attention_impl='flex' cannot apply attention dropout (FlexAttention has none): use "
                         "'varlen', 'sdpa' or 'auto' to train with attention_probs_dropout_prob > 0, or set it to 0")
    return padding_block_mask(attention_mask)


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention)


def flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int,
                 dropout_p: float) -> torch.Tensor:
    """`[total, heads, D]` q, k, v (last dim contiguous), sequences at `cu_seqlens` -> `[total, heads, D]`."""
    return torch.ops.aten._flash_attention_forward(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, dropout_p,
                                                   False, False)[0]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[PaddingMask],
           dropout_p: float = 0.0) -> torch.Tensor:
    """Attention of `[B, L, heads, D]` q, k, v under a `padding_mask` result -> `[B, L, heads, D]` (for a
    `VarlenMask`: in its packed order, as `pack` left the hidden states)."""
    if isinstance(mask, VarlenMask):
        if mask.bias is None:
            b, n, h, d = q.shape
            flat = (t.reshape(b * n, h, d) for t in (q, k, v))  # views: [B, L] merge in the packed projection
            return flash_varlen(*flat, mask.cu_seqlens, n, dropout_p).reshape(b, n, h, d)
        mask = mask.bias
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if isinstance(mask, BlockMask):
        fn = _compiled_flex() if q.is_cuda and not torch.compiler.is_compiling() else flex_attention
        return fn(q, k, v, block_mask=mask).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p).transpose(1, 2)
