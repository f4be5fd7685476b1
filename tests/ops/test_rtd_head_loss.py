"""`ops.rtd_head_loss`, the fused discriminator head (`dense(H -> 1)` + masked-mean BCE, and its accuracy), on every
backend.

- The reference (torch) against plain autograd of the head written out here, naive accuracy loops, gradcheck in
  float64, opcheck and compile; the counts for precision/recall (reference and Triton) against naive loops and the
  step's former logit formulas.
- The Triton kernel against the reference at tiny shapes with tiles shrunk (in the interpreter, or compiled on a
  GPU), outputs poisoned; at ELECTRA's shapes on a GPU against fp64 (twin: tiny shapes in the interpreter).
- Bad arguments named; empty batches."""
import pytest
import torch
import torch._dynamo

from conftest import NEEDS_TRITON, TRITON_DEVICE, TRITON_DEVICES, triton_param
from electra_fast import ops
from helpers import ELECTRA_SHAPES, kernel, rand, sized_for, use_small_tiles
from electra_fast.ops.rtd_head_loss import COUNTS, _rtd_head_op

# On a GPU these run the Triton kernels compiled (no interpreter): validate_gpu's `--rest` selects them by this marker.
pytestmark = pytest.mark.triton
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=2e-3, atol=2e-4)}  # Triton vs reference


# ---------------------------------------------------------------- the reference

def plain_head(hidden, weight, bias, labels, mask):
    """What users write: Linear(H, 1) then masked-mean BCE-with-logits."""
    logits = torch.nn.functional.linear(hidden, weight.reshape(1, -1), bias).squeeze(-1)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
    m = (mask != 0).to(logits.dtype)
    return (bce * m).sum() / m.sum().clamp(min=1), logits


def make(b=3, seq_len=7, h=5, dtype=torch.float64):
    hidden = torch.randn(b, seq_len, h, dtype=dtype, requires_grad=True)
    weight = torch.randn(1, h, dtype=dtype, requires_grad=True)
    bias = torch.randn(1, dtype=dtype, requires_grad=True)
    labels = torch.rand(b, seq_len) > 0.7
    mask = (torch.rand(b, seq_len) > 0.25).long()
    return hidden, weight, bias, labels, mask


def test_matches_plain_autograd_and_naive_accuracy():
    hidden, weight, bias, labels, mask = make()
    loss, acc = ops.rtd_head_loss(hidden, weight, bias, labels, mask, backend="torch")
    ref, logits = plain_head(hidden, weight, bias, labels, mask)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(loss * 1.3, (hidden, weight, bias))
    ref_grads = torch.autograd.grad(ref * 1.3, (hidden, weight, bias))
    for g, r in zip(grads, ref_grads):
        assert g.shape == r.shape
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    right = total = 0
    for x, y, m in zip(logits.flatten().tolist(), labels.flatten().tolist(), mask.flatten().tolist()):
        if m:
            right += (x > 0) == bool(y)
            total += 1
    assert abs(acc.item() - right / total) < 1e-12 and not acc.requires_grad


def test_gradcheck_float64():
    hidden, weight, bias, labels, mask = make(b=2, seq_len=4, h=3)
    assert torch.autograd.gradcheck(lambda x, w, c: ops.rtd_head_loss(x, w, c, labels, mask, backend="torch")[0],
                                    (hidden, weight, bias))


def test_flat_weight_no_bias_float_labels_and_fp32():
    hidden, weight, _, labels, mask = make(dtype=torch.float32)
    w = weight.detach().reshape(-1).requires_grad_()
    loss, acc = ops.rtd_head_loss(hidden, w, None, labels.float(), None, backend="torch")
    ref, logits = plain_head(hidden, w, None, labels, torch.ones_like(mask))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(acc, ((logits > 0) == labels).float().mean())
    (g,) = torch.autograd.grad(loss, w)
    assert g.shape == w.shape
    torch.testing.assert_close(g, torch.autograd.grad(ref, w)[0])


def test_all_padding_gives_zero():
    hidden, weight, bias, labels, mask = make()
    loss, acc = ops.rtd_head_loss(hidden, weight, bias, labels, torch.zeros_like(mask), backend="torch")
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    assert loss.item() == 0.0 and acc.item() == 0.0 and all(g.abs().max() == 0 for g in grads)


# ---------------------------------------------------------------- the Triton kernel

