"""`ops.mlm_loss_and_sample`, its loss, gradient and `correct` on every backend (its samples: tests/ops/
test_gumbel_sample.py and test_gumbel_sample_distribution.py, which draw through the same samplers).

- The reference (torch) against naive oracles written here: log-sum-exp loops in fp64, gradcheck in fp64, padded
  vocabulary columns that must never be read, rows with one or no finite logit, weight-0 rows.
- The Triton kernel against the reference, at tiny shapes with its tiles shrunk (in the interpreter with
  `TRITON_INTERPRET=1`, compiled on a GPU), outputs allocated poisoned (NaN / -7 / True).
- opcheck of each backend's custom ops; bad arguments named; the empty batch.
At ELECTRA sizes on a GPU (the Triton kernel, the CUDA C++ backend): tests/ops/test_mlm_loss_and_sample_gpu.py."""
import math

import pytest
import torch

from conftest import TRITON_DEVICE as DEVICE, gpu_param, triton_param, triton_test
from electra_fast import ops
from electra_fast.csrc import mlm_loss_and_sample as cu_mlm
from electra_fast.ops.mlm_loss_and_sample import WEIGHT_EPS
from helpers import call_mlm, cuda_seed, kernel, padded, rand

INF = float("inf")
FP16_MAX = 65504.0
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=2e-3, atol=2e-4)}  # Triton vs reference


# ---------------------------------------------------------------- the reference against naive oracles

def naive_mlm(logits, targets, weights):
    total, wsum, correct = 0.0, 0.0, []
    for r in range(logits.shape[0]):
        row = [float(v) for v in logits[r]]
        mx = max(row)
        lse = mx + math.log(sum(math.exp(v - mx) for v in row))
        total += float(weights[r]) * (lse - row[int(targets[r])])
        wsum += float(weights[r])
        correct.append(row.index(mx) == int(targets[r]))
    return total / (wsum + 1e-6), correct


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_loss_matches_naive(dtype):
    m, v = 11, 37
    logits = (torch.randn(m, v) * 3).to(dtype)
    targets = torch.randint(0, v, (m,))
    weights = (torch.rand(m) > 0.3).float()
    loss, sampled, correct = ops.mlm_loss_and_sample(logits, targets, weights)
    ref_loss, ref_correct = naive_mlm(logits.double(), targets, weights)
    assert loss.dtype == torch.float32 and abs(loss.item() - ref_loss) < 1e-5 * max(1, abs(ref_loss))
    assert correct.tolist() == ref_correct
    assert sampled.dtype == torch.int64 and sampled.shape == (m,) and ((0 <= sampled) & (sampled < v)).all()


def test_reference_gradient_and_gradcheck():
    m, v = 7, 13
    logits = torch.randn(m, v, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, v, (m,))
    weights = torch.rand(m, dtype=torch.float64)
    loss = ops.mlm_loss_and_sample(logits, targets, weights)[0]
    (grad,) = torch.autograd.grad(loss * 2.5, logits)
    ce = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    expected = torch.autograd.grad((weights * ce).sum() / (weights.sum() + 1e-6) * 2.5, logits)[0]
    assert torch.allclose(grad, expected, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: ops.mlm_loss_and_sample(x, targets, weights)[0], (logits,))


def test_reference_disallow_correct_and_zero_weights():
    m, v = 64, 5
    targets = torch.randint(0, v, (m,))
    logits = torch.full((m, v), -4.0).scatter(1, targets[:, None], 6.0).requires_grad_()
    loss, sampled, correct = ops.mlm_loss_and_sample(logits, targets, torch.zeros(m), disallow_correct=True)
    assert not (sampled == targets).any() and correct.all()
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_reference_padded_vocabulary_is_never_read(dtype):
    # Columns >= V hold +1e4: any leak into the loss, argmax, sampler or gradient shows.
    m, v, width = 9, 21, 32
    real = torch.randn(m, v, dtype=torch.float64) * 3
    logits = torch.cat([real, torch.full((m, width - v), 1e4, dtype=torch.float64)], 1).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (m,))
    weights = torch.rand(m, dtype=torch.float64)
    loss, sampled, correct = ops.mlm_loss_and_sample(logits, targets, weights, temperature=0.7, vocab_size=v,
                                                     generator=torch.Generator().manual_seed(3))
    ref_loss, ref_correct = naive_mlm(logits[:, :v].detach().double(), targets, weights)
    assert abs(loss.item() - ref_loss) < 1e-6 * max(1, abs(ref_loss))
    assert correct.tolist() == ref_correct
    # The same draws as the unpadded logits: the uniforms are [M, V] and the padding takes none.
    unpadded = ops.mlm_loss_and_sample(logits[:, :v].detach().contiguous(), targets, weights, temperature=0.7,
                                       generator=torch.Generator().manual_seed(3))[1]
    assert torch.equal(sampled, unpadded)
    (grad,) = torch.autograd.grad(loss * 1.5, logits)
    assert grad.dtype == dtype and torch.equal(grad[:, v:], torch.zeros_like(grad[:, v:]))
    x = logits[:, :v].detach().double().requires_grad_()
    ce = torch.nn.functional.cross_entropy(x, targets, reduction="none")
    (expected,) = torch.autograd.grad((weights * ce).sum() / (weights.sum() + 1e-6) * 1.5, x)
    torch.testing.assert_close(grad[:, :v].double(), expected, **({} if dtype == torch.float64 else
                                                                   dict(rtol=1e-2, atol=1e-4)))
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(
            lambda x: ops.mlm_loss_and_sample(x, targets, weights, vocab_size=v)[0],
            (torch.cat([real, torch.randn(m, width - v, dtype=torch.float64)], 1).requires_grad_(),))


