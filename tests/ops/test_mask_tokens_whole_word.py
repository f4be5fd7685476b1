"""`ops.mask_tokens(..., word_starts=...)`, whole-word masking (docs/algorithm.md#whole-word-masking), on every
backend: the reference against a numpy oracle of the literal walk of BERT's create_pretraining_data.py (shuffle the
candidate words, walk them, skip a word that overflows K_b) fed the same uniform scores; the chosen word sets of both
backends against exact enumeration of every order of that walk (chi-square, and the same test rejects a walk that
stops at the first overflow); the rules every output row follows; [MASK] on 85% of the chosen tokens; compile,
opcheck and bad arguments.
"""
import itertools
import math
import os
from collections import Counter

import numpy as np
import pytest
import torch
import torch._dynamo
import torch._inductor.config

from electra_fast import ops
from electra_fast.ops.mask_tokens import mask_tokens_reference
from helpers import chi2_critical

PAD, CLS, SEP, MASK = 0, 1, 2, 3
SPECIAL = (PAD, CLS, SEP, MASK)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

pytestmark = pytest.mark.triton  # on a GPU the Triton parameters run compiled (validate_gpu's `--rest`)
HAVE_TRITON = INTERPRET or torch.cuda.is_available()
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not HAVE_TRITON, reason="the Triton backend needs a CUDA GPU or TRITON_INTERPRET=1"))]


# ---------------------------------------------------------------- the oracle: BERT's walk, literally, in numpy

def words_of(starts, cand=None) -> list:
    """[(first, last)] column ranges: a start and the non-starts after it; leading non-starts form a word at 0.
    Given the candidates, a non-candidate is a word of its own and the token after it begins one."""
    if cand is not None:
        starts = [s or not cand[c] or (c > 0 and not cand[c - 1]) for c, s in enumerate(starts)]
    firsts = [0] + [c for c in range(1, len(starts)) if starts[c]]
    return [(a, b - 1) for a, b in zip(firsts, firsts[1:] + [len(starts)])]


def num_to_predict(n_real: int, mask_prob: float, n: int) -> int:
    """pretrain_helpers.py::mask: max(1, min(N, round(n_real * mask_prob))) in float32, half to even."""
    return int(max(1, min(n, np.round(np.float32(n_real) * np.float32(mask_prob)))))


def walk(lengths, order, k) -> list:
    """create_pretraining_data.py::create_masked_lm_predictions: words in `order`, a word that would overflow
    `k` skipped (`continue`), the walk over once `k` tokens are taken."""
    taken, total = [], 0
    for w in order:
        if total >= k:
            break
        if total + lengths[w] > k:
            continue
        taken.append(w)
        total += lengths[w]
    return taken


def walk_without_skipping(lengths, order, k) -> list:
    """A wrong process for the distribution test to reject: it stops at the first word that does not fit."""
    taken, total = [], 0
    for w in order:
        if total + lengths[w] > k:
            break
        taken.append(w)
        total += lengths[w]
    return taken


def oracle(ids, mask, starts, special, scores, keep, mask_prob, n):
    """Whole-word masking row by row: the candidate words shuffled by their start column's score (ties: the earlier
    word first), the walk, the chosen tokens ascending in the first slots, [MASK] where the slot's keep draw < 0.85."""
    ids, mask, starts, scores, keep = (np.asarray(t) for t in (ids, mask, starts, scores, keep))
    b, seq_len = ids.shape
    masked, positions, weights = ids.copy(), np.zeros((b, n), np.int64), np.zeros((b, n), np.float32)
    for r in range(b):
        cand = [bool(mask[r, c] != 0) and int(ids[r, c]) not in special for c in range(seq_len)]
        words = [w for w in words_of(starts[r].tolist(), cand) if all(cand[w[0]:w[1] + 1])]
        order = sorted(range(len(words)), key=lambda i: (scores[r, words[i][0]], words[i][0]))
        k = num_to_predict(int((mask[r] != 0).sum()), mask_prob, n)
        chosen = sorted(c for i in walk([b_ - a + 1 for a, b_ in words], order, k)
                        for c in range(words[i][0], words[i][1] + 1))
        positions[r, :len(chosen)] = chosen
        weights[r, :len(chosen)] = 1
        for j, c in enumerate(chosen):
            if keep[r, j] < np.float32(0.85):
                masked[r, c] = MASK
    return masked, positions, weights


