"""The fused LM head (`ops.lm_head_loss_and_sample`) at its default chunking: the peak memory (every allocation
counted) and the number of kernels launched, for the reference (torch backend, on the CPU) and the Triton backend
(in the interpreter with TRITON_INTERPRET=1, or on a GPU at the real sizes)."""
import collections
import gc
import importlib
import math
import os
import weakref

import pytest
import torch
from torch._C._profiler import _EventType
from torch._library.custom_ops import OPDEFS
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from electra_fast import ops
lm_ops = importlib.import_module("electra_fast.ops.lm_head_loss_and_sample")
contract = importlib.import_module("electra_fast.ops._contract")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# On a GPU these run the Triton kernels compiled (no interpreter): validate_gpu's `--rest` selects them by this marker.
pytestmark = pytest.mark.triton
TRITON_DEVICE = "cpu" if INTERPRET else "cuda"
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or not (INTERPRET or torch.cuda.is_available()),
    reason="the Triton backend needs triton and a CUDA GPU, or TRITON_INTERPRET=1")


REAL = {"small": (2432, 128), "base": (5056, 768)}  # (M, E): B x N slots and the generator's width
REAL_V, REAL_W = 30522, 30592  # BERT's vocabulary, padded to a multiple of 128
# Kernels (`profiled`) of one forward + backward of the reference at its default chunking before chunks were sized by
# bytes (548-row chunks: 5 at small, 10 at base), at the real shapes: the count not to exceed.
OLD_REFERENCE_KERNELS = {"small": 206, "base": 391}
# Kernels of a forward + backward, fixed + per chunk (pinned: a change of either is deliberate). The reference's chunk:
# the logits GEMM, the noise, 4 for the Gumbel scores, 2 argmax, log_softmax, gather, exp, scale, onehot, 3 gradient
# GEMMs. The Triton backend's: the logits GEMM, the row kernel and the copy of its samples, the backward kernel,
# 2 gradient GEMMs, the bias gradient's sum and add.
REFERENCE_FIXED, REFERENCE_PER_CHUNK = 26, 16
TRITON_FIXED, TRITON_PER_CHUNK = 16, 8
# ATen ops that launch no kernel of their own: views, allocations, no-op conversions, reads of a scalar.
NOT_KERNELS = {"aten::" + name for name in (
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "as_strided", "view", "_reshape_alias",
    "reshape", "_unsafe_view", "t", "transpose", "permute", "numpy_T", "slice", "select", "narrow", "expand",
    "unsqueeze", "squeeze", "split", "unbind", "detach", "alias", "lift_fresh", "resize_", "set_", "to",
    "contiguous", "resolve_conj", "resolve_neg", "real", "result_type", "item", "_local_scalar_dense",
    "is_nonzero", "_has_compatible_shallow_copy_type")}


