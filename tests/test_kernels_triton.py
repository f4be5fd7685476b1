"""The Triton kernels (`electra_fast.kernels`) against the PyTorch reference ops, run in the Triton interpreter
(`TRITON_INTERPRET=1`, CPU tensors) or on a GPU. Tiny shapes, with the kernels' block sizes shrunk so every loop
runs several times and every tail is partial; outputs are allocated poisoned (NaN / -7 / True) so an element a
kernel forgets to write shows. Sampling is checked by chi-square against softmax(logits / T)."""
import importlib
import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton backend cannot run")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# On a GPU these run the Triton kernels compiled (no interpreter): validate_gpu's `--rest` selects them by this marker.
pytestmark = pytest.mark.triton
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("Triton kernels need a CUDA GPU, or TRITON_INTERPRET=1 to run them in the interpreter on the CPU",
                allow_module_level=True)

from electra_fast import ops  # noqa: E402
from helpers import chi2_critical, use_small_tiles  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
K = {name: importlib.import_module(f"electra_fast.kernels.{name}") for name in
     ("mlm_loss_and_sample", "gumbel_sample", "masked_gather", "replace_tokens", "rtd_bce_loss", "rtd_head_loss",
      "varlen_plan")}
MLS = K["mlm_loss_and_sample"]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=2e-3, atol=2e-4)}