@NEEDS_TRITON
@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("dtype, weight_shape", [(torch.float32, "row"), (torch.float16, "flat")])
def test_triton_matches_reference(poison, dtype, weight_shape):
    b, seq_len, h = 3, 7, 10
    hidden = rand(b, seq_len, h, dtype=dtype).requires_grad_()
    weight = rand(1, h, scale=0.5) if weight_shape == "row" else rand(h, scale=0.5)
    weight.requires_grad_()
    bias = rand(1).requires_grad_()
    labels = torch.rand(b, seq_len, device=TRITON_DEVICE) > 0.7
    mask = torch.rand(b, seq_len, device=TRITON_DEVICE) > 0.2
    loss, acc = ops.rtd_head_loss(hidden, weight, bias, labels, mask, backend="triton")
    ref_loss, ref_acc = ops.rtd_head_loss(hidden, weight, bias, labels, mask, backend="torch")
    torch.testing.assert_close(loss, ref_loss, **TOL[torch.float32])
    torch.testing.assert_close(acc, ref_acc)
    assert not acc.requires_grad
    grad_out = torch.tensor(1.7, device=TRITON_DEVICE)
    grads = torch.autograd.grad(loss, (hidden, weight, bias), grad_out)
    ref_grads = torch.autograd.grad(ref_loss, (hidden, weight, bias), grad_out)
    for g, r, x in zip(grads, ref_grads, (hidden, weight, bias)):
        assert g.dtype == x.dtype and g.shape == x.shape
        torch.testing.assert_close(g, r, **TOL[g.dtype])


@NEEDS_TRITON
@pytest.mark.usefixtures("small_tiles")
def test_triton_all_padding_and_no_bias(poison):
    hidden, weight = rand(2, 5, 6).requires_grad_(), rand(1, 6).requires_grad_()
    labels = torch.ones(2, 5, device=TRITON_DEVICE)
    loss, acc = ops.rtd_head_loss(hidden, weight, None, labels, torch.zeros(2, 5, device=TRITON_DEVICE),
                                  backend="triton")
    assert loss.item() == 0.0 and acc.item() == 0.0
    grads = torch.autograd.grad(loss, (hidden, weight))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@pytest.mark.parametrize("shape", ["small", "base"])
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_at_electra_shapes(poison, monkeypatch, device, shape):
    sized_for(device, monkeypatch)
    b, seq_len, h = ELECTRA_SHAPES[shape][device]
    hidden = torch.randn(b, seq_len, h, device=device, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(1, h, device=device) * 0.05).requires_grad_()  # fp32 parameter, bf16 activations
    bias = torch.zeros(1, device=device, requires_grad=True)
    labels = torch.rand(b, seq_len, device=device) > 0.85
    mask = torch.rand(b, seq_len, device=device) > 0.1
    params = (hidden, weight, bias)
    ref_params = tuple(p.detach().double().requires_grad_() for p in params)
    loss, acc = ops.rtd_head_loss(*params, labels, mask, backend="triton")
    ref_loss, ref_acc = ops.rtd_head_loss(*ref_params, labels, mask, backend="torch")
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(acc.double(), ref_acc, rtol=0, atol=4.0 / mask.sum().item())  # |logit| ~ 0
    grads = torch.autograd.grad(loss, params)
    ref_grads = torch.autograd.grad(ref_loss, ref_params)
    for x, y, p in zip(grads, ref_grads, params):
        assert x.dtype == p.dtype
        torch.testing.assert_close(x.double(), y, rtol=1.6e-2, atol=1e-10)


# ---------------------------------------------------------------- counts for the step's metrics

def metrics_from_logits(logits, is_replaced, mask):
    """The metrics as the step computed them from the `[B, L]` logits before the counts existed."""
    real = mask != 0
    count = real.sum().clamp(min=1).float()
    pred = logits > 0
    hit = (pred & is_replaced & real).sum().float()
    return dict(disc_accuracy=((pred == is_replaced) & real).sum().float() / count,
                replaced_frac=(is_replaced & real).sum().float() / count,
                precision=hit / (pred & real).sum().clamp(min=1).float(),
                recall=hit / (is_replaced & real).sum().clamp(min=1).float())


def metrics_from_counts(counts):
    real, right, predicted, replaced, tp = counts.unbind()
    return dict(disc_accuracy=right / real.clamp(min=1), replaced_frac=replaced / real.clamp(min=1),
                precision=tp / predicted.clamp(min=1), recall=tp / replaced.clamp(min=1))


def naive_counts(logits, labels, mask):
    c = dict.fromkeys(COUNTS, 0)
    for x, y, m in zip(logits.flatten().tolist(), labels.flatten().tolist(), mask.flatten().tolist()):
        if m:
            p, y = x > 0, bool(y)
            c["real"] += 1
            c["correct"] += p == y
            c["predicted"] += p
            c["replaced"] += y
            c["true_positive"] += p and y
    return [c[k] for k in COUNTS]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=NEEDS_TRITON)])
def test_counts_match_naive_loops_and_the_logit_metrics(backend, request):
    if backend == "triton":
        request.getfixturevalue("poison")
        monkeypatch = request.getfixturevalue("monkeypatch")
        use_small_tiles(monkeypatch, ["rtd_head_loss"])  # several tiles and programs at this tiny shape
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    hidden, weight, bias, labels, mask = (t.detach().to(device) for t in make(b=4, seq_len=9, h=5,
                                                                               dtype=torch.float32))
    mask[3] = 0  # a row of padding
    loss, acc, counts = ops.rtd_head_loss(hidden, weight, bias, labels, mask, with_counts=True, backend=backend)
    ref_loss, ref_acc = ops.rtd_head_loss(hidden, weight, bias, labels, mask, backend="torch")
    logits = torch.nn.functional.linear(hidden, weight, bias).squeeze(-1)
    assert counts.dtype == torch.float32 and counts.shape == (len(COUNTS),) and not counts.requires_grad
    assert counts.cpu().tolist() == naive_counts(logits, labels, mask)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(acc, ref_acc)
    old, new = metrics_from_logits(logits, labels, mask), metrics_from_counts(counts)
    for k in old:
        torch.testing.assert_close(new[k], old[k], rtol=0, atol=0)


