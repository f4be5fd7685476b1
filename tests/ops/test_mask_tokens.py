"""`ops.mask_tokens` on every backend (the torch reference; the Triton kernel in the interpreter or on a GPU):
the slot count against lines written from the reference (numpy float32), the draws by their distributions (chi-square
for uniform positions, the expected number of distinct positions with replacement, a binomial bound on [MASK]),
the op under torch.compile(fullgraph=True), opcheck and bad arguments. Reference: google-research/electra
pretrain/pretrain_helpers.py::mask.
"""
import math
import os

import numpy as np
import pytest
import torch
import torch._dynamo
import torch._inductor.config

from electra_fast import ops
from helpers import chi2_critical, make_batch

PAD, CLS, SEP, MASK = 0, 1, 2, 3
SPECIAL = (PAD, CLS, SEP, MASK)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# On a GPU these run the Triton kernels compiled (no interpreter): validate_gpu's `--rest` selects them by this marker.
pytestmark = pytest.mark.triton
HAVE_TRITON = INTERPRET or torch.cuda.is_available()
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not HAVE_TRITON, reason="the Triton backend needs a CUDA GPU or TRITON_INTERPRET=1"))]


def reference_num_to_predict(num_tokens, mask_prob, n):
    """pretrain_helpers.py::mask, lines 173-175, in numpy:
        num_tokens = tf.cast(tf.reduce_sum(inputs.input_mask, -1), tf.float32)
        num_to_predict = tf.maximum(1, tf.minimum(N, tf.cast(tf.round(num_tokens * mask_prob), tf.int32)))
    (the Python float mask_prob becomes a float32 tensor; tf.round rounds half to even, as np.round)."""
    num_tokens = np.asarray(num_tokens).astype(np.float32)
    return np.maximum(1, np.minimum(n, np.round(num_tokens * np.float32(mask_prob)).astype(np.int32)))


def batch(lengths, seq_len, vocab=60, cls_sep=True):
    """Rows of `[CLS] tokens [SEP] [PAD]...` (or only tokens), `lengths` real tokens each."""
    b = len(lengths)
    ids = torch.randint(4, vocab, (b, seq_len))
    mask = (torch.arange(seq_len) < torch.tensor(lengths)[:, None]).long()
    ids = torch.where(mask.bool(), ids, PAD)
    if cls_sep:
        ids[:, 0] = CLS
        ids[torch.arange(b), (torch.tensor(lengths) - 1).clamp(min=0)] = SEP
        ids = torch.where(mask.bool(), ids, PAD)
    return ids.to(DEVICE), mask.to(DEVICE)


def run(backend, ids, mask, **kw):
    kw = dict(dict(mask_prob=0.15, mask_token_id=MASK, special_token_ids=SPECIAL), **kw)
    return [t.cpu() for t in ops.mask_tokens(ids, mask, backend=backend, **kw)]


# ---------------------------------------------------------------- the slot count, as the reference computes it

@pytest.mark.parametrize("mask_prob", [0.15, 0.25])
def test_real_slots_match_the_reference_for_every_length(mask_prob):
    seq_len = 512
    lengths = list(range(seq_len + 1))
    ids, mask = batch(lengths, seq_len, cls_sep=False)  # every real token a candidate
    n = ops.num_slots(seq_len, mask_prob)
    expect = reference_num_to_predict(lengths, mask_prob, n)
    for replacement in (False, True):
        _, _, weights = run("torch", ids, mask, mask_prob=mask_prob, replacement=replacement)
        # Both draws give the reference's count; a row without a candidate (0 tokens) has nothing to draw.
        assert weights.sum(1).long().tolist() == [0] + expect[1:].tolist()


def test_float32_rounding_gives_the_reference_slots_where_float64_would_not():
    """The reference's float32 K_b (docs/algorithm.md#masking): at L=512 rows of 190/350/390 tokens get 29/53/59
    slots (float64 rounding gives 28/52/58)."""
    assert [round(x * 0.15) for x in (190, 350, 390)] == [28, 52, 58]
    assert reference_num_to_predict([190, 350, 390], 0.15, 79).tolist() == [29, 53, 59]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_prob", [0.15, 0.25])
def test_kernel_slot_count_matches_the_reference(poison, backend, mask_prob):
    """Lengths around every rounding difference (float32 vs float64, ties) and the extremes, at L = 512."""
    seq_len = 512
    lengths = [1, 2, 3, 6, 10, 30, 190, 350, 390, 509, 511, 512]
    ids, mask = batch(lengths, seq_len)
    n = ops.num_slots(seq_len, mask_prob)
    k_ref, n_cands = reference_num_to_predict(lengths, mask_prob, n), np.maximum(np.array(lengths) - 2, 0)
    # Without replacement at most the candidates; with, the reference's K_b even from fewer, none from no candidate.
    for replacement, expect in ((False, np.minimum(k_ref, n_cands)), (True, np.where(n_cands > 0, k_ref, 0))):
        _, _, weights = run(backend, ids, mask, mask_prob=mask_prob, replacement=replacement)
        assert weights.sum(1).long().tolist() == expect.tolist()


