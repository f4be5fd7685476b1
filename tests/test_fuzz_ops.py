"""Every public op of `electra_fast.ops` fuzzed with hypothesis (issue 12, point 6).

- The torch reference (backend="torch") against naive oracles written here: Python loops in float64 over the same
  dtype-rounded inputs (log-sum-exp, first argmax, Gumbel-max from given uniforms, gathers, BCE, the LM head).
- The Triton backend against the torch reference (or the oracle), in the interpreter (TRITON_INTERPRET=1, CPU
  tensors) or on a GPU: tiny shapes, tiles sometimes shrunk so loops run several times with partial tails, both
  samplers, outputs allocated poisoned (NaN / -7 / True) so an unwritten element shows.
- Bad inputs raise the named error type, and the message names the argument.

Inputs: shapes from 0 (empty batches, where an op allows them) and 1 to small non-powers of two; fp32/fp16/bf16
(fp64 too on the reference); weights and attention masks all 0; temperatures 0.05..5; disallowed ids; rows of huge
logits (+-1e4, +-fp16 max), constant rows (ties: the first maximum wins), rows that are -inf but for one column;
padded vocabulary columns (`vocab_size=`) holding NaN, +-inf or 1e30; duplicate positions where an op allows them.
Sampling ops are checked for support (an id in [0, V), never disallowed, never of probability 0: log-probability
> -40 under softmax(logits / T)) and for determinism under one seed, not for their distribution (the chi-square
tests of test_kernels_triton.py and test_ops_reference.py do that).

Semantics pinned here that the docstrings leave open: a row with nothing to draw (all -inf, or its one finite id
disallowed) samples id 0 and has argmax 0 (torch's argmax of equal values); its cross-entropy is NaN, so a real slot
on it makes the loss NaN, on every backend.

Budget (hypothesis profiles registered in tests/conftest.py): "ci" by default, 20 examples per test and 5 per
Triton test (the interpreter takes ~0.1-1 s a call), derandomized so every CI run tries the same examples;
`ELECTRA_FAST_FUZZ=thorough` runs 400 (100) fresh random ones:
    ELECTRA_FAST_FUZZ=thorough TRITON_INTERPRET=1 python -m pytest -q tests/test_fuzz_ops.py
A failure prints the example and a `@reproduce_failure` blob.

Found by this fuzzing and fixed: a weight-0 slot with a non-finite cross-entropy made the reference loss NaN (the
kernels skip it); temperature=inf was accepted (scores 0 * -inf = NaN); no op checked id values (targets, positions)
against their range (now checked for CPU tensors; on CUDA a documented precondition, as a check would sync).
"""
import contextlib
import math
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st

from electra_fast import ops
from helpers import use_sampler, use_small_tiles
from electra_fast.ops.gumbel_sample import _gumbel_sample_op
from electra_fast.ops.mlm_loss_and_sample import WEIGHT_EPS, _mlm_op

