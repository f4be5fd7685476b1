"""The Triton kernels on a GPU at ELECTRA sizes (V = 30522, thousands of rows, bf16), against fp64 references, plus
CUDA-graph capture: each replay draws fresh samples, and `torch.manual_seed` replays the same sequence. The
full-vocabulary sampling test runs the CUDA C++ backend too (both samplers, plain and padded vocabulary).

Every test also runs its body on the CPU, so that its own logic (inputs, oracle, tolerances) is proven before a GPU
runs it: the Triton kernels in the interpreter (TRITON_INTERPRET=1) at tiny sizes with tiles shrunk to match, the
captured step eagerly, and the sampling test with the PyTorch reference in the kernels' place (the interpreter
would take minutes over enough draws)."""
import importlib

import pytest
import torch

from conftest import gpu_param, interpreter_param
from electra_fast import ops
from helpers import chi2_critical, half_at_argmax, pooled_chi2, replayable, use_sampler, use_small_tiles

pytest.importorskip("triton", reason="triton is not installed: the Triton backend cannot run")
MLS = importlib.import_module("electra_fast.kernels.mlm_loss_and_sample")
DEVICES = [interpreter_param("cpu"), gpu_param("cuda", triton=True)]
VOCAB = {"cpu": 37, "cuda": 30522}
MLM_ROWS = {"small": {"cpu": 5, "cuda": 128 * 19}, "base": {"cpu": 9, "cuda": 64 * 79}}
# (b, seq_len, h): ELECTRA's small and base batches on a GPU; on the CPU enough padding that slots repeat position 0.
SHAPES = {"small": {"cpu": (2, 32, 8), "cuda": (128, 128, 256)}, "base": {"cpu": (2, 40, 12), "cuda": (64, 512, 768)}}
# Against fp64 references. Gradients here are ~1e-8 at V = 30522 (softmax over thousands of rows): atol stays far
# below them, except one fp16 subnormal step (6e-8) where the fp32 value is rounded to fp16.
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-12), torch.float16: dict(rtol=2e-3, atol=6e-8),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1e-12)}
# The kernels sum the gradients of repeated slots (~10 unit-size terms) in fp32 before one rounding: an fp32 sum's
# error, not a relative one, bounds an element that nearly cancels.
SUM_ATOL = 1e-5


def sized_for(device, monkeypatch):
    """In the interpreter, tiles shrunk so the tiny shapes still span several, with a partial last one."""
    if device == "cpu":
        use_small_tiles(monkeypatch)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows, temperature, disallow", [("small", 1.0, False), ("base", 0.8, True)])
@pytest.mark.parametrize("device", DEVICES)
def test_mlm_loss_and_sample_real_sizes(poison, monkeypatch, device, dtype, rows, temperature, disallow):
    sized_for(device, monkeypatch)
    m, v = MLM_ROWS[rows][device], VOCAB[device]
    logits = (torch.randn(m, v, device=device) * 2).to(dtype)
    targets = half_at_argmax(logits)  # ties included: 16-bit logits tie often at V = 30522
    weights = (torch.rand(m, device=device) > 0.2).float()
    logits.requires_grad_()
    kw = dict(temperature=temperature, disallow_correct=disallow)
    loss, sampled, correct = ops.mlm_loss_and_sample(logits, targets, weights, backend="triton", **kw)
    ref_logits = logits.detach().double().requires_grad_()
    ref_loss, _, ref_correct = ops.mlm_loss_and_sample(ref_logits, targets, weights, backend="torch", **kw)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(correct, ref_correct)
    assert m // 2 <= correct.sum() < m
    assert ((sampled >= 0) & (sampled < v)).all()
    if disallow:
        assert not (sampled == targets).any()
    (grad,) = torch.autograd.grad(loss, logits)
    (ref_grad,) = torch.autograd.grad(ref_loss, ref_logits)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), ref_grad, **TOL[dtype])


# Per backend: vocabulary, padded width, draws and the logit of the cold ids. The GPU's figures are ELECTRA's; the
# CPU's keep enough draws on the cold ids to fill a few dozen buckets.
FULL = {"torch": dict(device="cpu", v=1000, padded=1024, draws=10000, cold=-4.0),
        "triton": dict(device="cuda", v=30522, padded=30592, draws=40000, cold=-8.0)}