# ---------------------------------------------------------------- without replacement (the default)

def test_reference_slot_counts_and_rules():
    ids, am = make_batch(b=8, seq_len=64, lengths=[64, 40, 3, 10, 1, 2, 64, 17])
    ids[6, 5:60] = MASK  # a row with few candidates left: only real tokens that are not special count
    masked, pos, w = ops.mask_tokens(ids, am, mask_prob=0.15, mask_token_id=MASK, special_token_ids=SPECIAL)
    n = int((0.15 + 0.005) * 64)
    assert pos.shape == (8, n) and w.shape == (8, n) and pos.dtype == torch.int64 and w.dtype == torch.float32
    for r in range(8):
        n_tokens = int(am[r].sum())
        cands = [i for i in range(64) if am[r, i] and int(ids[r, i]) not in SPECIAL]
        k = min(max(1, min(n, round(n_tokens * 0.15))), len(cands))
        real = [int(p) for p, wt in zip(pos[r], w[r]) if wt > 0]
        assert len(real) == k, (r, real, k)
        assert w[r, :k].eq(1).all() and w[r, k:].eq(0).all()  # real slots first
        assert set(real) <= set(cands)  # never a special or padding token
        assert len(set(real)) == k and real == sorted(real)  # no duplicates, ascending
        assert pos[r, k:].eq(0).all()
        changed = {i for i in range(64) if masked[r, i] != ids[r, i]}
        assert changed <= set(real) and all(masked[r, i] == MASK for i in changed)
    assert w[2].sum() == 1 and w[4].sum() == 0 and w[5].sum() == 0  # [CLS][SEP] row and one-token rows


def check_rows(ids, mask, masked, positions, weights, mask_prob, special, replacement=False):
    """Rules every output row follows, from the inputs alone."""
    b, seq_len = ids.shape
    n = positions.shape[1]
    for r in range(b):
        real = mask[r].bool().tolist()
        cands = [i for i in range(seq_len) if real[i] and int(ids[r, i]) not in special]
        k = int(reference_num_to_predict(sum(real), mask_prob, n))
        k = (k if cands else 0) if replacement else min(k, len(cands))
        assert weights[r, :k].eq(1).all() and weights[r, k:].eq(0).all(), (r, weights[r])
        assert positions[r, k:].eq(0).all(), (r, positions[r])
        chosen = positions[r, :k].tolist()
        assert set(chosen) <= set(cands), (r, chosen, cands)  # never a special or padding token
        if not replacement:
            assert chosen == sorted(set(chosen)), (r, chosen)  # distinct, ascending
        for i in range(seq_len):  # [MASK] only at chosen positions, every other token kept
            assert masked[r, i] == ids[r, i] or (i in chosen and masked[r, i] == MASK), (r, i)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rules_on_ragged_rows(poison, backend):
    seq_len = 40
    ids, mask = batch([40, 23, 3, 2, 1, 0, 17, 40], seq_len)
    ids[6, 3:15] = MASK  # few candidates left in a row: only real tokens that are not special count
    ids[7, 5] = 60       # ids outside `special` are candidates whatever their value
    for replacement in (False, True):
        for n in (None, 1, 40):
            masked, positions, weights = run(backend, ids, mask, mask_prob=0.3, replacement=replacement,
                                             max_predictions=n)
            assert positions.dtype == torch.int64 and weights.dtype == torch.float32 and masked.dtype == ids.dtype
            check_rows(ids.cpu(), mask.cpu(), masked, positions, weights, 0.3, set(SPECIAL), replacement)