def random_batch(g, b, seq_len, vocab=9):
    """Ragged rows with specials inside words, random word starts (also on padding) and every mask dtype."""
    ids = torch.randint(0, vocab, (b, seq_len), generator=g)
    lengths = torch.randint(0, seq_len + 1, (b, 1), generator=g)
    mask = torch.arange(seq_len) < lengths
    starts = torch.rand(b, seq_len, generator=g) < torch.rand(b, 1, generator=g)
    return ids, mask, starts


def run(backend, ids, mask, starts, **kw):
    kw = dict(dict(mask_prob=0.3, mask_token_id=MASK, special_token_ids=SPECIAL), **kw)
    out = ops.mask_tokens(ids.to(DEVICE), None if mask is None else mask.to(DEVICE), word_starts=starts.to(DEVICE),
                          backend=backend, **kw)
    return [t.cpu() for t in out]


# ---------------------------------------------------------------- the reference against the oracle, exactly

@pytest.mark.parametrize("seq_len", [1, 5, 16, 33])
@pytest.mark.parametrize("tied", [False, True], ids=["scores", "tied_scores"])
def test_reference_is_the_walk(seq_len, tied):
    """Same uniform scores and keep draws into both; with tied scores (quarters) the earlier word goes first."""
    g = torch.Generator().manual_seed(seq_len * 2 + tied)
    for mask_prob, n in ((0.15, None), (0.4, None), (0.6, seq_len), (0.3, 1)):
        n = n or ops.num_slots(seq_len, mask_prob)
        ids, mask, starts = random_batch(g, 60, seq_len)
        scores = torch.rand(60, seq_len, generator=g)
        if tied:
            scores = torch.randint(0, 4, (60, seq_len), generator=g).float() / 4
        keep = torch.rand(60, n, generator=g)
        got = mask_tokens_reference(ids, mask.long(), torch.tensor(SPECIAL), scores, keep, mask_prob, MASK, False,
                                    starts)
        want = oracle(ids, mask, starts, set(SPECIAL), scores, keep, mask_prob, n)
        for x, y in zip(got, want):
            np.testing.assert_array_equal(x.numpy(), y)


def test_public_op_feeds_the_reference_its_documented_draws():
    """docs/contracts.md#mask_tokens: `[B, L]` scores, then `[B, N]` keep draws, from the op's generator."""
    g = torch.Generator().manual_seed(4)
    ids, mask, starts = random_batch(g, 20, 24)
    n = ops.num_slots(24, 0.3)
    got = ops.mask_tokens(ids, mask, mask_prob=0.3, mask_token_id=MASK, special_token_ids=SPECIAL,
                          word_starts=starts, generator=torch.Generator().manual_seed(9), backend="torch")
    again = torch.Generator().manual_seed(9)
    scores, keep = torch.rand(20, 24, generator=again), torch.rand(20, n, generator=again)
    for x, y in zip(got, oracle(ids, mask, starts, set(SPECIAL), scores, keep, 0.3, n)):
        np.testing.assert_array_equal(x.numpy(), y)


# ---------------------------------------------------------------- rules every row follows, on every backend

