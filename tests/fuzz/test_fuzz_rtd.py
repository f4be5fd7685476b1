"""`ops.rtd_bce_loss` and `ops.rtd_head_loss` fuzzed (tests/fuzz/fuzz_common.py): the reference against float64
loops (loss, accuracy, gradients within the rounding their sums allow), the Triton kernels against the same oracles;
labels bool / int / soft, masks of any dtype or none, saturated logits."""
import math
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from hypothesis import given, strategies as st

from electra_fast import ops
from fuzz_common import (DTYPES, EPS, FP16_MAX, KDEV, REF_DTYPES, TOL, TRITON_BUDGET, assert_close, gen,
                         kernel_config, seeds, to_dev, triton_only)

# On a GPU these run the Triton kernels compiled (no interpreter): validate_gpu's `--rest` selects them by this marker.
pytestmark = pytest.mark.triton


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