@pytest.mark.parametrize("backend", BACKENDS)
def test_input_dtypes_and_specials(poison, backend):
    ids, mask = batch([9, 12, 5], 13)
    for id_dtype, mask_dtype, special in [(torch.int32, torch.bool, [CLS, SEP]), (torch.int64, torch.float32, []),
                                          (torch.int32, torch.int64, torch.tensor(SPECIAL))]:
        ids_t, mask_t = ids.to(id_dtype), mask.to(mask_dtype)
        masked, positions, weights = run(backend, ids_t, mask_t, mask_prob=0.4, special_token_ids=special)
        spec = set(special.tolist() if isinstance(special, torch.Tensor) else special)
        check_rows(ids.cpu(), mask.cpu(), masked.long(), positions, weights, 0.4, spec)
    masked, positions, weights = run(backend, ids[:0], mask[:0])
    assert masked.shape == (0, 13) and positions.shape == weights.shape == (0, ops.num_slots(13, 0.15))
    ids, mask = batch([20] * 3, 20)
    _, positions, weights = run(backend, ids, mask, mask_prob=0.5, special_token_ids=torch.tensor(SPECIAL),
                                max_predictions=4)
    assert positions.shape == (3, 4) and weights.sum(1).eq(4).all()  # round(20 * 0.5) = 10 capped at 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_uniform_positions_and_mask_fraction(poison, backend):
    """Positions uniform over the candidates (chi-square), [MASK] on 85% of the chosen slots (binomial bound)."""
    rows, seq_len = 300, 24
    ids, mask = batch([seq_len] * rows, seq_len)  # candidates: positions 1..22
    masked, positions, weights = run(backend, ids, mask, mask_prob=0.4, max_predictions=12)  # K = 10 of 22
    check_rows(ids[:3].cpu(), mask[:3].cpu(), masked[:3], positions[:3], weights[:3], 0.4, set(SPECIAL))
    assert weights.sum(1).eq(10).all()
    real = weights > 0
    counts = torch.bincount(positions[real], minlength=seq_len)
    assert counts[0] == 0 and counts[-1] == 0
    counts = counts[1:-1].double()
    expected = real.sum() / 22
    assert ((counts - expected) ** 2 / expected).sum() < chi2_critical(21)
    became = (masked.gather(1, positions) == MASK)[real].double()
    total = became.numel()
    assert abs(became.mean() - 0.85) < 4 * math.sqrt(0.85 * 0.15 / total), became.mean()
    # Every chosen subset size is exact and each row's subset differs (a fixed pattern would pass the marginals).
    assert len({tuple(p) for p in positions.tolist()}) > rows * 0.9


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_masks(backend):
    ids, mask = batch([20, 14, 7], 20)
    for replacement in (False, True):
        kw = dict(mask_prob=0.3, replacement=replacement)
        torch.manual_seed(5)
        a = run(backend, ids, mask, **kw)
        torch.manual_seed(5)
        b = run(backend, ids, mask, **kw)
        c = run(backend, ids, mask, generator=torch.Generator(DEVICE).manual_seed(5), **kw)
        d = run(backend, ids, mask, generator=torch.Generator(DEVICE).manual_seed(5), **kw)
        assert all(torch.equal(x, y) for x, y in zip(a, b)) and all(torch.equal(x, y) for x, y in zip(c, d))
        assert not all(torch.equal(x, y) for x, y in zip(a, run(backend, ids, mask, **kw)))


# ---------------------------------------------------------------- with replacement (the reference's draw)

@pytest.mark.parametrize("backend", BACKENDS)
def test_replacement_draws_as_the_reference(poison, backend):
    """K i.i.d. uniform draws among C candidates: the number of distinct positions has mean
    C * (1 - (1 - 1/C)^K) (the reference's duplicates), every draw is uniform (chi-square), and a position drawn c
    times is [MASK] with probability 1 - 0.15^c (the reference's scatter: any masked slot masks it)."""
    rows, seq_len, c = 400, 12, 10      # candidates 1..10
    ids, mask = batch([seq_len] * rows, seq_len)
    masked, positions, weights = run(backend, ids, mask, mask_prob=0.5, max_predictions=8, replacement=True)
    check_rows(ids[:3].cpu(), mask[:3].cpu(), masked[:3], positions[:3], weights[:3], 0.5, set(SPECIAL), True)
    k = 6                               # round(12 * 0.5)
    assert weights.sum(1).eq(k).all() and positions[:, k:].eq(0).all()
    drawn = positions[:, :k]
    distinct = torch.tensor([len(set(p)) for p in drawn.tolist()], dtype=torch.float64)
    mean = c * (1 - (1 - 1 / c) ** k)
    assert abs(distinct.mean() - mean) < 4 * distinct.std() / math.sqrt(rows), (distinct.mean(), mean)
    assert (distinct < k).any()         # duplicates happen (P(all distinct) = 0.15 per row)
    counts = torch.bincount(drawn.flatten(), minlength=seq_len)
    assert counts[0] == 0 and counts[-1] == 0
    counts = counts[1:-1].double()
    expected = rows * k / c
    assert ((counts - expected) ** 2 / expected).sum() < chi2_critical(c - 1)
    mult = torch.zeros(rows, seq_len).scatter_add_(1, drawn, torch.ones(rows, k))  # draws per position
    hit = mult > 0
    became = (masked == MASK)[hit].double()
    p = (1 - 0.15 ** mult[hit].double())
    assert abs(became.sum() - p.sum()) < 4 * math.sqrt((p * (1 - p)).sum()), (became.sum(), p.sum())


