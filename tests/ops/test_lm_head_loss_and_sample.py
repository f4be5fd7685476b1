"""The fused LM head (`ops.lm_head_loss_and_sample`) against the unfused path it replaces,
`mlm_loss_and_sample(F.linear(hidden, weight, bias), ...)`: same loss, correctness and samples (same RNG state),
same gradients, for several chunkings and a padded vocabulary; the reference (torch backend) on the CPU and the
Triton backend in the interpreter (TRITON_INTERPRET=1) or on a GPU; float64 gradcheck, opcheck, torch.compile, bad
arguments; and the fused head in the RTD step. The peak memory and the kernels launched at the default chunking:
tests/ops/test_lm_head_loss_and_sample_chunking.py."""
import importlib
import os

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

from electra_fast import ops
from helpers import call_lm_head, use_small_tiles
from electra_fast.ops.lm_head_loss_and_sample import _chunk_op, _loss_with_grads

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# On a GPU these run the Triton kernels compiled (no interpreter): validate_gpu's `--rest` selects them by this marker.
pytestmark = pytest.mark.triton
TRITON_DEVICE = "cpu" if INTERPRET else "cuda"
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or not (INTERPRET or torch.cuda.is_available()),
    reason="the Triton backend needs triton and a CUDA GPU, or TRITON_INTERPRET=1")
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]


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


# ---------------------------------------------------------------- registration, compile, errors

@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(request, backend):
    if backend == "triton":
        request.getfixturevalue("small_blocks")
        lm = importlib.import_module("electra_fast.kernels.lm_head_loss_and_sample")
        hidden, weight, bias, targets, weights = (t.detach() for t in make(m=6, e=4, width=16, v=13,
                                                                           device=TRITON_DEVICE))
        seed = torch.tensor([5], device=TRITON_DEVICE)
        torch.library.opcheck(lm._lm_head_op, (hidden, weight, bias, targets, weights, seed, 0.9, True, "cdf", 13, 4))
        return
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiles_fullgraph_and_matches_eager(request, backend):
    if backend == "triton":
        request.getfixturevalue("small_blocks")
    run_compiled(backend, TRITON_DEVICE if backend == "triton" else "cpu")


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
    (lambda *_: call_lm_head(hidden=torch.randn(0, 4)), ValueError, ["hidden"]),
    (lambda *_: call_lm_head(targets=torch.zeros(3)), TypeError, ["targets"]),
    (lambda *_: call_lm_head(targets=torch.zeros(3, dtype=torch.long, device="meta")), ValueError, ["targets"]),
    (lambda *_: call_lm_head(weight=torch.randn(5, 4), bias=torch.randn(5), targets=torch.tensor([0, 4, 2]),
                             temperature=float("inf")), ValueError, ["temperature"]),
])
def test_bad_input_errors_name_the_argument(call, exc, words):
    with pytest.raises(exc) as info:
        call(*make())
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_ids_are_named(backend):
    """Checked on CPU tensors (free; these are); on CUDA a documented precondition (checking would sync)."""
    with pytest.raises((ValueError, IndexError), match="targets"):
        call_lm_head(targets=torch.tensor([0, 6, 2]), backend=backend)


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
