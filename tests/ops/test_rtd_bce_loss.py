"""`ops.rtd_bce_loss`, the discriminator's masked-mean BCE over token logits, on every backend.

- The reference (torch) against a naive loop in fp64, gradcheck in fp64, an all-padding batch.
- The Triton kernel against the reference at tiny shapes with tiles shrunk (in the interpreter, or compiled on a
  GPU), saturated logits, label and mask dtypes, outputs poisoned; at ELECTRA's shapes on a GPU against fp64 (twin:
  tiny shapes in the interpreter).
- The CUDA C++ backend on a GPU against fp64, label and mask dtypes, no mask (twin: the reference on the CPU); parity
  with Triton.
- opcheck of each backend's custom ops; bad arguments named; empty batches."""
import math

import pytest
import torch

from conftest import ENGINES, PAIRS, TRITON_DEVICE as DEVICE, TRITON_DEVICES, gpu_param, triton_param, triton_test
from electra_fast import ops
from electra_fast.csrc import rtd_bce_loss as cu_bce
from helpers import (ELECTRA_SHAPES, assert_close_to_fp64, by_device, kernel, make_batch, poison_cuda_allocator, rand,
                     sized_for)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=2e-3, atol=2e-4)}  # Triton vs reference


# ---------------------------------------------------------------- the reference

def naive_bce(logits, labels, mask):
    total, count = 0.0, 0
    for x, y, m in zip(logits.flatten().tolist(), labels.flatten().tolist(), mask.flatten().tolist()):
        if m:
            p = 1 / (1 + math.exp(-x))
            total += -(y * math.log(p) + (1 - y) * math.log(1 - p))
            count += 1
    return total / max(count, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reference_matches_naive(dtype):
    logits = (torch.randn(4, 10) * 4).to(dtype)
    labels = torch.rand(4, 10) > 0.8
    mask = torch.rand(4, 10) > 0.2
    loss = ops.rtd_bce_loss(logits, labels, mask)
    assert abs(loss.item() - naive_bce(logits.double(), labels.double(), mask)) < 1e-5


def test_reference_gradient_and_all_padding():
    logits = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    labels = (torch.rand(3, 8) > 0.5).double()
    mask = (torch.rand(3, 8) > 0.3).long()
    assert torch.autograd.gradcheck(lambda x: ops.rtd_bce_loss(x, labels, mask), (logits,))
    ref = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    ref = (ref * mask).sum() / mask.sum()
    assert torch.allclose(ops.rtd_bce_loss(logits, labels, mask), ref)
    empty = ops.rtd_bce_loss(logits, labels, torch.zeros_like(mask))
    (g,) = torch.autograd.grad(empty, logits)
    assert empty.item() == 0.0 and g.abs().max() == 0


# ---------------------------------------------------------------- the Triton kernel

@triton_test
@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("label_dtype, mask_dtype", [(torch.bool, torch.bool), (torch.float32, torch.int64)])
def test_triton_matches_reference(poison, dtype, label_dtype, mask_dtype):
    logits = rand(5, 9, dtype=dtype, scale=4)
    logits[0, 0], logits[0, 1] = 30.0, -30.0  # saturated sigmoid both ways
    logits.requires_grad_()
    labels = (torch.rand(5, 9, device=DEVICE) > 0.6).to(label_dtype)
    mask = (torch.rand(5, 9, device=DEVICE) > 0.2).to(mask_dtype)
    loss = ops.rtd_bce_loss(logits, labels, mask, backend="triton")
    ref = ops.rtd_bce_loss(logits, labels, mask, backend="torch")
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, **TOL[torch.float32])
    grad_out = torch.tensor(3.0, device=DEVICE)
    (grad,) = torch.autograd.grad(loss, logits, grad_out)
    (ref_grad,) = torch.autograd.grad(ref, logits, grad_out)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad, ref_grad, **TOL[dtype])


@triton_test
@pytest.mark.usefixtures("small_tiles")
def test_triton_all_padding_is_zero(poison):
    logits = rand(3, 7).requires_grad_()
    loss = ops.rtd_bce_loss(logits, torch.ones(3, 7, device=DEVICE), torch.zeros(3, 7, device=DEVICE),
                            backend="triton")
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("shape", ["small", "base"])
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_at_electra_shapes(poison, monkeypatch, device, shape):
    sized_for(device, monkeypatch)
    b, seq_len, _ = ELECTRA_SHAPES[shape][device]
    labels = torch.rand(b, seq_len, device=device) > 0.85
    mask = torch.rand(b, seq_len, device=device) > 0.1
    logits = torch.randn(b, seq_len, device=device, dtype=torch.bfloat16, requires_grad=True)
    ref_logits = logits.detach().double().requires_grad_()
    loss = ops.rtd_bce_loss(logits, labels, mask, backend="triton")
    ref_loss = ops.rtd_bce_loss(ref_logits, labels, mask, backend="torch")
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(loss, logits)
    (ref_grad,) = torch.autograd.grad(ref_loss, ref_logits)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1.6e-2, atol=1e-12)


# ---------------------------------------------------------------- the CUDA C++ backend (twin: the reference on the CPU)

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("label_dtype,mask_dtype", [(torch.bool, None), (torch.int64, torch.int64),
                                                    (torch.float32, torch.bool), (torch.uint8, torch.float16)])
