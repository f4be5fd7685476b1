"""The PyTorch reference ops against independent naive implementations written here (loops, math),
gradients by gradcheck in float64, every registered op through torch.library.opcheck."""
import math

import pytest
import torch

from electra_fast import ops
from electra_fast.ops.gumbel_sample import _gumbel_sample_op
from electra_fast.ops.mask_tokens import _mask_tokens_op
from electra_fast.ops.masked_gather import _masked_gather_op, _masked_scatter_add_op
from electra_fast.ops.mlm_loss_and_sample import _mlm_backward_op, _mlm_op
from electra_fast.ops.replace_tokens import _replace_tokens_op
from electra_fast.ops.rtd_bce_loss import _rtd_bce_op
from helpers import chi2_critical

PAD, CLS, SEP, MASK = 0, 1, 2, 3
SPECIAL = (PAD, CLS, SEP, MASK)


def make_batch(b=6, seq_len=40, vocab=50, lengths=None):
    """[CLS] tokens [SEP] [PAD]...; lengths per row (real tokens incl. specials)."""
    lengths = lengths or [int(x) for x in torch.randint(3, seq_len + 1, (b,))]
    ids = torch.full((b, seq_len), PAD, dtype=torch.int64)
    mask = torch.zeros((b, seq_len), dtype=torch.int64)
    for r, n in enumerate(lengths):
        ids[r, :n] = torch.randint(4, vocab, (n,))
        ids[r, 0], ids[r, n - 1] = CLS, SEP
        mask[r, :n] = 1
    return ids, mask


# ---------------------------------------------------------------- mask_tokens

def test_mask_tokens_slot_counts_and_rules():
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


def test_mask_tokens_mask_fraction_and_uniform_positions():
    ids, am = make_batch(b=400, seq_len=32, lengths=[32] * 400)
    masked, pos, w = ops.mask_tokens(ids, am, mask_prob=0.15, mask_token_id=MASK, special_token_ids=SPECIAL)
    real = w > 0
    became_mask = masked.gather(1, pos) == MASK
    frac = became_mask[real].float().mean().item()
    total = real.sum().item()
    assert abs(frac - 0.85) < 4 * math.sqrt(0.85 * 0.15 / total), frac
    # Uniform among the 30 candidates (positions 1..30): chi-square on the position counts.
    counts = torch.bincount(pos[real], minlength=32)[1:31].double()
    expected = total / 30
    assert ((counts - expected) ** 2 / expected).sum() < chi2_critical(29)


def test_mask_tokens_reproducible_and_generator():
    ids, am = make_batch()
    kw = dict(mask_prob=0.2, mask_token_id=MASK, special_token_ids=SPECIAL)
    torch.manual_seed(7)
    a = ops.mask_tokens(ids, am, **kw)
    torch.manual_seed(7)
    b = ops.mask_tokens(ids, am, **kw)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    c, d = ops.mask_tokens(ids, am, generator=g1, **kw), ops.mask_tokens(ids, am, generator=g2, **kw)
    for x, y in [(a, b), (c, d)]:
        for u, v in zip(x, y):
            assert torch.equal(u, v)
    assert not all(torch.equal(u, v) for u, v in zip(a, ops.mask_tokens(ids, am, **kw)))


def test_mask_tokens_max_predictions_and_special_tensor():
    ids, am = make_batch(b=3, seq_len=20, lengths=[20, 20, 20])
    _, pos, w = ops.mask_tokens(ids, am, mask_prob=0.5, mask_token_id=MASK,
                                special_token_ids=torch.tensor(SPECIAL), max_predictions=4)
    assert pos.shape == (3, 4) and w.sum(1).eq(4).all()  # round(20 * 0.5) = 10 capped at 4


# ---------------------------------------------------------------- masked_gather