def shape_at(name, f):
    """(m, e, v, w): ELECTRA-`name`'s head with M, E and V scaled by f (W: V padded to a multiple of 8). With
    CHUNK_BYTES scaled by f**2 every ratio to the [M, V] logits stays: chunk rows / M, E / M (the [W, E]
    accumulator), E / V (the [M, E] gradient)."""
    m, e = REAL[name]
    v = round(REAL_V * f)
    return round(m * f), max(1, round(e * f)), v, (REAL_W if f == 1 else -(-v // 8) * 8)


def scale_default_chunk(monkeypatch, f):
    """The default chunk rule for a head scaled by f (`shape_at`): CHUNK_BYTES times f**2; untouched at f = 1."""
    if f != 1:
        monkeypatch.setattr(contract, "CHUNK_BYTES", round(contract.CHUNK_BYTES * f * f))


def head_inputs(m, e, v, w, device="cpu", dtype=torch.float32):
    hidden = torch.randn(m, e, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(w, e, device=device) * 0.05).to(dtype)
    weight[v:] = 0.0
    bias = torch.zeros(w, device=device, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, v, (m,), device=device)
    weights = (torch.rand(m, device=device) > 0.15).float()
    return hidden, weight.requires_grad_(), bias, targets, weights


def head_step(inputs, v, backend, **kw):
    """Forward + backward from no gradient yet (a first backward stores the gradients, adds nothing)."""
    for t in inputs[:3]:
        t.grad = None
    loss, _, _ = ops.lm_head_loss_and_sample(*inputs, vocab_size=v, backend=backend, **kw)
    loss.backward()


def profiled(fn):
    """(peak, kernels) of `fn()` on the CPU: the most bytes the CPU allocator held at once above what it held before
    (every allocation and free, the profiler's memory events), and the kernels: ATen ops that do work (not in
    NOT_KERNELS) and call no other such op (a composite op counts as its parts)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocs, kernels = [], []

    def walk(nodes):
        for n in nodes:
            if n.tag == _EventType.Allocation:
                allocs.append((n.start_time_ns, n.extra_fields.alloc_size))
                continue
            before = len(kernels)
            walk(n.children)
            if (n.tag == _EventType.TorchOp and len(kernels) == before and n.name.startswith("aten::")
                    and n.name not in NOT_KERNELS):
                kernels.append(n.name)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    live = peak = 0
    for _, size in sorted(allocs):
        live += size
        peak = max(peak, live)
    return peak, kernels


def fixed_and_per_chunk(count):
    """A kernel count linear in the number of chunks, `count(chunk_size)` at 12 rows: (fixed, per chunk), from one
    chunk and three."""
    one, three = count(12), count(4)
    return one - (three - one) // 2, (three - one) // 2


# ---------------------------------------------------------------- reference (torch backend)

@pytest.mark.parametrize("name, f", [("small", 1.0), ("base", 0.25)])
def test_reference_default_chunking_peak_stays_under_40_percent_of_the_logits(monkeypatch, name, f):
    """Forward + backward of the reference (the CPU default) at its default chunking: the CPU allocator's peak above
    what was live before stays under 40% of one [M, V] fp32 buffer (before chunks were sized by bytes: 124% at
    small, 96% at base). Small at its real size, base at a quarter of M, E and V (CHUNK_BYTES at 1/16: the same
    ratios, 1/64 of the work)."""
    scale_default_chunk(monkeypatch, f)
    m, e, v, w = shape_at(name, f)
    inputs = head_inputs(m, e, v, w)
    peak, _ = profiled(lambda: head_step(inputs, v, "torch"))
    assert inputs[0].grad.abs().sum() > 0 and inputs[1].grad.abs().sum() > 0
    logits_fp32 = m * v * 4
    assert peak < 0.4 * logits_fp32, (peak, peak / logits_fp32)


def test_reference_default_chunking_launches_no_more_kernels_than_before():
    """Kernels of a forward + backward of the reference: fixed + per chunk x chunks, counted at a tiny shape (and
    pinned); at the default's chunk counts at the real shapes (9 at small, 19 at base: smaller chunks, each with
    fewer kernels) the total stays within the count before."""
    inputs = head_inputs(12, 4, 37, 40)
    fixed, per_chunk = fixed_and_per_chunk(
        lambda chunk_size: len(profiled(lambda: head_step(inputs, 37, "torch", chunk_size=chunk_size))[1]))
    assert (fixed, per_chunk) == (REFERENCE_FIXED, REFERENCE_PER_CHUNK)
    for name, (m, _) in REAL.items():
        rows = lm_ops.chunk_rows(m, lm_ops.reference_bytes_per_row(REAL_V, torch.float32))
        assert fixed + per_chunk * math.ceil(m / rows) <= OLD_REFERENCE_KERNELS[name], (name, rows)


# ---------------------------------------------------------------- Triton backend

class LiveStorages(TorchDispatchMode):
    """For the ops run under it, inside this package's custom ops too: `peak`, the most bytes of tensor storages
    allocated under it alive at once (a storage is freed when its last tensor dies: weakref finalizers), and
    `kernels`, the ops that do work (in place, or into a new storage; not in NOT_KERNELS), by name. Triton launches
    are counted by `count_triton_launches`, which sets `paused` while the interpreter copies a launch's arguments."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.tracked = set()
        self.kernels = collections.Counter()
        self.paused = False

    def _free(self, key, nbytes):
        self.tracked.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "electra_fast":  # its Python body, under this mode
            with self:
                return OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        new = False
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not func.is_view:
                storage = t.untyped_storage()
                key = id(storage)
                if key not in inputs and key not in self.tracked:
                    new = True
                    self.tracked.add(key)
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._free, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        if not self.paused and func._schema.name not in NOT_KERNELS and (new or func._schema.is_mutable):
            self.kernels[func._schema.name] += 1
        return out


def count_triton_launches(monkeypatch, live):
    """Count each launch of the MLM kernels (one Triton kernel each) in `live.kernels`. The interpreter's launch
    leaves its copies of the arguments in a reference cycle (a recursive closure) until the garbage collector runs;
    a GPU launch keeps nothing, so the cycle is collected right after each launch."""
    mls = importlib.import_module("electra_fast.kernels.mlm_loss_and_sample")
    for name in ("launch_sampler", "launch_backward", "launch_weighted_mean"):
        def launch(*args, _launch=getattr(mls, name), _name=name, **kwargs):
            live.kernels[_name] += 1
            live.paused = True
            try:
                return _launch(*args, **kwargs)
            finally:
                live.paused = False
                if INTERPRET:
                    gc.collect(0)
        monkeypatch.setattr(mls, name, launch)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["small", "base"])