def check_rows(ids, mask, starts, masked, positions, weights, mask_prob, special=frozenset(SPECIAL)):
    """From the inputs alone: the real slots (weight 1) first, ascending, whole candidate words only, and a fill
    some order of the walk gives: every candidate word left out is longer than the capacity left (then the walk
    in the order "chosen words first" takes exactly these). Unchosen tokens kept, chosen ones kept or [MASK]."""
    b, seq_len = ids.shape
    n = positions.shape[1]
    fills = []
    for r in range(b):
        cand = [bool(mask[r, c] != 0) and int(ids[r, c]) not in special for c in range(seq_len)]
        words = [w for w in words_of(starts[r].tolist(), cand) if all(cand[w[0]:w[1] + 1])]
        k = num_to_predict(int((mask[r] != 0).sum()), mask_prob, n)
        fill = int(weights[r].sum())
        assert weights[r, :fill].eq(1).all() and weights[r, fill:].eq(0).all(), (r, weights[r])
        assert positions[r, fill:].eq(0).all(), (r, positions[r])
        chosen = positions[r, :fill].tolist()
        assert chosen == sorted(set(chosen)), (r, chosen)
        inside = [w for w in words if w[0] in chosen]
        assert chosen == [c for a, e in inside for c in range(a, e + 1)], (r, chosen, words)  # whole words only
        assert fill <= k and all(e - a + 1 > k - fill for a, e in words if (a, e) not in inside), (r, k, fill)
        for c in range(seq_len):
            assert masked[r, c] == ids[r, c] or (c in chosen and masked[r, c] == MASK), (r, c)
        fills.append(fill)
    return fills


@pytest.mark.parametrize("backend", BACKENDS)
def test_rules_on_random_rows(poison, backend):
    g = torch.Generator().manual_seed(1)
    for seq_len, mask_prob, n in ((1, 0.5, None), (7, 0.3, None), (19, 0.45, 19), (40, 0.15, None), (40, 0.3, 2)):
        ids, mask, starts = random_batch(g, 24, seq_len)
        for id_dtype, mask_dtype in ((torch.int64, torch.bool), (torch.int32, torch.float32)):
            masked, positions, weights = run(backend, ids.to(id_dtype), mask.to(mask_dtype), starts,
                                             mask_prob=mask_prob, max_predictions=n)
            assert masked.dtype == id_dtype and positions.dtype == torch.int64 and weights.dtype == torch.float32
            assert positions.shape == weights.shape == (24, n or ops.num_slots(seq_len, mask_prob))
            check_rows(ids, mask, starts, masked.long(), positions, weights, mask_prob)


@pytest.mark.parametrize("backend", BACKENDS)
def test_words_that_never_fit_or_meet_a_special(poison, backend):
    """Row 0: a continuation piece right after [CLS] begins a word (the special is a word of its own). Row 1: every
    word longer than K_b = 2: nothing drawn, nothing masked. Row 2: padding marked as a continuation still ends the
    word before it. Row 3: no word starts at all: [CLS], one word of 6 (too long) and [SEP]: nothing drawn."""
    t, f = True, False
    ids = torch.tensor([[CLS, 5, 6, 7, 8, 9, SEP, PAD], [5, 6, 7, 8, 9, 10, 11, 12],
                        [CLS, 5, 6, 7, 8, PAD, PAD, PAD], [CLS, 5, 6, 7, 8, 9, 10, SEP]])
    mask = torch.tensor([[1] * 7 + [0], [1] * 8, [1] * 5 + [0] * 3, [1] * 8])
    starts = torch.tensor([[f, f, t, t, f, t, t, t], [t, f, f, t, f, f, f, f],
                           [t, t, f, t, f, f, f, f], [f] * 8])
    masked, positions, weights = run(backend, ids, mask, starts, mask_prob=0.3, max_predictions=8)
    # K_b = round(7 * 0.3) = 2, round(8 * 0.3) = 2, round(5 * 0.3) = 2, 2.
    assert check_rows(ids, mask, starts, masked, positions, weights, 0.3) == [2, 0, 2, 0]
    assert positions[1].eq(0).all() and torch.equal(masked[1], ids[1]) and torch.equal(masked[3], ids[3])
    assert set(positions[0, :2].tolist()) <= {1, 2, 3, 4, 5} and positions[2, :2].tolist() in ([1, 2], [3, 4])


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_fraction_per_token(backend):
    """Each chosen token becomes [MASK] with probability 0.85 (binomial, 4 sigma), independently of its word."""
    g = torch.Generator().manual_seed(2)
    ids, mask, starts = random_batch(g, 400, 24)
    ids = torch.randint(4, 30, (400, 24), generator=g)  # no specials: many candidates
    masked, positions, weights = run(backend, ids, None, starts, mask_prob=0.4, max_predictions=12)
    real = weights > 0
    became = (masked.gather(1, positions) == MASK)[real].double()
    assert became.numel() > 2000
    assert abs(became.mean() - 0.85) < 4 * math.sqrt(0.85 * 0.15 / became.numel()), became.mean()
    # Within a word, tokens are masked independently: some chosen words are masked only in part.
    chosen = [set(positions[r][real[r]].tolist()) for r in range(400)]
    partial = [(masked[r, a:e + 1] == MASK).float().mean() for r in range(400)
               for a, e in words_of(starts[r].tolist()) if e > a and a in chosen[r]]
    assert any(0 < p < 1 for p in partial)