def test_masked_gather_matches_loops_and_grad():
    b, seq_len, h, n = 3, 9, 5, 4
    hidden = torch.randn(b, seq_len, h, dtype=torch.float64, requires_grad=True)
    pos = torch.stack([torch.randperm(seq_len)[:n] for _ in range(b)])
    pos[1, 3] = pos[1, 2]  # repeated positions accumulate in the backward
    out = ops.masked_gather(hidden, pos)
    for i in range(b):
        for j in range(n):
            assert torch.equal(out[i, j], hidden[i, pos[i, j]])
    g = torch.randn_like(out)
    out.backward(g)
    expected = torch.zeros(b, seq_len, h, dtype=torch.float64)
    for i in range(b):
        for j in range(n):
            expected[i, pos[i, j]] += g[i, j]
    assert torch.allclose(hidden.grad, expected)
    assert torch.autograd.gradcheck(lambda x: ops.masked_gather(x, pos), (hidden.detach().requires_grad_(),))


# ---------------------------------------------------------------- mlm_loss_and_sample

def naive_mlm(logits, targets, weights):
    total, wsum, correct = 0.0, 0.0, []
    for r in range(logits.shape[0]):
        row = [float(v) for v in logits[r]]
        mx = max(row)
        lse = mx + math.log(sum(math.exp(v - mx) for v in row))
        total += float(weights[r]) * (lse - row[int(targets[r])])
        wsum += float(weights[r])
        correct.append(row.index(mx) == int(targets[r]))
    return total / (wsum + 1e-6), correct


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_mlm_loss_matches_naive(dtype):
    m, v = 11, 37
    logits = (torch.randn(m, v) * 3).to(dtype)
    targets = torch.randint(0, v, (m,))
    weights = (torch.rand(m) > 0.3).float()
    loss, sampled, correct = ops.mlm_loss_and_sample(logits, targets, weights)
    ref_loss, ref_correct = naive_mlm(logits.double(), targets, weights)
    assert loss.dtype == torch.float32 and abs(loss.item() - ref_loss) < 1e-5 * max(1, abs(ref_loss))
    assert correct.tolist() == ref_correct
    assert sampled.dtype == torch.int64 and sampled.shape == (m,) and ((0 <= sampled) & (sampled < v)).all()


def test_mlm_loss_gradient():
    m, v = 7, 13
    logits = torch.randn(m, v, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, v, (m,))
    weights = torch.rand(m, dtype=torch.float64)
    loss = ops.mlm_loss_and_sample(logits, targets, weights)[0]
    (grad,) = torch.autograd.grad(loss * 2.5, logits)
    ce = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    expected = torch.autograd.grad((weights * ce).sum() / (weights.sum() + 1e-6) * 2.5, logits)[0]
    assert torch.allclose(grad, expected, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: ops.mlm_loss_and_sample(x, targets, weights)[0], (logits,))


def test_mlm_sample_is_gumbel_max_of_torch_uniforms():
    m, v = 9, 21
    logits = torch.randn(m, v)
    targets = torch.randint(0, v, (m,))
    g = torch.Generator().manual_seed(11)
    _, sampled, _ = ops.mlm_loss_and_sample(logits, targets, torch.ones(m), temperature=0.5, generator=g)
    u = torch.rand((m, v), generator=torch.Generator().manual_seed(11))
    for r in range(m):
        scores = [float(logits[r, c]) / 0.5 - math.log(-math.log(float(u[r, c]))) for c in range(v)]
        assert int(sampled[r]) == scores.index(max(scores))


