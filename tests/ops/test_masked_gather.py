"""`ops.masked_gather` (and its backward, a scatter-add that sums repeated positions) on every backend.

- The reference (torch) against loops, and gradcheck in fp64.
- The Triton kernels against the reference at tiny shapes with tiles shrunk (in the interpreter, or compiled on a
  GPU), outputs poisoned; at ELECTRA's shapes on a GPU against fp64 sums (twin: tiny shapes in the interpreter).
- The CUDA C++ backend on a GPU, misaligned storage included (twin: the reference on the CPU); parity with Triton.
- opcheck of each backend's custom ops; bad arguments named; ids out of range; empty batches."""
import pytest
import torch

from conftest import ENGINES, PAIRS, TRITON_DEVICE as DEVICE, TRITON_DEVICES, gpu_param, triton_param, triton_test
from electra_fast import ops
from electra_fast.csrc import masked_gather as cu_gather
from helpers import (ELECTRA_SHAPES, assert_close_to_fp64, by_device, kernel, masked_batch,
                     poison_cuda_allocator, rand, sized_for)

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=2e-3, atol=2e-4)}  # Triton vs reference
FP64_RTOL = {torch.float32: 1e-4, torch.bfloat16: 1.6e-2}
# The kernels sum the gradients of repeated slots (~10 unit-size terms) in fp32 before one rounding: an fp32 sum's
# error, not a relative one, bounds an element that nearly cancels.
SUM_ATOL = 1e-5


# ---------------------------------------------------------------- the reference

def test_reference_matches_loops_and_gradcheck():
    b, seq_len, h, n = 3, 9, 5, 4
    hidden = torch.randn(b, seq_len, h, dtype=torch.float64, requires_grad=True)
    pos = torch.stack([torch.randperm(seq_len)[:n] for _ in range(b)])
    pos[1, 3] = pos[1, 2]  # repeated positions accumulate in the backward
    out = ops.masked_gather(hidden, pos)
    for i in range(b):
        for j in range(n):
            assert torch.equal(out[i, j], hidden[i, pos[i, j]])
    g = torch.randn_like(out)
    out.backward(g)
    expected = torch.zeros(b, seq_len, h, dtype=torch.float64)
    for i in range(b):
        for j in range(n):
            expected[i, pos[i, j]] += g[i, j]
    assert torch.allclose(hidden.grad, expected)
    assert torch.autograd.gradcheck(lambda x: ops.masked_gather(x, pos), (hidden.detach().requires_grad_(),))


# ---------------------------------------------------------------- the Triton kernels

@triton_test
@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_gather_and_scatter_add(poison, dtype):
    b, seq_len, h, n = 3, 11, 9, 6
    hidden = rand(b, seq_len, h, dtype=dtype).requires_grad_()
    pos = torch.stack([torch.randperm(seq_len, device=DEVICE)[:n] for _ in range(b)])
    pos[1, 3:] = 0       # padding slots all point at position 0 ...
    pos[2, 0] = 0        # ... and a real slot may sit at 0 as well
    pos[2, 4:] = 0
    out = ops.masked_gather(hidden, pos, backend="triton")
    ref = ops.masked_gather(hidden, pos, backend="torch")
    assert out.dtype == dtype and torch.equal(out, ref)
    g = rand(b, n, h, dtype=dtype)
    (grad,) = torch.autograd.grad(out, hidden, g)
    # The oracle sums in fp64 from the upcast inputs: a gradient taken through `ref.float()` would flow back into
    # fp16 `hidden` and be summed by an fp16 scatter-add, while the kernel sums in fp32 and rounds once.
    ref_hidden = hidden.detach().double().requires_grad_()
    (ref_grad,) = torch.autograd.grad(ops.masked_gather(ref_hidden, pos, backend="torch"), ref_hidden, g.double())
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), ref_grad, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", ["small", "base"])
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_at_electra_shapes(poison, monkeypatch, device, shape, dtype):
    sized_for(device, monkeypatch)
    b, seq_len, h = ELECTRA_SHAPES[shape][device]
    _, _, pos, w = masked_batch(device, shape)
    assert (w[: b // 2] == 0).sum(1).min() >= 2  # the padded rows' padding slots all point at position 0
    hidden = torch.randn(b, seq_len, h, device=device, dtype=dtype, requires_grad=True)
    out = ops.masked_gather(hidden, pos, backend="triton")
    assert torch.equal(out, ops.masked_gather(hidden, pos, backend="torch"))
    g = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, hidden, g)
    ref_hidden = hidden.detach().double().requires_grad_()
    (ref_grad,) = torch.autograd.grad(ops.masked_gather(ref_hidden, pos, backend="torch"), ref_hidden, g.double())
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), ref_grad, rtol=FP64_RTOL[dtype], atol=SUM_ATOL)


