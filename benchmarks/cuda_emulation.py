"""CUDA's op stream on a CPU, for benchmarks/step_model.py's count (its docstring says what is emulated and why):
CUDA autocast's fp32 policy, the fused dropout kernel, the H100's attention kernel choice (flash's variable-length
kernel with its FLOPs at the batch's real lengths), and the Triton backend with its launches intercepted."""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

from electra_fast.model import attention
from step_counter import StepCounter

aten = torch.ops.aten
# CUDA autocast's fp32 policy (aten/src/ATen/autocast_mode.cpp) for ops that CPU autocast leaves in bf16.
CUDA_FP32_OPS = ("layer_norm", "group_norm", "softmax.int", "log_softmax.int", "exp", "log", "log1p", "expm1",
                 "rsqrt", "reciprocal", "pow.Tensor_Scalar", "softplus", "logsumexp", "sum", "sum.dim_IntList",
                 "cumsum", "prod", "norm.Scalar", "erfinv")


def _fp32_kernel(op):
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def kernel(*args, **kwargs):
        cast = [a.float() if isinstance(a, torch.Tensor) and a.dtype in (torch.bfloat16, torch.float16) else a
                for a in args]
        with torch._C._ExcludeDispatchKeyGuard(keys):
            return op(*cast, **kwargs)
    return kernel


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """The H100's choice: flash attention without a mask, memory-efficient attention with an additive one."""
    if attn_mask is None:
        return aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, scale=scale)[0]
    bias = attn_mask.to(query.dtype).expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    need_lse = query.requires_grad or key.requires_grad or value.requires_grad
    return aten._scaled_dot_product_efficient_attention(query, key, value, bias, need_lse, dropout_p, is_causal,
                                                        scale=scale)[0]


def varlen_flop_formulas(cu_seqlens: torch.Tensor) -> dict:
    """flop_counter's attention formulas for flash's variable-length kernels, one sequence at a time at the batch's
    real lengths (its registry, given a fake `cu_seqlens`, counts every sequence at the maximum length: 2 x the
    dense FLOPs for ours, 2B sequences of L)."""
    lengths = [n for n in cu_seqlens.diff().tolist() if n]

    def forward(query, *args, **kwargs):
        shapes = [(1, query.shape[1], n, query.shape[2]) for n in lengths]
        return sum(sdpa_flop_count(s, s, s) for s in shapes)

    def backward(grad_out, query, *args, **kwargs):
        shapes = [(1, query.shape[1], n, query.shape[2]) for n in lengths]
        return sum(sdpa_backward_flop_count(s, s, s, s) for s in shapes)

    forward._get_raw = backward._get_raw = True
    return {aten._flash_attention_forward: forward, aten._flash_attention_backward: backward}


def _dropout(x, p=0.5, training=True, inplace=False):
    if not training or p == 0:
        return x
    return torch.native_dropout(x, p, True)[0]


@contextlib.contextmanager
def cuda_like(counter: StepCounter):
    """CUDA's op stream on the CPU (module docstring): autocast fp32 policy, fused dropout, SDPA kernel choice,
    Triton backend with its launches intercepted and counted."""
    import triton.runtime.interpreter as interp
    import triton.runtime.jit as jit
    import warnings

    from electra_fast.ops import get_backend, set_backend

    lib = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in CUDA_FP32_OPS:
            base, _, overload = name.partition(".")
            lib.impl(name, _fp32_kernel(getattr(getattr(aten, base), overload or "default")), "AutocastCPU")
    runs = {cls: cls.run for cls in (jit.JITFunction, interp.InterpretedFunction)}

    def run(fn, *args, grid=None, warmup=False, **kwargs):
        counter.triton_launch(fn, args)

    saved = (F.dropout, F.scaled_dot_product_attention, get_backend(), os.environ.get("TRITON_INTERPRET"),
             attention.flash_varlen_supported)
    F.dropout, F.scaled_dot_product_attention = _dropout, _sdpa
    attention.flash_varlen_supported = lambda device, dtype, head_dim: dtype in (torch.float16, torch.bfloat16)
    os.environ["TRITON_INTERPRET"] = "1"  # lets the backend switch pick Triton for CPU tensors; nothing runs
    set_backend("triton")
    for cls in runs:
        cls.run = run
    try:
        yield
    finally:
        for cls, fn in runs.items():
            cls.run = fn
        F.dropout, F.scaled_dot_product_attention = saved[0], saved[1]
        attention.flash_varlen_supported = saved[4]
        set_backend(saved[2])
        if saved[3] is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved[3]
        lib._destroy()