@pytest.mark.parametrize("backend", BACKENDS)
def test_replacement_draws_more_slots_than_candidates(poison, backend):
    ids, mask = batch([16, 16], 16)
    ids[0, 4:] = SEP  # row 0: candidates 1, 2, 3; K = round(16 * 0.5) = 8 draws regardless, as the reference
    ids[1, 1:15] = MASK  # row 1: none
    masked, positions, weights = run(backend, ids, mask, mask_prob=0.5, replacement=True)
    assert weights[0].sum() == 8 and set(positions[0].tolist()) <= {1, 2, 3}
    assert weights[1].sum() == 0 and positions[1].eq(0).all() and torch.equal(masked[1], ids[1].cpu())


# ---------------------------------------------------------------- registration, compile, errors

@pytest.mark.parametrize("backend", BACKENDS)
def test_compiles_fullgraph_and_matches_eager(backend):
    torch._dynamo.reset()
    ids, mask = batch([16, 11, 5], 16)

    def step(ids, mask):
        masked, positions, weights = ops.mask_tokens(ids, mask, mask_prob=0.3, mask_token_id=MASK,
                                                     special_token_ids=SPECIAL, backend=backend)
        return masked, positions, weights, (masked == MASK).sum()

    compiled = torch.compile(step, fullgraph=True)
    with torch._inductor.config.patch(fallback_random=True):  # the compiled RNG draws eager's stream
        torch.manual_seed(3)
        eager = step(ids, mask)
        torch.manual_seed(3)
        comp = compiled(ids, mask)
    assert all(torch.equal(x, y) for x, y in zip(eager, comp))
    check_rows(ids.cpu(), mask.cpu(), *[t.cpu() for t in comp[:3]], 0.3, set(SPECIAL))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    ids, mask = batch([10, 6], 10)
    n = ops.num_slots(10, 0.3)
    special = torch.tensor(SPECIAL, device=DEVICE)
    if backend == "torch":
        from electra_fast.ops.mask_tokens import _mask_tokens_op

        for replacement, draws in ((False, 10), (True, n)):
            args = (ids, mask, special, torch.rand(2, draws, device=DEVICE), torch.rand(2, n, device=DEVICE), 0.3,
                    MASK, replacement)
            torch.library.opcheck(_mask_tokens_op, args)
        return
    from electra_fast.kernels.mask_tokens import _mask_tokens_op as kernel_op

    seed = torch.tensor([12345], device=DEVICE)
    for replacement in (False, True):
        torch.library.opcheck(kernel_op, (ids, mask, special, seed, 0.3, MASK, n, replacement))


def call_mask(ids=None, mask=None, **kw):
    kw = dict(dict(mask_token_id=3, special_token_ids=SPECIAL), **kw)
    return ops.mask_tokens(torch.randint(4, 9, (2, 10)) if ids is None else ids, mask, **kw)


BAD_INPUTS = [  # (call, error type, words the message must hold: the argument, what it expects, what it got)
    (lambda: ops.mask_tokens(torch.zeros(3, dtype=torch.long), mask_token_id=3, special_token_ids=[]),
     ValueError, ["input_ids", "2 dimensions", "(3,)"]),
    (lambda: ops.mask_tokens(torch.zeros(2, 3), mask_token_id=3, special_token_ids=[]),
     TypeError, ["input_ids", "int64", "float32"]),
    (lambda: ops.mask_tokens(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4), mask_token_id=3,
                             special_token_ids=[]), ValueError, ["attention_mask", "(2, 3)", "(2, 4)"]),
    (lambda: ops.mask_tokens(torch.zeros(2, 3, dtype=torch.long), mask_prob=1.0, mask_token_id=3,
                             special_token_ids=[]), ValueError, ["mask_prob", "(0, 1)", "1.0"]),
    (lambda: ops.mask_tokens(torch.zeros(2, 3, dtype=torch.long), mask_token_id=3, special_token_ids=[],
                             max_predictions=9), ValueError, ["max_predictions", "[1, 3]", "9"]),
    (lambda: call_mask(ids=torch.ones(2, 0, dtype=torch.long)), ValueError, ["input_ids"]),
    (lambda: call_mask(mask=torch.ones(2, 10, device="meta")), ValueError, ["attention_mask"]),
    (lambda: call_mask(mask_prob=0.0), ValueError, ["mask_prob"]),
    (lambda: call_mask(mask_prob=float("nan")), ValueError, ["mask_prob"]),
    (lambda: call_mask(mask_prob=True), ValueError, ["mask_prob"]),
    (lambda: call_mask(mask_token_id=-1), TypeError, ["mask_token_id"]),
    (lambda: call_mask(mask_token_id=3.0), TypeError, ["mask_token_id"]),
    (lambda: call_mask(max_predictions=0), ValueError, ["max_predictions"]),
]


@pytest.mark.parametrize("call, exc, words", BAD_INPUTS)
def test_bad_input_errors_name_the_argument(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    for word in words:
        assert word in str(info.value), (word, str(info.value))