# ---------------------------------------------------------------- the CUDA C++ backend (twin: the reference on the CPU)

@pytest.mark.parametrize("dtype,h,offset", [(torch.bfloat16, 768, 0), (torch.float32, 256, 0),
                                            (torch.float16, 3, 1), (torch.float64, 5, 1), (torch.int64, 4, 0)])
@pytest.mark.parametrize("backend", ENGINES)
def test_gather_and_scatter_match_reference(backend, device, dtype, h, offset):
    b, seq, n = by_device(device, (16, 512, 77), (4, 64, 20))
    # `offset` starts the tensor one element into its storage: misaligned rows take the narrower copy paths.
    base = torch.randn(b * seq * h + offset, device=device, dtype=torch.float64) * 100
    hidden = base.to(dtype)[offset:].view(b, seq, h)
    positions = torch.randint(0, seq, (b, n), device=device)  # repeats included: the backward must add them
    poison_cuda_allocator(b * seq * h * 8, device)
    out = ops.masked_gather(hidden, positions, backend=backend)
    assert torch.equal(out, hidden.gather(1, positions[..., None].expand(-1, -1, h)))
    if not dtype.is_floating_point:
        return
    hidden = hidden.detach().requires_grad_(True)  # same (misaligned) storage, now a leaf that takes a grad
    grad_out = torch.randn(b, n, h, device=device).to(dtype)
    poison_cuda_allocator(b * seq * h * 8, device)
    ops.masked_gather(hidden, positions, backend=backend).backward(grad_out)
    want = torch.zeros(b, seq, h, device=device, dtype=torch.float64)
    want.scatter_add_(1, positions[..., None].expand(-1, -1, h), grad_out.double())
    assert_close_to_fp64(hidden.grad, want, dtype if dtype != torch.float64 else torch.float32, "scatter-add backward")


@pytest.mark.parametrize("pair", PAIRS)
def test_parity_with_triton(pair, pair_device):
    device = pair_device
    b, seq, h, n = by_device(device, (16, 512, 768, 77), (2, 16, 8, 5))
    if "triton" not in ops.available_backends(device, "masked_gather"):
        pytest.skip("no Triton kernel for masked_gather here")
    hidden = torch.randn(b, seq, h, device=device, dtype=torch.bfloat16)
    positions = torch.randint(0, seq, (b, n), device=device)
    grads = []
    for backend in pair:
        x = hidden.clone().requires_grad_(True)
        out = ops.masked_gather(x, positions, backend=backend)
        out.float().pow(2).sum().backward()
        grads.append((out, x.grad))
    assert torch.equal(grads[0][0], grads[1][0])
    assert_close_to_fp64(grads[0][1], grads[1][1].double(), torch.bfloat16, f"scatter-add: {pair[0]} vs Triton")


# ---------------------------------------------------------------- registration, errors, empty batches