@pytest.mark.parametrize("backend", ENGINES)
def test_matches_reference(backend, device, dtype, label_dtype, mask_dtype):
    b, seq = 128, 512
    logits = (torch.randn(b, seq, device=device) * 4).to(dtype).requires_grad_(True)
    labels = (torch.rand(b, seq, device=device) < 0.15).to(label_dtype)
    mask = None
    if mask_dtype is not None:
        lengths = torch.randint(1, seq + 1, (b,), device=device)
        mask = (torch.arange(seq, device=device) < lengths[:, None]).to(mask_dtype)
    poison_cuda_allocator(b * seq * 8, device)
    loss = ops.rtd_bce_loss(logits, labels, mask, backend=backend)
    (loss * 2.5).backward()
    ref_logits = logits.detach().double().requires_grad_(True)
    ref = ops.rtd_bce_loss(ref_logits, labels, mask, backend="torch")
    (ref * 2.5).backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-7)
    assert_close_to_fp64(logits.grad, ref_logits.grad, dtype, "grad of the BCE loss")


@pytest.mark.parametrize("backend", ENGINES)
def test_without_real_tokens_is_zero(backend, device):
    logits = torch.randn(4, 9, device=device, requires_grad=True)
    loss = ops.rtd_bce_loss(logits, torch.ones(4, 9, device=device), torch.zeros(4, 9, device=device),
                            backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("pair", PAIRS)
def test_parity_with_triton(pair, pair_device):
    device = pair_device
    b, seq = by_device(device, (16, 512), (2, 16))
    if "triton" not in ops.available_backends(device, "rtd_bce_loss"):
        pytest.skip("no Triton kernel for rtd_bce_loss here")
    logits = torch.randn(b, seq, device=device, dtype=torch.bfloat16)
    labels = torch.rand(b, seq, device=device) < 0.15
    mask = torch.rand(b, seq, device=device) < 0.9
    losses = [ops.rtd_bce_loss(logits, labels, mask, backend=bk) for bk in pair]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- registration, errors, empty batches

def opcheck_cases(backend, device):
    """Each backend's custom ops with the arguments torch.library.opcheck checks them at."""
    if backend == "torch":
        from electra_fast.ops.rtd_bce_loss import _rtd_bce_op

        b, seq_len = 2, 10
        _, am = make_batch(b=b, seq_len=seq_len, vocab=9)
        return [(_rtd_bce_op, (torch.randn(b, seq_len, requires_grad=True), torch.rand(b, seq_len) > 0.5, am))]
    if backend == "triton":
        bce = kernel("rtd_bce_loss")
        b, seq_len = 2, 6
        return [
            (bce._rtd_bce_op, (rand(b, seq_len, device=device).requires_grad_(),
                               torch.rand(b, seq_len, device=device) > 0.5,
                               torch.ones(b, seq_len, dtype=torch.long, device=device))),
            (bce._backward_op, (rand(b, seq_len, device=device), torch.tensor(2.0, device=device),
                                torch.tensor(0.1, device=device), torch.float16)),
        ]
    bce_logits = torch.randn(2, 40, device=device, requires_grad=True)
    return [(cu_bce._bce_op, (bce_logits, torch.rand(2, 40, device=device) < 0.5, torch.ones(2, 40, device=device)))]


@pytest.mark.parametrize("backend", ["torch", triton_param("triton"), gpu_param("cuda")])
def test_opcheck(request, backend, device):
    if backend == "triton":
        request.getfixturevalue("small_tiles")
    for op, args in opcheck_cases(backend, device):
        torch.library.opcheck(op, args)


META = dict(device="meta")  # another device than the CPU, without a GPU
BAD_INPUTS = [  # (call, error type, words the message must hold: the argument, what it expects, what it got)
    (lambda: ops.rtd_bce_loss(torch.randn(2, 5), torch.zeros(2, 4)), ValueError, ["labels", "(2, 5)", "(2, 4)"]),
    (lambda: ops.rtd_bce_loss(torch.randn(2, 5), torch.zeros(2, 5), torch.ones(5)),
     ValueError, ["attention_mask", "(2, 5)", "(5,)"]),
    (lambda: ops.rtd_bce_loss(torch.ones(2, 6, dtype=torch.long), torch.zeros(2, 6)), TypeError, ["logits"]),
    (lambda: ops.rtd_bce_loss(torch.randn(12), torch.zeros(2, 6)), ValueError, ["logits"]),
    (lambda: ops.rtd_bce_loss(torch.randn(2, 6), torch.zeros(2, 6, **META)), ValueError, ["labels"]),
]


@pytest.mark.parametrize("call, exc, words", BAD_INPUTS)
def test_bad_input_errors_name_the_argument(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize("backend", ["torch", triton_param("triton")])
def test_empty_batch(poison, backend):
    dev = "cpu" if backend == "torch" else DEVICE
    for shape in [(0, 4), (3, 0)]:
        x = torch.randn(shape, device=dev, requires_grad=True)
        loss = ops.rtd_bce_loss(x, torch.ones(shape, device=dev), backend=backend)
        assert loss.item() == 0.0