INF = float("inf")
FP16_MAX = 65504.0
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REF_DTYPES = DTYPES + (torch.float64,)
EPS = {torch.float64: 2.0 ** -52, torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
# Against a float64 oracle: one rounding to the output dtype, with margin (rtol, atol).
TOL = {torch.float64: (1e-9, 1e-12), torch.float32: (1e-5, 1e-6), torch.float16: (2e-3, 1e-5),
       torch.bfloat16: (1.6e-2, 1e-5)}

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# On a GPU these run the Triton kernels compiled (no interpreter): validate_gpu's `--rest` selects them by this marker.
pytestmark = pytest.mark.triton
try:
    import triton  # noqa: F401
    HAVE_TRITON = INTERPRET or torch.cuda.is_available()
except ImportError:
    HAVE_TRITON = False
triton_only = pytest.mark.skipif(not HAVE_TRITON, reason="the Triton backend needs a CUDA GPU or TRITON_INTERPRET=1")
KDEV = "cpu" if INTERPRET or not HAVE_TRITON else "cuda"

# A quarter of the profile's examples for the Triton tests; `poison` patches torch.empty for the whole test, which is
# what every example needs, so the function-scoped fixture is fine.
TRITON_BUDGET = settings(max_examples=max(3, settings.default.max_examples // 4),
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

@contextlib.contextmanager
def kernel_config(small_tiles: bool, sampler: str = "cdf"):
    """The kernels with their sampler, and with tiles that the tiny shapes span several of (`small_tiles`)."""
    with pytest.MonkeyPatch.context() as mp:
        use_sampler(mp, "triton", sampler)
        if small_tiles:
            use_small_tiles(mp)
        yield


def gen(seed: int, device="cpu") -> torch.Generator:
    return torch.Generator(device).manual_seed(seed)


def to_dev(*tensors):
    return [None if t is None else t.to(KDEV) for t in tensors]


def assert_close(actual, expected, rtol, atol, what=""):
    """|actual - expected| <= atol + rtol * |expected| elementwise, in float64; inf must match inf, NaN NaN."""
    a = torch.as_tensor(actual).detach().double().cpu()
    e = torch.as_tensor(expected).detach().double().cpu()
    torch.testing.assert_close(a, e, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------- strategies

seeds = st.integers(0, 2 ** 32 - 1)
temperatures = st.one_of(st.just(1.0), st.floats(0.05, 5.0))
ROW_KINDS = ("normal", "normal", "huge", "ties", "one_finite")


def weight_vector(draw, g, m: int) -> torch.Tensor:
    """[m] slot weights: all 1, all 0, random in [0, 1) with zeros, or bool/int 0/1."""
    kind = draw(st.sampled_from(("ones", "zeros", "mixed", "bool", "int")))
    if kind == "ones":
        return torch.ones(m)
    if kind == "zeros":
        return torch.zeros(m)
    w = torch.rand(m, generator=g) * (torch.rand(m, generator=g) > 0.3)
    return w if kind == "mixed" else (w > 0).to(torch.bool if kind == "bool" else torch.int64)


def logit_rows(draw, g, m: int, v: int, pad: int, targets: torch.Tensor, kinds=ROW_KINDS) -> torch.Tensor:
    """[m, v + pad] fp32 logits: each row normal (of a drawn scale), huge (+-1e4, +-fp16 max, 0: many ties),
    constant (all tied), -inf but at its target, or all -inf ("none_finite"); the pad columns past the vocabulary
    hold garbage."""
    x = torch.randn(m, v + pad, generator=g) * draw(st.sampled_from([0.1, 1.0, 8.0, 30.0]))
    for r in range(m):
        kind = draw(st.sampled_from(kinds))
        if kind == "huge":
            big = torch.tensor([-1e4, 1e4, -FP16_MAX, FP16_MAX, 0.0])
            x[r, :v] = big[torch.randint(0, 5, (v,), generator=g)]
        elif kind == "ties":
            x[r, :v] = x[r, 0]
        elif kind == "one_finite":
            x[r, :v] = torch.where(torch.arange(v) == targets[r], x[r, :v], -INF)
        elif kind == "none_finite":
            x[r, :v] = -INF
    if pad:
        garbage = torch.tensor([float("nan"), INF, -INF, 1e30, -FP16_MAX])
        x[:, v:] = garbage[torch.randint(0, 5, (m, pad), generator=g)]
    return x


@dataclass
class MlmCase:
    logits: torch.Tensor   # [M, W] in `dtype`
    targets: torch.Tensor  # [M] in [0, V)
    weights: torch.Tensor  # [M] float, int or bool
    vocab: int             # V
    temperature: float
    disallow: bool
    seed: int

    @property
    def padded(self) -> Optional[int]:
        """The vocab_size= argument: None when the logits are not padded (half the time, to cover the default)."""
        return None if self.vocab == self.logits.shape[1] and self.seed % 2 else self.vocab


@st.composite
def mlm_cases(draw, max_m=12, max_v=40, dtypes=REF_DTYPES, kinds=ROW_KINDS):
    """`kinds`: the row kinds drawn; the default leaves out "none_finite" (all -inf), whose NaN cross-entropy makes
    the MLM loss NaN (pinned in test_rows_with_one_or_no_finite_logit)."""
    seed = draw(seeds)
    g = gen(seed)
    m, v = draw(st.integers(0, max_m)), draw(st.integers(1, max_v))
    pad = draw(st.sampled_from((0, 0, 1, 3, 7)))
    targets = torch.randint(0, v, (m,), generator=g)
    x = logit_rows(draw, g, m, v, pad, targets, kinds)
    return MlmCase(x.to(draw(st.sampled_from(dtypes))), targets, weight_vector(draw, g, m), v, draw(temperatures),
                   draw(st.booleans()), seed)


# ---------------------------------------------------------------- oracles

def mlm_oracle(logits, targets, weights, v: int):
    """Loop over rows in float64: (loss, correct, d loss / d logits) of `sum(w * ce) / (sum(w) + 1e-6)` over the
    first v columns; the first maximum is the argmax."""
    x = logits.detach().double().cpu()
    w = weights.double().cpu().tolist()
    norm = sum(w) + WEIGHT_EPS
    total, correct, grad = 0.0, [], torch.zeros_like(x)
    for r, t in enumerate(targets.tolist()):
        row = x[r, :v].tolist()
        top = max(row)
        correct.append(row.index(top) == t)
        lse = top + math.log(sum(math.exp(a - top) for a in row))
        total += w[r] * (lse - row[t])
        for c in range(v):
            grad[r, c] = (math.exp(row[c] - lse) - (c == t)) * w[r] / norm
    return total / norm, torch.tensor(correct, dtype=torch.bool), grad


def loss_atol(logits, v: int) -> float:
    """Absolute error of an fp32 log-sum-exp: a few ulps of the largest finite logit."""
    x = logits[:, :v].detach().double().cpu()
    finite = x[torch.isfinite(x)]
    return 1e-6 + 5e-7 * (float(finite.abs().max()) if finite.numel() else 0.0)


def check_support(sampled, logits, v: int, temperature: float, banned=None):
    """Each id is in [0, v), not banned, of log-probability > -40 under softmax(logits[:, :v] / T) (so never an id of
    probability 0, nor one whose probability underflows: Gumbel noise from 24-bit uniforms spans < 20); a row with
    nothing to draw gives id 0."""
    assert sampled.dtype == torch.int64 and sampled.shape == (logits.shape[0],)
    sampled = sampled.cpu()
    assert ((sampled >= 0) & (sampled < v)).all(), sampled
    x = logits[:, :v].detach().double().cpu() / temperature
    if banned is not None:
        banned = banned.cpu()
        x[(torch.arange(v) == banned[:, None])] = -INF
    for r, s in enumerate(sampled.tolist()):
        if x[r].max() == -INF:
            assert s == 0, (r, s)
        else:
            assert x[r, s] - torch.logsumexp(x[r], 0) > -40, (r, s, x[r].tolist())


def gumbel_oracle_ok(pick: int, row, u, temperature: float, banned: int) -> bool:
    """Gumbel-max in float64 over one row: `pick` maximises x / T - log(-log u) up to fp32 rounding; U = 0 and the
    banned id give -inf; nothing finite gives 0."""
    scores = [-INF if c == banned or uc == 0.0 else a / temperature - math.log(-math.log(uc))
              for c, (a, uc) in enumerate(zip(row, u))]
    best = max(scores)
    if best == -INF:
        return pick == 0
    return scores[pick] >= best - 1e-5 * (1 + abs(best))


# ---------------------------------------------------------------- MLM loss + sample, gumbel sample

@given(case=mlm_cases(), grad_out=st.sampled_from([1.0, -2.5]))
def test_mlm_reference_matches_oracle(case, grad_out):
    x = case.logits.clone().requires_grad_()
    kw = dict(temperature=case.temperature, disallow_correct=case.disallow, vocab_size=case.padded, backend="torch")
    loss, sampled, correct = ops.mlm_loss_and_sample(x, case.targets, case.weights, generator=gen(case.seed), **kw)
    o_loss, o_correct, o_grad = mlm_oracle(x, case.targets, case.weights, case.vocab)
    assert loss.shape == () and loss.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    assert_close(loss, o_loss, TOL[torch.float32][0], loss_atol(x, case.vocab), "loss")
    assert correct.dtype == torch.bool and torch.equal(correct, o_correct)
    check_support(sampled, x, case.vocab, case.temperature, case.targets if case.disallow else None)
    again = ops.mlm_loss_and_sample(x, case.targets, case.weights, generator=gen(case.seed), **kw)[1]
    assert torch.equal(again, sampled)  # same seed, same samples
    (grad,) = torch.autograd.grad(loss, x, torch.tensor(grad_out, dtype=loss.dtype))
    assert grad.dtype == x.dtype and grad.shape == x.shape
    assert torch.equal(grad[:, case.vocab:], torch.zeros_like(grad[:, case.vocab:]))  # padding: exactly 0
    rtol, atol = TOL[x.dtype]
    w = case.weights.double()
    scale = abs(grad_out) * float(w.max()) / (float(w.sum()) + WEIGHT_EPS) if w.numel() else 0.0
    assert_close(grad[:, :case.vocab], o_grad[:, :case.vocab] * grad_out, rtol,
                 atol + scale * loss_atol(x, case.vocab), "grad")


@given(case=mlm_cases(), zero_u=st.booleans())
def test_reference_sampling_is_gumbel_max_of_its_uniforms(case, zero_u):
    """The reference custom ops against Gumbel-max computed here from the same uniforms (U = 0 included)."""
    m, v = case.targets.shape[0], case.vocab
    g = gen(case.seed)
    u = torch.rand(m, v, generator=g)
    if zero_u:
        u[torch.rand(m, v, generator=g) < 0.2] = 0.0
    banned = case.targets if case.disallow else None
    picks = _gumbel_sample_op(case.logits, u, case.temperature, banned, v)
    mlm_picks = _mlm_op(case.logits, case.targets, case.weights.float(), u, case.temperature, case.disallow, v)[1]
    assert torch.equal(picks, mlm_picks)
    x = case.logits.double()
    for r, pick in enumerate(picks.tolist()):
        ban = int(case.targets[r]) if case.disallow else -1
        assert gumbel_oracle_ok(pick, x[r, :v].tolist(), u[r].tolist(), case.temperature, ban), (r, pick)


@st.composite
def disallow_ids(draw, g, m: int, width: int):
    """None or [m] ids in [-1, width]: -1 disallows nothing, ids >= V are padding (nothing to disallow either)."""
    if draw(st.booleans()):
        return None
    return torch.randint(-1, width + 1, (m,), generator=g).to(draw(st.sampled_from((torch.int64, torch.int32))))


SAMPLE_KINDS = ROW_KINDS + ("none_finite",)


@given(case=mlm_cases(kinds=SAMPLE_KINDS), data=st.data())
def test_gumbel_sample_reference_support_and_determinism(case, data):
    m, w = case.logits.shape
    banned = data.draw(disallow_ids(gen(case.seed), m, w))
    kw = dict(temperature=case.temperature, disallow=banned, vocab_size=case.padded, backend="torch")
    ids = ops.gumbel_sample(case.logits, generator=gen(case.seed), **kw)
    check_support(ids, case.logits, case.vocab, case.temperature, banned)
    assert torch.equal(ops.gumbel_sample(case.logits, generator=gen(case.seed), **kw), ids)


@triton_only
@TRITON_BUDGET
@given(case=mlm_cases(max_m=5, max_v=19, dtypes=DTYPES), small=st.booleans(),
       sampler=st.sampled_from(("cdf", "gumbel")), grad_out=st.sampled_from([1.0, -2.5]))
def test_mlm_triton_matches_reference(poison, case, small, sampler, grad_out):
    x = case.logits.to(KDEV).requires_grad_()
    targets, weights = to_dev(case.targets, case.weights)
    kw = dict(temperature=case.temperature, disallow_correct=case.disallow, vocab_size=case.padded)
    with kernel_config(small, sampler):
        loss, sampled, correct = ops.mlm_loss_and_sample(x, targets, weights, backend="triton", **kw)
        (grad,) = torch.autograd.grad(loss, x, torch.tensor(grad_out, device=KDEV))
    ref_loss, _, ref_correct = ops.mlm_loss_and_sample(x, targets, weights, backend="torch", **kw)
    (ref_grad,) = torch.autograd.grad(ref_loss, x, torch.tensor(grad_out, device=KDEV))
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close(loss, ref_loss, TOL[torch.float32][0], loss_atol(x, case.vocab), "loss")
    assert correct.dtype == torch.bool and torch.equal(correct, ref_correct)
    check_support(sampled, x, case.vocab, case.temperature, targets if case.disallow else None)
    assert grad.dtype == x.dtype and torch.equal(grad[:, case.vocab:], torch.zeros_like(grad[:, case.vocab:]))
    rtol, atol = TOL[x.dtype]
    assert_close(grad, ref_grad, 2 * rtol, atol + abs(grad_out) * loss_atol(x, case.vocab), "grad")


@triton_only
@TRITON_BUDGET
@given(case=mlm_cases(max_m=5, max_v=19, dtypes=DTYPES, kinds=SAMPLE_KINDS), small=st.booleans(),
       sampler=st.sampled_from(("cdf", "gumbel")), data=st.data())
def test_gumbel_sample_triton_support_and_determinism(poison, case, small, sampler, data):
    m, w = case.logits.shape
    (banned,) = to_dev(data.draw(disallow_ids(gen(case.seed), m, w)))
    x = case.logits.to(KDEV)
    kw = dict(temperature=case.temperature, disallow=banned, vocab_size=case.padded, backend="triton")
    with kernel_config(small, sampler):
        ids = ops.gumbel_sample(x, generator=gen(case.seed, KDEV), **kw)
        again = ops.gumbel_sample(x, generator=gen(case.seed, KDEV), **kw)
    check_support(ids, x, case.vocab, case.temperature, banned)
    assert torch.equal(again, ids)


# The kernels read every dtype the same way (a load converted to fp32): one dtype for the slow interpreter.
@pytest.mark.parametrize("backend, dtype", [("torch", d) for d in DTYPES] + [
    pytest.param("triton", torch.bfloat16, marks=triton_only)])
def test_rows_with_one_or_no_finite_logit(backend, dtype):
    """All but one -inf: sample and argmax that one. All -inf (or the one finite id disallowed): id 0, argmax 0, and
    a NaN cross-entropy, which a real slot passes on to the loss."""
    dev = "cpu" if backend == "torch" else KDEV
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


@pytest.mark.parametrize("backend", [
    "torch",
    pytest.param("triton", marks=triton_only)])
def test_weight0_rows_never_reach_the_loss(backend):
    """A padding slot (weight 0) must not reach the loss whatever its logits: e.g. a user masks the special tokens'
    logits to -inf while padding slots target [CLS]."""
    dev = "cpu" if backend == "torch" else KDEV
    x = torch.tensor([[0.0, -INF, 1.0], [1.0, 2.0, 0.5], [-INF, -INF, -INF]], device=dev)
    targets, weights = torch.tensor([1, 0, 2], device=dev), torch.tensor([0.0, 1.0, 0.0], device=dev)
    loss = ops.mlm_loss_and_sample(x, targets, weights, backend=backend)[0]
    expected = float(torch.logsumexp(x[1], 0) - x[1, 0]) / (1 + WEIGHT_EPS)
    assert_close(loss, expected, 1e-6, 1e-6, "loss")


# ---------------------------------------------------------------- fused LM head + loss + sample

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


# ---------------------------------------------------------------- masked gather

@dataclass
class GatherCase:
    hidden: torch.Tensor
    positions: torch.Tensor
    grad: torch.Tensor


@st.composite
def gather_cases(draw, max_b=4, max_l=9, max_n=7, max_h=7, dtypes=REF_DTYPES):
    g = gen(draw(seeds))
    b, seq_len = draw(st.integers(0, max_b)), draw(st.integers(1, max_l))
    n, h = draw(st.integers(0, max_n)), draw(st.integers(0, max_h))
    dtype = draw(st.sampled_from(dtypes))
    hidden = (torch.randn(b, seq_len, h, generator=g) * draw(st.sampled_from([1.0, 1e4]))).to(dtype)
    # Duplicate positions, which the backward must add up: all at 0 (like padding slots) or drawn with replacement.
    hi = draw(st.sampled_from((1, seq_len)))
    positions = torch.randint(0, hi, (b, n), generator=g).to(draw(st.sampled_from((torch.int64, torch.int32))))
    return GatherCase(hidden, positions, torch.randn(b, n, h, generator=g).to(dtype))


def gather_oracle(case: GatherCase):
    """Forward by loops; backward sums in float64, with the sums of |g| that bound the rounding error."""
    b, seq_len, h = case.hidden.shape
    out = torch.empty(b, case.positions.shape[1], h, dtype=case.hidden.dtype)
    grad, mag, count = (torch.zeros(b, seq_len, h, dtype=torch.float64) for _ in range(3))
    for i in range(b):
        for j, p in enumerate(case.positions[i].tolist()):
            out[i, j] = case.hidden[i, p]
            grad[i, p] += case.grad[i, j].double()
            mag[i, p] += case.grad[i, j].double().abs()
            count[i, p] += 1
    return out, grad, mag * (count + 1)


def check_gather(case: GatherCase, backend: str, device="cpu"):
    hidden = case.hidden.to(device).requires_grad_()
    out = ops.masked_gather(hidden, case.positions.to(device), backend=backend)
    (grad,) = torch.autograd.grad(out, hidden, case.grad.to(device))
    o_out, o_grad, bound = gather_oracle(case)
    assert out.dtype == hidden.dtype and torch.equal(out.cpu(), o_out)
    assert grad.dtype == hidden.dtype and grad.shape == hidden.shape
    assert ((grad.cpu().double() - o_grad).abs() <= EPS[hidden.dtype] * bound).all()


@given(case=gather_cases())
def test_masked_gather_reference_matches_oracle(case):
    check_gather(case, "torch")


@triton_only
@TRITON_BUDGET
@given(case=gather_cases(max_b=3, max_l=7, max_n=5, max_h=6, dtypes=DTYPES), small=st.booleans())
def test_masked_gather_triton_matches_oracle(poison, case, small):
    with kernel_config(small):
        check_gather(case, "triton", KDEV)


# ---------------------------------------------------------------- replace tokens

@dataclass
class ReplaceCase:
    ids: torch.Tensor
    positions: torch.Tensor
    weights: torch.Tensor
    sampled: torch.Tensor


@st.composite
def replace_cases(draw, max_b=4, max_l=10, duplicates=False):
    """Real slots (weight > 0) at distinct positions as `mask_tokens` makes them (sometimes not, with `duplicates`:
    every backend then adds each real slot's `sampled - original`); padding slots anywhere, often at 0; samples
    often equal to the original token."""
    g = gen(draw(seeds))
    b, seq_len = draw(st.integers(0, max_b)), draw(st.integers(1, max_l))
    n = draw(st.integers(0, seq_len))
    ids = torch.randint(0, 9, (b, seq_len), generator=g).to(draw(st.sampled_from((torch.int64, torch.int32))))
    if duplicates and draw(st.booleans()):
        positions = torch.randint(0, seq_len, (b, n), generator=g)
    else:
        positions = torch.stack([torch.randperm(seq_len, generator=g)[:n] for _ in range(b)]) if b else \
            torch.zeros(0, n, dtype=torch.int64)
    weights = weight_vector(draw, g, b * n).reshape(b, n)
    pad_slot = ~(weights.double() > 0)
    positions = torch.where(pad_slot & (torch.rand(b, n, generator=g) < 0.5), 0, positions)
    sampled = torch.randint(0, 9, (b, n), generator=g)  # ids in [0, 9): equal to the original one time in nine
    if draw(st.booleans()):
        sampled = sampled.flatten()
    positions = positions.to(draw(st.sampled_from((torch.int64, torch.int32))))
    return ReplaceCase(ids, positions, weights, sampled.to(draw(st.sampled_from((torch.int64, torch.int32)))))


@given(case=replace_cases())
def test_replace_tokens_reference_matches_oracle(case):
    disc, replaced = ops.replace_tokens(case.ids, case.positions, case.weights, case.sampled, backend="torch")
    expect = case.ids.clone()
    samples = case.sampled.reshape(case.positions.shape)
    for i in range(case.ids.shape[0]):
        for j, p in enumerate(case.positions[i].tolist()):
            if float(case.weights[i, j]) > 0:
                expect[i, p] = samples[i, j]
    assert disc.dtype == case.ids.dtype and torch.equal(disc, expect)
    assert replaced.dtype == torch.bool and torch.equal(replaced, expect != case.ids)


def scatter_update(sequence, updates, positions, weights):
    """The reference's `pretrain_helpers.scatter_update` for int32 ids, step by step in numpy (its positions of
    padding slots are 0 and position 0 is never updated; here a padding slot adds nothing wherever it points)."""
    b, seq_len = sequence.shape
    real = weights > 0
    flat = (positions + seq_len * np.arange(b)[:, None]).reshape(-1)[real.reshape(-1)]
    updated = np.zeros(b * seq_len, dtype=np.int64)
    np.add.at(updated, flat, updates.reshape(-1)[real.reshape(-1)])    # tf.tensor_scatter_nd_add
    updates_mask = np.zeros(b * seq_len, dtype=np.int64)
    np.add.at(updates_mask, flat, 1)                                   # tf.scatter_nd of ones
    updated = np.floor_divide(updated, np.maximum(1, updates_mask))    # integer ids: floordiv, duplicates averaged
    updates_mask = np.minimum(updates_mask, 1)
    return ((1 - updates_mask) * sequence.reshape(-1) + updates_mask * updated).reshape(b, seq_len)


@given(case=replace_cases(duplicates=True))
def test_replace_tokens_mean_is_the_reference_scatter_update(case):
    disc, replaced = ops.replace_tokens(case.ids, case.positions, case.weights, case.sampled, duplicates="mean")
    expect = scatter_update(case.ids.long().numpy(), case.sampled.reshape(case.positions.shape).long().numpy(),
                            case.positions.long().numpy(), case.weights.double().numpy())
    assert disc.dtype == case.ids.dtype and np.array_equal(disc.long().numpy(), expect)
    assert replaced.dtype == torch.bool and np.array_equal(replaced.numpy(), expect != case.ids.numpy())


@triton_only
@TRITON_BUDGET
@given(case=replace_cases(max_b=3, max_l=9, duplicates=True), small=st.booleans())
def test_replace_tokens_triton_matches_reference(poison, case, small):
    args = to_dev(case.ids, case.positions, case.weights, case.sampled)
    with kernel_config(small):
        disc, replaced = ops.replace_tokens(*args, backend="triton")
    ref_disc, ref_replaced = ops.replace_tokens(*args, backend="torch")
    assert disc.dtype == case.ids.dtype and torch.equal(disc, ref_disc)
    assert replaced.dtype == torch.bool and torch.equal(replaced, ref_replaced)


# ---------------------------------------------------------------- token BCE and the fused discriminator head

def labels_and_mask(draw, g, shape):
    """Labels bool / int / soft float in [0, 1]; attention mask all 1, all 0 or random, of any dtype, or None."""
    kind = draw(st.sampled_from((torch.bool, torch.int64, torch.float32, "soft")))
    labels = torch.rand(shape, generator=g) if kind == "soft" else (torch.rand(shape, generator=g) > 0.5).to(kind)
    mask_kind = draw(st.sampled_from(("none", "ones", "zeros", "random")))
    if mask_kind == "none":
        return labels, None
    mask = {"ones": torch.ones(shape), "zeros": torch.zeros(shape),
            "random": (torch.rand(shape, generator=g) > 0.3).float()}[mask_kind]
    return labels, mask.to(draw(st.sampled_from((torch.bool, torch.uint8, torch.int32, torch.int64, torch.float32))))


def bce_oracle(logits, labels, mask):
    """Loops in float64: mean over real tokens of -y log(sigmoid(x)) - (1 - y) log(1 - sigmoid(x)), and its
    gradient (sigmoid(x) - y) / count; 0 and 0 when no token is real."""
    x, y = logits.double().flatten().tolist(), labels.double().flatten().tolist()
    real = [True] * len(x) if mask is None else (mask != 0).flatten().tolist()
    count = max(1, sum(real))
    loss, grad = 0.0, []
    for a, t, r in zip(x, y, real):
        sig = 1 / (1 + math.exp(-a)) if a >= 0 else math.exp(a) / (1 + math.exp(a))
        loss += r * (max(a, 0.0) - a * t + math.log1p(math.exp(-abs(a))))
        grad.append(r * (sig - t) / count)
    return loss / count, torch.tensor(grad, dtype=torch.float64).reshape(logits.shape)


@dataclass
class BceCase:
    logits: torch.Tensor
    labels: torch.Tensor
    mask: Optional[torch.Tensor]


@st.composite
def bce_cases(draw, max_b=5, max_l=12, dtypes=REF_DTYPES):
    g = gen(draw(seeds))
    shape = (draw(st.integers(0, max_b)), draw(st.integers(0, max_l)))
    x = torch.randn(shape, generator=g) * draw(st.sampled_from([0.1, 3.0, 40.0]))
    if draw(st.booleans()):  # saturated tokens: huge and fp16-max logits
        big = torch.tensor([-1e4, 1e4, -FP16_MAX, FP16_MAX])
        x = torch.where(torch.rand(shape, generator=g) < 0.4, big[torch.randint(0, 4, shape, generator=g)], x)
    return BceCase(x.to(draw(st.sampled_from(dtypes))), *labels_and_mask(draw, g, shape))


def bce_atol(logits) -> float:
    return 1e-6 + 5e-7 * (float(logits.detach().double().abs().max()) if logits.numel() else 0.0)


def check_bce(case: BceCase, backend: str, device="cpu", grad_out=1.5):
    logits = case.logits.to(device).requires_grad_()
    labels, mask = to_dev(case.labels, case.mask)
    loss = ops.rtd_bce_loss(logits, labels, mask, backend=backend)
    (grad,) = torch.autograd.grad(loss, logits, torch.tensor(grad_out, dtype=loss.dtype, device=device))
    o_loss, o_grad = bce_oracle(case.logits, case.labels, case.mask)
    assert loss.shape == () and loss.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    assert_close(loss, o_loss, TOL[torch.float32][0], bce_atol(case.logits), "loss")
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    assert_close(grad, o_grad * grad_out, *TOL[logits.dtype], "grad")


@given(case=bce_cases())
def test_rtd_bce_reference_matches_oracle(case):
    check_bce(case, "torch")


@triton_only
@TRITON_BUDGET
@given(case=bce_cases(max_b=4, max_l=9, dtypes=DTYPES), small=st.booleans())
def test_rtd_bce_triton_matches_oracle(poison, case, small):
    with kernel_config(small):
        check_bce(case, "triton", KDEV)


@dataclass
class HeadCase:
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    labels: torch.Tensor
    mask: Optional[torch.Tensor]


@st.composite
def head_cases(draw, max_b=4, max_l=7, max_h=9, dtypes=REF_DTYPES):
    """Hidden, weight and bias of independent dtypes; weight [1, H] or [H]; bias [1], [], [1, 1] or None."""
    g = gen(draw(seeds))
    b, seq_len, h = draw(st.integers(0, max_b)), draw(st.integers(0, max_l)), draw(st.integers(1, max_h))
    scale = draw(st.sampled_from([0.3, 1.0, 30.0]))  # 30: saturated logits
    hidden = (torch.randn(b, seq_len, h, generator=g) * scale).to(draw(st.sampled_from(dtypes)))
    weight = torch.randn(draw(st.sampled_from(((1, h), (h,)))), generator=g).to(draw(st.sampled_from(dtypes)))
    bias_shape = draw(st.sampled_from(((1,), (), (1, 1), None)))
    bias = None if bias_shape is None else torch.randn(bias_shape, generator=g).to(draw(st.sampled_from(dtypes)))
    return HeadCase(hidden, weight, bias, *labels_and_mask(draw, g, (b, seq_len)))


def head_oracle(case: HeadCase):
    """float64: (loss, logits, accuracy, number of near-zero logits whose sign fp32 may flip, grads of hidden, weight
    and bias, and for each the sum of |terms| that bounds its rounding error)."""
    h, w = case.hidden.double(), case.weight.double().reshape(-1)
    b = 0.0 if case.bias is None else float(case.bias.detach().double().reshape(()))
    logits = h @ w + b
    loss, g = bce_oracle(logits, case.labels, case.mask)
    real = torch.ones_like(logits, dtype=torch.bool) if case.mask is None else case.mask != 0
    right = ((logits > 0) == (case.labels.double() > 0.5)) & real
    accuracy = float(right.sum()) / max(1, int(real.sum()))
    size = h.abs() @ w.abs() + abs(b)  # what an fp32 logit's rounding is relative to
    unsure = int(((logits.abs() <= 1e-5 * (1 + size)) & real).sum())
    # |sigmoid(x) - y| cancels (x large, y = 1): its error is an ulp of sigmoid(x) + |y|, and sigmoid' <= 1/4 carries
    # the logit's own error.
    mag = (torch.sigmoid(logits) + case.labels.double().abs()) * (1 + size) * real / max(1, int(real.sum()))
    grads = (g[..., None] * w, (g[..., None] * h).sum((0, 1)).reshape(case.weight.shape),
             None if case.bias is None else g.sum().reshape(case.bias.shape))
    bounds = (mag[..., None] * w.abs(), (mag[..., None] * h.abs()).sum((0, 1)).reshape(case.weight.shape),
              None if case.bias is None else mag.sum().reshape(case.bias.shape))
    return loss, logits, accuracy, unsure, grads, bounds


def check_head(case: HeadCase, backend: str, device="cpu", grad_out=-0.7):
    params = [t.to(device).requires_grad_() for t in (case.hidden, case.weight, case.bias) if t is not None]
    labels, mask = to_dev(case.labels, case.mask)
    bias = params[2] if case.bias is not None else None
    loss, accuracy = ops.rtd_head_loss(params[0], params[1], bias, labels, mask, backend=backend)
    grads = torch.autograd.grad(loss, params, torch.tensor(grad_out, dtype=loss.dtype, device=device))
    o_loss, o_logits, o_acc, unsure, o_grads, bounds = head_oracle(case)
    count = max(1, int(torch.ones(case.labels.shape).sum() if case.mask is None else (case.mask != 0).sum()))
    assert loss.shape == () and accuracy.shape == () and not accuracy.requires_grad
    assert_close(loss, o_loss, 1e-5, bce_atol(o_logits), "loss")
    assert abs(float(accuracy) - o_acc) <= unsure / count + 1e-6, (float(accuracy), o_acc, unsure)
    compute = torch.float64 if case.hidden.dtype == torch.float64 else torch.float32
    for name, g, x, o, bound in zip(("hidden", "weight", "bias"), grads, params, o_grads, bounds):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        expected = o * grad_out
        err = (g.detach().cpu().double() - expected).abs()
        # fp32 math (fp64 for fp64 hidden), then one rounding to x's dtype.
        tol = TOL[x.dtype][0] * expected.abs() + 8 * EPS[compute] * bound * abs(grad_out) + TOL[compute][1]
        assert (err <= tol).all(), (name, err, tol)


@given(case=head_cases())
def test_rtd_head_reference_matches_oracle(case):
    check_head(case, "torch")


@triton_only
@TRITON_BUDGET
@given(case=head_cases(max_b=3, max_l=6, max_h=7, dtypes=DTYPES), small=st.booleans())
def test_rtd_head_triton_matches_oracle(poison, case, small):
    with kernel_config(small):
        check_head(case, "triton", KDEV)


# ---------------------------------------------------------------- masking

SPECIALS = (0, 1, 2, 3)  # [PAD], [CLS], [SEP], [MASK]
MASK_ID = 3


@st.composite
def mask_cases(draw):
    g = gen(draw(seeds))
    b, seq_len = draw(st.integers(0, 6)), draw(st.integers(1, 40))
    ids = torch.randint(0, 12, (b, seq_len), generator=g).to(draw(st.sampled_from((torch.int64, torch.int32))))
    mask_kind = draw(st.sampled_from(("none", "prefix", "random", "zeros")))
    if mask_kind == "none":
        mask = None
    elif mask_kind == "prefix":
        mask = torch.arange(seq_len) < torch.randint(0, seq_len + 1, (b, 1), generator=g)
    else:
        mask = torch.rand(b, seq_len, generator=g) < (0.6 if mask_kind == "random" else 0.0)
    if mask is not None:
        mask = mask.to(draw(st.sampled_from((torch.bool, torch.int64, torch.float32))))
    specials = draw(st.sampled_from((SPECIALS, list(SPECIALS[1:]), [], "tensor")))
    specials = torch.tensor(SPECIALS) if specials == "tensor" else specials
    mask_prob = draw(st.floats(0.01, 0.99))
    max_pred = draw(st.one_of(st.none(), st.integers(1, seq_len)))
    return ids, mask, specials, mask_prob, max_pred, draw(seeds)


def k_choices(n_real: int, mask_prob: float, n: int, n_cands: int) -> set:
    """Real slots in a row: min(max(1, min(N, round(n_real * p))), candidates); both roundings where n_real * p sits
    within 1e-4 of a half (round-half-even in float64 or float32: issue 12 may switch the reference to float32)."""
    x = n_real * mask_prob
    near_half = abs(x - math.floor(x) - 0.5) < 1e-4
    rounded = {math.floor(x), math.ceil(x)} if near_half else {round(x)}
    return {min(max(1, min(n, r)), n_cands) for r in rounded}


def check_mask_tokens(case, backend: str):
    ids, mask, specials, mask_prob, max_pred, seed = case
    kw = dict(mask_prob=mask_prob, mask_token_id=MASK_ID, special_token_ids=specials, max_predictions=max_pred,
              backend=backend)
    dev = "cpu" if backend == "torch" else KDEV
    ids, mask = ids.to(dev), None if mask is None else mask.to(dev)
    masked, positions, weights = ops.mask_tokens(ids, mask, generator=gen(seed, dev), **kw)
    again = ops.mask_tokens(ids, mask, generator=gen(seed, dev), **kw)
    ids, mask, masked, positions, weights = (None if t is None else t.cpu() for t in (ids, mask, masked, positions,
                                                                                          weights))
    assert all(torch.equal(a, b) for a, b in zip(again, (masked, positions, weights)))  # same seed, same masks
    b, seq_len = ids.shape
    n = max_pred if max_pred is not None else max(1, min(seq_len, int((mask_prob + 0.005) * seq_len)))
    assert positions.shape == weights.shape == (b, n) and positions.dtype == torch.int64
    assert weights.dtype == torch.float32 and masked.dtype == ids.dtype and masked.shape == ids.shape
    special = set(specials.tolist() if isinstance(specials, torch.Tensor) else specials)
    for r in range(b):
        real = [True] * seq_len if mask is None else (mask[r] != 0).tolist()
        cands = [i for i in range(seq_len) if real[i] and int(ids[r, i]) not in special]
        k = int(weights[r].sum())
        assert k in k_choices(sum(real), mask_prob, n, len(cands)), (r, k)
        assert weights[r, :k].eq(1).all() and weights[r, k:].eq(0).all() and positions[r, k:].eq(0).all()
        chosen = positions[r, :k].tolist()
        assert chosen == sorted(set(chosen)) and set(chosen) <= set(cands)  # distinct, ascending, candidates only
        for i in range(seq_len):
            if i not in chosen:
                assert masked[r, i] == ids[r, i], (r, i)
            else:
                assert masked[r, i] in (ids[r, i], MASK_ID), (r, i)


# ---------------------------------------------------------------- empty batches, pinned (hypothesis may not draw 0)

@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=triton_only)])
def test_empty_batches(poison, backend):
    dev = "cpu" if backend == "torch" else KDEV
    logits = torch.randn(0, 7, device=dev, requires_grad=True)
    none = torch.zeros(0, dtype=torch.long, device=dev)
    loss, sampled, correct = ops.mlm_loss_and_sample(logits, none, torch.zeros(0, device=dev), backend=backend)
    assert loss.item() == 0.0 and sampled.shape == correct.shape == (0,)
    loss.backward()
    assert logits.grad.shape == (0, 7)
    assert ops.gumbel_sample(logits.detach(), disallow=none, backend=backend).shape == (0,)
    for b, seq_len, n, h in [(0, 5, 2, 3), (2, 5, 0, 3), (2, 5, 2, 0)]:
        hidden = torch.randn(b, seq_len, h, device=dev, requires_grad=True)
        out = ops.masked_gather(hidden, torch.zeros(b, n, dtype=torch.long, device=dev), backend=backend)
        assert out.shape == (b, n, h)
        (grad,) = torch.autograd.grad(out.sum(), hidden)
        assert torch.equal(grad, torch.zeros_like(grad))
        ids = torch.randint(0, 9, (b, seq_len), device=dev)
        positions = torch.arange(n, device=dev).expand(b, n)
        disc, replaced = ops.replace_tokens(ids, positions, torch.ones(b, n, device=dev), ids[:, :n].flatten(),
                                            backend=backend)  # samples equal to the originals: nothing replaced
        assert torch.equal(disc, ids) and not replaced.any()
    for shape in [(0, 4), (3, 0)]:
        x = torch.randn(shape, device=dev, requires_grad=True)
        loss = ops.rtd_bce_loss(x, torch.ones(shape, device=dev), backend=backend)
        assert loss.item() == 0.0
        hidden = torch.randn(*shape, 5, device=dev, requires_grad=True)
        loss, accuracy = ops.rtd_head_loss(hidden, torch.randn(5, device=dev), None, torch.ones(shape, device=dev),
                                           backend=backend)
        assert loss.item() == 0.0 and accuracy.item() == 0.0
    if backend == "torch":  # masking has only the reference
        masked, positions, weights = ops.mask_tokens(torch.zeros(0, 8, dtype=torch.long), mask_token_id=3,
                                                     special_token_ids=SPECIALS)
        assert masked.shape == (0, 8) and positions.shape == weights.shape == (0, 1)


# ---------------------------------------------------------------- bad inputs

def _mlm(logits=None, targets=None, weights=None, **kw):
    logits = torch.randn(3, 5) if logits is None else logits
    targets = torch.tensor([0, 4, 2]) if targets is None else targets
    return ops.mlm_loss_and_sample(logits, targets, torch.ones(3) if weights is None else weights, **kw)


def _gumbel(logits=None, **kw):
    return ops.gumbel_sample(torch.randn(3, 5) if logits is None else logits, **kw)


def _gather(hidden=None, positions=None, **kw):
    return ops.masked_gather(torch.randn(2, 6, 4) if hidden is None else hidden,
                             torch.tensor([[0, 5], [2, 2]]) if positions is None else positions, **kw)


def _replace(ids=None, positions=None, weights=None, sampled=None, **kw):
    return ops.replace_tokens(torch.ones(2, 6, dtype=torch.long) if ids is None else ids,
                              torch.tensor([[0, 5], [2, 3]]) if positions is None else positions,
                              torch.ones(2, 2) if weights is None else weights,
                              torch.tensor([[7, 8], [9, 9]]) if sampled is None else sampled, **kw)


def _bce(logits=None, labels=None, mask=None, **kw):
    return ops.rtd_bce_loss(torch.randn(2, 6) if logits is None else logits,
                            torch.zeros(2, 6) if labels is None else labels, mask, **kw)


def _head(hidden=None, weight=None, bias=None, labels=None, mask=None, **kw):
    return ops.rtd_head_loss(torch.randn(2, 6, 4) if hidden is None else hidden,
                             torch.randn(1, 4) if weight is None else weight, bias,
                             torch.zeros(2, 6) if labels is None else labels, mask, **kw)


def _mask(ids=None, mask=None, **kw):
    kw = dict(dict(mask_token_id=3, special_token_ids=SPECIALS), **kw)
    return ops.mask_tokens(torch.randint(4, 9, (2, 10)) if ids is None else ids, mask, **kw)


def _lm_head(hidden=None, weight=None, bias=None, targets=None, weights=None, **kw):
    return ops.lm_head_loss_and_sample(torch.randn(3, 4) if hidden is None else hidden,
                                       torch.randn(6, 4) if weight is None else weight,
                                       torch.randn(6) if bias is None else bias,
                                       torch.tensor([0, 5, 2]) if targets is None else targets,
                                       torch.ones(3) if weights is None else weights, **kw)


META = dict(device="meta")  # another device than the CPU, without a GPU
BAD_INPUTS = [  # (call, error type, the argument the message must name)
    (lambda: _mlm(logits=torch.ones(3, 5, dtype=torch.long)), TypeError, "logits"),
    (lambda: _mlm(logits=torch.randn(15)), ValueError, "logits"),
    (lambda: _mlm(logits=torch.randn(3, 0)), ValueError, "logits"),
    (lambda: _mlm(targets=torch.zeros(3)), TypeError, "targets"),
    (lambda: _mlm(targets=torch.zeros(4, dtype=torch.long)), ValueError, "targets"),
    (lambda: _mlm(targets=torch.zeros(3, 1, dtype=torch.long)), ValueError, "targets"),
    (lambda: _mlm(weights=torch.ones(2)), ValueError, "weights"),
    (lambda: _mlm(weights=torch.ones(3, dtype=torch.complex64)), TypeError, "weights"),
    (lambda: _mlm(targets=torch.zeros(3, dtype=torch.long, **META)), ValueError, "targets"),
    (lambda: _mlm(weights=torch.ones(3, **META)), ValueError, "weights"),
    (lambda: _mlm(backend="nope"), ValueError, "backend"),
    (lambda: _gumbel(logits=torch.ones(3, 5, dtype=torch.int32)), TypeError, "logits"),
    (lambda: _gumbel(logits=torch.randn(2, 3, 5)), ValueError, "logits"),
    (lambda: _gumbel(disallow=torch.zeros(3)), TypeError, "disallow"),
    (lambda: _gumbel(disallow=torch.zeros(2, dtype=torch.long)), ValueError, "disallow"),
    (lambda: _gumbel(disallow=torch.zeros(3, dtype=torch.long, **META)), ValueError, "disallow"),
    (lambda: _gather(hidden=torch.randn(6, 4)), ValueError, "hidden"),
    (lambda: _gather(positions=torch.zeros(2, 2)), TypeError, "positions"),
    (lambda: _gather(positions=torch.zeros(3, 2, dtype=torch.long)), ValueError, "positions"),
    (lambda: _gather(positions=torch.zeros(2, dtype=torch.long)), ValueError, "positions"),
    (lambda: _gather(positions=torch.zeros(2, 2, dtype=torch.long, **META)), ValueError, "positions"),
    (lambda: _replace(ids=torch.ones(2, 6)), TypeError, "input_ids"),
    (lambda: _replace(positions=torch.zeros(2, 2)), TypeError, "positions"),
    (lambda: _replace(positions=torch.zeros(1, 2, dtype=torch.long)), ValueError, "positions"),
    (lambda: _replace(weights=torch.ones(2, 3)), ValueError, "weights"),
    (lambda: _replace(sampled=torch.ones(2, 2)), TypeError, "sampled"),
    (lambda: _replace(sampled=torch.ones(5, dtype=torch.long)), ValueError, "sampled"),
    (lambda: _replace(sampled=torch.ones(2, 2, dtype=torch.long, **META)), ValueError, "sampled"),
    (lambda: _replace(duplicates="first"), ValueError, "duplicates must be 'add' or 'mean'"),
    (lambda: _replace(duplicates="mean", backend="triton"), ValueError, "duplicates='mean'.*backend='triton'"),
    (lambda: _bce(logits=torch.ones(2, 6, dtype=torch.long)), TypeError, "logits"),
    (lambda: _bce(logits=torch.randn(12)), ValueError, "logits"),
    (lambda: _bce(labels=torch.zeros(2, 5)), ValueError, "labels"),
    (lambda: _bce(mask=torch.ones(6, 2)), ValueError, "attention_mask"),
    (lambda: _bce(labels=torch.zeros(2, 6, **META)), ValueError, "labels"),
    (lambda: _head(hidden=torch.randn(2, 6)), ValueError, "hidden"),
    (lambda: _head(hidden=torch.ones(2, 6, 4, dtype=torch.long)), TypeError, "hidden"),
    (lambda: _head(weight=torch.randn(4, 1)), ValueError, "weight"),
    (lambda: _head(weight=torch.ones(1, 4, dtype=torch.long)), TypeError, "weight"),
    (lambda: _head(bias=torch.zeros(2)), ValueError, "bias"),
    (lambda: _head(labels=torch.zeros(2, 5)), ValueError, "labels"),
    (lambda: _head(mask=torch.ones(2, 6, 1)), ValueError, "attention_mask"),
    (lambda: _head(bias=torch.zeros(1, **META)), ValueError, "bias"),
    (lambda: _mask(ids=torch.ones(2, 10)), TypeError, "input_ids"),
    (lambda: _mask(ids=torch.ones(2, 0, dtype=torch.long)), ValueError, "input_ids"),
    (lambda: _mask(mask=torch.ones(2, 9)), ValueError, "attention_mask"),
    (lambda: _mask(mask=torch.ones(2, 10, **META)), ValueError, "attention_mask"),
    (lambda: _mask(mask_prob=0.0), ValueError, "mask_prob"),
    (lambda: _mask(mask_prob=1.0), ValueError, "mask_prob"),
    (lambda: _mask(mask_prob=float("nan")), ValueError, "mask_prob"),
    (lambda: _mask(mask_prob=True), ValueError, "mask_prob"),
    (lambda: _mask(mask_token_id=-1), TypeError, "mask_token_id"),
    (lambda: _mask(mask_token_id=3.0), TypeError, "mask_token_id"),
    (lambda: _mask(max_predictions=0), ValueError, "max_predictions"),
    (lambda: _mask(max_predictions=11), ValueError, "max_predictions"),
    (lambda: _lm_head(hidden=torch.randn(0, 4)), ValueError, "hidden"),
    (lambda: _lm_head(hidden=torch.randn(3, 4, dtype=torch.float64)), TypeError, "hidden"),
    (lambda: _lm_head(weight=torch.randn(6, 5)), ValueError, "weight"),
    (lambda: _lm_head(bias=torch.randn(5)), ValueError, "bias"),
    (lambda: _lm_head(targets=torch.zeros(3)), TypeError, "targets"),
    (lambda: _lm_head(weights=torch.ones(4)), ValueError, "weights"),
    (lambda: _lm_head(targets=torch.zeros(3, dtype=torch.long, **META)), ValueError, "targets"),
    (lambda: _lm_head(chunk_size=0), ValueError, "chunk_size"),
]


@pytest.mark.parametrize("call, error, name", BAD_INPUTS)
def test_bad_inputs_raise_naming_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call()


SCALAR_OPS = {  # op -> call with a scalar argument set
    "mlm_loss_and_sample": _mlm, "gumbel_sample": _gumbel,
    "lm_head_loss_and_sample": lambda **kw: _lm_head(weight=torch.randn(5, 4), bias=torch.randn(5),
                                                     targets=torch.tensor([0, 4, 2]), **kw),
}
bad_temperatures = st.one_of(st.floats(max_value=0.0), st.just(float("nan")), st.just(-INF),
                             st.sampled_from(["1.0", None, True, torch.tensor(1.0)]))


@settings(max_examples=max(10, settings.default.max_examples))
@given(op=st.sampled_from(sorted(SCALAR_OPS)), temperature=bad_temperatures)
def test_bad_temperature_raises(op, temperature):
    with pytest.raises(ValueError, match="temperature"):
        SCALAR_OPS[op](temperature=temperature)


@pytest.mark.parametrize("op", sorted(SCALAR_OPS))
def test_infinite_temperature_raises(op):
    with pytest.raises(ValueError, match="temperature"):
        SCALAR_OPS[op](temperature=INF)


@settings(max_examples=max(10, settings.default.max_examples))
@given(op=st.sampled_from(sorted(SCALAR_OPS)),
       vocab_size=st.one_of(st.integers(max_value=0), st.integers(min_value=6), st.sampled_from([2.0, True, "3"])))
def test_bad_vocab_size_raises(op, vocab_size):
    with pytest.raises(ValueError, match="vocab_size"):
        SCALAR_OPS[op](vocab_size=vocab_size)


OUT_OF_RANGE = [  # (call with an id out of its range, the argument)
    (lambda b: _mlm(targets=torch.tensor([0, 5, 2]), backend=b), "targets"),
    (lambda b: _mlm(targets=torch.tensor([0, -1, 2]), backend=b), "targets"),
    (lambda b: _mlm(targets=torch.tensor([0, 4, 2]), vocab_size=4, backend=b), "targets"),  # a padding column
    (lambda b: _lm_head(targets=torch.tensor([0, 6, 2]), backend=b), "targets"),
    (lambda b: _gather(positions=torch.tensor([[0, 6], [2, 2]]), backend=b), "positions"),
    (lambda b: _gather(positions=torch.tensor([[0, -1], [2, 2]]), backend=b), "positions"),
    (lambda b: _replace(positions=torch.tensor([[0, 6], [2, 3]]), backend=b), "positions"),
    (lambda b: _replace(positions=torch.tensor([[0, -1], [2, 3]]), backend=b), "positions"),
]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=triton_only)])
@pytest.mark.parametrize("call, name", OUT_OF_RANGE)
def test_out_of_range_ids_raise_naming_the_argument(call, name, backend):
    """Checked on CPU tensors (free; these are); on CUDA a documented precondition (checking would sync)."""
    with pytest.raises((ValueError, IndexError), match=name):
        call(backend)


@given(case=mask_cases())
def test_mask_tokens_reference_matches_oracle(case):
    check_mask_tokens(case, "torch")


def _has_triton_kernel(op: str) -> bool:
    return HAVE_TRITON and ops._backend._module("triton", op) is not None


@pytest.mark.skipif(not _has_triton_kernel("mask_tokens"), reason="no Triton mask_tokens kernel (or no Triton)")
@TRITON_BUDGET
@given(case=mask_cases())
def test_mask_tokens_triton_matches_oracle(poison, case):
    check_mask_tokens(case, "triton")
