"""`dropout_add_layer_norm` (electra_fast.ops, kernels/dropout_add_layer_norm.py): the Triton kernel against the
unfused PyTorch chain, in the Triton interpreter (`TRITON_INTERPRET=1`, CPU tensors) or on a GPU.

Without dropout the kernel must match the reference. With dropout the two draw different masks, so the kernel's
mask is recovered (the same seed and salt on x = 1, residual = 0 give `s = keep / (1 - p)`) and checked on its own
(values, binomial kept fraction, independence across salts) and as the mask of the forward and the backward: the
reference rebuilt with it must give the kernel's output and all four gradients."""
import importlib
import os

import pytest
import torch
import torch.nn.functional as F

from electra_fast import ops
from electra_fast.ops._backend import draw_seed
from electra_fast.ops.dropout_add_layer_norm import dropout_add_layer_norm_reference
from helpers import chi2_critical

pytest.importorskip("triton", reason="triton is not installed: the Triton backend cannot run")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# On a GPU these run the Triton kernels compiled (no interpreter): validate_gpu's `--rest` selects them by this marker.
pytestmark = pytest.mark.triton
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a CUDA GPU, or TRITON_INTERPRET=1 to run them in the interpreter on the CPU",
                allow_module_level=True)

K = importlib.import_module("electra_fast.kernels.dropout_add_layer_norm")
DEVICE = "cpu" if INTERPRET else "cuda"
# Against the fp32 oracle below, fp16/bf16 outputs and gradients differ by their final rounding (a few units in
# the last place of values O(1)).
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=4e-3, atol=4e-3),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def inputs(m, n, dtype):
    x, res = torch.randn(m, n, device=DEVICE), torch.randn(m, n, device=DEVICE) * 2 + 0.5
    w, b = torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE)
    return [t.to(dtype).requires_grad_() for t in (x, res, w, b)]


def value_and_grads(fn, tensors, dy):
    for t in tensors:
        t.grad = None
    y = fn(*tensors)
    y.backward(dy)
    return [y.detach()] + [t.grad for t in tensors]


def oracle(p=0.0, keep=None):
    """The chain in fp32 on the inputs' values, its sum rounded to their dtype as both the kernel and the unfused
    low-precision chain round it (torch's bf16 LayerNorm backward accumulates in bf16: no oracle for the kernel's
    fp32 accumulation), with the dropout mask `keep` (None: no dropout)."""
    def fn(x, res, w, b):
        d = x.float() if keep is None else torch.where(keep, x.float() / (1 - p), 0.0)
        s = res.float() + d
        if INTERPRET and x.dtype == torch.bfloat16:  # the interpreter casts fp32 -> bf16 by truncation (a GPU rounds)
            s = s + ((s.detach().view(torch.int32) & -65536).view(torch.float32) - s.detach())
        s = s.to(x.dtype).float()
        return F.layer_norm(s, x.shape[-1:], w.float(), b.float(), 1e-5).to(x.dtype)
    return fn


