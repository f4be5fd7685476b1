"""Real-size correctness of the default GPU path, so that no speed figure is ever reported for a wrong step.

Each test runs the op as a training step calls it (no `backend=`: whatever the default resolves to, asserted to be
the Triton kernel on CUDA) at the real ELECTRA shapes and specialisations: the MLM loss + sample at M = 2432 (small)
and 5056 (base) slots of a vocabulary padded to W = 30592 (8 column tiles, 8 warps), the fused LM head at E = 128
and 768 over several row chunks, dropout + residual + LayerNorm at 256 / 768 / 1024 columns, the masking at L = 512
and the variable-length attention at base dims (L = 512, 12 heads of 64), all in bf16 against fp64 oracles computed
here from the upcast inputs with plain torch. Samples are checked for support and, statistically, against the fp64
softmax (the exact distribution tests are tests/ops/test_gumbel_sample_distribution.py's).

Every test has a CPU twin: the same body at tiny shapes through the Triton kernel in the interpreter
(`TRITON_INTERPRET=1`, tiles shrunk so that the same loops, chunks and partial tails run), which proves the test's
own logic, oracle and tolerances before a GPU runs it."""
import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from electra_fast import ops
from electra_fast.model.attention import VarlenMask, padding_mask
from electra_fast.ops import _backend
from conftest import gpu_param, interpreter_param
from helpers import chi2_critical, half_at_argmax, use_small_tiles
from attention_oracles import lengths_mask, naive_attention, run_attend

BF16 = torch.bfloat16

# One bf16 rounding of an fp32 result: under 2^-7 relative (a GPU rounds to nearest, the interpreter truncates).
BF16_RTOL = 1e-2
# Absolute slack, as a fraction of the tensor's largest |value|: fp32 arithmetic and cancellation near zero.
FP32_ATOL = 1e-3
# fp32 sums of exp over 30522 columns, then over 5056 rows, against the fp64 loss.
LOSS_RTOL = 1e-4
# The fused head's logits are rounded to bf16 (the unfused head's values) before the loss: ~2^-9 of |x| ~ 3 per
# logit, a loss off by ~5e-5 relative and gradients by ~0.4% in norm against exact fp64 logits.
HEAD_LOSS_RTOL = 1e-3
HEAD_NORM_RTOL = 1e-2
HEAD_ROW_RTOL = 0.1     # per row of grad_hidden / grad_weight: small rows see ~4% (a row not computed shows 100%)
HEAD_ELEM_ATOL = 2e-2   # elementwise, of the largest |gradient|
# Flash attention in bf16 (P rounded to bf16 before P @ V, outputs and gradients rounded): ~0.3% in norm.
ATTN_NORM_RTOL = 1e-2
ATTN_GRAD_NORM_RTOL = 2e-2
ATTN_ELEM_ATOL = 3e-2   # elementwise, of the largest |value|
Z_MAX = 5.0             # |z| bound of the sampling statistics (fixed seeds; ~6e-7 two-sided for a normal z)
LOGIT_STD = 3.0         # logits of a partly trained generator: a softmax over a few dozen ids, not uniform


def gpu(*size, id):
    return gpu_param("cuda", *size, id=f"cuda-{id}", triton=True)


def cpu(*size, id):
    return interpreter_param("cpu", *size, id=f"cpu-{id}")


def default_path(device, op, dtype=None):
    """The `backend=` of the op under test: None on a GPU (the default path, which must be the Triton kernel: a
    silent fallback to the reference would check the reference), "triton" (the interpreter) on the CPU."""
    if device == "cuda":
        name = _backend.resolve(op, None, torch.device("cuda"), dtype)[0]
        assert name == "triton", f"the default path of {op} on this GPU is {name!r}, not the Triton kernel"
        return None
    return "triton"


