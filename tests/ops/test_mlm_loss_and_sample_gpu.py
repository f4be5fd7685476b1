"""`ops.mlm_loss_and_sample` on a GPU at ELECTRA sizes, each test with a CPU twin that proves its own logic
(inputs, oracle, tolerances) before a GPU runs it (tests/test_gpu_map.py):

- the Triton kernel (V = 30522, thousands of rows, bf16) against fp64; its twin runs the same body at tiny sizes in
  the interpreter (`TRITON_INTERPRET=1`) with the tiles shrunk to match;
- the CUDA C++ backend against the reference (fp32/fp16/bf16, plain and padded to a multiple of 128 with NaN in the
  padding, exactly zero gradient there, both samplers: exact samples for the Gumbel one, replayed from its own
  noise); its twin is the reference on the CPU; parity with the Triton kernels; int64 row offsets."""
import pytest
import torch

from conftest import ENGINES, PAIRS, SAMPLED, TRITON_DEVICES, requires_cuda
from electra_fast import ops
from electra_fast.csrc import gumbel_sample as cu_gumbel, mlm_loss_and_sample as cu_mlm
from helpers import (ELECTRA_VOCAB, assert_close_to_fp64, by_device, cuda_seed, gumbel_draw, half_at_argmax,
                     mlm_inputs, poison_cuda_allocator, sized_for)

VOCAB = 30522  # BERT's: rows of 16-bit logits then start off 16-byte boundaries, exercising the scalar head/tail
PADDED = 30592  # the model's width for it (a multiple of 128): every row 16-byte aligned, 70 padding columns
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Against fp64. Gradients here are ~1e-8 at V = 30522 (softmax over thousands of rows): atol stays far below them,
# except one fp16 subnormal step (6e-8) where the fp32 value is rounded to fp16.
FP64_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-12), torch.float16: dict(rtol=2e-3, atol=6e-8),
            torch.bfloat16: dict(rtol=1.6e-2, atol=1e-12)}
MLM_ROWS = {"small": {"cpu": 5, "cuda": 128 * 19}, "base": {"cpu": 9, "cuda": 64 * 79}}


# ---------------------------------------------------------------- the Triton kernel

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows, temperature, disallow", [("small", 1.0, False), ("base", 0.8, True)])
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_at_electra_sizes_matches_fp64(poison, monkeypatch, device, dtype, rows, temperature, disallow):
    sized_for(device, monkeypatch)
    m, v = MLM_ROWS[rows][device], ELECTRA_VOCAB[device]
    logits = (torch.randn(m, v, device=device) * 2).to(dtype)
    targets = half_at_argmax(logits)  # ties included: 16-bit logits tie often at V = 30522
    weights = (torch.rand(m, device=device) > 0.2).float()
    logits.requires_grad_()
    kw = dict(temperature=temperature, disallow_correct=disallow)
    loss, sampled, correct = ops.mlm_loss_and_sample(logits, targets, weights, backend="triton", **kw)
    ref_logits = logits.detach().double().requires_grad_()
    ref_loss, _, ref_correct = ops.mlm_loss_and_sample(ref_logits, targets, weights, backend="torch", **kw)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(correct, ref_correct)
    assert m // 2 <= correct.sum() < m
    assert ((sampled >= 0) & (sampled < v)).all()
    if disallow:
        assert not (sampled == targets).any()
    (grad,) = torch.autograd.grad(loss, logits)
    (ref_grad,) = torch.autograd.grad(ref_loss, ref_logits)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), ref_grad, **FP64_TOL[dtype])


# ---------------------------------------------------------------- the CUDA C++ backend