def kernel_mask(seed, salt, p, shape):
    """The keep mask the kernel draws for `shape` under (seed, salt), read off its saved sum."""
    n = shape[-1]
    one = torch.ones(shape, device=DEVICE)
    s = K._forward_op(one, torch.zeros_like(one), torch.ones(n, device=DEVICE), torch.zeros(n, device=DEVICE), seed,
                      salt, p, 1e-5)[1]
    return s


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m, n", [(5, 256), (3, 768), (9, 37), (6, 100)])
@pytest.mark.parametrize("block_elements", [64, 4096])
def test_matches_reference_without_dropout(poison, monkeypatch, dtype, m, n, block_elements):
    # 64: one row per program and several row blocks per backward program; 4096: many rows per program, partial.
    monkeypatch.setattr(K, "BLOCK_ELEMENTS", block_elements)
    monkeypatch.setattr(K, "BWD_BLOCK_ELEMENTS", block_elements)
    tensors = inputs(m, n, dtype)
    dy = torch.randn(m, n, device=DEVICE).to(dtype)
    for p, training in ((0.0, True), (0.4, False)):
        got = value_and_grads(lambda *t: ops.dropout_add_layer_norm(*t, p=p, eps=1e-5, training=training,
                                                                    backend="triton"), tensors, dy)
        references = [oracle()]
        if dtype == torch.float32:  # the public reference itself (the torch backend)
            references.append(lambda *t: dropout_add_layer_norm_reference(*t, 0.0, 1e-5))
        for reference in references:
            want = value_and_grads(reference, tensors, dy)
            for name, g, w in zip(("y", "dx", "dresidual", "dweight", "dbias"), got, want):
                assert g.dtype == w.dtype and g.shape == w.shape, name
                torch.testing.assert_close(g, w, **TOL[dtype], msg=lambda e, name=name: f"{name}: {e}")


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_statistics(poison, p):
    m, n = 64, 200
    seed = draw_seed(torch.device(DEVICE))
    s = kernel_mask(seed, 3, p, (m, n))
    keep = s != 0
    assert torch.equal(s[keep], torch.full_like(s[keep], 1.0 / (1.0 - p))), "kept values are not scaled by 1/(1-p)"
    kept, total = keep.sum().item(), keep.numel()
    assert (kept - total * (1 - p)) ** 2 / (total * p * (1 - p)) < chi2_critical(1), f"kept {kept} of {total}"
    # Columns and rows both see the rate (a counter bug that repeats rows or columns would not).
    for counts, size in ((keep.sum(0), m), (keep.sum(1), n)):
        stat = ((counts - size * (1 - p)) ** 2 / (size * p * (1 - p))).sum().item()
        assert stat < chi2_critical(counts.numel()), "kept fraction not uniform over rows/columns"
    # Deterministic per (seed, salt); another salt or seed is an independent mask (agreement p^2 + (1-p)^2).
    assert torch.equal(kernel_mask(seed, 3, p, (m, n)), s)
    for other in (kernel_mask(seed, 4, p, (m, n)), kernel_mask(draw_seed(torch.device(DEVICE)), 3, p, (m, n))):
        agree = ((other != 0) == keep).sum().item()
        q = p * p + (1 - p) * (1 - p)
        assert (agree - total * q) ** 2 / (total * q * (1 - q)) < chi2_critical(1), "masks are not independent"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m, n", [(7, 256), (4, 48)])
def test_forward_and_backward_use_one_mask(poison, monkeypatch, dtype, m, n):
    monkeypatch.setattr(K, "BLOCK_ELEMENTS", 128)
    monkeypatch.setattr(K, "BWD_BLOCK_ELEMENTS", 128)
    p, salt = 0.3, 5
    seed = draw_seed(torch.device(DEVICE))
    keep = kernel_mask(seed, salt, p, (m, n)) != 0
    tensors = inputs(m, n, dtype)
    dy = torch.randn(m, n, device=DEVICE).to(dtype)
    got = value_and_grads(lambda *t: ops.dropout_add_layer_norm(*t, p=p, eps=1e-5, seed=seed, salt=salt,
                                                                backend="triton"), tensors, dy)
    want = value_and_grads(oracle(p, keep), tensors, dy)
    for name, g, w in zip(("y", "dx", "dresidual", "dweight", "dbias"), got, want):
        torch.testing.assert_close(g, w, **TOL[dtype], msg=lambda e, name=name: f"{name}: {e}")
    assert torch.equal(got[1] == 0, ~keep | (got[2] == 0)), "dx is not zero exactly where the mask drops"


def test_seed_follows_torch_rng(poison):
    tensors = [t.detach() for t in inputs(4, 64, torch.float32)]

    def run(g):
        return ops.dropout_add_layer_norm(*tensors, p=0.5, eps=1e-5, generator=g, backend="triton")
    a, b = run(torch.Generator(DEVICE).manual_seed(1)), run(torch.Generator(DEVICE).manual_seed(1))
    assert torch.equal(a, b)
    assert not torch.equal(a, run(torch.Generator(DEVICE).manual_seed(2)))