def test_counts_of_an_all_padding_batch_are_zero():
    hidden, weight, bias, labels, mask = make()
    _, _, counts = ops.rtd_head_loss(hidden, weight, bias, labels, torch.zeros_like(mask), with_counts=True,
                                     backend="torch")
    assert counts.tolist() == [0.0] * len(COUNTS)
    assert all(v.item() == 0.0 for v in metrics_from_counts(counts).values())


# ---------------------------------------------------------------- registration, compile, errors, empty batches

@pytest.mark.parametrize("backend", ["torch", triton_param("triton")])
def test_opcheck(request, backend):
    if backend == "torch":
        hidden, weight, bias, labels, mask = make(dtype=torch.float32)
        torch.library.opcheck(_rtd_head_op, (hidden, weight, bias, labels, mask))
        return
    request.getfixturevalue("small_tiles")
    b, seq_len, h = 2, 6, 5
    torch.library.opcheck(kernel("rtd_head_loss")._head_op, (
        rand(b, seq_len, h).requires_grad_(), rand(1, h).requires_grad_(), rand(1).requires_grad_(),
        torch.rand(b, seq_len, device=TRITON_DEVICE), torch.ones(b, seq_len, device=TRITON_DEVICE)))


def test_compiles_fullgraph_and_matches_eager():
    hidden, weight, bias, labels, mask = make(dtype=torch.float32)
    torch._dynamo.reset()
    fn = lambda *a: ops.rtd_head_loss(*a, backend="torch")  # noqa: E731
    eager = fn(hidden, weight, bias, labels, mask)
    compiled = torch.compile(fn, fullgraph=True)(hidden, weight, bias, labels, mask)
    for x, y in zip(compiled, eager):
        torch.testing.assert_close(x, y)
    torch.testing.assert_close(torch.autograd.grad(compiled[0], hidden)[0], torch.autograd.grad(eager[0], hidden)[0])


def call_head(hidden=None, weight=None, bias=None, labels=None, mask=None, **kw):
    return ops.rtd_head_loss(torch.randn(2, 6, 4) if hidden is None else hidden,
                             torch.randn(1, 4) if weight is None else weight, bias,
                             torch.zeros(2, 6) if labels is None else labels, mask, **kw)


@pytest.mark.parametrize("call, exc, words", [
    (lambda x, w, b, y, m: ops.rtd_head_loss(x[0], w, b, y, m), ValueError, ["hidden", "3 dimensions", "(7, 5)"]),
    (lambda x, w, b, y, m: ops.rtd_head_loss(x, w[:, :4], b, y, m), ValueError, ["weight", "(1, 5)", "(1, 4)"]),
    (lambda x, w, b, y, m: ops.rtd_head_loss(x, w, torch.zeros(2), y, m), ValueError, ["bias", "1 element", "(2,)"]),
    (lambda x, w, b, y, m: ops.rtd_head_loss(x, w, b, y[:, :3], m), ValueError, ["labels", "(3, 7)", "(3, 3)"]),
    (lambda x, w, b, y, m: ops.rtd_head_loss(x, w, b, y, m[:2]), ValueError, ["attention_mask", "(3, 7)", "(2, 7)"]),
    (lambda x, w, b, y, m: ops.rtd_head_loss(x.long(), w, b, y, m), TypeError, ["hidden", "int64"]),
    (lambda *_: call_head(weight=torch.randn(4, 1)), ValueError, ["weight"]),
    (lambda *_: call_head(weight=torch.ones(1, 4, dtype=torch.long)), TypeError, ["weight"]),
    (lambda *_: call_head(mask=torch.ones(2, 6, 1)), ValueError, ["attention_mask"]),
    (lambda *_: call_head(bias=torch.zeros(1, device="meta")), ValueError, ["bias"]),
])
def test_bad_input_errors_name_the_argument(call, exc, words):
    with pytest.raises(exc) as info:
        call(*make())
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize("backend", ["torch", triton_param("triton")])
def test_empty_batch(poison, backend):
    dev = "cpu" if backend == "torch" else TRITON_DEVICE
    for shape in [(0, 4), (3, 0)]:
        hidden = torch.randn(*shape, 5, device=dev, requires_grad=True)
        loss, accuracy = ops.rtd_head_loss(hidden, torch.randn(5, device=dev), None, torch.ones(shape, device=dev),
                                           backend=backend)
        assert loss.item() == 0.0 and accuracy.item() == 0.0