@pytest.mark.parametrize("v, width", [(VOCAB, VOCAB), (VOCAB, PADDED), (1000, 1000), (7, 16)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature,disallow_correct", [(1.0, False), (0.5, True)])
@pytest.mark.parametrize("backend, sampler", SAMPLED)
def test_matches_reference(backend, sampler, device, with_sampler, dtype, v, width, temperature, disallow_correct):
    m = by_device(device, 2048, 64)
    logits, targets, weights = mlm_inputs(m, v, dtype, width, device)
    logits.requires_grad_(True)
    gen = torch.Generator(device).manual_seed(17)
    poison_cuda_allocator(m * width * 4, device)
    loss, sampled, correct = ops.mlm_loss_and_sample(logits, targets, weights, temperature=temperature,
                                                     disallow_correct=disallow_correct, generator=gen,
                                                     backend=backend, vocab_size=v)
    (loss * 2.5).backward()

    ref_logits = logits.detach().double().requires_grad_(True)
    ref_loss, _, ref_correct = ops.mlm_loss_and_sample(ref_logits, targets, weights, backend="torch", vocab_size=v)
    (ref_loss * 2.5).backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-5, atol=1e-6)
    assert torch.equal(correct, ref_correct) and m // 2 <= correct.sum() < m
    assert_close_to_fp64(logits.grad[:, :v], ref_logits.grad[:, :v], dtype, "grad of the MLM loss")
    assert torch.equal(logits.grad[:, v:], torch.zeros_like(logits.grad[:, v:]))  # padding: exactly 0, written

    assert ((sampled >= 0) & (sampled < v)).all()
    if disallow_correct:
        assert not (sampled == targets).any()
    if backend == "torch" or sampler == "gumbel":  # the sample, exactly, from the sampler's own noise replayed
        want = gumbel_draw(backend, logits.detach(), torch.Generator(device).manual_seed(17), temperature, v,
                           targets if disallow_correct else None)
        assert torch.equal(sampled, want)


@pytest.mark.parametrize("backend", ENGINES)
def test_without_real_slots_is_zero(backend, device):
    logits = torch.randn(8, 50, device=device, requires_grad=True)
    loss, sampled, _ = ops.mlm_loss_and_sample(logits, torch.zeros(8, dtype=torch.long, device=device),
                                               torch.zeros(8, device=device), backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))
    assert ((sampled >= 0) & (sampled < 50)).all()


def _triton_or_skip(op, device):
    if "triton" not in ops.available_backends(device, op):
        pytest.skip(f"no Triton kernel for {op} here")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pair", PAIRS)
def test_parity_with_triton(pair, pair_device, dtype):
    device = pair_device
    _triton_or_skip("mlm_loss_and_sample", device)
    m, v = by_device(device, (2048, VOCAB), (8, 40))
    temperature = 1e-6  # T -> 0: the sample is the argmax, whatever each backend's random stream
    logits, targets, weights = mlm_inputs(m, v, dtype, device=device)
    results = {}
    for backend in pair:
        x = logits.detach().clone().requires_grad_(True)
        loss, sampled, correct = ops.mlm_loss_and_sample(x, targets, weights, temperature=temperature,
                                                         backend=backend)
        loss.backward()
        results[backend] = (loss, sampled, correct, x.grad)
    (l1, s1, c1, g1), (l2, s2, c2, g2) = (results[b] for b in pair)
    torch.testing.assert_close(l1, l2, rtol=2e-5, atol=1e-6)
    assert torch.equal(c1, c2) and m // 2 <= c1.sum() < m
    assert_close_to_fp64(g1, g2.double(), dtype, f"{pair[0]} vs Triton gradient")
    # Compare samples where the top logit is unique by a margin (16-bit ties are broken by the noise).
    top2 = logits.float().topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-3
    assert clear.float().mean() > 0.5
    assert torch.equal(s1[clear], s2[clear])


@requires_cuda
def test_cuda_row_offsets_beyond_int32(ext):
    v = VOCAB
    m = 2**31 // v + 64  # M * V > 2^31 elements: int32 offsets would wrap in the last rows
    need = m * v * 2 * 2 + (2 << 30)  # bf16 logits and their gradient, plus headroom
    if torch.cuda.mem_get_info()[0] < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory")
    logits = torch.empty(m, v, device="cuda", dtype=torch.bfloat16).normal_().requires_grad_(True)
    targets = torch.randint(0, v, (m,), device="cuda")
    weights = torch.zeros(m, device="cuda")
    weights[-64:] = 1.0  # only the rows past 2^31 count
    loss, _, correct = cu_mlm.mlm_loss_and_sample(logits, targets, weights, cuda_seed(), 1.0, False)
    loss.backward()
    tail = logits.detach()[-64:].double().requires_grad_(True)
    ref_loss, _, ref_correct = ops.mlm_loss_and_sample(tail, targets[-64:], weights[-64:], backend="torch")
    ref_loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-5, atol=1e-6)
    assert torch.equal(correct[-64:], ref_correct)
    assert_close_to_fp64(logits.grad[-64:], tail.grad, torch.bfloat16, "gradient past 2^31")
    assert not logits.grad[:-64].any()  # weight-0 rows: zero gradient, written
    # At T -> 0 the sample is a maximal logit of its row.
    sampled = cu_gumbel.gumbel_sample(logits.detach(), cuda_seed(), 1e-6, None)
    picked = logits.detach()[-64:].gather(1, sampled[-64:, None])[:, 0]
    assert torch.equal(picked, logits.detach()[-64:].max(1).values)
    del logits
    torch.cuda.empty_cache()