# The kernels read every dtype the same way (a load converted to fp32): one dtype for the slow interpreter.
@pytest.mark.parametrize("backend, dtype", [("torch", d) for d in DTYPES] + [triton_param("triton", torch.bfloat16)])
def test_rows_with_one_or_no_finite_logit(backend, dtype):
    """All but one -inf: sample and argmax that one. All -inf (or the one finite id disallowed): id 0, argmax 0, and
    a NaN cross-entropy, which a real slot passes on to the loss."""
    dev = "cpu" if backend == "torch" else DEVICE
    x = torch.full((4, 9), -INF, device=dev)
    x[0, 5], x[1, 8], x[3, 2] = 3.0, -FP16_MAX, 1e4
    x = x.to(dtype)
    targets = torch.tensor([5, 4, 3, 2], device=dev)
    ones = torch.ones(4, device=dev)
    for temperature, disallow in [(1.0, False), (0.05, False), (5.0, True)]:
        loss, sampled, correct = ops.mlm_loss_and_sample(x, targets, ones, temperature=temperature,
                                                         disallow_correct=disallow, backend=backend)
        ids = ops.gumbel_sample(x, temperature=temperature, disallow=targets if disallow else None, backend=backend)
        expect = [0, 8, 0, 0] if disallow else [5, 8, 0, 2]  # row 0 and 3 disallow their only finite id
        assert sampled.tolist() == expect and ids.tolist() == expect
        assert correct.tolist() == [True, False, False, True]  # argmax 5, 8, 0 (all -inf), 2
        assert loss.isnan()  # the all -inf row is a real slot
    loss = ops.mlm_loss_and_sample(x[:2], targets[:2], ones[:2], backend=backend)[0]
    assert loss.isinf() and loss > 0  # row 1: target logit -inf, finite log-sum-exp


@pytest.mark.parametrize("backend", ["torch", triton_param("triton")])
def test_weight0_rows_never_reach_the_loss(backend):
    """A padding slot (weight 0) must not reach the loss whatever its logits: e.g. a user masks the special tokens'
    logits to -inf while padding slots target [CLS]."""
    dev = "cpu" if backend == "torch" else DEVICE
    x = torch.tensor([[0.0, -INF, 1.0], [1.0, 2.0, 0.5], [-INF, -INF, -INF]], device=dev)
    targets, weights = torch.tensor([1, 0, 2], device=dev), torch.tensor([0.0, 1.0, 0.0], device=dev)
    loss = ops.mlm_loss_and_sample(x, targets, weights, backend=backend)[0]
    expected = float(torch.logsumexp(x[1], 0) - x[1, 0]) / (1 + WEIGHT_EPS)
    torch.testing.assert_close(loss.detach().double().cpu(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6,
                               atol=1e-6, equal_nan=True)


# ---------------------------------------------------------------- the Triton kernel against the reference, tiles shrunk

@triton_test
@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("temperature, disallow", [(1.0, False), (0.7, True)])
@pytest.mark.parametrize("m, v", [(7, 37), (1, 5)])
def test_triton_matches_reference(poison, dtype, temperature, disallow, m, v):
    logits = rand(m, v, dtype=dtype, scale=3).requires_grad_()
    targets = torch.randint(0, v, (m,), device=DEVICE)
    weights = (torch.rand(m, device=DEVICE) > 0.3).float()
    weights[0] = 1.0
    kw = dict(temperature=temperature, disallow_correct=disallow)
    loss, sampled, correct = ops.mlm_loss_and_sample(logits, targets, weights, backend="triton", **kw)
    ref_loss, _, ref_correct = ops.mlm_loss_and_sample(logits, targets, weights, backend="torch", **kw)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, ref_loss, **TOL[torch.float32])
    assert correct.dtype == torch.bool and torch.equal(correct, ref_correct)
    assert sampled.dtype == torch.int64 and ((sampled >= 0) & (sampled < v)).all()
    if disallow and v > 1:
        assert not (sampled == targets).any()
    grad_out = torch.tensor(2.5, device=DEVICE)
    (grad,) = torch.autograd.grad(loss, logits, grad_out)
    (ref_grad,) = torch.autograd.grad(ref_loss, logits, grad_out)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad, ref_grad, **TOL[dtype])