def test_triton_default_chunking_peak_stays_under_40_percent_of_the_logits(monkeypatch, name, dtype):
    """The Triton backend at its default chunking, forward + backward: the peak of live bytes above what was live
    before stays under 40% of one [M, V] fp32 buffer. On a GPU at the real sizes (the allocator's peak); in the
    interpreter at 1/64 of M, E and V with CHUNK_BYTES at 1/4096 (the same chunks and ratios), counting the
    storages allocated."""
    if dtype == torch.bfloat16 and INTERPRET:
        pytest.skip("the interpreter's CPU GEMM takes an fp32 copy of a 16-bit chunk that a GPU does not")
    f = 1.0 if TRITON_DEVICE == "cuda" else 1 / 64
    scale_default_chunk(monkeypatch, f)
    m, e, v, w = shape_at(name, f)
    inputs = head_inputs(m, e, v, w, TRITON_DEVICE, dtype)
    if TRITON_DEVICE == "cuda":
        head_step(inputs, v, "triton")  # compiles the kernels
        inputs[0].grad = inputs[1].grad = inputs[2].grad = None
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        head_step(inputs, v, "triton")
        peak = torch.cuda.max_memory_allocated() - before
    else:
        with LiveStorages() as live:
            count_triton_launches(monkeypatch, live)
            head_step(inputs, v, "triton")
        peak = live.peak
    assert inputs[0].grad.abs().sum() > 0 and inputs[1].grad.abs().sum() > 0
    logits_fp32 = m * v * 4
    assert peak < 0.4 * logits_fp32, (peak, peak / logits_fp32)


@needs_triton
def test_triton_default_chunking_launches_no_more_kernels_than_before(monkeypatch):
    """Kernels of a forward + backward of the Triton backend (launches and ATen ops): fixed + per chunk x chunks,
    counted at a tiny shape (and pinned). The default's chunk counts at the real shapes never exceed those of the
    rule before (548 rows of 2**24 logits): as many in fp32, half as many in bf16."""
    inputs = head_inputs(12, 4, 37, 40, TRITON_DEVICE)

    def count(chunk_size):
        with LiveStorages() as live:
            count_triton_launches(monkeypatch, live)
            head_step(inputs, 37, "triton", chunk_size=chunk_size)
        return sum(live.kernels.values())
    assert fixed_and_per_chunk(count) == (TRITON_FIXED, TRITON_PER_CHUNK)
    kernel = importlib.import_module("electra_fast.kernels.lm_head_loss_and_sample")
    for m, _ in REAL.values():
        before = math.ceil(m / (2 ** 24 // REAL_W))
        for dtype, at_most in ((torch.float32, before), (torch.bfloat16, math.ceil(before / 2))):
            rows = lm_ops.chunk_rows(m, kernel.bytes_per_row(REAL_W, dtype))
            assert math.ceil(m / rows) <= at_most, (m, dtype, rows)
