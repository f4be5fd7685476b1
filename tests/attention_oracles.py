"""Oracles of the attention paths, shared by tests/model/test_attention.py and tests/test_real_size.py: a naive
masked softmax in fp64, and CPU kernels standing in for flash's variable-length ones (their contract: sequences at
cu_seqlens; registered by conftest's `flash_on_cpu` fixture)."""
import collections

import torch

from electra_fast.model.attention import VarlenMask, attend


def lengths_mask(lengths, n):
    return (torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]).long()


def naive_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(d)) v over the real keys only, in fp64; `[B, L, heads, D]` in and out."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    s = s.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2)


def segments(cu_seqlens, max_len):
    """Flash's variable-length contract: `[total, heads, D]` tokens cut into sequences at cu_seqlens."""
    bounds = cu_seqlens.tolist()
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.is_contiguous()
    assert bounds == sorted(bounds) and max(b - a for a, b in zip(bounds, bounds[1:])) <= max_len
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


FLASH_CALLS = collections.Counter()


def flash_forward_cpu(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, return_debug_mask, **kwargs):
    """A CPU kernel for `aten::_flash_attention_forward`, variable-length form only, without dropout: softmax
    attention per sequence in fp64, with the outputs the real kernel has (out, logsumexp [heads, total], ...)."""
    FLASH_CALLS["forward"] += 1
    assert torch.equal(cu_q, cu_k) and not is_causal and dropout_p == 0 and kwargs.get("scale") is None
    assert q.dim() == 3 and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
    out = torch.zeros(q.shape, dtype=q.dtype)
    lse = torch.zeros(q.shape[1], q.shape[0])
    for a, b in segments(cu_q, max_q):
        qs, ks, vs = (t[a:b].double().transpose(0, 1) for t in (q, k, v))  # [heads, n, D]
        s = qs @ ks.transpose(1, 2) / q.shape[-1] ** 0.5
        out[a:b] = (s.softmax(-1) @ vs).transpose(0, 1).to(q.dtype)
        lse[:, a:b] = s.logsumexp(-1).float()
    return out, lse, torch.zeros(2, dtype=torch.uint64), torch.zeros((), dtype=torch.uint64), q.new_empty(0)


def flash_backward_cpu(grad, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, rng_state, unused,
                       **kwargs):
    """Its backward, the textbook formulas per sequence in fp64 (dS = P * (dP - rowsum(dP * P)))."""
    FLASH_CALLS["backward"] += 1
    assert lse.shape == (q.shape[1], q.shape[0]) and out.shape == q.shape == grad.shape
    dq, dk, dv = (torch.zeros(t.shape, dtype=t.dtype) for t in (q, k, v))
    scale = q.shape[-1] ** -0.5
    for a, b in segments(cu_q, max_q):
        qs, ks, vs, g = (t[a:b].double().transpose(0, 1) for t in (q, k, v, grad))
        p = (qs @ ks.transpose(1, 2) * scale).softmax(-1)
        dp = g @ vs.transpose(1, 2)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))
        dq[a:b] = (ds @ ks * scale).transpose(0, 1).to(q.dtype)
        dk[a:b] = (ds.transpose(1, 2) @ qs * scale).transpose(0, 1).to(k.dtype)
        dv[a:b] = (p.transpose(1, 2) @ g).transpose(0, 1).to(v.dtype)
    return dq, dk, dv


def run_attend(q, k, v, prepared, dropout_p=0.0):
    """`attend` on q, k, v in their original order (a `VarlenMask` wants them packed, real tokens first)."""
    if not isinstance(prepared, VarlenMask):
        return attend(q, k, v, prepared, dropout_p)
    return prepared.unpack(attend(*(prepared.pack(t) for t in (q, k, v)), prepared, dropout_p))
