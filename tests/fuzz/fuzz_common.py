"""Every public op of `electra_fast.ops` fuzzed with hypothesis: what the suite's files (tests/fuzz/test_fuzz_*.py)
share, its strategies and oracles.

- The torch reference (backend="torch") against naive oracles written here: Python loops in float64 over the same
  dtype-rounded inputs (log-sum-exp, first argmax, Gumbel-max from given uniforms, gathers, BCE, the LM head).
- The Triton backend against the torch reference (or the oracle), in the interpreter (TRITON_INTERPRET=1, CPU
  tensors) or on a GPU: tiny shapes, tiles sometimes shrunk so loops run several times with partial tails, both
  samplers, outputs allocated poisoned (NaN / -7 / True) so an unwritten element shows.
- Bad scalar arguments (temperature, vocab_size) raise, naming the argument.

Inputs: shapes from 0 (empty batches, where an op allows them) and 1 to small non-powers of two; fp32/fp16/bf16
(fp64 too on the reference); weights and attention masks all 0; temperatures 0.05..5; disallowed ids; rows of huge
logits (+-1e4, +-fp16 max), constant rows (ties: the first maximum wins), rows that are -inf but for one column;
padded vocabulary columns (`vocab_size=`) holding NaN, +-inf or 1e30; duplicate positions where an op allows them.
Sampling ops are checked for support (an id in [0, V), never disallowed, never of probability 0: log-probability
> -40 under softmax(logits / T)) and for determinism under one seed, not for their distribution (the chi-square
tests of tests/ops/test_gumbel_sample_distribution.py do that).

Semantics the docstrings leave open, checked here and pinned in tests/ops/test_mlm_loss_and_sample.py: a row with
nothing to draw (all -inf, or its one finite id disallowed) samples id 0 and has argmax 0 (torch's argmax of equal
values); its cross-entropy is NaN, so a real slot on it makes the loss NaN, on every backend.

Budget (hypothesis profiles registered in tests/conftest.py): "ci" by default, 20 examples per test and 5 per
Triton test (the interpreter takes ~0.1-1 s a call), derandomized so every CI run tries the same examples;
`ELECTRA_FAST_FUZZ=thorough` runs 400 (100) fresh random ones:
    ELECTRA_FAST_FUZZ=thorough TRITON_INTERPRET=1 python -m pytest -q tests/fuzz
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

import pytest
import torch
from hypothesis import HealthCheck, settings, strategies as st

from helpers import use_sampler, use_small_tiles
from electra_fast.ops.mlm_loss_and_sample import WEIGHT_EPS

INF = float("inf")
FP16_MAX = 65504.0
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REF_DTYPES = DTYPES + (torch.float64,)
EPS = {torch.float64: 2.0 ** -52, torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
# Against a float64 oracle: one rounding to the output dtype, with margin (rtol, atol).
TOL = {torch.float64: (1e-9, 1e-12), torch.float32: (1e-5, 1e-6), torch.float16: (2e-3, 1e-5),
       torch.bfloat16: (1.6e-2, 1e-5)}

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

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