# ---------------------------------------------------------------- the chosen word sets, against every order

# [CLS] | 1 | 2 2 | 3 3 3 | 1 | 2 2 | 3 3 3 | [MASK] | [MASK] | [SEP] | [SEP]: six candidate words of lengths 1, 2,
# 3, 1, 2, 3 and specials (never candidates), K_b = round(17 * 0.3) = 5 < 12 tokens: walks skip words.
ROW_LENGTHS = [1, 2, 3, 1, 2, 3]
ROW_IDS = [CLS, 5, 6, 6, 7, 7, 7, 8, 9, 9, 10, 10, 10, MASK, MASK, SEP, SEP]
ROW_STARTS = [1, 1, 1, 0, 1, 0, 0, 1, 1, 0, 1, 0, 0, 1, 0, 1, 1]
WORD_AT = {1: 0, 2: 1, 4: 2, 7: 3, 8: 4, 10: 5}  # start column -> word


def set_distribution(process, lengths, k) -> dict:
    """P(chosen word set) over the len(lengths)! equally likely orders."""
    counts = Counter(frozenset(process(lengths, order, k)) for order in itertools.permutations(range(len(lengths))))
    total = sum(counts.values())
    return {s: c / total for s, c in counts.items()}


def chi_square(observed: Counter, probs: dict, draws: int):
    """Pearson's statistic with expected counts under 5 pooled; infinite when a set of probability 0 is seen."""
    if any(s not in probs for s in observed):
        return math.inf, 1
    stat, df, pool_obs, pool_exp = 0.0, -1, 0, 0.0
    for s, p in probs.items():
        if draws * p < 5:
            pool_obs, pool_exp = pool_obs + observed[s], pool_exp + draws * p
        else:
            stat, df = stat + (observed[s] - draws * p) ** 2 / (draws * p), df + 1
    if pool_exp:
        stat, df = stat + (pool_obs - pool_exp) ** 2 / pool_exp, df + 1
    return stat, df


@pytest.mark.parametrize("backend, draws", [("torch", 40000), pytest.param(
    "triton", 8000 if INTERPRET else 40000, marks=BACKENDS[1].marks)])  # 8000 rows interpreted: ~15 s
def test_word_sets_follow_the_walk_over_uniform_orders(backend, draws):
    ids = torch.tensor([ROW_IDS] * draws)
    starts = torch.tensor([ROW_STARTS] * draws, dtype=torch.bool)
    k = num_to_predict(len(ROW_IDS), 0.3, 6)
    assert k == 5
    torch.manual_seed(11)
    masked, positions, weights = run(backend, ids, None, starts, mask_prob=0.3, max_predictions=6)
    check_rows(ids[:50], torch.ones(50, 17), starts[:50], masked[:50], positions[:50], weights[:50], 0.3)
    observed = Counter(frozenset(WORD_AT[c] for c, w in zip(p, wt) if w > 0 and c in WORD_AT)
                       for p, wt in zip(positions.tolist(), weights.tolist()))
    right = set_distribution(walk, ROW_LENGTHS, k)
    stat, df = chi_square(observed, right, draws)
    assert df >= 8 and stat < chi2_critical(df), (stat, df, observed)
    # The same test tells the walk from one that stops at the first word that overflows.
    wrong = set_distribution(walk_without_skipping, ROW_LENGTHS, k)
    assert wrong != right
    stat, df = chi_square(observed, wrong, draws)
    assert stat > chi2_critical(df), (stat, df)


