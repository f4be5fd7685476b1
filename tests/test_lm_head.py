"""The fused LM head (`ops.lm_head_loss_and_sample`) against the unfused path it replaces,
`mlm_loss_and_sample(F.linear(hidden, weight, bias), ...)`: same loss, correctness and samples (same RNG state),
same gradients, for several chunkings and a padded vocabulary; the reference (torch backend) on the CPU and the
Triton backend in the interpreter (TRITON_INTERPRET=1) or on a GPU; float64 gradcheck, opcheck, torch.compile; and,
at the default chunking, the peak memory (every allocation counted) and the number of kernels launched."""
import collections
import gc
import importlib
import math
import os
import weakref

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch._C._profiler import _EventType
from torch._library.custom_ops import OPDEFS
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from electra_fast import ops
from helpers import use_small_tiles
lm_ops = importlib.import_module("electra_fast.ops.lm_head_loss_and_sample")
contract = importlib.import_module("electra_fast.ops._contract")
from electra_fast.ops.lm_head_loss_and_sample import _chunk_op, _loss_with_grads

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# On a GPU these run the Triton kernels compiled (no interpreter): validate_gpu's `--rest` selects them by this marker.
pytestmark = pytest.mark.triton
TRITON_DEVICE = "cpu" if INTERPRET else "cuda"
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or not (INTERPRET or torch.cuda.is_available()),
    reason="the Triton backend needs triton and a CUDA GPU, or TRITON_INTERPRET=1")


def exact(*shape, device="cpu", dtype=torch.float32):
    """Multiples of 1/8 in [-1/2, 1/2]: every product and sum of the head is exact in fp32 (and in bf16 for the
    inputs), so the logits do not depend on how BLAS blocks the rows and samples must match id for id."""
    return (torch.randint(-4, 5, shape, device=device) / 8).to(dtype)


def make(m=29, e=6, width=40, v=37, device="cpu", dtype=torch.float32):
    hidden = exact(m, e, device=device, dtype=dtype).requires_grad_()
    weight = exact(width, e, device=device, dtype=dtype)
    weight[v:] = 0.0  # padded vocabulary rows, as the model keeps them
    weight.requires_grad_()
    bias = exact(width, device=device, dtype=dtype).requires_grad_()
    targets = torch.randint(0, v, (m,), device=device)
    weights = (torch.rand(m, device=device) > 0.3).float()
    weights[0] = 1.0
    return hidden, weight, bias, targets, weights


def unfused(hidden, weight, bias, targets, weights, **kw):
    return ops.mlm_loss_and_sample(F.linear(hidden, weight, bias), targets, weights, **kw)


def fused_vs_unfused(backend, device, chunk_size, dtype=torch.float32, temperature=1.0, disallow=False, v=37):
    hidden, weight, bias, targets, weights = make(device=device, dtype=dtype, v=v)
    kw = dict(temperature=temperature, disallow_correct=disallow, vocab_size=v, backend=backend)
    outs = []
    for fn, extra in ((ops.lm_head_loss_and_sample, dict(chunk_size=chunk_size)), (unfused, {})):
        gen = torch.Generator(device).manual_seed(123)
        loss, sampled, correct = fn(hidden, weight, bias, targets, weights, generator=gen, **kw, **extra)
        grads = torch.autograd.grad(loss, (hidden, weight, bias), torch.tensor(1.7, device=device))
        outs.append((loss, sampled, correct, grads))
    (loss, sampled, correct, grads), (ref_loss, ref_sampled, ref_correct, ref_grads) = outs
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert sampled.dtype == torch.int64 and torch.equal(sampled, ref_sampled)
    assert correct.dtype == torch.bool and torch.equal(correct, ref_correct)
    assert ((sampled >= 0) & (sampled < v)).all()
    if disallow:
        assert not (sampled == targets).any()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    for g, r, x in zip(grads, ref_grads, (hidden, weight, bias)):
        assert g.dtype == x.dtype and g.shape == x.shape
        torch.testing.assert_close(g, r, **tol)
    # The padded vocabulary rows never get a gradient.
    assert torch.equal(grads[1][v:], torch.zeros_like(grads[1][v:]))
    assert torch.equal(grads[2][v:], torch.zeros_like(grads[2][v:]))
    return (hidden, weight, bias, targets, weights), kw, (loss, correct, grads)


# ---------------------------------------------------------------- reference (torch backend)

@pytest.mark.parametrize("chunk_size", [None, 1, 7, 29])
@pytest.mark.parametrize("temperature, disallow", [(1.0, False), (0.6, True)])
def test_reference_matches_unfused(chunk_size, temperature, disallow):
    fused_vs_unfused("torch", "cpu", chunk_size, temperature=temperature, disallow=disallow)


def test_reference_bf16_and_unpadded_vocab():
    fused_vs_unfused("torch", "cpu", 8, dtype=torch.bfloat16)
    fused_vs_unfused("torch", "cpu", 8, v=40)  # vocab_size = W