def assert_near(got, ref, *, norm_rtol, rtol=BF16_RTOL, atol_frac=FP32_ATOL, what=""):
    """`got` against an fp64 `ref`: finite, within `norm_rtol` of it in norm, and elementwise within
    `rtol * |ref| + atol_frac * max|ref|`."""
    got, ref = got.detach().double(), ref.detach().double()
    assert torch.isfinite(got).all(), f"{what}: non-finite values (an element never written?)"
    err = ((got - ref).norm() / ref.norm()).item()
    assert err <= norm_rtol, f"{what}: relative error {err:.3g} in norm > {norm_rtol}"
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol_frac * ref.abs().max().item(),
                               msg=lambda detail: f"{what}: {detail}")


def check_samples(sampled, logp, peaked=None, peak_cols=None):
    """Samples from the rows of `logp` (fp64 `[M, V]` log-softmax): in `[0, V)`; each `peaked` row (all its mass on
    one id) took its `peak_cols` id; over the other rows the sampled ids' mean log-probability is the mean
    -entropy (a z-test on the sum, the variance exact from logp), and the draws fall into equal column bins as the
    summed probabilities say (chi-square: a tile the sampler never picks, or picks too often, shows)."""
    m, v = logp.shape
    assert sampled.shape == (m,) and sampled.dtype == torch.int64
    assert ((sampled >= 0) & (sampled < v)).all(), "a sample outside the vocabulary (a padding column?)"
    rest = torch.ones(m, dtype=torch.bool, device=logp.device)
    if peaked is not None:
        assert torch.equal(sampled[peaked], peak_cols), "a row with all its mass on one id sampled another"
        rest[peaked] = False
    lp, s = logp[rest], sampled[rest]
    p = lp.exp()
    mean = (p * lp).sum(1)
    var = (p * lp * lp).sum(1) - mean * mean
    z = ((lp.gather(1, s[:, None])[:, 0] - mean).sum() / var.sum().sqrt()).item()
    assert abs(z) < Z_MAX, f"log p of the samples is off its expectation by z = {z:.2f}"
    bins = min(8, s.numel() // 10)
    edges = torch.linspace(0, v, bins + 1, device=logp.device).long()
    cum = F.pad(p.sum(0).cumsum(0), (1, 0))
    expected = cum[edges[1:]] - cum[edges[:-1]]
    counts = torch.bincount(torch.bucketize(s, edges[1:], right=True), minlength=bins).double()
    assert expected.min() >= 5, "too few draws per bin for the chi-square approximation"
    stat = ((counts - expected) ** 2 / expected).sum().item()
    assert stat < chi2_critical(bins - 1), f"column bins: chi-square {stat:.1f} over {bins - 1} dof"


# ------------------------------------------------------------------------------- MLM loss + sample

@pytest.mark.parametrize("device, m, v, width", [
    gpu(2432, 30522, 30592, id="small-M2432-W30592"), gpu(5056, 30522, 30592, id="base-M5056-W30592"),
    cpu(24, 57, 60, id="M24-W60-8tiles")])
def test_mlm_loss_and_sample_matches_fp64(poison, monkeypatch, device, m, v, width):
    """W = 30592 in 4096-column tiles: 8 tiles, the last partial and holding the vocabulary's end (V = 30522);
    the CPU twin: 8-column tiles over W = 60, V = 57. Padding columns hold NaN: they must reach nothing."""
    backend = default_path(device, "mlm_loss_and_sample", BF16)
    if device == "cpu":
        use_small_tiles(monkeypatch, ("mlm_loss_and_sample",))
    logits = torch.full((m, width), float("nan"), device=device, dtype=BF16)
    logits[:, :v] = (torch.randn(m, v, device=device) * LOGIT_STD).to(BF16)
    peaked = torch.tensor([0, m // 3, m // 2, m - 1], device=device)
    peak_cols = torch.tensor([0, v - 1, v // 2, 3 * v // 4], device=device)  # first, last, inner columns
    logits[peaked, peak_cols] = logits[peaked, :v].float().amax(1).add(30).to(BF16)  # the rest: < 30522 e^-30 ~ 3e-9
    x = logits[:, :v].double()
    targets = half_at_argmax(x)
    weights = (torch.rand(m, device=device) > 0.1).float()  # padding slots: weight 0
    weights[0] = 1.0
    logits.requires_grad_()

    loss, sampled, correct = ops.mlm_loss_and_sample(logits, targets, weights, vocab_size=v, backend=backend)
    grad_out = torch.tensor(1.7, device=device)
    (grad,) = torch.autograd.grad(loss, logits, grad_out)

    x64 = x.clone().requires_grad_()
    lse = x64.logsumexp(1)
    w64 = weights.double()
    ref_loss = (w64 * (lse - x64.gather(1, targets[:, None])[:, 0])).sum() / (w64.sum() + 1e-6)
    (ref_grad,) = torch.autograd.grad(ref_loss, x64, grad_out.double())
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=LOSS_RTOL, atol=0)
    ref_correct = x.argmax(1) == targets  # bf16 values are exact in fp64: the same argmax, first maximum on ties
    assert correct.dtype == torch.bool and torch.equal(correct, ref_correct)
    assert grad.dtype == BF16 and torch.equal(grad[:, v:], torch.zeros_like(grad[:, v:]))
    # atol: softmax - 1 in fp32 at a target of probability ~1 cancels to within fp32's epsilon of the row's scale.
    assert_near(grad[:, :v], ref_grad, norm_rtol=BF16_RTOL, atol_frac=1e-6, what="grad")
    check_samples(sampled, (x - x.logsumexp(1, keepdim=True)), peaked, peak_cols)


# ------------------------------------------------------------------------------- fused LM head

@pytest.mark.parametrize("device, m, e, v, width, chunk_size", [
    gpu(2432, 128, 30522, 30592, None, id="small-M2432-E128"), gpu(5056, 768, 30522, 30592, None, id="base-M5056-E768"),
    cpu(24, 16, 57, 60, 5, id="M24-E16-chunks5")])
def test_lm_head_loss_and_sample_matches_fp64(poison, monkeypatch, device, m, e, v, width, chunk_size):
    """The default chunking on a GPU (several chunks: checked by the peak memory, below the whole logits), an
    explicit one on the CPU (5 chunks, the last partial). Padded vocabulary rows have a bias of +50: leaking into
    the loss, the samples or the gradients, they would dominate."""
    backend = default_path(device, "lm_head_loss_and_sample", BF16)
    if device == "cpu":
        use_small_tiles(monkeypatch, ("mlm_loss_and_sample",))
    hidden = torch.randn(m, e, device=device).to(BF16)
    weight = (torch.randn(width, e, device=device) * LOGIT_STD / e ** 0.5).to(BF16)
    bias = (torch.randn(width, device=device) * 0.5).to(BF16)
    bias[v:] = 50.0
    h64, w64, b64 = (t.double().requires_grad_() for t in (hidden, weight, bias))
    with torch.no_grad():
        x = (h64 @ w64.T + b64)[:, :v]  # the exact logits
    targets = half_at_argmax(x)
    weights = (torch.rand(m, device=device) > 0.1).float()
    weights[0] = 1.0
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    loss, sampled, correct = ops.lm_head_loss_and_sample(hidden, weight, bias, targets, weights, vocab_size=v,
                                                         chunk_size=chunk_size, backend=backend)
    if device == "cuda":
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before
        whole = m * width * hidden.element_size()
        assert extra < whole, f"peak {extra / 2**20:.0f} MiB >= the whole [M, W] logits ({whole / 2**20:.0f} MiB)"
    grad_out = torch.tensor(1.7, device=device)
    grads = torch.autograd.grad(loss, leaves, grad_out)
    if device == "cuda":  # the 16-bit weight gradient went through one addmm(out_dtype=fp32), not its fallback
        assert importlib.import_module("electra_fast.kernels.lm_head_loss_and_sample")._ADDMM_OUT_DTYPE[0]

    logits64 = (h64 @ w64.T + b64)[:, :v]
    lse = logits64.logsumexp(1)
    wt = weights.double()
    ref_loss = (wt * (lse - logits64.gather(1, targets[:, None])[:, 0])).sum() / (wt.sum() + 1e-6)
    ref_grads = torch.autograd.grad(ref_loss, (h64, w64, b64), grad_out.double())
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=HEAD_LOSS_RTOL, atol=0)
    for name, got, want, dtype in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, ref_grads,
                                      (hidden.dtype, weight.dtype, bias.dtype)):
        assert got.dtype == dtype, name
        if name != "grad_hidden":  # padded vocabulary rows: exactly 0
            assert torch.equal(got[v:], torch.zeros_like(got[v:])), name
            got, want = got[:v], want[:v]
        assert_near(got, want, norm_rtol=HEAD_NORM_RTOL, rtol=0, atol_frac=HEAD_ELEM_ATOL, what=name)
        if got.dim() == 2:  # every row: a chunk computed wrong or not at all shows whole
            rows = (got.double() - want).norm(dim=1) / want.norm(dim=1).clamp_min(1e-30)
            live = want.norm(dim=1) > 0  # weight-0 slots: exactly 0 on both sides
            assert rows[live].max().item() < HEAD_ROW_RTOL, name
            assert torch.equal(got[~live], torch.zeros_like(got[~live])), name
    # `correct` from bf16-rounded logits: compared where the exact top two are further apart than a bf16 rounding.
    top2 = x.topk(2, dim=1).values
    clear = top2[:, 0] - top2[:, 1] > 2 ** -7 * top2[:, 0].abs() + 1e-3
    ref_correct = x.argmax(1) == targets
    assert clear.double().mean().item() > 0.5 and ref_correct[clear].any() and not ref_correct[clear].all()
    assert correct.dtype == torch.bool and torch.equal(correct[clear], ref_correct[clear])
    check_samples(sampled, x - x.logsumexp(1, keepdim=True))


# ------------------------------------------------------------------------------- dropout + residual + LayerNorm

def pow2(n):
    return 1 << (n - 1).bit_length()


def round_bf16(t, device):
    """fp32 -> bf16 as the kernel's store rounds on `device`: to nearest on a GPU, by truncation in the
    interpreter (its numpy cast)."""
    if device == "cpu":
        return (t.view(torch.int32) & -65536).view(torch.float32).to(BF16)
    return t.to(BF16)


@pytest.mark.parametrize("device, m, n", [
    gpu(16384, 256, id="small-M16384-N256"), gpu(32768, 768, id="base-M32768-N768"),
    gpu(16384, 1024, id="large-M16384-N1024"),
    cpu(5, 256, id="M5-N256"), cpu(5, 768, id="M5-N768"), cpu(5, 1024, id="M5-N1024")])
def test_dropout_add_layer_norm_matches_fp64(poison, monkeypatch, device, m, n):
    """Forward and all four gradients under dropout against the fp64 chain rebuilt with the kernel's mask, read off
    a second call with the same seed and salt on x = 1, residual = 0, weight 1, bias 0 (kept elements come out
    above the row mean, dropped ones below). p = 0.75: 1 / (1 - p) = 4 makes `residual + x / (1 - p)` exact in fp32
    whatever the kernel fuses, so the oracle rounds the very sum the kernel rounds; and p != 1/2 tells keep from
    drop. The CPU twin: 2 rows a program, the last partial."""
    backend = default_path(device, "dropout_add_layer_norm", BF16)
    if device == "cpu":
        kernel = importlib.import_module("electra_fast.kernels.dropout_add_layer_norm")
        for name in ("BLOCK_ELEMENTS", "BWD_BLOCK_ELEMENTS"):
            monkeypatch.setattr(kernel, name, 2 * pow2(n))
    p, eps, salt = 0.75, 1e-12, 5  # BERT's epsilon; a salt as an encoder layer passes one
    x, res, w, b = (torch.randn(*shape, device=device).to(BF16) for shape in ((m, n), (m, n), (n,), (n,)))
    leaves = [t.requires_grad_() for t in (x, res, w, b)]
    dy = torch.randn(m, n, device=device).to(BF16)
    seed = _backend.draw_seed(torch.device(device))
    kw = dict(p=p, eps=eps, training=True, seed=seed, salt=salt, backend=backend)
    y = ops.dropout_add_layer_norm(x, res, w, b, **kw)
    dx, dres, dw, db = torch.autograd.grad(y, leaves, dy)
    keep = ops.dropout_add_layer_norm(torch.ones_like(x), torch.zeros_like(x), torch.ones_like(w),
                                      torch.zeros_like(w), **kw) > 0

    kept, total = keep.sum().item(), keep.numel()
    assert abs(kept - total * (1 - p)) < Z_MAX * (total * p * (1 - p)) ** 0.5, f"kept {kept} of {total}"
    s = torch.where(keep, x.double() * 4, 0.0) + res.double()
    s = round_bf16(s.float(), device).double().requires_grad_()  # the kernel's pre-norm sum, in the input dtype
    w64, b64 = (t.detach().double().requires_grad_() for t in (w, b))
    ref = F.layer_norm(s, (n,), w64, b64, eps)
    ds, ref_dw, ref_db = torch.autograd.grad(ref, (s, w64, b64), dy.double())
    assert y.dtype == BF16 and dx.dtype == BF16 and dw.dtype == BF16
    assert_near(y, ref, norm_rtol=BF16_RTOL, what="y")
    assert_near(dres, ds, norm_rtol=BF16_RTOL, what="d residual")
    assert torch.equal(dx[~keep], torch.zeros_like(dx[~keep])), "the backward passed a gradient to a dropped x"
    assert_near(dx, torch.where(keep, ds * 4, 0.0), norm_rtol=BF16_RTOL, what="dx")
    assert_near(dw, ref_dw, norm_rtol=BF16_RTOL, what="dweight")
    assert_near(db, ref_db, norm_rtol=BF16_RTOL, what="dbias")


# ------------------------------------------------------------------------------- masking

SPECIAL = (0, 100, 101, 102, 103)  # [PAD], [UNK], [CLS], [SEP], [MASK] of the BERT vocabulary
CLS, SEP, MASK = 101, 102, 103


@pytest.mark.parametrize("device, b", [gpu(64, id="base-B64-L512"), cpu(10, id="B10-L512")])
def test_mask_tokens_at_l512(poison, device, b):
    """The default masking (distinct positions) of a padded L = 512 batch: the reference's slot count per row
    (rows of 190 / 350 / 390 tokens: where float32 rounding counts one more slot than float64), ascending distinct
    candidate positions, padding slots at 0 with weight 0, [MASK] only at chosen positions and 85% of them, and
    positions uniform among the candidates (z-test on their ranks)."""
    backend = default_path(device, "mask_tokens")
    seq_len, mask_prob = 512, 0.15
    # Packed data: mostly full rows. Rows 1-7: the float32 rounding cases, rows without candidates or with one.
    lengths = torch.where(torch.rand(b) < 0.5, seq_len, torch.randint(1, seq_len + 1, (b,)))
    lengths[0] = seq_len
    lengths[1:8] = torch.tensor([190, 350, 390, 3, 2, 1, 511])
    ids = torch.randint(999, 30522, (b, seq_len))
    ids[:, 0] = CLS
    ids[torch.arange(b), lengths - 1] = SEP
    ids[0, 100], ids[0, 200], ids[0, 300] = SEP, 100, MASK  # special ids inside a row: never chosen
    attn = lengths_mask(lengths.tolist(), seq_len)
    ids = ids * attn
    n = ops.num_slots(seq_len, mask_prob)
    masked, positions, weights = ops.mask_tokens(ids.to(device), attn.to(device), mask_prob=mask_prob,
                                                 mask_token_id=MASK, special_token_ids=SPECIAL, backend=backend)
    masked, positions, weights = masked.cpu(), positions.cpu(), weights.cpu()
    assert positions.shape == weights.shape == (b, n) and masked.shape == ids.shape
    chosen_total = masked_total = 0
    rank_dev = rank_var = 0.0
    for row in range(b):
        real = attn[row].bool()
        cand = real & ~torch.isin(ids[row], torch.tensor(SPECIAL))
        c = int(cand.sum())
        k = min(max(1, min(n, int(np.rint(np.float32(int(real.sum())) * np.float32(mask_prob))))), c)
        assert weights[row].tolist() == [1.0] * k + [0.0] * (n - k), f"row {row}"
        pos = positions[row, :k]
        assert (positions[row, k:] == 0).all() and (pos[1:] > pos[:-1]).all() and cand[pos].all(), f"row {row}"
        chosen = torch.zeros(seq_len, dtype=torch.bool)
        chosen[pos] = True
        assert torch.equal(masked[row][~chosen], ids[row][~chosen]), f"row {row}: a position not chosen changed"
        at = masked[row][pos]
        assert ((at == MASK) | (at == ids[row][pos])).all(), f"row {row}"
        chosen_total += k
        masked_total += int((at == MASK).sum())
        if 0 < k < c:  # the ranks of k draws without replacement from 0..c-1: mean (c-1)/2, finite population
            ranks = torch.cumsum(cand.long(), 0)[pos] - 1
            rank_dev += ranks.double().sum().item() - k * (c - 1) / 2
            rank_var += k * (c * c - 1) / 12 * (c - k) / (c - 1)
    q = 0.85
    assert abs(masked_total - q * chosen_total) < Z_MAX * (chosen_total * q * (1 - q)) ** 0.5
    assert abs(rank_dev) < Z_MAX * rank_var ** 0.5, f"positions not uniform: z = {rank_dev / rank_var ** 0.5:.2f}"


# ------------------------------------------------------------------------------- variable-length attention

@pytest.mark.parametrize("device, lengths, heads, d", [
    gpu([512, 300, 0, 1, 129, 511, 64, 257], 12, 64, id="base-B8-L512-H12x64"),
    cpu([40, 17, 0, 1, 33, 39], 2, 16, id="B6-L40-H2x16")])
def test_varlen_attention_matches_fp64(poison, request, monkeypatch, device, lengths, heads, d):
    """The "auto" attention of a padded bf16 batch: the plan (Triton), real tokens packed first, flash's
    variable-length kernel, unpacked; values and gradients at the real tokens against a naive fp64 masked softmax.
    The CPU twin runs the plan in the interpreter and the same `aten::_flash_attention_forward` call, served by
    tests/attention_oracles.py's fp64 CPU kernels."""
    n = max(lengths)
    if device == "cuda":
        assert _backend.resolve("varlen_plan", None, torch.device("cuda"))[0] == "triton"
    else:
        request.getfixturevalue("flash_on_cpu")
        use_small_tiles(monkeypatch, ("varlen_plan",))
        monkeypatch.setenv("ELECTRA_FAST_BACKEND", "triton")  # the plan is called inside, without backend=
    mask = lengths_mask(lengths, n).to(device)
    prepared = padding_mask(mask, "auto", dtype=BF16, dropout=False, head_dim=d)
    assert isinstance(prepared, VarlenMask) and prepared.bias is None, "the default is not flash varlen here"
    real = mask.bool()
    order = np.argsort(~real.cpu().numpy(), axis=1, kind="stable") + np.arange(len(lengths))[:, None] * n
    assert torch.equal(prepared.order.cpu(), torch.from_numpy(order))
    cu = [x for row, length in enumerate(lengths) for x in (row * n, row * n + length)] + [len(lengths) * n]
    assert prepared.cu_seqlens.tolist() == cu

    shape = (len(lengths), n, heads, d)
    q = (torch.randn(shape, device=device) * 1.5).to(BF16)  # scores of std ~1.5: a softmax with some peaks
    k, v = (torch.randn(shape, device=device).to(BF16) for _ in range(2))
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = run_attend(q, k, v, prepared)
    g = torch.randn(shape, device=device).to(BF16) * real[..., None, None]
    grads = torch.autograd.grad(out, leaves, g)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = naive_attention(*ref_leaves, mask)
    ref_grads = torch.autograd.grad(ref, ref_leaves, g.double())
    assert out.dtype == BF16
    assert_near(out[real], ref[real], norm_rtol=ATTN_NORM_RTOL, rtol=BF16_RTOL, atol_frac=ATTN_ELEM_ATOL, what="out")
    for name, got, want in zip("qkv", grads, ref_grads):  # a row without real keys (length 0) has no reference
        assert_near(got[real], want[real], norm_rtol=ATTN_GRAD_NORM_RTOL, rtol=BF16_RTOL, atol_frac=ATTN_ELEM_ATOL,
                    what=f"d{name}")