@triton_test
@pytest.mark.usefixtures("small_tiles")
def test_triton_all_weights_zero_writes_everything(poison):
    m, v = 5, 19
    logits = rand(m, v, scale=2).requires_grad_()
    targets = torch.randint(0, v, (m,), device=DEVICE)
    loss, sampled, correct = ops.mlm_loss_and_sample(logits, targets, torch.zeros(m, device=DEVICE), backend="triton")
    assert loss.item() == 0.0
    assert ((sampled >= 0) & (sampled < v)).all()
    assert torch.equal(correct, logits.argmax(1) == targets)
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@triton_test
@pytest.mark.usefixtures("small_tiles")
def test_triton_extreme_logits_are_finite():
    # -1e4 / +1e4 spreads: the online log-sum-exp must not overflow; the sample is the dominant id.
    logits = torch.full((3, 21), -1e4, device=DEVICE)
    logits[0, 20], logits[1, 0], logits[2, 9] = 1e4, 50.0, 0.0
    targets = torch.tensor([20, 3, 9], device=DEVICE)
    loss, sampled, correct = ops.mlm_loss_and_sample(logits, targets, torch.ones(3, device=DEVICE), backend="triton")
    ref = ops.mlm_loss_and_sample(logits, targets, torch.ones(3, device=DEVICE), backend="torch")[0]
    torch.testing.assert_close(loss, ref)
    assert sampled.tolist() == [20, 0, 9] and correct.tolist() == [True, False, True]


@triton_test
@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("temperature, disallow", [(1.0, False), (0.7, True)])
@pytest.mark.parametrize("v, width", [(37, 48), (21, 43)])  # W a multiple of 16 (the model's case), and not
def test_triton_padded_vocabulary_matches_reference(poison, dtype, temperature, disallow, v, width):
    m = 7
    logits = padded(rand(m, v, dtype=dtype, scale=3), width).requires_grad_()
    targets = torch.randint(0, v, (m,), device=DEVICE)
    weights = torch.rand(m, device=DEVICE)
    kw = dict(temperature=temperature, disallow_correct=disallow, vocab_size=v)
    loss, sampled, correct = ops.mlm_loss_and_sample(logits, targets, weights, backend="triton", **kw)
    ref_loss, _, ref_correct = ops.mlm_loss_and_sample(logits, targets, weights, backend="torch", **kw)
    torch.testing.assert_close(loss, ref_loss, **TOL[torch.float32])
    assert torch.equal(correct, ref_correct) and ((sampled >= 0) & (sampled < v)).all()
    if disallow:
        assert not (sampled == targets).any()
    (grad,) = torch.autograd.grad(loss, logits, torch.tensor(1.5, device=DEVICE))
    (ref_grad,) = torch.autograd.grad(ref_loss, logits, torch.tensor(1.5, device=DEVICE))
    torch.testing.assert_close(grad[:, :v], ref_grad[:, :v], **TOL[dtype])
    assert torch.equal(grad[:, v:], torch.zeros_like(grad[:, v:]))  # written (poisoned buffer), exactly 0


# ---------------------------------------------------------------- registration, errors, the empty batch

def opcheck_cases(backend, device):
    """Each backend's custom ops with the arguments torch.library.opcheck checks them at."""
    if backend == "torch":
        from electra_fast.ops.mlm_loss_and_sample import _mlm_backward_op, _mlm_op

        m, v = 6, 9
        logits = torch.randn(m, v, requires_grad=True)
        targets = torch.randint(0, v, (m,))
        return [
            (_mlm_op, (logits, targets, torch.rand(m), torch.rand(m, v), 0.8, True, v)),
            (_mlm_op, (logits, targets.clamp(max=v - 3), torch.rand(m), torch.rand(m, v - 2), 1.0, False, v - 2)),
            (_mlm_backward_op, (torch.tensor(1.0), logits.detach(), targets, torch.rand(m), torch.randn(m), v)),
            (_mlm_backward_op, (torch.tensor(1.0), logits.detach(), targets.clamp(max=v - 3), torch.rand(m),
                                torch.randn(m), v - 2)),
        ]
    if backend == "triton":
        mls = kernel("mlm_loss_and_sample")
        m, v = 4, 11
        logits = rand(m, v, device=device).requires_grad_()
        targets, seed = torch.randint(0, v, (m,), device=device), torch.tensor([7], device=device)
        return [
            (mls._mlm_op, (logits, targets, torch.rand(m, device=device), seed, 0.8, True, "cdf", v)),
            (mls._mlm_op, (logits, targets.clamp(max=v - 4), torch.rand(m, device=device), seed, 1.0, False,
                           "gumbel", v - 3)),
            (mls._mlm_backward_op, (torch.tensor(1.5, device=device), logits.detach(), targets.clamp(max=v - 3),
                                    torch.rand(m, device=device), rand(m, device=device),
                                    torch.tensor(0.3, device=device), v - 2)),
        ]
    m, v = 64, 300
    logits = torch.randn(m, v, device=device, dtype=torch.bfloat16, requires_grad=True)
    ids = torch.randint(0, v, (m,), device=device)
    w, seed = torch.ones(m, device=device), cuda_seed(device)
    return [
        (cu_mlm._mlm_op, (logits, ids, w, seed, 0.8, True, "cdf", v)),
        (cu_mlm._mlm_op, (logits, ids.clamp(max=v - 45), w, seed, 1.0, False, "gumbel", v - 44)),
    ]