def test_opcheck(poison):
    x, res, w, b = (t.detach() for t in inputs(5, 40, torch.float32))
    seed = draw_seed(torch.device(DEVICE))
    for s, p in ((None, 0.0), (seed, 0.25)):
        torch.library.opcheck(K._forward_op, (x.requires_grad_(), res.requires_grad_(), w.requires_grad_(),
                                              b.requires_grad_(), s, 1, p, 1e-5))


def test_bad_arguments_are_named():
    x, res, w, b = (t.detach() for t in inputs(2, 8, torch.float32))
    cases = [(dict(residual=res[:, :4]), "residual must have shape"),
             (dict(residual=res.double()), "residual must have dtype float32"),
             (dict(weight=w[:4]), "weight must have shape"),
             (dict(bias=b.half()), "bias must have dtype float32"),
             (dict(p=1.0), "p must be a number in \\[0, 1\\)"),
             (dict(salt=-1), "salt must be an int"),
             (dict(seed=torch.zeros(2, dtype=torch.int64)), "seed must have shape")]
    for change, message in cases:
        args = {**dict(x=x, residual=res, weight=w, bias=b, p=0.1, eps=1e-5), **change}
        with pytest.raises((ValueError, TypeError), match=message):
            ops.dropout_add_layer_norm(args.pop("x"), args.pop("residual"), args.pop("weight"), args.pop("bias"),
                                       **args)
    with pytest.raises(ValueError, match=f"normalised size must be <= {K.MAX_N}, got {K.MAX_N + 1}"):
        K.dropout_add_layer_norm(torch.empty(1, K.MAX_N + 1), torch.empty(1, K.MAX_N + 1), torch.empty(K.MAX_N + 1),
                                 torch.empty(K.MAX_N + 1), None, 0, 0.0, 1e-5)


def test_encoder_layer_uses_the_kernel(poison):
    """The model's layers run the fused op on the Triton backend: same output and gradients as the torch path."""
    from electra_fast.model import Discriminator, preset_configs

    torch.manual_seed(0)
    model = Discriminator(preset_configs("tiny", vocab_size=50, num_hidden_layers=1, hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0)[1]).to(DEVICE).train()
    ids = torch.randint(5, 50, (2, 8), device=DEVICE)
    grads = []
    for backend in ("torch", "triton"):
        ops.set_backend(backend)
        try:
            model.zero_grad()
            out = model.encode(ids)
            out.square().sum().backward()
        finally:
            ops.set_backend(None)
        grads.append([out.detach(), model.layers[0].ffn_norm.weight.grad.clone(),
                      model.layers[0].attn_out.weight.grad.clone()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_no_torch_kernels_around_the_triton_launches(poison):
    """The fused op's whole cost is its three Triton launches: no ATen op that launches a kernel (a zero-fill of the
    gradients of the saved outputs, a copy, a cast) runs in its forward or backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops_seen.append(func._schema.name)
            return func(*args, **(kwargs or {}))

    ops_seen = []
    x, res, w, b = inputs(6, 32, torch.bfloat16)
    seed = draw_seed(torch.device(DEVICE))
    with Record():
        y = ops.dropout_add_layer_norm(x.view(2, 3, 32), res.view(2, 3, 32), w, b, p=0.2, eps=1e-5, seed=seed,
                                       backend="triton")
        torch.autograd.grad(y, (x, res, w, b), torch.ones_like(y))
    allocations_and_views = {"aten::empty", "aten::empty_like", "aten::new_empty", "aten::empty_strided",
                             "aten::view", "aten::_unsafe_view", "aten::reshape", "aten::detach", "aten::alias"}
    launching = [op for op in ops_seen if not op.startswith("electra_fast::") and op not in allocations_and_views]
    assert launching == ["aten::ones_like"], launching  # the test's own grad_outputs