FULL["cuda"] = FULL["triton"]


@pytest.mark.parametrize("padded", [False, True])  # as is, and padded to a multiple of 128 (garbage in the padding)
@pytest.mark.parametrize("op", ["mlm", "gumbel"])
@pytest.mark.parametrize("backend, sampler", [pytest.param("torch", None, id="cpu-torch")] + [
    gpu_param(backend, sampler, id=f"cuda-{backend}-{sampler}", triton=backend == "triton")
    for backend in ("triton", "cuda") for sampler in MLS.SAMPLERS])
def test_sampling_distribution_at_full_vocabulary(monkeypatch, backend, sampler, op, padded):
    """Mass on 24 ids spread over all tiles (the largest in the last tile), the rest of the vocabulary at a low
    logit; bf16 logits, T = 0.9. The chi-square counts every hot id on its own and the cold ones in runs of
    neighbouring ids (pooled_chi2), so a tile or a stretch of the vocabulary sampled wrongly shows."""
    if backend == "cuda":
        ef_cuda = importlib.import_module("electra_fast.csrc.mlm_loss_and_sample")
        if not ef_cuda.is_available():
            pytest.skip(f"CUDA backend unavailable: {ef_cuda.unavailable_reason()}")
    use_sampler(monkeypatch, backend, sampler)
    size = FULL[backend]
    device, v, draws, temperature = size["device"], size["v"], size["draws"], 0.9
    width = size["padded"] if padded else v
    gen = torch.Generator(device).manual_seed(31)
    row = torch.full((width,), 30.0, device=device)  # the padding would win every draw if it leaked
    row[:v] = size["cold"]
    hot = torch.linspace(0, v - 1, 24, device=device).long()
    row[hot] = torch.linspace(-1.0, 2.0, 24, device=device)
    logits = row.to(torch.bfloat16).expand(draws, width).contiguous()
    if op == "mlm":
        ids = ops.mlm_loss_and_sample(logits, torch.zeros(draws, dtype=torch.long, device=device),
                                      torch.ones(draws, device=device), temperature=temperature, generator=gen,
                                      backend=backend, vocab_size=v)[1]
    else:
        ids = ops.gumbel_sample(logits, temperature=temperature, generator=gen, backend=backend, vocab_size=v)
    assert ((ids >= 0) & (ids < v)).all()
    probs = torch.softmax(logits[0, :v].double() / temperature, 0)
    counts = torch.bincount(ids, minlength=v)
    assert counts[hot].sum() < draws * 0.98  # the cold ids draw their share: the pooled buckets hold something
    stat, df = pooled_chi2(counts, probs)
    assert df > 24 + 10, df  # the hot ids, and cold buckets well beyond one
    assert stat < chi2_critical(df), (stat, df)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", ["small", "base"])
@pytest.mark.parametrize("device", DEVICES)
def test_gather_replace_at_electra_shapes(poison, monkeypatch, device, shape, dtype):
    sized_for(device, monkeypatch)
    b, seq_len, h = SHAPES[shape][device]
    v = VOCAB[device]
    ids = torch.randint(5, v, (b, seq_len), device=device)
    am = torch.ones_like(ids)
    am[: b // 2, seq_len // 2:] = 0
    _, pos, w = ops.mask_tokens(ids, am, mask_token_id=103, special_token_ids=(0, 1, 2, 3, 103))
    n = pos.shape[1]
    assert (w[: b // 2] == 0).sum(1).min() >= 2  # the padded rows' padding slots all point at position 0
    hidden = torch.randn(b, seq_len, h, device=device, dtype=dtype, requires_grad=True)
    out = ops.masked_gather(hidden, pos, backend="triton")
    assert torch.equal(out, ops.masked_gather(hidden, pos, backend="torch"))
    g = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, hidden, g)
    ref_hidden = hidden.detach().double().requires_grad_()
    (ref_grad,) = torch.autograd.grad(ops.masked_gather(ref_hidden, pos, backend="torch"), ref_hidden, g.double())
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), ref_grad, rtol=TOL[dtype]["rtol"], atol=SUM_ATOL)
    sampled = torch.randint(5, v, (b, n), device=device)
    got, want = (ops.replace_tokens(ids, pos, w, sampled, backend=be) for be in ("triton", "torch"))
    assert all(torch.equal(x, y) for x, y in zip(got, want))