def test_mlm_disallow_correct_and_zero_weights():
    m, v = 64, 5
    targets = torch.randint(0, v, (m,))
    logits = torch.full((m, v), -4.0).scatter(1, targets[:, None], 6.0).requires_grad_()
    loss, sampled, correct = ops.mlm_loss_and_sample(logits, targets, torch.zeros(m), disallow_correct=True)
    assert not (sampled == targets).any() and correct.all()
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_mlm_padded_vocabulary_is_never_read(dtype):
    # Columns >= V hold +1e4: any leak into the loss, argmax, sampler or gradient shows.
    m, v, width = 9, 21, 32
    real = torch.randn(m, v, dtype=torch.float64) * 3
    logits = torch.cat([real, torch.full((m, width - v), 1e4, dtype=torch.float64)], 1).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (m,))
    weights = torch.rand(m, dtype=torch.float64)
    loss, sampled, correct = ops.mlm_loss_and_sample(logits, targets, weights, temperature=0.7, vocab_size=v,
                                                     generator=torch.Generator().manual_seed(3))
    ref_loss, ref_correct = naive_mlm(logits[:, :v].detach().double(), targets, weights)
    assert abs(loss.item() - ref_loss) < 1e-6 * max(1, abs(ref_loss))
    assert correct.tolist() == ref_correct
    # The same draws as the unpadded logits: the uniforms are [M, V] and the padding takes none.
    unpadded = ops.mlm_loss_and_sample(logits[:, :v].detach().contiguous(), targets, weights, temperature=0.7,
                                       generator=torch.Generator().manual_seed(3))[1]
    assert torch.equal(sampled, unpadded)
    (grad,) = torch.autograd.grad(loss * 1.5, logits)
    assert grad.dtype == dtype and torch.equal(grad[:, v:], torch.zeros_like(grad[:, v:]))
    x = logits[:, :v].detach().double().requires_grad_()
    ce = torch.nn.functional.cross_entropy(x, targets, reduction="none")
    (expected,) = torch.autograd.grad((weights * ce).sum() / (weights.sum() + 1e-6) * 1.5, x)
    torch.testing.assert_close(grad[:, :v].double(), expected, **({} if dtype == torch.float64 else
                                                                   dict(rtol=1e-2, atol=1e-4)))
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(
            lambda x: ops.mlm_loss_and_sample(x, targets, weights, vocab_size=v)[0],
            (torch.cat([real, torch.randn(m, width - v, dtype=torch.float64)], 1).requires_grad_(),))


# ---------------------------------------------------------------- gumbel_sample

@pytest.mark.parametrize("temperature", [1.0, 0.6, 2.5])
def test_gumbel_sample_distribution(temperature):
    v, draws = 6, 6000
    base = torch.tensor([1.5, 0.2, -1.0, 0.7, 0.0, 2.0])
    logits = base.expand(draws, v).to(torch.float16)  # fp16 logits: sampling still runs in fp32
    ids = ops.gumbel_sample(logits, temperature=temperature)
    counts = torch.bincount(ids, minlength=v).double()
    expected = torch.softmax(logits[0].double() / temperature, 0) * draws
    assert ((counts - expected) ** 2 / expected).sum() < chi2_critical(v - 1)


