"""`ops.lm_head_loss_and_sample` fuzzed (tests/fuzz/fuzz_common.py): the reference against a float64 oracle on the
unfused logits and against the unfused op's samples, the Triton backend against the reference and the unfused
kernel."""
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from electra_fast import ops
from electra_fast.ops.mlm_loss_and_sample import WEIGHT_EPS
from fuzz_common import (DTYPES, EPS, KDEV, REF_DTYPES, TOL, TRITON_BUDGET, assert_close, check_support, gen,
                         kernel_config, mlm_oracle, seeds, temperatures, triton_only, weight_vector)

# On a GPU these run the Triton kernels compiled (no interpreter): validate_gpu's `--rest` selects them by this marker.
pytestmark = pytest.mark.triton


@dataclass
class LmHeadCase:
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor
    vocab: int
    temperature: float
    disallow: bool
    chunk: Optional[int]
    exact: bool  # small-integer inputs: every matmul is exact, so chunked and unfused logits are equal bit for bit
    seed: int


@st.composite
def lm_head_cases(draw, max_m=7, max_e=6, max_v=13, dtypes=REF_DTYPES):
    seed = draw(seeds)
    g = gen(seed)
    m, e, v = draw(st.integers(1, max_m)), draw(st.integers(1, max_e)), draw(st.integers(1, max_v))
    width = v + draw(st.sampled_from((0, 0, 3)))
    exact = draw(st.booleans())
    if exact:
        make = lambda *shape: torch.randint(-3, 4, shape, generator=g).float()  # noqa: E731
    else:
        make = lambda *shape: torch.randn(*shape, generator=g) * 0.7  # noqa: E731
    dtype = draw(st.sampled_from(dtypes))
    hidden, weight, bias = (t.to(dtype) for t in (make(m, e), make(width, e), make(width)))
    chunk = draw(st.one_of(st.none(), st.integers(1, m + 1)))
    return LmHeadCase(hidden, weight, bias, torch.randint(0, v, (m,), generator=g), weight_vector(draw, g, m), v,
                      draw(temperatures), draw(st.booleans()), chunk, exact, seed)


def lm_head_call(case: LmHeadCase, backend: str, device="cpu"):
    """(loss, sampled, correct, grads of hidden, weight, bias, unfused logits) through the public op."""
    hidden, weight, bias = (t.to(device).requires_grad_() for t in (case.hidden, case.weight, case.bias))
    targets, weights = case.targets.to(device), case.weights.to(device)
    loss, sampled, correct = ops.lm_head_loss_and_sample(
        hidden, weight, bias, targets, weights, temperature=case.temperature, disallow_correct=case.disallow,
        generator=gen(case.seed, device), vocab_size=case.vocab, chunk_size=case.chunk, backend=backend)
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    return loss, sampled, correct, grads, F.linear(hidden, weight, bias).detach()


def decisive_rows(logits, v: int) -> torch.Tensor:
    """Rows whose maximum leads the runner-up clearly, so that no rounding of the logits can move the argmax."""
    top2 = logits[:, :v].double().topk(min(2, v), dim=1).values
    if v == 1:
        return torch.ones(logits.shape[0], dtype=torch.bool)
    return (top2[:, 0] - top2[:, 1]) > 1e-2 * (1 + top2[:, 0].abs())


def check_lm_head(case: LmHeadCase, out, expected_grads, loss_rtol):
    """Loss and correctness against the oracle on the unfused logits, support of the samples, and the gradients
    against `expected_grads` within the rounding a 16-bit gradient of the logits allows (the Triton backend writes
    it in the input dtype before its matmuls, as the unfused op's backward does): a few ulps of the dtype times the
    sums of |terms| that make each gradient element (G @ |weight|, G.T @ |hidden|, sum G with G = (softmax + onehot)
    * w / norm: `softmax - 1` at the target cancels, its error is an ulp of 1, not of the difference)."""
    loss, sampled, correct, grads, logits = out
    o_loss, o_correct, g = mlm_oracle(logits, case.targets, case.weights, case.vocab)
    assert loss.dtype == (torch.float64 if case.hidden.dtype == torch.float64 else torch.float32)
    assert_close(loss, o_loss, loss_rtol, 1e-6, "loss")
    keep = torch.ones_like(o_correct) if case.exact else decisive_rows(logits.cpu(), case.vocab)
    assert torch.equal(correct.cpu()[keep], o_correct[keep])
    check_support(sampled, logits, case.vocab, case.temperature, case.targets if case.disallow else None)
    w = case.weights.double()
    g = g.abs() + F.one_hot(case.targets, g.shape[1]).double() * (2 * w / (w.sum() + WEIGHT_EPS))[:, None]
    bounds = (g @ case.weight.double().abs(), g.T @ case.hidden.double().abs(), g.sum(0))
    ulps = 8 * EPS[case.hidden.dtype] * (1 + float(logits.double().abs().max()))
    for name, grad, x, e, bound in zip(("hidden", "weight", "bias"), grads, (case.hidden, case.weight, case.bias),
                                       expected_grads, bounds):
        assert grad.dtype == x.dtype and grad.shape == x.shape, name
        err = (grad.detach().cpu().double() - e.detach().cpu().double()).abs()
        assert (err <= TOL[x.dtype][0] * e.detach().cpu().double().abs() + ulps * bound + 1e-7).all(), (name, err)
        if name != "hidden":
            assert torch.equal(grad[case.vocab:], torch.zeros_like(grad[case.vocab:])), name  # padding: exactly 0


def lm_head_grad_oracle(case: LmHeadCase, logits):
    """Gradients of the MLM loss of `logits = hidden @ weight.T + bias` w.r.t. hidden, weight, bias, in float64."""
    _, _, g = mlm_oracle(logits, case.targets, case.weights, case.vocab)
    h, w = case.hidden.double(), case.weight.double()
    return g @ w, g.T @ h, g.sum(0)


@given(case=lm_head_cases())
def test_lm_head_reference_matches_oracle_and_unfused_op(case):
    out = lm_head_call(case, "torch")
    check_lm_head(case, out, lm_head_grad_oracle(case, out[-1]), 1e-5)
    if case.exact:  # documented: the unfused op's samples for the same RNG state, whatever the chunking
        unfused = ops.mlm_loss_and_sample(out[-1], case.targets, case.weights, temperature=case.temperature,
                                          disallow_correct=case.disallow, generator=gen(case.seed),
                                          vocab_size=case.vocab, backend="torch")
        assert torch.equal(out[1], unfused[1]) and torch.equal(out[2], unfused[2])


@triton_only
@TRITON_BUDGET
@given(case=lm_head_cases(max_m=5, max_e=5, max_v=11, dtypes=DTYPES), small=st.booleans(),
       sampler=st.sampled_from(("cdf", "gumbel")))
def test_lm_head_triton_matches_reference_and_unfused_kernel(poison, case, small, sampler):
    with kernel_config(small, sampler):
        out = lm_head_call(case, "triton", KDEV)
        if case.exact:  # same seed: the Triton MLM op's samples on the unfused logits
            unfused = ops.mlm_loss_and_sample(out[-1], case.targets.to(KDEV), case.weights.to(KDEV),
                                              temperature=case.temperature, disallow_correct=case.disallow,
                                              generator=gen(case.seed, KDEV), vocab_size=case.vocab,
                                              backend="triton")
            assert torch.equal(out[1], unfused[1]) and torch.equal(out[2], unfused[2])
    check_lm_head(case, out, lm_head_call(case, "torch")[3], 1e-5)