@pytest.mark.parametrize("shape", ["small", "base"])
@pytest.mark.parametrize("device", DEVICES)
def test_bce_and_head_at_electra_shapes(poison, monkeypatch, device, shape):
    sized_for(device, monkeypatch)
    b, seq_len, h = SHAPES[shape][device]
    hidden = torch.randn(b, seq_len, h, device=device, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(1, h, device=device) * 0.05).requires_grad_()  # fp32 parameter, bf16 activations
    bias = torch.zeros(1, device=device, requires_grad=True)
    labels = torch.rand(b, seq_len, device=device) > 0.85
    mask = torch.rand(b, seq_len, device=device) > 0.1
    params = (hidden, weight, bias)
    ref_params = tuple(p.detach().double().requires_grad_() for p in params)
    loss, acc = ops.rtd_head_loss(*params, labels, mask, backend="triton")
    ref_loss, ref_acc = ops.rtd_head_loss(*ref_params, labels, mask, backend="torch")
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(acc.double(), ref_acc, rtol=0, atol=4.0 / mask.sum().item())  # |logit| ~ 0
    grads = torch.autograd.grad(loss, params)
    ref_grads = torch.autograd.grad(ref_loss, ref_params)
    for x, y, p in zip(grads, ref_grads, params):
        assert x.dtype == p.dtype
        torch.testing.assert_close(x.double(), y, rtol=1.6e-2, atol=1e-10)
    logits = torch.randn(b, seq_len, device=device, dtype=torch.bfloat16, requires_grad=True)
    ref_logits = logits.detach().double().requires_grad_()
    loss = ops.rtd_bce_loss(logits, labels, mask, backend="triton")
    ref_loss = ops.rtd_bce_loss(ref_logits, labels, mask, backend="torch")
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(loss, logits)
    (ref_grad,) = torch.autograd.grad(ref_loss, ref_logits)
    torch.testing.assert_close(grad.double(), ref_grad, **TOL[torch.bfloat16])


@pytest.mark.parametrize("device", DEVICES)
def test_cuda_graph_replays_draw_fresh_samples_and_follow_manual_seed(device):
    """On a GPU the step is captured and replayed; on the CPU the same step runs eagerly each time (everything
    the capture takes, without it)."""
    m, v = (256, VOCAB["cuda"]) if device == "cuda" else (6, 24)
    logits = torch.randn(m, v, device=device).to(torch.bfloat16)
    targets = torch.randint(0, v, (m,), device=device)
    weights = (torch.rand(m, device=device) > 0.2).float()

    def step():
        loss, sampled, _ = ops.mlm_loss_and_sample(logits, targets, weights, backend="triton")
        return loss, sampled, ops.gumbel_sample(logits, backend="triton")

    run = replayable(step, device)

    def replays(k):
        out = []
        for _ in range(k):
            loss, sampled, extra = run()
            out.append((loss.clone(), sampled.clone(), extra.clone()))
        return out

    torch.manual_seed(123)
    first = replays(3)
    torch.manual_seed(123)
    again = replays(2)
    for (_, a, x), (_, b, y) in zip(first, again):
        assert torch.equal(a, b) and torch.equal(x, y)
    # Two draws of a row agree with probability ~e / V: all M rows (6 of 24 ids on the CPU) do only if the noise
    # is frozen.
    for i in range(3):
        for j in range(i + 1, 3):
            assert not torch.equal(first[i][1], first[j][1]) and not torch.equal(first[i][2], first[j][2])
    assert not torch.equal(first[0][1], first[0][2])  # the two ops draw from different seeds
    ref = ops.mlm_loss_and_sample(logits.double(), targets, weights, backend="torch")[0]
    for loss, _, _ in first:  # the deterministic part of every replay: the fp64 loss
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