@pytest.mark.parametrize("backend", ["torch", triton_param("triton"), gpu_param("cuda")])
def test_opcheck(request, backend, device):
    if backend == "triton":
        request.getfixturevalue("small_tiles")
    for op, args in opcheck_cases(backend, device):
        torch.library.opcheck(op, args)


META = dict(device="meta")  # another device than the CPU, without a GPU
BAD_INPUTS = [  # (call, error type, words the message must hold: the argument, what it expects, what it got)
    (lambda: ops.mlm_loss_and_sample(torch.randn(4, 5), torch.zeros(3, dtype=torch.long), torch.ones(4)),
     ValueError, ["targets", "(4,)", "(3,)"]),
    (lambda: ops.mlm_loss_and_sample(torch.randn(4, 5), torch.zeros(4), torch.ones(4)),
     TypeError, ["targets", "int64", "float32"]),
    (lambda: ops.mlm_loss_and_sample(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), torch.ones(4),
                                     temperature=-1), ValueError, ["temperature", "-1"]),
    (lambda: ops.mlm_loss_and_sample(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), torch.ones(4),
                                     vocab_size=6), ValueError, ["vocab_size", "[1, 5]", "6"]),
    (lambda: call_mlm(temperature=INF), ValueError, ["temperature"]),
    (lambda: call_mlm(logits=torch.ones(3, 5, dtype=torch.long)), TypeError, ["logits"]),
    (lambda: call_mlm(logits=torch.randn(15)), ValueError, ["logits"]),
    (lambda: call_mlm(logits=torch.randn(3, 0)), ValueError, ["logits"]),
    (lambda: call_mlm(targets=torch.zeros(3, 1, dtype=torch.long)), ValueError, ["targets"]),
    (lambda: call_mlm(weights=torch.ones(2)), ValueError, ["weights"]),
    (lambda: call_mlm(weights=torch.ones(3, dtype=torch.complex64)), TypeError, ["weights"]),
    (lambda: call_mlm(targets=torch.zeros(3, dtype=torch.long, **META)), ValueError, ["targets"]),
    (lambda: call_mlm(weights=torch.ones(3, **META)), ValueError, ["weights"]),
    (lambda: call_mlm(backend="nope"), ValueError, ["backend"]),
]


@pytest.mark.parametrize("call, exc, words", BAD_INPUTS)
def test_bad_input_errors_name_the_argument(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    for word in words:
        assert word in str(info.value), (word, str(info.value))


OUT_OF_RANGE = [  # (call with an id out of its range, the argument)
    (lambda b: call_mlm(targets=torch.tensor([0, 5, 2]), backend=b), "targets"),
    (lambda b: call_mlm(targets=torch.tensor([0, -1, 2]), backend=b), "targets"),
    (lambda b: call_mlm(targets=torch.tensor([0, 4, 2]), vocab_size=4, backend=b), "targets"),  # a padding column
]


@pytest.mark.parametrize("backend", ["torch", triton_param("triton")])
@pytest.mark.parametrize("call, name", OUT_OF_RANGE)
def test_out_of_range_ids_are_named(call, name, backend):
    """Checked on CPU tensors (free; these are); on CUDA a documented precondition (checking would sync)."""
    with pytest.raises((ValueError, IndexError), match=name):
        call(backend)


@pytest.mark.parametrize("backend", ["torch", triton_param("triton")])
def test_empty_batch(poison, backend):
    dev = "cpu" if backend == "torch" else DEVICE
    logits = torch.randn(0, 7, device=dev, requires_grad=True)
    none = torch.zeros(0, dtype=torch.long, device=dev)
    loss, sampled, correct = ops.mlm_loss_and_sample(logits, none, torch.zeros(0, device=dev), backend=backend)
    assert loss.item() == 0.0 and sampled.shape == correct.shape == (0,)
    loss.backward()
    assert logits.grad.shape == (0, 7)