def chi2(samples, probs):
    counts = torch.bincount(samples.cpu(), minlength=probs.numel()).double()
    keep = probs > 0
    assert counts[~keep].sum() == 0, "sampled an id of probability 0"
    expected = probs[keep] * samples.numel()
    assert expected.min() >= 5, "too few draws for the chi-square approximation"
    return ((counts[keep] - expected) ** 2 / expected).sum().item(), int(keep.sum()) - 1


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Shrink every tile so the tiny test shapes span several tiles with a partial last one."""
    use_small_tiles(monkeypatch)


def rand(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


# ---------------------------------------------------------------- fused MLM loss + sample

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("temperature, disallow", [(1.0, False), (0.7, True)])
@pytest.mark.parametrize("m, v", [(7, 37), (1, 5)])
def test_mlm_loss_matches_reference(poison, dtype, temperature, disallow, m, v):
    logits = rand(m, v, dtype=dtype, scale=3).requires_grad_()
    targets = torch.randint(0, v, (m,), device=DEVICE)
    weights = (torch.rand(m, device=DEVICE) > 0.3).float()
    weights[0] = 1.0
    kw = dict(temperature=temperature, disallow_correct=disallow)
    loss, sampled, correct = ops.mlm_loss_and_sample(logits, targets, weights, backend="triton", **kw)
    ref_loss, _, ref_correct = ops.mlm_loss_and_sample(logits, targets, weights, backend="torch", **kw)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, ref_loss, **TOL[torch.float32])
    assert correct.dtype == torch.bool and torch.equal(correct, ref_correct)
    assert sampled.dtype == torch.int64 and ((sampled >= 0) & (sampled < v)).all()
    if disallow and v > 1:
        assert not (sampled == targets).any()
    grad_out = torch.tensor(2.5, device=DEVICE)
    (grad,) = torch.autograd.grad(loss, logits, grad_out)
    (ref_grad,) = torch.autograd.grad(ref_loss, logits, grad_out)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad, ref_grad, **TOL[dtype])


def test_mlm_all_weights_zero_writes_everything(poison):
    m, v = 5, 19
    logits = rand(m, v, scale=2).requires_grad_()
    targets = torch.randint(0, v, (m,), device=DEVICE)
    loss, sampled, correct = ops.mlm_loss_and_sample(logits, targets, torch.zeros(m, device=DEVICE), backend="triton")
    assert loss.item() == 0.0
    assert ((sampled >= 0) & (sampled < v)).all()
    assert torch.equal(correct, logits.argmax(1) == targets)
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_mlm_extreme_logits_are_finite():
    # -1e4 / +1e4 spreads: the online log-sum-exp must not overflow; the sample is the dominant id.
    logits = torch.full((3, 21), -1e4, device=DEVICE)
    logits[0, 20], logits[1, 0], logits[2, 9] = 1e4, 50.0, 0.0
    targets = torch.tensor([20, 3, 9], device=DEVICE)
    loss, sampled, correct = ops.mlm_loss_and_sample(logits, targets, torch.ones(3, device=DEVICE), backend="triton")
    ref = ops.mlm_loss_and_sample(logits, targets, torch.ones(3, device=DEVICE), backend="torch")[0]
    torch.testing.assert_close(loss, ref)
    assert sampled.tolist() == [20, 0, 9] and correct.tolist() == [True, False, True]


@pytest.mark.parametrize("sampler", MLS.SAMPLERS)
def test_mlm_sampler_choice_keeps_loss_and_disallow(sampler):
    m, v = 6, 13
    logits, targets, weights = rand(m, v), torch.randint(0, v, (m,), device=DEVICE), torch.rand(m, device=DEVICE)
    loss, sampled, _ = ops.mlm_loss_and_sample(logits, targets, weights, disallow_correct=True, backend="triton",
                                               sampler=sampler)
    torch.testing.assert_close(loss, ops.mlm_loss_and_sample(logits, targets, weights, backend="torch")[0])
    assert not (sampled == targets).any()
    with pytest.raises(ValueError, match="ELECTRA_FAST_SAMPLER.*nope"):
        ops.mlm_loss_and_sample(logits, targets, weights, backend="triton", sampler="nope")


def padded(real, width, value=1e4):
    """`real` [M, V] widened to [M, width] with `value` in the padded columns: a leak of the padding shows."""
    pad = torch.full((real.shape[0], width - real.shape[1]), value, device=real.device, dtype=real.dtype)
    return torch.cat([real, pad], 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("temperature, disallow", [(1.0, False), (0.7, True)])
@pytest.mark.parametrize("v, width", [(37, 48), (21, 43)])  # W a multiple of 16 (the model's case), and not
def test_mlm_padded_vocabulary_matches_reference(poison, dtype, temperature, disallow, v, width):
    m = 7
    logits = padded(rand(m, v, dtype=dtype, scale=3), width).requires_grad_()
    targets = torch.randint(0, v, (m,), device=DEVICE)
    weights = torch.rand(m, device=DEVICE)
    kw = dict(temperature=temperature, disallow_correct=disallow, vocab_size=v)
    loss, sampled, correct = ops.mlm_loss_and_sample(logits, targets, weights, backend="triton", **kw)
    ref_loss, _, ref_correct = ops.mlm_loss_and_sample(logits, targets, weights, backend="torch", **kw)
    torch.testing.assert_close(loss, ref_loss, **TOL[torch.float32])
    assert torch.equal(correct, ref_correct) and ((sampled >= 0) & (sampled < v)).all()
    if disallow:
        assert not (sampled == targets).any()
    (grad,) = torch.autograd.grad(loss, logits, torch.tensor(1.5, device=DEVICE))
    (ref_grad,) = torch.autograd.grad(ref_loss, logits, torch.tensor(1.5, device=DEVICE))
    torch.testing.assert_close(grad[:, :v], ref_grad[:, :v], **TOL[dtype])
    assert torch.equal(grad[:, v:], torch.zeros_like(grad[:, v:]))  # written (poisoned buffer), exactly 0


def test_launch_sampler_row_offset_draws_the_whole_matrix_samples():
    m, v, width, seed = 9, 13, 32, torch.tensor([21], device=DEVICE)
    logits = padded(rand(m, v), width)
    targets = torch.randint(0, v, (m,), device=DEVICE)
    for sampler in MLS.SAMPLERS:
        whole = MLS.launch_sampler(logits, seed, 1.0, targets, sampler, v)
        chunks = [MLS.launch_sampler(logits[r0:r0 + 4], seed, 1.0, targets[r0:r0 + 4], sampler, v, row_offset=r0)
                  for r0 in range(0, m, 4)]
        assert torch.equal(torch.cat(chunks), whole)
        shifted = MLS.launch_sampler(logits[4:8], seed, 1.0, targets[4:8], sampler, v)
        assert not torch.equal(shifted, whole[4:8])  # without the offset, rows 4..7 draw rows 0..3's numbers


# ---------------------------------------------------------------- sampling distribution

# V = 10: a tile of 8 and a partial one; the maximum sits in the last tile, so the first tile's mass must be
# rescaled to the final running max.
BASE = torch.tensor([0.3, -0.4, 0.1, 0.2, -0.5, 0.0, 0.4, -0.2, 0.0, 2.2])


@pytest.mark.parametrize("op, sampler, temperature, disallow, width", [
    ("mlm", "cdf", 1.0, False, 10),     # the default path: tile masses shared with the loss
    ("gumbel", "cdf", 0.8, True, 19),   # own running max for the scaled scores, a disallowed id, padding (+1e4)
    ("mlm", "gumbel", 1.7, False, 16),  # Gumbel-max with randint4x noise, padding to a multiple of 16
])
def test_sampling_distribution_is_softmax(op, sampler, temperature, disallow, width):
    draws, v = 500, BASE.numel()
    # fp16 logits (sampling still in fp32); columns >= v hold +1e4 and must never be drawn.
    logits = padded(BASE.to(DEVICE).expand(draws, v), width).to(torch.float16)
    banned = torch.full((draws,), 3, device=DEVICE)
    gen = torch.Generator(DEVICE).manual_seed(2024)
    if op == "mlm":
        ids = ops.mlm_loss_and_sample(logits, banned, torch.ones(draws, device=DEVICE), temperature=temperature,
                                      disallow_correct=disallow, generator=gen, backend="triton", vocab_size=v,
                                      sampler=sampler)[1]
    else:
        ids = ops.gumbel_sample(logits, temperature=temperature, disallow=banned if disallow else None,
                                generator=gen, backend="triton", vocab_size=v, sampler=sampler)
    probs = torch.softmax(logits[0, :v].double().cpu() / temperature, 0)
    if disallow:
        probs[3] = 0
        probs /= probs.sum()
    stat, df = chi2(ids, probs)
    assert stat < chi2_critical(df), (stat, df)


def test_sampling_reproducible_under_manual_seed_and_generator():
    m, v = 16, 37
    logits = torch.zeros(m, v, device=DEVICE)  # uniform: 16 draws from 37 ids never repeat by chance
    targets, weights = torch.zeros(m, dtype=torch.long, device=DEVICE), torch.ones(m, device=DEVICE)
    calls = [lambda **k: ops.mlm_loss_and_sample(logits, targets, weights, backend="triton", **k)[1],
             lambda **k: ops.gumbel_sample(logits, backend="triton", **k)]
    for call in calls:
        torch.manual_seed(5)
        a, b = call(), call()
        torch.manual_seed(5)
        assert torch.equal(call(), a) and not torch.equal(a, b)
        g1, g2 = torch.Generator(DEVICE).manual_seed(9), torch.Generator(DEVICE).manual_seed(9)
        assert torch.equal(call(generator=g1), call(generator=g2))


def test_gumbel_sample_disallow_and_peaked_rows(poison):
    m, v = 6, 23
    logits = rand(m, v)
    logits[:, 4] = 40.0  # every row puts all its mass on id 4 ...
    disallow = torch.tensor([4, -1, 4, -1, 4, 0], device=DEVICE)  # ... unless id 4 is disallowed
    ids = ops.gumbel_sample(logits, disallow=disallow, backend="triton")
    assert ids.dtype == torch.int64
    assert torch.equal(ids == 4, disallow != 4)
    assert ((ids >= 0) & (ids < v)).all()
    one = ops.gumbel_sample(torch.zeros(1, 1, device=DEVICE), disallow=torch.zeros(1, dtype=torch.long,
                                                                                     device=DEVICE), backend="triton")
    assert one.tolist() == [0]  # nothing allowed: id 0, as argmax over all -inf in the reference


# ---------------------------------------------------------------- masked gather / scatter

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_masked_gather_and_scatter_add(poison, dtype):
    b, seq_len, h, n = 3, 11, 9, 6
    hidden = rand(b, seq_len, h, dtype=dtype).requires_grad_()
    pos = torch.stack([torch.randperm(seq_len, device=DEVICE)[:n] for _ in range(b)])
    pos[1, 3:] = 0       # padding slots all point at position 0 ...
    pos[2, 0] = 0        # ... and a real slot may sit at 0 as well
    pos[2, 4:] = 0
    out = ops.masked_gather(hidden, pos, backend="triton")
    ref = ops.masked_gather(hidden, pos, backend="torch")
    assert out.dtype == dtype and torch.equal(out, ref)
    g = rand(b, n, h, dtype=dtype)
    (grad,) = torch.autograd.grad(out, hidden, g)
    # The oracle sums in fp64 from the upcast inputs: a gradient taken through `ref.float()` would flow back into
    # fp16 `hidden` and be summed by an fp16 scatter-add, while the kernel sums in fp32 and rounds once.
    ref_hidden = hidden.detach().double().requires_grad_()
    (ref_grad,) = torch.autograd.grad(ops.masked_gather(ref_hidden, pos, backend="torch"), ref_hidden, g.double())
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), ref_grad, **TOL[dtype])


# ---------------------------------------------------------------- replace tokens

@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_replace_tokens_matches_reference(poison, id_dtype):
    b, seq_len, n = 4, 13, 5
    ids = torch.randint(4, 30, (b, seq_len), device=DEVICE, dtype=id_dtype)
    pos = torch.stack([torch.randperm(seq_len, device=DEVICE)[:n] for _ in range(b)])
    w = (torch.rand(b, n, device=DEVICE) > 0.3).float()
    pos = torch.where(w > 0, pos, 0)
    sampled = torch.randint(4, 30, (b, n), device=DEVICE)
    sampled[0, 0] = ids[0, pos[0, 0]]  # a sample equal to the original: not replaced
    w[0, 0] = 1.0
    disc, labels = ops.replace_tokens(ids, pos, w, sampled.flatten(), backend="triton")
    ref_disc, ref_labels = ops.replace_tokens(ids, pos, w, sampled, backend="torch")
    assert disc.dtype == id_dtype and torch.equal(disc, ref_disc)
    assert labels.dtype == torch.bool and torch.equal(labels, ref_labels)
    assert not labels[0, pos[0, 0]]


# ---------------------------------------------------------------- token BCE

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("label_dtype, mask_dtype", [(torch.bool, torch.bool), (torch.float32, torch.int64)])
def test_rtd_bce_matches_reference(poison, dtype, label_dtype, mask_dtype):
    logits = rand(5, 9, dtype=dtype, scale=4)
    logits[0, 0], logits[0, 1] = 30.0, -30.0  # saturated sigmoid both ways
    logits.requires_grad_()
    labels = (torch.rand(5, 9, device=DEVICE) > 0.6).to(label_dtype)
    mask = (torch.rand(5, 9, device=DEVICE) > 0.2).to(mask_dtype)
    loss = ops.rtd_bce_loss(logits, labels, mask, backend="triton")
    ref = ops.rtd_bce_loss(logits, labels, mask, backend="torch")
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, **TOL[torch.float32])
    grad_out = torch.tensor(3.0, device=DEVICE)
    (grad,) = torch.autograd.grad(loss, logits, grad_out)
    (ref_grad,) = torch.autograd.grad(ref, logits, grad_out)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad, ref_grad, **TOL[dtype])


def test_rtd_bce_all_padding_is_zero(poison):
    logits = rand(3, 7).requires_grad_()
    loss = ops.rtd_bce_loss(logits, torch.ones(3, 7, device=DEVICE), torch.zeros(3, 7, device=DEVICE),
                            backend="triton")
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


# ---------------------------------------------------------------- fused discriminator head

@pytest.mark.parametrize("dtype, weight_shape", [(torch.float32, "row"), (torch.float16, "flat")])
def test_rtd_head_matches_reference(poison, dtype, weight_shape):
    b, seq_len, h = 3, 7, 10
    hidden = rand(b, seq_len, h, dtype=dtype).requires_grad_()
    weight = rand(1, h, scale=0.5) if weight_shape == "row" else rand(h, scale=0.5)
    weight.requires_grad_()
    bias = rand(1).requires_grad_()
    labels = torch.rand(b, seq_len, device=DEVICE) > 0.7
    mask = torch.rand(b, seq_len, device=DEVICE) > 0.2
    loss, acc = ops.rtd_head_loss(hidden, weight, bias, labels, mask, backend="triton")
    ref_loss, ref_acc = ops.rtd_head_loss(hidden, weight, bias, labels, mask, backend="torch")
    torch.testing.assert_close(loss, ref_loss, **TOL[torch.float32])
    torch.testing.assert_close(acc, ref_acc)
    assert not acc.requires_grad
    grad_out = torch.tensor(1.7, device=DEVICE)
    grads = torch.autograd.grad(loss, (hidden, weight, bias), grad_out)
    ref_grads = torch.autograd.grad(ref_loss, (hidden, weight, bias), grad_out)
    for g, r, x in zip(grads, ref_grads, (hidden, weight, bias)):
        assert g.dtype == x.dtype and g.shape == x.shape
        torch.testing.assert_close(g, r, **TOL[g.dtype])


def test_rtd_head_all_padding_and_no_bias(poison):
    hidden, weight = rand(2, 5, 6).requires_grad_(), rand(1, 6).requires_grad_()
    labels = torch.ones(2, 5, device=DEVICE)
    loss, acc = ops.rtd_head_loss(hidden, weight, None, labels, torch.zeros(2, 5, device=DEVICE), backend="triton")
    assert loss.item() == 0.0 and acc.item() == 0.0
    grads = torch.autograd.grad(loss, (hidden, weight))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


# ---------------------------------------------------------------- varlen attention plan

@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
@pytest.mark.parametrize("b, n", [(6, 40), (1, 5)])  # rows of 40: three chunks of 16, the count carried across
def test_varlen_plan_matches_reference(poison, dtype, b, n):
    mask = torch.rand(b, n, device=DEVICE) < 0.6
    mask[0] = True  # a full row: an empty padding sequence
    if b > 1:
        mask[1] = False  # padding only: an empty real sequence
    got = ops.varlen_plan(mask.to(dtype), backend="triton")
    want = ops.varlen_plan(mask.to(dtype), backend="torch")
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=0, atol=0)


# ---------------------------------------------------------------- registration and compile

def test_opcheck_triton_custom_ops():
    m, v, b, seq_len, h, n = 4, 11, 2, 6, 5, 3
    logits = rand(m, v).requires_grad_()
    targets, seed = torch.randint(0, v, (m,), device=DEVICE), torch.tensor([7], device=DEVICE)
    pos = torch.randint(0, seq_len, (b, n), device=DEVICE)
    cases = [
        (MLS._mlm_op, (logits, targets, torch.rand(m, device=DEVICE), seed, 0.8, True, "cdf", v)),
        (MLS._mlm_op, (logits, targets.clamp(max=v - 4), torch.rand(m, device=DEVICE), seed, 1.0, False, "gumbel",
                       v - 3)),
        (MLS._mlm_backward_op, (torch.tensor(1.5, device=DEVICE), logits.detach(), targets.clamp(max=v - 3),
                                torch.rand(m, device=DEVICE), rand(m), torch.tensor(0.3, device=DEVICE), v - 2)),
        (K["gumbel_sample"]._gumbel_sample_op, (logits.detach(), seed, 1.3,
                                                torch.randint(-1, v, (m,), device=DEVICE), "cdf", v - 1)),
        (K["gumbel_sample"]._gumbel_sample_op, (logits.detach(), seed, 1.0, None, "gumbel", v)),
        (K["masked_gather"]._gather_op, (rand(b, seq_len, h).requires_grad_(), pos)),
        (K["masked_gather"]._scatter_add_op, (rand(b, n, h), pos, seq_len)),
        (K["replace_tokens"]._replace_tokens_op, (torch.randint(0, 9, (b, seq_len), device=DEVICE), pos,
                                                  torch.rand(b, n, device=DEVICE),
                                                  torch.randint(0, 9, (b, n), device=DEVICE))),
        (K["rtd_bce_loss"]._rtd_bce_op, (rand(b, seq_len).requires_grad_(),
                                         torch.rand(b, seq_len, device=DEVICE) > 0.5,
                                         torch.ones(b, seq_len, dtype=torch.long, device=DEVICE))),
        (K["rtd_bce_loss"]._backward_op, (rand(b, seq_len), torch.tensor(2.0, device=DEVICE),
                                          torch.tensor(0.1, device=DEVICE), torch.float16)),
        (K["rtd_head_loss"]._head_op, (rand(b, seq_len, h).requires_grad_(), rand(1, h).requires_grad_(),
                                       rand(1).requires_grad_(), torch.rand(b, seq_len, device=DEVICE),
                                       torch.ones(b, seq_len, device=DEVICE))),
        (K["varlen_plan"]._varlen_plan_op, (torch.rand(b, seq_len, device=DEVICE) > 0.3,)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_kernels_compile_fullgraph_and_match_eager():
    """A generator-loss -> replace -> discriminator-head chain through the Triton entries, compiled whole."""
    torch._dynamo.reset()
    b, seq_len, h, n, v = 2, 8, 6, 3, 13
    ids = torch.randint(0, v, (b, seq_len), device=DEVICE)
    pos = torch.stack([torch.randperm(seq_len, device=DEVICE)[:n] for _ in range(b)])
    w = torch.ones(b, n, device=DEVICE)
    hidden, emb = rand(b, seq_len, h).requires_grad_(), rand(v, h).requires_grad_()
    head_w, head_b = rand(1, h).requires_grad_(), rand(1).requires_grad_()

    def chain(hidden, emb, head_w, head_b, seed):
        slots = K["masked_gather"].masked_gather(hidden, pos)
        logits = slots.flatten(0, 1) @ emb.T
        mlm, sampled, correct = MLS.mlm_loss_and_sample(logits, ids.gather(1, pos).flatten(), w.flatten(),
                                                        seed, 1.0, False, v)
        disc_ids, labels = K["replace_tokens"].replace_tokens(ids, pos, w, sampled.view(b, n))
        disc_hidden = torch.tanh(emb[disc_ids])
        disc, acc = K["rtd_head_loss"].rtd_head_loss(disc_hidden, head_w, head_b, labels, torch.ones_like(ids))
        bce = K["rtd_bce_loss"].rtd_bce_loss(disc_hidden.sum(-1), labels, torch.ones_like(ids))
        return mlm + 50.0 * disc + bce, sampled, acc, correct

    params = (hidden, emb, head_w, head_b)
    seed = torch.tensor([11], device=DEVICE)
    results = []
    for fn in (chain, torch.compile(chain, fullgraph=True)):
        out = fn(*params, seed)
        results.append((out, torch.autograd.grad(out[0], params)))
    (eager, eager_grads), (comp, comp_grads) = results
    torch.testing.assert_close(comp[0], eager[0], rtol=1e-5, atol=1e-5)
    for x, y in zip(comp[1:], eager[1:]):
        assert torch.equal(x, y)
    for x, y in zip(comp_grads, eager_grads):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
