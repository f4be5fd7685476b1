"""The Triton kernels on a GPU at ELECTRA sizes (V = 30522, thousands of rows, bf16), against the PyTorch
reference, plus CUDA-graph capture: each replay draws fresh samples, and `torch.manual_seed` replays the same
sequence. The full-vocabulary sampling test runs the CUDA C++ backend too (both samplers, plain and padded
vocabulary). Skipped without CUDA (the interpreter tests in test_kernels_triton.py cover the logic on the CPU)."""
import importlib
import math

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton", reason="triton is not installed: the Triton backend cannot run")

from electra_fast import ops  # noqa: E402
from helpers import chi2_critical  # noqa: E402

MLS = importlib.import_module("electra_fast.kernels.mlm_loss_sample")
V = 30522
# Gradients here are ~1e-8 (softmax over 30522 ids / thousands of rows): atol stays far below them, except one fp16
# subnormal step (6e-8) where both sides round the same fp32 value to fp16.
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-12), torch.float16: dict(rtol=2e-3, atol=6e-8),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1e-12)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m, temperature, disallow", [(128 * 19, 1.0, False), (64 * 79, 0.8, True)])
def test_mlm_loss_and_sample_real_sizes(poison, dtype, m, temperature, disallow):
    logits = (torch.randn(m, V, device="cuda") * 2).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (m,), device="cuda")
    weights = (torch.rand(m, device="cuda") > 0.2).float()
    kw = dict(temperature=temperature, disallow_correct=disallow)
    loss, sampled, correct = ops.mlm_loss_and_sample(logits, targets, weights, backend="triton", **kw)
    ref_loss, _, ref_correct = ops.mlm_loss_and_sample(logits, targets, weights, backend="torch", **kw)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert torch.equal(correct, ref_correct)
    assert ((sampled >= 0) & (sampled < V)).all()
    if disallow:
        assert not (sampled == targets).any()
    (grad,) = torch.autograd.grad(loss, logits)
    (ref_grad,) = torch.autograd.grad(ref_loss, logits)
    torch.testing.assert_close(grad, ref_grad, **TOL[dtype])


def _use_sampler(monkeypatch, backend, sampler):
    """Select the sampler of a backend, as ELECTRA_FAST_SAMPLER does at import."""
    if backend == "cuda":
        ef_cuda = importlib.import_module("electra_fast.cuda")
        if not ef_cuda.is_available():
            pytest.skip(f"CUDA backend unavailable: {ef_cuda.unavailable_reason()}")
        monkeypatch.setattr(ef_cuda, "SAMPLER", sampler)
    else:
        monkeypatch.setattr(MLS, "SAMPLER", sampler)