def opcheck_cases(backend, device):
    """Each backend's custom ops with the arguments torch.library.opcheck checks them at."""
    if backend == "torch":
        from electra_fast.ops.masked_gather import _masked_gather_op, _masked_scatter_add_op

        b, seq_len, h = 2, 10, 4
        n = ops.num_slots(seq_len, 0.3)
        pos = torch.stack([torch.randperm(seq_len)[:n] for _ in range(b)])
        return [
            (_masked_gather_op, (torch.randn(b, seq_len, h, requires_grad=True), pos)),
            (_masked_scatter_add_op, (torch.randn(b, n, h), pos, seq_len)),
        ]
    if backend == "triton":
        mg = kernel("masked_gather")
        b, seq_len, h, n = 2, 6, 5, 3
        pos = torch.randint(0, seq_len, (b, n), device=device)
        return [
            (mg._gather_op, (rand(b, seq_len, h, device=device).requires_grad_(), pos)),
            (mg._scatter_add_op, (rand(b, n, h, device=device), pos, seq_len)),
        ]
    hidden = torch.randn(2, 40, 16, device=device, requires_grad=True)
    positions = torch.randint(0, 40, (2, 7), device=device)
    return [
        (cu_gather._gather_op, (hidden, positions)),
        (cu_gather._scatter_add_op, (torch.randn(2, 7, 16, device=device), positions, 40)),
    ]


@pytest.mark.parametrize("backend", ["torch", triton_param("triton"), gpu_param("cuda")])
def test_opcheck(request, backend, device):
    if backend == "triton":
        request.getfixturevalue("small_tiles")
    for op, args in opcheck_cases(backend, device):
        torch.library.opcheck(op, args)


def call_gather(hidden=None, positions=None, **kw):
    return ops.masked_gather(torch.randn(2, 6, 4) if hidden is None else hidden,
                             torch.tensor([[0, 5], [2, 2]]) if positions is None else positions, **kw)


META = dict(device="meta")  # another device than the CPU, without a GPU
BAD_INPUTS = [  # (call, error type, words the message must hold: the argument, what it expects, what it got)
    (lambda: ops.masked_gather(torch.randn(2, 5, 3), torch.zeros(3, 2, dtype=torch.long)),
     ValueError, ["positions", "batch size 2", "(3, 2)"]),
    (lambda: ops.masked_gather(torch.randn(2, 5), torch.zeros(2, 2, dtype=torch.long)),
     ValueError, ["hidden", "3 dimensions", "(2, 5)"]),
    (lambda: call_gather(positions=torch.zeros(2, 2)), TypeError, ["positions"]),
    (lambda: call_gather(positions=torch.zeros(2, dtype=torch.long)), ValueError, ["positions"]),
    (lambda: call_gather(positions=torch.zeros(2, 2, dtype=torch.long, **META)), ValueError, ["positions"]),
]


@pytest.mark.parametrize("call, exc, words", BAD_INPUTS)
def test_bad_input_errors_name_the_argument(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize("backend", ["torch", triton_param("triton")])
@pytest.mark.parametrize("positions", [[[0, 6], [2, 2]], [[0, -1], [2, 2]]])
def test_out_of_range_ids_are_named(positions, backend):
    """Checked on CPU tensors (free; these are); on CUDA a documented precondition (checking would sync)."""
    with pytest.raises((ValueError, IndexError), match="positions"):
        call_gather(positions=torch.tensor(positions), backend=backend)


@pytest.mark.parametrize("backend", ["torch", triton_param("triton")])
def test_empty_batch(poison, backend):
    dev = "cpu" if backend == "torch" else DEVICE
    for b, seq_len, n, h in [(0, 5, 2, 3), (2, 5, 0, 3), (2, 5, 2, 0)]:
        hidden = torch.randn(b, seq_len, h, device=dev, requires_grad=True)
        out = ops.masked_gather(hidden, torch.zeros(b, n, dtype=torch.long, device=dev), backend=backend)
        assert out.shape == (b, n, h)
        (grad,) = torch.autograd.grad(out.sum(), hidden)
        assert torch.equal(grad, torch.zeros_like(grad))