def test_enumeration_against_a_hand_count():
    """Lengths 1, 2, 3 and K = 3: the walk takes {0, 1} unless word 2 comes first (1/3): {2}."""
    assert set_distribution(walk, [1, 2, 3], 3) == {frozenset({0, 1}): 2 / 3, frozenset({2}): 1 / 3}
    # Without skipping: word 2 after word 0 or 1 ends the walk early.
    assert set_distribution(walk_without_skipping, [1, 2, 3], 3) == {
        frozenset({0, 1}): 2 / 6, frozenset({0}): 1 / 6, frozenset({1}): 1 / 6, frozenset({2}): 2 / 6}


# ---------------------------------------------------------------- compile, opcheck, errors

@pytest.mark.parametrize("backend", BACKENDS)
def test_compiles_fullgraph_and_matches_eager(backend):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(6)
    ids, mask, starts = (t.to(DEVICE) for t in random_batch(g, 5, 16))

    def step(ids, mask, starts):
        out = ops.mask_tokens(ids, mask, mask_prob=0.3, mask_token_id=MASK, special_token_ids=SPECIAL,
                              word_starts=starts, backend=backend)
        return (*out, (out[0] == MASK).sum())

    compiled = torch.compile(step, fullgraph=True)
    with torch._inductor.config.patch(fallback_random=True):  # the compiled RNG draws eager's stream
        torch.manual_seed(3)
        eager = step(ids, mask, starts)
        torch.manual_seed(3)
        comp = compiled(ids, mask, starts)
    assert all(torch.equal(x, y) for x, y in zip(eager, comp))
    check_rows(ids.cpu(), mask.cpu(), starts.cpu(), *[t.cpu() for t in comp[:3]], 0.3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    g = torch.Generator().manual_seed(7)
    ids, mask, starts = (t.to(DEVICE) for t in random_batch(g, 3, 10))
    special, n = torch.tensor(SPECIAL, device=DEVICE), ops.num_slots(10, 0.3)
    if backend == "torch":
        from electra_fast.ops.mask_tokens import _mask_tokens_op
        args = (ids, mask.long(), special, torch.rand(3, 10, device=DEVICE), torch.rand(3, n, device=DEVICE), 0.3,
                MASK, False, starts)
        torch.library.opcheck(_mask_tokens_op, args)
        return
    from electra_fast.kernels.mask_tokens import _mask_tokens_op as kernel_op
    seed = torch.tensor([12345], device=DEVICE)
    torch.library.opcheck(kernel_op, (ids, mask.long(), special, seed, 0.3, MASK, n, False, starts))


def call(starts, **kw):
    return ops.mask_tokens(torch.randint(4, 9, (2, 10)), mask_token_id=MASK, special_token_ids=SPECIAL,
                           word_starts=starts, **kw)


BAD_INPUTS = [  # (call, error type, words the message must hold: the argument, what it expects, what it got)
    (lambda: call(torch.ones(2, 10, dtype=torch.bool), replacement=True), ValueError,
     ["replacement", "False", "word_starts", "True"]),
    (lambda: call(torch.ones(2, 9, dtype=torch.bool)), ValueError, ["word_starts", "(2, 10)", "(2, 9)"]),
    (lambda: call(torch.ones(2, 10, dtype=torch.long)), TypeError, ["word_starts", "bool", "int64"]),
    (lambda: call(torch.ones(20, dtype=torch.bool)), ValueError, ["word_starts", "2 dimensions", "(20,)"]),
    (lambda: call([[True] * 10] * 2), TypeError, ["word_starts", "torch.Tensor", "list"]),
    (lambda: call(torch.ones(2, 10, dtype=torch.bool, device="meta")), ValueError, ["word_starts", "meta", "cpu"]),
]


@pytest.mark.parametrize("bad, exc, words", BAD_INPUTS)
def test_bad_input_errors_name_the_argument(bad, exc, words):
    with pytest.raises(exc) as info:
        bad()
    for word in words:
        assert word in str(info.value), (word, str(info.value))
