"""`ops.masked_gather` and `ops.replace_tokens` fuzzed (tests/fuzz/fuzz_common.py): the reference against loops
(duplicate positions summed in the backward, the reference implementation's scatter update for `duplicates="mean"`),
the Triton kernels against the oracle or the reference."""
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from electra_fast import ops
from fuzz_common import DTYPES, EPS, REF_DTYPES, TRITON_BUDGET, gen, kernel_config, seeds, to_dev, triton_only, \
    weight_vector, KDEV

# On a GPU these run the Triton kernels compiled (no interpreter): validate_gpu's `--rest` selects them by this marker.
pytestmark = pytest.mark.triton


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
