"""`ops.mask_tokens` fuzzed (tests/fuzz/fuzz_common.py): every output row against the rules derived from its inputs
(the reference's slot count, candidates only, distinct and ascending, [MASK] or the original token; with
`word_starts`, whole candidate words and a fill that some order of BERT's walk gives), the same masks under the same
seed; on the reference and the Triton kernel."""
import math

import pytest
import torch
from hypothesis import given, strategies as st

from electra_fast import ops
from fuzz_common import HAVE_TRITON, KDEV, TRITON_BUDGET, gen, seeds

# On a GPU these run the Triton kernels compiled (no interpreter): validate_gpu's `--rest` selects them by this marker.
pytestmark = pytest.mark.triton


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
    starts = None
    if draw(st.booleans()):  # whole words: starts anywhere, padding and specials included or not
        starts = torch.rand(b, seq_len, generator=g) < draw(st.sampled_from((0.0, 0.3, 0.7, 1.0)))
    return ids, mask, specials, mask_prob, max_pred, draw(seeds), starts


def k_choices(n_real: int, mask_prob: float, n: int, n_cands: int) -> set:
    """Real slots in a row: min(max(1, min(N, round(n_real * p))), candidates); both roundings where n_real * p sits
    within 1e-4 of a half (round-half-even in float64 or float32: the reference rounds in float32,
    docs/algorithm.md#masking)."""
    x = n_real * mask_prob
    near_half = abs(x - math.floor(x) - 0.5) < 1e-4
    rounded = {math.floor(x), math.ceil(x)} if near_half else {round(x)}
    return {min(max(1, min(n, r)), n_cands) for r in rounded}


def whole_words(starts, cands) -> list:
    """The candidate words of a row as column lists: a start and the non-starts after it (a word at column 0 first);
    a non-candidate is a word of its own and the token after it begins one."""
    cands = set(cands)
    starts = [s or c not in cands or (c > 0 and c - 1 not in cands) for c, s in enumerate(starts)]
    firsts = [0] + [c for c in range(1, len(starts)) if starts[c]]
    words = [list(range(a, b)) for a, b in zip(firsts, firsts[1:] + [len(starts)])]
    return [w for w in words if set(w) <= set(cands)]


def check_mask_tokens(case, backend: str):
    ids, mask, specials, mask_prob, max_pred, seed, starts = case
    kw = dict(mask_prob=mask_prob, mask_token_id=MASK_ID, special_token_ids=specials, max_predictions=max_pred,
              backend=backend, word_starts=starts if starts is None else starts.to("cpu" if backend == "torch"
                                                                                    else KDEV))
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
        if starts is None:
            assert k in k_choices(sum(real), mask_prob, n, len(cands)), (r, k)
        assert weights[r, :k].eq(1).all() and weights[r, k:].eq(0).all() and positions[r, k:].eq(0).all()
        chosen = positions[r, :k].tolist()
        assert chosen == sorted(set(chosen)) and set(chosen) <= set(cands)  # distinct, ascending, candidates only
        if starts is not None:  # whole words, and a fill the walk gives for some order: what is left out overflows
            words = whole_words(starts[r].tolist(), cands)
            assert chosen == sorted(c for w in words if w[0] in chosen for c in w), (r, chosen, words)
            caps = k_choices(sum(real), mask_prob, n, n)
            assert any(k <= cap and all(len(w) > cap - k for w in words if w[0] not in chosen) for cap in caps)
        for i in range(seq_len):
            if i not in chosen:
                assert masked[r, i] == ids[r, i], (r, i)
            else:
                assert masked[r, i] in (ids[r, i], MASK_ID), (r, i)


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