def test_gumbel_sample_disallow():
    v, draws = 5, 5000
    logits = torch.tensor([0.3, 1.0, -0.5, 0.8, 0.1]).expand(draws, v)
    disallow = torch.where(torch.arange(draws) % 2 == 0, 1, -1)
    ids = ops.gumbel_sample(logits, disallow=disallow)
    assert not (ids[::2] == 1).any()
    counts = torch.bincount(ids[::2], minlength=v).double()[[0, 2, 3, 4]]
    p = torch.softmax(logits[0, [0, 2, 3, 4]].double(), 0) * (draws // 2)
    assert ((counts - p) ** 2 / p).sum() < chi2_critical(3)
    assert (ids[1::2] == 1).any()  # rows with a negative id disallow nothing


def test_gumbel_sample_padded_vocabulary_is_never_drawn():
    m, v, width = 200, 7, 16
    real = torch.randn(m, v)
    logits = torch.cat([real, torch.full((m, width - v), 1e4)], 1)
    disallow = torch.randint(-1, v, (m,))
    ids = ops.gumbel_sample(logits, temperature=1.3, disallow=disallow, vocab_size=v,
                            generator=torch.Generator().manual_seed(5))
    same = ops.gumbel_sample(real, temperature=1.3, disallow=disallow, generator=torch.Generator().manual_seed(5))
    assert torch.equal(ids, same) and (ids < v).all() and not (ids == disallow).any()


# ---------------------------------------------------------------- replace_tokens

def test_replace_tokens_matches_loops():
    ids, am = make_batch(b=5, seq_len=30, vocab=12)
    _, pos, w = ops.mask_tokens(ids, am, mask_prob=0.3, mask_token_id=MASK, special_token_ids=SPECIAL)
    sampled = torch.randint(4, 12, pos.shape)
    sampled[0, 0] = ids[0, pos[0, 0]]  # a sample equal to the original is labelled 0
    disc, labels = ops.replace_tokens(ids, pos, w, sampled.flatten())
    exp = ids.clone()
    for r in range(5):
        for j in range(pos.shape[1]):
            if w[r, j] > 0:
                exp[r, pos[r, j]] = sampled[r, j]
    assert torch.equal(disc, exp)
    assert labels.dtype == torch.bool and torch.equal(labels, exp != ids)
    assert not labels[0, pos[0, 0]]


# ---------------------------------------------------------------- rtd_bce_loss

def naive_bce(logits, labels, mask):
    total, count = 0.0, 0
    for x, y, m in zip(logits.flatten().tolist(), labels.flatten().tolist(), mask.flatten().tolist()):
        if m:
            p = 1 / (1 + math.exp(-x))
            total += -(y * math.log(p) + (1 - y) * math.log(1 - p))
            count += 1
    return total / max(count, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rtd_bce_matches_naive(dtype):
    logits = (torch.randn(4, 10) * 4).to(dtype)
    labels = torch.rand(4, 10) > 0.8
    mask = torch.rand(4, 10) > 0.2
    loss = ops.rtd_bce_loss(logits, labels, mask)
    assert abs(loss.item() - naive_bce(logits.double(), labels.double(), mask)) < 1e-5


def test_rtd_bce_gradient_and_all_padding():
    logits = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    labels = (torch.rand(3, 8) > 0.5).double()
    mask = (torch.rand(3, 8) > 0.3).long()
    assert torch.autograd.gradcheck(lambda x: ops.rtd_bce_loss(x, labels, mask), (logits,))
    ref = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    ref = (ref * mask).sum() / mask.sum()
    assert torch.allclose(ops.rtd_bce_loss(logits, labels, mask), ref)
    empty = ops.rtd_bce_loss(logits, labels, torch.zeros_like(mask))
    (g,) = torch.autograd.grad(empty, logits)
    assert empty.item() == 0.0 and g.abs().max() == 0


# ---------------------------------------------------------------- registration, errors, backends

def test_opcheck_every_registered_op():
    b, seq_len, h, m, v = 2, 10, 4, 6, 9
    ids, am = make_batch(b=b, seq_len=seq_len, vocab=v)
    n = ops.num_slots(seq_len, 0.3)
    pos = torch.stack([torch.randperm(seq_len)[:n] for _ in range(b)])
    w = (torch.rand(b, n) > 0.3).float()
    logits = torch.randn(m, v, requires_grad=True)
    targets = torch.randint(0, v, (m,))
    cases = [
        (_mask_tokens_op, (ids, am, torch.tensor(SPECIAL), torch.rand(b, seq_len), torch.rand(b, n), 0.3, MASK, False)),
        (_masked_gather_op, (torch.randn(b, seq_len, h, requires_grad=True), pos)),
        (_masked_scatter_add_op, (torch.randn(b, n, h), pos, seq_len)),
        (_mlm_op, (logits, targets, torch.rand(m), torch.rand(m, v), 0.8, True, v)),
        (_mlm_op, (logits, targets.clamp(max=v - 3), torch.rand(m), torch.rand(m, v - 2), 1.0, False, v - 2)),
        (_mlm_backward_op, (torch.tensor(1.0), logits.detach(), targets, torch.rand(m), torch.randn(m), v)),
        (_mlm_backward_op, (torch.tensor(1.0), logits.detach(), targets.clamp(max=v - 3), torch.rand(m),
                            torch.randn(m), v - 2)),
        (_gumbel_sample_op, (logits.detach(), torch.rand(m, v), 1.3, torch.randint(-1, v, (m,)), v)),
        (_gumbel_sample_op, (logits.detach(), torch.rand(m, v - 4), 1.0, None, v - 4)),
        (_replace_tokens_op, (ids, pos, w, torch.randint(0, v, (b, n)))),
        (_rtd_bce_op, (torch.randn(b, seq_len, requires_grad=True), torch.rand(b, seq_len) > 0.5, am)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_edge_cases_are_defined():
    ids = torch.tensor([[CLS, SEP, PAD, PAD], [PAD, PAD, PAD, PAD]])
    am = (ids != PAD).long()
    masked, pos, w = ops.mask_tokens(ids, am, mask_prob=0.5, mask_token_id=MASK, special_token_ids=SPECIAL)
    assert w.sum() == 0 and torch.equal(masked, ids) and pos.eq(0).all()
    logits = torch.randn(pos.numel(), 7, requires_grad=True)
    loss, sampled, _ = ops.mlm_loss_and_sample(logits, ids.gather(1, pos).flatten(), w.flatten())
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(logits.grad).all()
    disc, labels = ops.replace_tokens(ids, pos, w, sampled)
    assert torch.equal(disc, ids) and not labels.any()
    assert ops.rtd_bce_loss(torch.randn(2, 4), labels, am).isfinite()


@pytest.mark.parametrize("call, exc, words", [
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
    (lambda: ops.gumbel_sample(torch.randn(2, 5), temperature=0.0), ValueError, ["temperature", "> 0", "0.0"]),
    (lambda: ops.gumbel_sample(torch.randn(2, 0)), ValueError, ["logits", "vocabulary", "(2, 0)"]),
    (lambda: ops.gumbel_sample(torch.randn(2, 5), disallow=torch.zeros(3, dtype=torch.long)),
     ValueError, ["disallow", "(2,)", "(3,)"]),
    (lambda: ops.mlm_loss_and_sample(torch.randn(4, 5), torch.zeros(3, dtype=torch.long), torch.ones(4)),
     ValueError, ["targets", "(4,)", "(3,)"]),
    (lambda: ops.mlm_loss_and_sample(torch.randn(4, 5), torch.zeros(4), torch.ones(4)),
     TypeError, ["targets", "int64", "float32"]),
    (lambda: ops.mlm_loss_and_sample(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), torch.ones(4),
                                     temperature=-1), ValueError, ["temperature", "-1"]),
    (lambda: ops.mlm_loss_and_sample(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), torch.ones(4),
                                     vocab_size=6), ValueError, ["vocab_size", "[1, 5]", "6"]),
    (lambda: ops.gumbel_sample(torch.randn(4, 5), vocab_size=0), ValueError, ["vocab_size", "[1, 5]", "0"]),
    (lambda: ops.gumbel_sample(torch.randn(4, 5), vocab_size=3.0), ValueError, ["vocab_size", "int", "3.0"]),
    (lambda: ops.masked_gather(torch.randn(2, 5, 3), torch.zeros(3, 2, dtype=torch.long)),
     ValueError, ["positions", "batch size 2", "(3, 2)"]),
    (lambda: ops.masked_gather(torch.randn(2, 5), torch.zeros(2, 2, dtype=torch.long)),
     ValueError, ["hidden", "3 dimensions", "(2, 5)"]),
    (lambda: ops.replace_tokens(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long),
                                torch.ones(2, 2), torch.zeros(5, dtype=torch.long)), ValueError, ["sampled", "4"]),
    (lambda: ops.rtd_bce_loss(torch.randn(2, 5), torch.zeros(2, 4)), ValueError, ["labels", "(2, 5)", "(2, 4)"]),
    (lambda: ops.rtd_bce_loss(torch.randn(2, 5), torch.zeros(2, 5), torch.ones(5)),
     ValueError, ["attention_mask", "(2, 5)", "(5,)"]),
    (lambda: ops.masked_gather(torch.randn(1, 2, 3), torch.zeros(1, 1, dtype=torch.long), backend="gpu"),
     ValueError, ["backend", "gpu"]),
])
def test_bad_input_errors_name_the_argument(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_backend_switch(monkeypatch):
    x, pos = torch.randn(1, 4, 2), torch.zeros(1, 1, dtype=torch.long)
    with pytest.raises(RuntimeError, match="cuda.*CUDA tensors"):
        ops.masked_gather(x, pos, backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="triton.*TRITON_INTERPRET"):
        ops.masked_gather(x, pos, backend="triton")
    assert ops.available_backends("cpu") == ["torch"]
    monkeypatch.setenv("ELECTRA_FAST_BACKEND", "torch")
    assert ops.get_backend() == "torch"
    monkeypatch.setenv("ELECTRA_FAST_BACKEND", "nope")
    with pytest.raises(ValueError, match="ELECTRA_FAST_BACKEND.*nope"):
        ops.masked_gather(x, pos)
    monkeypatch.delenv("ELECTRA_FAST_BACKEND")
    ops.set_backend("torch")
    try:
        assert torch.equal(ops.masked_gather(x, pos), x[:, :1])
    finally:
        ops.set_backend(None)
