"""`ops.mlm_loss_and_sample` and `ops.gumbel_sample` fuzzed (tests/fuzz/fuzz_common.py): the reference against
float64 loops (loss, argmax, gradient) and Gumbel-max from its own uniforms, support and determinism of the samples;
the Triton kernels against the reference (both samplers, tiles sometimes shrunk, outputs poisoned); bad temperatures
and vocabulary sizes raise, naming the argument."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from electra_fast import ops
from electra_fast.ops.gumbel_sample import _gumbel_sample_op
from electra_fast.ops.mlm_loss_and_sample import WEIGHT_EPS, _mlm_op
from fuzz_common import (DTYPES, INF, KDEV, ROW_KINDS, TOL, TRITON_BUDGET, assert_close, check_support, gen,
                         gumbel_oracle_ok, kernel_config, loss_atol, mlm_cases, mlm_oracle, to_dev, triton_only)
from helpers import call_gumbel, call_lm_head, call_mlm

# On a GPU these run the Triton kernels compiled (no interpreter): validate_gpu's `--rest` selects them by this marker.
pytestmark = pytest.mark.triton


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


SCALAR_OPS = {  # op -> call with a scalar argument set
    "mlm_loss_and_sample": call_mlm, "gumbel_sample": call_gumbel,
    "lm_head_loss_and_sample": lambda **kw: call_lm_head(weight=torch.randn(5, 4), bias=torch.randn(5),
                                                         targets=torch.tensor([0, 4, 2]), **kw),
}


bad_temperatures = st.one_of(st.floats(max_value=0.0), st.just(float("nan")), st.just(-INF),
                             st.sampled_from(["1.0", None, True, torch.tensor(1.0)]))


@settings(max_examples=max(10, settings.default.max_examples))
@given(op=st.sampled_from(sorted(SCALAR_OPS)), temperature=bad_temperatures)
def test_bad_temperature_raises(op, temperature):
    with pytest.raises(ValueError, match="temperature"):
        SCALAR_OPS[op](temperature=temperature)


@settings(max_examples=max(10, settings.default.max_examples))
@given(op=st.sampled_from(sorted(SCALAR_OPS)),
       vocab_size=st.one_of(st.integers(max_value=0), st.integers(min_value=6), st.sampled_from([2.0, True, "3"])))
def test_bad_vocab_size_raises(op, vocab_size):
    with pytest.raises(ValueError, match="vocab_size"):
        SCALAR_OPS[op](vocab_size=vocab_size)