def test_reference_under_autocast_casts_like_f_linear():
    hidden, weight, bias, targets, weights = make()
    hidden = (hidden.detach() + torch.randn_like(hidden) * 1e-3).requires_grad_()  # not exact in bf16: the cast matters
    outs = []
    for fn in (lambda **k: ops.lm_head_loss_and_sample(hidden, weight, bias, targets, weights, chunk_size=5, **k),
               lambda **k: unfused(hidden, weight, bias, targets, weights, **k)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, sampled, _ = fn(vocab_size=37, generator=torch.Generator().manual_seed(4))
        outs.append((loss, sampled, torch.autograd.grad(loss, (hidden, weight, bias))))
    (loss, sampled, grads), (ref_loss, ref_sampled, ref_grads) = outs
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert torch.equal(sampled, ref_sampled)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, r, rtol=2e-2, atol=2e-3)


def test_gradcheck_float64():
    hidden, weight, bias, targets, weights = make(m=5, e=3, width=8, v=7, dtype=torch.float64)
    hidden, weight, bias = (torch.randn_like(t).requires_grad_() for t in (hidden, weight, bias))

    def loss(h, w, b):
        return ops.lm_head_loss_and_sample(h, w, b, targets, weights, vocab_size=7, chunk_size=2)[0]
    assert torch.autograd.gradcheck(loss, (hidden, weight, bias))


def test_all_weights_zero_gives_zero_loss_and_gradients():
    hidden, weight, bias, targets, _ = make()
    loss, _, correct = ops.lm_head_loss_and_sample(hidden, weight, bias, targets, torch.zeros(29), vocab_size=37,
                                                   chunk_size=4)
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    assert loss.item() == 0.0 and all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    assert torch.equal(correct, F.linear(hidden, weight, bias)[:, :37].argmax(1) == targets)


def test_opcheck_reference_ops():
    hidden, weight, bias, targets, weights = (t.detach() for t in make(m=6, e=4, width=16, v=13))
    scale = weights * 0.25
    for temperature, disallow in ((1.0, False), (0.8, True)):
        outs = (torch.empty(6), torch.empty(2, 6, dtype=torch.long), torch.empty(6, 4), torch.zeros(16, 4),
                torch.zeros(16))
        x = F.linear(hidden[2:6], weight[:13], bias[:13])
        torch.library.opcheck(_chunk_op, (x, torch.rand(4, 13), weight[:13], hidden, targets, scale, -scale,
                                          torch.ones(4), 2, temperature, disallow, *outs))
    grads = (torch.randn(6, 4), torch.randn(16, 4), torch.randn(16))
    torch.library.opcheck(_loss_with_grads, (torch.tensor(1.5), hidden.requires_grad_(), weight.requires_grad_(),
                                             bias.requires_grad_(), *grads))


def run_compiled(backend, device):
    torch._dynamo.reset()
    hidden, weight, bias, targets, weights = make(device=device)

    def step(hidden, weight, bias):  # the global RNG: dynamo cannot trace a torch.Generator argument
        loss, sampled, correct = ops.lm_head_loss_and_sample(hidden, weight, bias, targets, weights, vocab_size=37,
                                                             chunk_size=8, backend=backend)
        return loss * 2.0, sampled, correct

    results = []
    with torch._inductor.config.patch(fallback_random=True):  # the compiled RNG draws eager's stream
        for fn in (step, torch.compile(step, fullgraph=True)):
            torch.manual_seed(8)
            out = fn(hidden, weight, bias)
            results.append((out, torch.autograd.grad(out[0], (hidden, weight, bias))))
    (eager, eager_grads), (comp, comp_grads) = results
    torch.testing.assert_close(comp[0], eager[0])
    assert torch.equal(comp[1], eager[1]) and torch.equal(comp[2], eager[2])
    for x, y in zip(comp_grads, eager_grads):
        torch.testing.assert_close(x, y)


def test_compile_fullgraph_reference():
    run_compiled("torch", "cpu")


@pytest.mark.parametrize("call, exc, words", [
    (lambda h, w, b, t, x: ops.lm_head_loss_and_sample(h[0], w, b, t, x), ValueError, ["hidden", "2 dimensions"]),
    (lambda h, w, b, t, x: ops.lm_head_loss_and_sample(h, w[:, :5], b, t, x), ValueError, ["weight", "(W, 6)",
                                                                                           "(40, 5)"]),
    (lambda h, w, b, t, x: ops.lm_head_loss_and_sample(h, w, b[:3], t, x), ValueError, ["bias", "(40,)", "(3,)"]),
    (lambda h, w, b, t, x: ops.lm_head_loss_and_sample(h, w, b, t[:3], x), ValueError, ["targets", "(29,)"]),
    (lambda h, w, b, t, x: ops.lm_head_loss_and_sample(h, w, b, t, x[:3]), ValueError, ["weights", "(29,)"]),
    (lambda h, w, b, t, x: ops.lm_head_loss_and_sample(h, w, b, t, x, vocab_size=41), ValueError,
     ["vocab_size", "[1, 40]", "41"]),
    (lambda h, w, b, t, x: ops.lm_head_loss_and_sample(h, w, b, t, x, chunk_size=0), ValueError, ["chunk_size", "0"]),
    (lambda h, w, b, t, x: ops.lm_head_loss_and_sample(h.double(), w, b, t, x), TypeError,
     ["hidden, weight and bias", "float64", "float32"]),
])
def test_bad_input_errors_name_the_argument(call, exc, words):
    with pytest.raises(exc) as info:
        call(*make())
    for word in words:
        assert word in str(info.value), (word, str(info.value))