@pytest.mark.parametrize("width", [V, 30592])  # as is, and padded to a multiple of 128 (garbage in the padding)
@pytest.mark.parametrize("sampler", MLS.SAMPLERS)
@pytest.mark.parametrize("op", ["mlm", "gumbel"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_sampling_distribution_at_full_vocabulary(monkeypatch, backend, sampler, op, width):
    """Mass on 24 ids spread over all tiles (the largest in the last tile), the rest of the vocabulary at a
    low logit and pooled into one bucket; bf16 logits, T = 0.9."""
    _use_sampler(monkeypatch, backend, sampler)
    draws, temperature = 40000, 0.9
    gen = torch.Generator("cuda").manual_seed(31)
    row = torch.full((width,), 30.0, device="cuda")  # the padding would win every draw if it leaked
    row[:V] = -8.0
    hot = torch.linspace(0, V - 1, 24, device="cuda").long()
    row[hot] = torch.linspace(-1.0, 2.0, 24, device="cuda")
    logits = row.to(torch.bfloat16).expand(draws, width).contiguous()
    if op == "mlm":
        ids = ops.mlm_loss_and_sample(logits, torch.zeros(draws, dtype=torch.long, device="cuda"),
                                      torch.ones(draws, device="cuda"), temperature=temperature, generator=gen,
                                      backend=backend, vocab_size=V)[1]
    else:
        ids = ops.gumbel_sample(logits, temperature=temperature, generator=gen, backend=backend, vocab_size=V)
    assert ((ids >= 0) & (ids < V)).all()
    probs = torch.softmax(logits[0, :V].double() / temperature, 0)
    counts = torch.bincount(ids, minlength=V).double()
    is_hot = torch.zeros(V, dtype=torch.bool, device="cuda")
    is_hot[hot] = True
    obs = torch.cat([counts[hot], counts[~is_hot].sum()[None]])
    exp = torch.cat([probs[hot], probs[~is_hot].sum()[None]]) * draws
    assert exp.min() >= 5
    stat = ((obs - exp) ** 2 / exp).sum().item()
    assert stat < chi2_critical(obs.numel() - 1), stat


@pytest.mark.parametrize("b, seq_len, h, n", [(128, 128, 256, 19), (64, 512, 768, 79)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gather_replace_at_electra_shapes(poison, b, seq_len, h, n, dtype):
    ids = torch.randint(5, V, (b, seq_len), device="cuda")
    am = torch.ones_like(ids)
    am[: b // 2, seq_len // 2:] = 0
    _, pos, w = ops.mask_tokens(ids, am, mask_token_id=103, special_token_ids=(0, 1, 2, 3, 103))
    assert pos.shape == (b, n)
    hidden = torch.randn(b, seq_len, h, device="cuda", dtype=dtype, requires_grad=True)
    out = ops.masked_gather(hidden, pos, backend="triton")
    ref = ops.masked_gather(hidden, pos, backend="torch")
    assert torch.equal(out, ref)
    g = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, hidden, g)
    (ref_grad,) = torch.autograd.grad(ref.float(), hidden, g.float())
    torch.testing.assert_close(grad.float(), ref_grad.float(), **TOL[dtype])
    sampled = torch.randint(5, V, (b, n), device="cuda")
    got, want = (ops.replace_tokens(ids, pos, w, sampled, backend=be) for be in ("triton", "torch"))
    assert all(torch.equal(x, y) for x, y in zip(got, want))


@pytest.mark.parametrize("b, seq_len, h", [(128, 128, 256), (64, 512, 768)])
def test_bce_and_head_at_electra_shapes(poison, b, seq_len, h):
    hidden = torch.randn(b, seq_len, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(1, h, device="cuda") * 0.05).requires_grad_()  # fp32 parameter, bf16 activations
    bias = torch.zeros(1, device="cuda", requires_grad=True)
    labels = torch.rand(b, seq_len, device="cuda") > 0.85
    mask = torch.rand(b, seq_len, device="cuda") > 0.1
    outs = [ops.rtd_head_loss(hidden, weight, bias, labels, mask, backend=be) for be in ("triton", "torch")]
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=0, atol=4.0 / mask.sum().item())  # |logit| ~ 0
    grads = [torch.autograd.grad(o[0], (hidden, weight, bias)) for o in outs]
    for x, y in zip(*grads):
        torch.testing.assert_close(x.float(), y.float(), rtol=1.6e-2, atol=1e-10)
    logits = torch.randn(b, seq_len, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    losses = [ops.rtd_bce_loss(logits, labels, mask, backend=be) for be in ("triton", "torch")]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    g = [torch.autograd.grad(x, logits)[0] for x in losses]
    torch.testing.assert_close(g[0], g[1], **TOL[torch.bfloat16])


def test_cuda_graph_replays_draw_fresh_samples_and_follow_manual_seed():
    m = 256
    logits = torch.zeros(m, V, device="cuda", dtype=torch.bfloat16)  # uniform: replays never repeat by chance
    targets, weights = torch.zeros(m, dtype=torch.long, device="cuda"), torch.ones(m, device="cuda")

    def step():
        loss, sampled, _ = ops.mlm_loss_and_sample(logits, targets, weights, backend="triton")
        return loss, sampled, ops.gumbel_sample(logits, backend="triton")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles the kernels) outside the capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, sampled, extra = step()

    def replays(k):
        out = []
        for _ in range(k):
            graph.replay()
            out.append((sampled.clone(), extra.clone()))
        torch.cuda.synchronize()
        return out

    torch.manual_seed(123)
    first = replays(3)
    torch.manual_seed(123)
    again = replays(3)
    for (a, x), (b, y) in zip(first, again):
        assert torch.equal(a, b) and torch.equal(x, y)
    for i in range(3):
        for j in range(i + 1, 3):
            assert not torch.equal(first[i][0], first[j][0]) and not torch.equal(first[i][1], first[j][1])
    assert not torch.equal(first[0][0], first[0][1])  # the two ops draw from different seeds
    torch.testing.assert_close(loss, torch.tensor(math.log(V), device="cuda"), rtol=1e-5, atol=1e-5)