# ---------------------------------------------------------------- the default chunking: peak memory and launches

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

@pytest.fixture
def small_blocks(monkeypatch):
    return use_small_tiles(monkeypatch, ["mlm_loss_and_sample"])  # several tiles per row, a partial last one


@needs_triton
@pytest.mark.parametrize("chunk_size, temperature, disallow", [(1, 1.0, False), (7, 0.6, True), (None, 1.3, False)])
def test_triton_matches_unfused_triton_and_reference(poison, small_blocks, chunk_size, temperature, disallow):
    inputs, kw, (loss, correct, grads) = fused_vs_unfused("triton", TRITON_DEVICE, chunk_size,
                                                          temperature=temperature, disallow=disallow)
    hidden, weight, bias = inputs[:3]
    # The fused reference on the same inputs (the fused Triton op ran once, above).
    ref_loss, _, ref_correct = ops.lm_head_loss_and_sample(*inputs, **dict(kw, backend="torch"), chunk_size=chunk_size)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert torch.equal(correct, ref_correct)
    ref_grads = torch.autograd.grad(ref_loss, (hidden, weight, bias), torch.tensor(1.7, device=TRITON_DEVICE))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("sampler", ["cdf", "gumbel"])
def test_triton_samples_do_not_depend_on_the_chunking(small_blocks, sampler):
    hidden, weight, bias, targets, weights = (t.detach() for t in make(m=11, device=TRITON_DEVICE))
    draws = [ops.lm_head_loss_and_sample(hidden, weight, bias, targets, weights, vocab_size=37, chunk_size=c,
                                         generator=torch.Generator(TRITON_DEVICE).manual_seed(77),
                                         backend="triton", sampler=sampler)[1] for c in (1, 4, 11)]
    assert torch.equal(draws[0], draws[1]) and torch.equal(draws[0], draws[2])
    other = ops.lm_head_loss_and_sample(hidden, weight, bias, targets, weights, vocab_size=37, backend="triton",
                                        generator=torch.Generator(TRITON_DEVICE).manual_seed(78), sampler=sampler)[1]
    assert not torch.equal(other, draws[0])


@needs_triton
def test_triton_bf16_matches_unfused(small_blocks):
    fused_vs_unfused("triton", TRITON_DEVICE, 6, dtype=torch.bfloat16)


@needs_triton
def test_triton_opcheck_and_compile(small_blocks):
    lm = importlib.import_module("electra_fast.kernels.lm_head_loss_and_sample")
    hidden, weight, bias, targets, weights = (t.detach() for t in make(m=6, e=4, width=16, v=13,
                                                                       device=TRITON_DEVICE))
    seed = torch.tensor([5], device=TRITON_DEVICE)
    torch.library.opcheck(lm._lm_head_op, (hidden, weight, bias, targets, weights, seed, 0.9, True, "cdf", 13, 4))
    run_compiled("triton", TRITON_DEVICE)


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


# ---------------------------------------------------------------- in the step

def test_rtd_step_fused_head_matches_unfused_head():
    from electra_fast import ElectraPretrainer
    from electra_fast.pretraining.pretrainer import rtd_step

    special = (0, 1, 2, 3)
    model = ElectraPretrainer.from_preset("tiny", vocab_size=300, mask_token_id=3, special_token_ids=special,
                                          pad_token_id=0)  # vocabulary padded to 384
    ids = torch.randint(4, 300, (3, 24))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    params = [model.generator.embeddings.word.weight, model.generator.head.bias, model.generator.head.dense.weight]
    results = []
    for fused in (True, False):
        torch.manual_seed(5)
        out = rtd_step(model.generator, model.discriminator, ids, mask, mask_token_id=3, special_token_ids=special,
                       fused_lm_head=fused)
        results.append((out.to_dict(), torch.autograd.grad(out.loss, params)))
    (fused, fused_grads), (plain, plain_grads) = results
    assert fused.keys() == plain.keys()
    for k in plain:
        assert abs(fused[k] - plain[k]) <= 1e-6 * max(1.0, abs(plain[k])), k
    for g, r in zip(fused_grads, plain_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
