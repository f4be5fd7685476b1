"""CUDA C++ backend (`electra_fast.csrc`: a launcher module per op, kernels in `csrc/`).

CPU part (always runs): backend selection and its errors, the probe that must never compile, the build
definition, and the fake kernels + autograd wiring (on meta tensors).
GPU part (marked `cuda`; skipped without a GPU, or without nvcc/ninja to build the extension; each test that can
runs its body on the CPU too, with the PyTorch reference in the backend's place): parity with the PyTorch
reference at real sizes (V = 30522, M in thousands; fp32/fp16/bf16), plain and padded to a multiple of 128 (garbage
in the padding, exactly zero gradient there), with both samplers: exact samples for the Gumbel one, replayed from
its own noise; gradients; chi-square tests of the sampling distribution (both samplers; the full-vocabulary one is
in test_kernels_cuda.py); parity with the Triton kernels; CUDA-graph replays drawing fresh samples;
torch.compile(fullgraph=True); opcheck; int64 offsets.
"""
import itertools

import pytest
import torch

from conftest import gpu_param, interpreter_param, requires_cuda
from electra_fast import ops
from electra_fast.csrc import _build as _cuda_build, _extension as ef_cuda
from electra_fast.csrc import gumbel_sample as cu_gumbel, masked_gather as cu_gather, mlm_loss_and_sample as cu_mlm, \
    replace_tokens as cu_replace, rtd_bce_loss as cu_bce
from electra_fast.ops._backend import draw_seed, uniform
from electra_fast.ops.gumbel_sample import disallow_ids, gumbel_scores
from electra_fast.options import env_sampler
from helpers import chi2_critical, half_at_argmax, replayable, use_sampler

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
VOCAB = 30522  # BERT's: rows of 16-bit logits then start off 16-byte boundaries, exercising the scalar head/tail
PADDED = 30592  # the model's width for it (a multiple of 128): every row 16-byte aligned, 70 padding columns


def _seed(device="cuda"):
    return torch.randint(0, 2**63 - 1, (1,), device=device, dtype=torch.int64)  # as draw_seed: all 64 bits used


# ------------------------------------------------------------------------------------------------------------
# CPU part


def _cpu_calls():
    logits, ids = torch.randn(4, 10), torch.randint(0, 10, (4,))
    hidden, positions = torch.randn(2, 6, 8), torch.randint(0, 6, (2, 2))
    return {
        "mlm_loss_and_sample": lambda **kw: ops.mlm_loss_and_sample(logits, ids, torch.ones(4), **kw),
        "gumbel_sample": lambda **kw: ops.gumbel_sample(logits, **kw),
        "masked_gather": lambda **kw: ops.masked_gather(hidden, positions, **kw),
        "replace_tokens": lambda **kw: ops.replace_tokens(torch.randint(0, 10, (2, 6)), positions, torch.ones(2, 2),
                                                          torch.randint(0, 10, (2, 2)), **kw),
        "rtd_bce_loss": lambda **kw: ops.rtd_bce_loss(torch.randn(2, 6), torch.rand(2, 6) > 0.5, **kw),
    }


@pytest.mark.parametrize("op", sorted(_cpu_calls()))
def test_backend_cuda_on_cpu_tensors_raises(op):
    call = _cpu_calls()[op]
    with pytest.raises(RuntimeError, match=r"backend 'cuda' cannot run .*CUDA tensors"):
        call(backend="cuda")
    assert "cuda" not in ops.available_backends("cpu", op)
    call()  # the default on CPU tensors is the reference, silently


def test_direct_calls_name_the_cpu_argument():
    ids, seed = torch.zeros(4, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="logits must be a CUDA tensor.*got device cpu"):
        cu_mlm.mlm_loss_and_sample(torch.randn(4, 10), ids, torch.ones(4), seed, 1.0, False)
    with pytest.raises(ValueError, match="hidden must be a CUDA tensor"):
        cu_gather.masked_gather(torch.randn(2, 3, 4), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids must be a CUDA tensor"):
        cu_replace.replace_tokens(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long),
                                  torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.long))


def test_sampler_choice_is_checked():
    assert env_sampler() in cu_mlm.SAMPLERS and cu_mlm.SAMPLERS[0] == "cdf"  # the default: exact inverse CDF
    ids, seed = torch.zeros(4, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="ELECTRA_FAST_SAMPLER.*nope"):
        cu_mlm.mlm_loss_and_sample(torch.randn(4, 10), ids, torch.ones(4), seed, 1.0, False, sampler="nope")
    with pytest.raises(ValueError, match="ELECTRA_FAST_SAMPLER.*nope"):
        cu_gumbel.gumbel_sample(torch.randn(4, 10), seed, 1.0, sampler="nope")


def test_probe_is_cheap_and_explains_itself():
    before = ef_cuda._ext
    reason = ef_cuda.unavailable_reason()
    assert isinstance(reason, str) and ef_cuda.is_available() == (reason == "")
    assert ef_cuda._ext is before  # probing never builds or loads the extension
    if not torch.cuda.is_available():
        assert not ef_cuda.is_available()
        assert "CUDA" in reason
        with pytest.raises(RuntimeError, match="CUDA backend is unavailable"):
            ef_cuda.extension()


def test_build_definition(monkeypatch):
    assert ef_cuda._csrc_dir().endswith("csrc")
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    flags = _cuda_build.arch_flags(["8.6"])
    assert "-gencode=arch=compute_90,code=sm_90" in flags  # Hopper, always
    assert "-gencode=arch=compute_86,code=sm_86" in flags  # the GPU present at a JIT build
    assert flags[-1] == "-gencode=arch=compute_80,code=compute_80"  # portable PTX
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    assert _cuda_build.arch_flags(["8.6"]) == []  # torch turns the variable into flags itself
    digest = _cuda_build.sources_digest(ef_cuda._csrc_dir())
    assert len(digest) == 16 and digest == _cuda_build.sources_digest(ef_cuda._csrc_dir())


def test_fake_kernels_and_autograd_wiring_on_meta():
    # Meta tensors run the fake kernels and the registered autograd, so shapes and dtypes are checked here.
    d = "meta"
    for dtype in DTYPES:
        logits = torch.empty(6, 11, device=d, dtype=dtype, requires_grad=True)
        ids, w, seed = torch.zeros(6, dtype=torch.long, device=d), torch.ones(6, device=d), _seed(d)
        loss, sampled, correct, lse, wsum = cu_mlm._mlm_op(logits, ids, w, seed, 1.0, True, "cdf", 9)
        assert (loss.shape, loss.dtype, sampled.shape, sampled.dtype, correct.dtype) == \
            (torch.Size([]), torch.float32, torch.Size([6]), torch.int64, torch.bool)
        loss.backward()
        assert logits.grad.shape == logits.shape and logits.grad.dtype == dtype
        assert cu_gumbel._gumbel_op(logits.detach(), seed, 0.5, ids, "gumbel", 11).shape == (6,)

        bce_logits = torch.empty(3, 7, device=d, dtype=dtype, requires_grad=True)
        bce = cu_bce._bce_op(bce_logits, torch.empty(3, 7, device=d, dtype=torch.bool),
                              torch.empty(3, 7, device=d, dtype=torch.int64))[0]
        bce.backward()
        assert bce.dtype == torch.float32 and bce_logits.grad.dtype == dtype

        hidden = torch.empty(2, 9, 5, device=d, dtype=dtype, requires_grad=True)
        out = cu_gather._gather_op(hidden, torch.zeros(2, 4, dtype=torch.long, device=d))
        out.sum().backward()
        assert out.shape == (2, 4, 5) and hidden.grad.shape == hidden.shape and hidden.grad.dtype == dtype
    disc, rep = cu_replace._replace_op(torch.empty(2, 9, dtype=torch.int32, device=d),
                                    torch.zeros(2, 4, dtype=torch.long, device=d), torch.ones(2, 4, device=d),
                                    torch.zeros(2, 4, dtype=torch.long, device=d))
    assert disc.dtype == torch.int32 and rep.dtype == torch.bool and rep.shape == (2, 9)


# ------------------------------------------------------------------------------------------------------------
# GPU part, each test with its CPU twin: the same body with the PyTorch reference on the CPU in the CUDA backend's
# place (`backend="torch"`, at sizes the CPU draws quickly), so the inputs, the fp64 oracles and the tolerances are
# proven before a GPU runs them; the parity tests pair the reference with the Triton kernels in the interpreter.

ENGINES = [pytest.param("torch", id="cpu"), gpu_param("cuda")]
# With each sampler of the CUDA backend (as ELECTRA_FAST_SAMPLER would select it at import); the reference has one.
SAMPLED = [pytest.param("torch", None, id="cpu")] + [gpu_param("cuda", s, id=f"cuda-{s}") for s in cu_mlm.SAMPLERS]


@pytest.fixture
def with_sampler(monkeypatch, backend, sampler):
    use_sampler(monkeypatch, backend, sampler)


@pytest.fixture(scope="module")
def ext():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not ef_cuda.is_available():
        pytest.skip(f"CUDA backend unavailable: {ef_cuda.unavailable_reason()}")
    return ef_cuda.extension()  # built here on first use (a minute or two), then cached


@pytest.fixture
def device(request, backend):
    """Where `backend` runs; the CUDA backend's tests build (or skip for want of) the extension first."""
    if backend == "cuda":
        request.getfixturevalue("ext")
        return "cuda"
    return "cpu"


def _size(device, gpu, cpu):
    return gpu if device == "cuda" else cpu


def _poison_allocator(nbytes, device):
    """Leave freed blocks of 0xFF bytes (NaN for floats, -1 for ints, True for bools) in both pools of the caching
    allocator (blocks up to 1 MiB, and larger ones), so an output element a kernel fails to write shows up
    instead of reading as a lucky zero. The kernels' outputs are allocated inside the ops, out of reach. The CPU
    has no caching allocator (and the reference writes every element it returns)."""
    if device != "cuda":
        return
    for size in (1 << 20, max(int(nbytes), 2 << 20)):
        torch.full((size,), 0xFF, dtype=torch.uint8, device="cuda")


def _close(got, want, dtype, what):
    """`got` (any dtype) against an fp64 oracle, to the precision of one rounding to `dtype` of an fp32 result."""
    rtol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    scale = want.abs().max().item() if want.numel() else 1.0
    subnormal_step = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps  # fp16 grads ~1e-8 land there
    # Computed in fp32, an element that nearly cancels keeps fp32's error of the largest terms, not a relative one:
    # softmax - onehot at a target of probability ~1 (V = 7) is off by ~eps32 * |logit| * scale.
    atol = max(rtol * 1e-2 * scale, 16 * torch.finfo(torch.float32).eps * scale, subnormal_step)
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol, msg=what)


def _mlm_inputs(m, v, dtype, width=None, device="cuda"):
    """Logits [m, width] whose first v columns are the vocabulary; the padding holds NaN, which must never leak."""
    logits = torch.full((m, width or v), float("nan"), device=device, dtype=dtype)
    logits[:, :v] = (torch.randn(m, v, device=device) * 3).to(dtype)
    targets = half_at_argmax(logits[:, :v])  # `correct` exercised both ways (and its tie rule in 16-bit)
    weights = (torch.rand(m, device=device) > 0.1).float()
    return logits, targets, weights


def _gumbel_draw(backend, logits, generator, temperature, v, disallow=None):
    """What the Gumbel sampler of `backend` draws from `logits[:, :v]` with `generator` as the op would take it:
    argmax(logits / T + g) with the backend's own noise, replayed (the CUDA kernel's from the seed it draws, the
    reference's from the uniforms it draws)."""
    m, width = logits.shape
    if backend == "cuda":
        seed = draw_seed(logits.device, generator)
        scores = logits[:, :v].float() / temperature + cu_gumbel.gumbel_noise(seed, m, width)[:, :v]
    else:
        scores = gumbel_scores(logits[:, :v], uniform((m, v), logits.device, generator), temperature)
    if disallow is not None:
        scores = disallow_ids(scores, disallow)
    return scores.argmax(1)


@pytest.mark.parametrize("v, width", [(VOCAB, VOCAB), (VOCAB, PADDED), (1000, 1000), (7, 16)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature,disallow_correct", [(1.0, False), (0.5, True)])
@pytest.mark.parametrize("backend, sampler", SAMPLED)
def test_mlm_loss_and_sample_matches_reference(backend, sampler, device, with_sampler, dtype, v, width,
                                               temperature, disallow_correct):
    m = _size(device, 2048, 64)
    logits, targets, weights = _mlm_inputs(m, v, dtype, width, device)
    logits.requires_grad_(True)
    gen = torch.Generator(device).manual_seed(17)
    _poison_allocator(m * width * 4, device)
    loss, sampled, correct = ops.mlm_loss_and_sample(logits, targets, weights, temperature=temperature,
                                                     disallow_correct=disallow_correct, generator=gen,
                                                     backend=backend, vocab_size=v)
    (loss * 2.5).backward()

    ref_logits = logits.detach().double().requires_grad_(True)
    ref_loss, _, ref_correct = ops.mlm_loss_and_sample(ref_logits, targets, weights, backend="torch", vocab_size=v)
    (ref_loss * 2.5).backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-5, atol=1e-6)
    assert torch.equal(correct, ref_correct) and m // 2 <= correct.sum() < m
    _close(logits.grad[:, :v], ref_logits.grad[:, :v], dtype, "grad of the MLM loss")
    assert torch.equal(logits.grad[:, v:], torch.zeros_like(logits.grad[:, v:]))  # padding: exactly 0, written

    assert ((sampled >= 0) & (sampled < v)).all()
    if disallow_correct:
        assert not (sampled == targets).any()
    if backend == "torch" or sampler == "gumbel":  # the sample, exactly, from the sampler's own noise replayed
        want = _gumbel_draw(backend, logits.detach(), torch.Generator(device).manual_seed(17), temperature, v,
                            targets if disallow_correct else None)
        assert torch.equal(sampled, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_disallow", [False, True])
@pytest.mark.parametrize("backend", ENGINES)
def test_gumbel_sample_matches_reference(backend, device, dtype, with_disallow):
    m, v, temperature = _size(device, 4096, 256), VOCAB, 2.0
    logits = (torch.randn(m, v, device=device) * 2).to(dtype)
    disallow = None
    if with_disallow:  # a mix of rows without a restriction (-1) and rows that may not draw their argmax
        disallow = torch.where(torch.rand(m, device=device) < 0.5, logits.float().argmax(1), -1)
    _poison_allocator(m * 8 * 4, device)
    sampled = ops.gumbel_sample(logits, temperature=temperature, disallow=disallow,
                                generator=torch.Generator(device).manual_seed(5), backend=backend,
                                sampler="gumbel")  # the sampler whose draws can be replayed
    want = _gumbel_draw(backend, logits, torch.Generator(device).manual_seed(5), temperature, v, disallow)
    assert torch.equal(sampled, want)
    if with_disallow:
        assert not (sampled == disallow).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [12, 16])
@pytest.mark.parametrize("op", ["gumbel_sample", "mlm_loss_and_sample"])
@pytest.mark.parametrize("backend, sampler", SAMPLED)
def test_sampling_distribution(backend, sampler, device, with_sampler, op, dtype, width):
    # One 12-token row repeated 200k times (unpadded, rows 24 bytes apart in 16-bit: both the vector and the scalar
    # paths draw; or padded to 16 with garbage that would win every draw if it leaked), token 3 disallowed; the
    # counts must follow softmax(logits / T) over the other tokens.
    v, m, temperature, banned = 12, 200_000, 0.7, 3
    row = torch.full((width,), 50.0, dtype=torch.float64)
    # Spread over [-2.5, 2.5] in a random order: every token expects >= 70 draws (randn * 2.5 left some below the
    # 5 the chi-square approximation needs, for about half the seeds).
    row[:v] = torch.linspace(-2.5, 2.5, v, dtype=torch.float64)[torch.randperm(v)]
    row = row.to(dtype)
    logits = row.to(device).expand(m, width).contiguous()
    ids = torch.full((m,), banned, device=device, dtype=torch.int64)
    if op == "gumbel_sample":
        sampled = ops.gumbel_sample(logits, temperature=temperature, disallow=ids, backend=backend, vocab_size=v)
    else:
        sampled = ops.mlm_loss_and_sample(logits, ids, torch.ones(m, device=device), temperature=temperature,
                                          disallow_correct=True, backend=backend, vocab_size=v)[1]
    counts = torch.bincount(sampled, minlength=width).double().cpu()
    assert counts.sum() == m and counts[banned] == 0 and counts[v:].sum() == 0
    probs = torch.softmax(row[:v].double() / temperature, 0)
    keep = torch.arange(v) != banned
    expected = probs[keep] / probs[keep].sum() * m
    assert expected.min() >= 5
    stat = ((counts[:v][keep] - expected) ** 2 / expected).sum().item()
    assert stat < chi2_critical(int(keep.sum()) - 1), (stat, counts, probs)


@pytest.mark.parametrize("temperature, disallow", [(1.0, False), (0.8, True)])
@pytest.mark.parametrize("backend", ENGINES)
def test_cdf_sampling_across_warps_and_tiles(backend, device, temperature, disallow):
    """The inverse-CDF draw's levels (warp, thread tile, lane share, column) at a width where every thread holds
    several vectors: V = 2000 fp32 (500 vectors over 64 threads, two warps), the row max in the last tile, the mass
    spread so every tile carries some; NaN padding. (The reference on the CPU: V = 500, fewer draws.)"""
    v, width, m = _size(device, (2000, 2048, 100_000), (500, 512, 25_000))
    banned = v * 5 // 8
    row = torch.full((width,), float("nan"))
    row[:v] = torch.randn(v) * 0.25
    row[v - 1] = row[:v].max() + 0.5
    logits = row.to(device).expand(m, width).contiguous()
    ids = torch.full((m,), banned, device=device)
    if disallow:
        sampled = ops.gumbel_sample(logits, temperature=temperature, disallow=ids, backend=backend, vocab_size=v,
                                    sampler="cdf")
    else:
        sampled = ops.mlm_loss_and_sample(logits, ids, torch.ones(m, device=device), temperature=temperature,
                                          backend=backend, vocab_size=v, sampler="cdf")[1]
    counts = torch.bincount(sampled, minlength=width).double().cpu()
    assert counts.sum() == m and counts[v:].sum() == 0
    probs = torch.softmax(row[:v].double() / temperature, 0)
    if disallow:
        assert counts[banned] == 0
        probs[banned] = 0
        probs /= probs.sum()
    keep = probs > 0
    expected = probs[keep] * m
    assert expected.min() >= 5
    stat = ((counts[:v][keep] - expected) ** 2 / expected).sum().item()
    assert stat < chi2_critical(int(keep.sum()) - 1), stat


@pytest.mark.parametrize("backend", ENGINES)
def test_samples_follow_torch_seed(backend, device):
    logits = torch.randn(512, 1000, device=device)
    torch.manual_seed(7)
    a = ops.gumbel_sample(logits, backend=backend)
    torch.manual_seed(7)
    b = ops.gumbel_sample(logits, backend=backend)
    c = ops.gumbel_sample(logits, backend=backend)
    d = ops.gumbel_sample(logits, generator=torch.Generator(device=device).manual_seed(3), backend=backend)
    e = ops.gumbel_sample(logits, generator=torch.Generator(device=device).manual_seed(3), backend=backend)
    assert torch.equal(a, b) and (a != c).float().mean() > 0.5
    assert torch.equal(d, e) and (d != a).float().mean() > 0.5


@pytest.mark.parametrize("dtype,h,offset", [(torch.bfloat16, 768, 0), (torch.float32, 256, 0),
                                            (torch.float16, 3, 1), (torch.float64, 5, 1), (torch.int64, 4, 0)])
@pytest.mark.parametrize("backend", ENGINES)
def test_masked_gather_and_scatter_match_reference(backend, device, dtype, h, offset):
    b, seq, n = _size(device, (16, 512, 77), (4, 64, 20))
    # `offset` starts the tensor one element into its storage: misaligned rows take the narrower copy paths.
    base = torch.randn(b * seq * h + offset, device=device, dtype=torch.float64) * 100
    hidden = base.to(dtype)[offset:].view(b, seq, h)
    positions = torch.randint(0, seq, (b, n), device=device)  # repeats included: the backward must add them
    _poison_allocator(b * seq * h * 8, device)
    out = ops.masked_gather(hidden, positions, backend=backend)
    assert torch.equal(out, hidden.gather(1, positions[..., None].expand(-1, -1, h)))
    if not dtype.is_floating_point:
        return
    hidden = hidden.detach().requires_grad_(True)  # same (misaligned) storage, now a leaf that takes a grad
    grad_out = torch.randn(b, n, h, device=device).to(dtype)
    _poison_allocator(b * seq * h * 8, device)
    ops.masked_gather(hidden, positions, backend=backend).backward(grad_out)
    want = torch.zeros(b, seq, h, device=device, dtype=torch.float64)
    want.scatter_add_(1, positions[..., None].expand(-1, -1, h), grad_out.double())
    _close(hidden.grad, want, dtype if dtype != torch.float64 else torch.float32, "scatter-add backward")


@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("backend", ENGINES)
def test_replace_tokens_matches_reference(backend, device, id_dtype):
    b, seq = 64, 512
    input_ids = torch.randint(1000, 30000, (b, seq), device=device, dtype=id_dtype)
    lengths = torch.randint(seq // 4, seq + 1, (b,), device=device)
    attention = (torch.arange(seq, device=device) < lengths[:, None]).long()
    _, positions, weights = ops.mask_tokens(input_ids, attention, mask_token_id=103, special_token_ids=(0, 101, 102))
    original = input_ids.gather(1, positions)
    # 30% of the samples equal the original token: those must come out as not replaced.
    same = torch.rand(positions.shape, device=device) < 0.3
    sampled = torch.where(same, original.long(), torch.randint(0, 30522, positions.shape, device=device))
    _poison_allocator(b * seq * 16, device)
    disc, rep = ops.replace_tokens(input_ids, positions, weights, sampled, backend=backend)
    want_disc = input_ids.clone()  # the oracle, by its definition: real slots write their samples
    real = weights > 0
    rows = torch.arange(b, device=device)[:, None].expand_as(positions)
    want_disc[rows[real], positions[real]] = sampled[real].to(id_dtype)
    assert disc.dtype == id_dtype and torch.equal(disc, want_disc) and torch.equal(rep, disc != input_ids)
    assert 0 < rep.sum() < real.sum() and not rep[rows[real & same], positions[real & same]].any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("label_dtype,mask_dtype", [(torch.bool, None), (torch.int64, torch.int64),
                                                    (torch.float32, torch.bool), (torch.uint8, torch.float16)])
@pytest.mark.parametrize("backend", ENGINES)
def test_rtd_bce_matches_reference(backend, device, dtype, label_dtype, mask_dtype):
    b, seq = 128, 512
    logits = (torch.randn(b, seq, device=device) * 4).to(dtype).requires_grad_(True)
    labels = (torch.rand(b, seq, device=device) < 0.15).to(label_dtype)
    mask = None
    if mask_dtype is not None:
        lengths = torch.randint(1, seq + 1, (b,), device=device)
        mask = (torch.arange(seq, device=device) < lengths[:, None]).to(mask_dtype)
    _poison_allocator(b * seq * 8, device)
    loss = ops.rtd_bce_loss(logits, labels, mask, backend=backend)
    (loss * 2.5).backward()
    ref_logits = logits.detach().double().requires_grad_(True)
    ref = ops.rtd_bce_loss(ref_logits, labels, mask, backend="torch")
    (ref * 2.5).backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-7)
    _close(logits.grad, ref_logits.grad, dtype, "grad of the BCE loss")


@pytest.mark.parametrize("backend", ENGINES)
def test_rtd_bce_without_real_tokens_is_zero(backend, device):
    logits = torch.randn(4, 9, device=device, requires_grad=True)
    loss = ops.rtd_bce_loss(logits, torch.ones(4, 9, device=device), torch.zeros(4, 9, device=device),
                            backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("backend", ENGINES)
def test_mlm_without_real_slots_is_zero(backend, device):
    logits = torch.randn(8, 50, device=device, requires_grad=True)
    loss, sampled, _ = ops.mlm_loss_and_sample(logits, torch.zeros(8, dtype=torch.long, device=device),
                                               torch.zeros(8, device=device), backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))
    assert ((sampled >= 0) & (sampled < 50)).all()


# Backend pairs of the parity tests: the CUDA backend and Triton on a GPU; the reference and Triton (interpreter)
# at tiny sizes on the CPU.
PAIRS = [interpreter_param(("torch", "triton"), id="cpu"), gpu_param(("cuda", "triton"), id="cuda", triton=True)]


@pytest.fixture
def pair_device(request, pair):
    if pair[0] == "cuda":
        request.getfixturevalue("ext")
        return "cuda"
    return "cpu"


def _triton_or_skip(op, device):
    if "triton" not in ops.available_backends(device, op):
        pytest.skip(f"no Triton kernel for {op} here")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pair", PAIRS)
def test_mlm_parity_with_triton(pair, pair_device, dtype):
    device = pair_device
    _triton_or_skip("mlm_loss_and_sample", device)
    m, v = _size(device, (2048, VOCAB), (8, 40))
    temperature = 1e-6  # T -> 0: the sample is the argmax, whatever each backend's random stream
    logits, targets, weights = _mlm_inputs(m, v, dtype, device=device)
    results = {}
    for backend in pair:
        x = logits.detach().clone().requires_grad_(True)
        loss, sampled, correct = ops.mlm_loss_and_sample(x, targets, weights, temperature=temperature,
                                                         backend=backend)
        loss.backward()
        results[backend] = (loss, sampled, correct, x.grad)
    (l1, s1, c1, g1), (l2, s2, c2, g2) = (results[b] for b in pair)
    torch.testing.assert_close(l1, l2, rtol=2e-5, atol=1e-6)
    assert torch.equal(c1, c2) and m // 2 <= c1.sum() < m
    _close(g1, g2.double(), dtype, f"{pair[0]} vs Triton gradient")
    # Compare samples where the top logit is unique by a margin (16-bit ties are broken by the noise).
    top2 = logits.float().topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-3
    assert clear.float().mean() > 0.5
    assert torch.equal(s1[clear], s2[clear])


@pytest.mark.parametrize("pair", PAIRS)
def test_other_ops_parity_with_triton(pair, pair_device):
    device = pair_device
    b, seq, h, n = _size(device, (16, 512, 768, 77), (2, 16, 8, 5))
    if "triton" in ops.available_backends(device, "masked_gather"):
        hidden = torch.randn(b, seq, h, device=device, dtype=torch.bfloat16)
        positions = torch.randint(0, seq, (b, n), device=device)
        grads = []
        for backend in pair:
            x = hidden.clone().requires_grad_(True)
            out = ops.masked_gather(x, positions, backend=backend)
            out.float().pow(2).sum().backward()
            grads.append((out, x.grad))
        assert torch.equal(grads[0][0], grads[1][0])
        _close(grads[0][1], grads[1][1].double(), torch.bfloat16, f"scatter-add: {pair[0]} vs Triton")
    if "triton" in ops.available_backends(device, "rtd_bce_loss"):
        logits = torch.randn(b, seq, device=device, dtype=torch.bfloat16)
        labels = torch.rand(b, seq, device=device) < 0.15
        mask = torch.rand(b, seq, device=device) < 0.9
        losses = [ops.rtd_bce_loss(logits, labels, mask, backend=bk) for bk in pair]
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-7)
    if "triton" in ops.available_backends(device, "replace_tokens"):
        ids = torch.randint(0, 30522, (b, seq), device=device)
        _, positions, weights = ops.mask_tokens(ids, mask_token_id=103, special_token_ids=(0,))
        sampled = torch.randint(0, 30522, positions.shape, device=device)
        outs = [ops.replace_tokens(ids, positions, weights, sampled, backend=bk) for bk in pair]
        assert all(torch.equal(x, y) for x, y in zip(*outs))


@pytest.mark.parametrize("backend", ENGINES)
def test_cuda_graph_replays_draw_fresh_samples(backend, device):
    """On a GPU the step is captured and replayed; on the CPU the same step runs eagerly each time."""
    m, v = 256, 1000
    logits = torch.randn(m, v, device=device)
    targets = torch.randint(0, v, (m,), device=device)
    weights = torch.ones(m, device=device)

    def step():
        loss, sampled, _ = ops.mlm_loss_and_sample(logits, targets, weights, disallow_correct=True, backend=backend)
        return loss, sampled, ops.gumbel_sample(logits, backend=backend)

    run = replayable(step, device)
    draws = []
    for _ in range(4):
        draws.append(tuple(t.clone() for t in run()))
    ref = ops.mlm_loss_and_sample(logits.double(), targets, weights, backend="torch")[0]
    for replay_loss, replay_sampled, _ in draws:
        torch.testing.assert_close(replay_loss.double(), ref, rtol=2e-5, atol=1e-6)  # the deterministic part
        assert torch.equal(replay_loss, draws[0][0])
        assert not (replay_sampled == targets).any()
    for (_, s1, p1), (_, s2, p2) in itertools.combinations(draws, 2):
        # With ~1000 plausible tokens per row two independent draws rarely agree; a frozen seed would agree everywhere.
        assert (s1 != s2).float().mean() > 0.5 and (p1 != p2).float().mean() > 0.5


def _pipeline(hidden, positions, weights, targets, w_out, input_ids, disc_logits):
    # The backend's own entry points, so this checks electra_fast.csrc's ops (fake kernels, autograd) under
    # dynamo independently of the backend switch.
    gathered = cu_gather.masked_gather(hidden, positions)
    logits = gathered.flatten(0, 1) @ w_out
    loss, sampled, _ = cu_mlm.mlm_loss_and_sample(logits, targets, weights.flatten(), _seed(), 1.0, False)
    _, is_replaced = cu_replace.replace_tokens(input_ids, positions, weights, sampled)
    return loss + cu_bce.rtd_bce_loss(disc_logits, is_replaced, torch.ones_like(disc_logits)), sampled


@requires_cuda
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(ext, compiler):
    b, seq, h, v = 4, 64, 32, 500
    input_ids = torch.randint(5, v, (b, seq), device="cuda")
    _, positions, weights = ops.mask_tokens(input_ids, mask_token_id=3, special_token_ids=(0,))
    targets = input_ids.gather(1, positions).flatten()
    params = [torch.randn(b, seq, h, device="cuda"), torch.randn(h, v, device="cuda") * 0.1,
              torch.randn(b, seq, device="cuda")]
    results = []
    for fn in (_pipeline, torch.compile(_pipeline, fullgraph=True, backend=compiler)):
        leaves = [p.clone().requires_grad_(True) for p in params]
        torch.manual_seed(11)  # the same seed draws in both (inductor falls back to torch's RNG, below)
        with torch._inductor.config.patch(fallback_random=True):
            loss, sampled = fn(leaves[0], positions, weights, targets, leaves[1], input_ids, leaves[2])
        loss.backward()
        results.append((loss, sampled, [p.grad for p in leaves]))
    (l1, s1, g1), (l2, s2, g2) = results
    assert torch.equal(s1, s2)
    torch.testing.assert_close(l1, l2)
    for a, c in zip(g1, g2):
        torch.testing.assert_close(a, c)


@requires_cuda
def test_opcheck(ext):
    m, v = 64, 300
    logits = torch.randn(m, v, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ids = torch.randint(0, v, (m,), device="cuda")
    w, seed = torch.ones(m, device="cuda"), _seed()
    hidden = torch.randn(2, 40, 16, device="cuda", requires_grad=True)
    positions = torch.randint(0, 40, (2, 7), device="cuda")
    bce_logits = torch.randn(2, 40, device="cuda", requires_grad=True)
    cases = [
        (cu_mlm._mlm_op, (logits, ids, w, seed, 0.8, True, "cdf", v)),
        (cu_mlm._mlm_op, (logits, ids.clamp(max=v - 45), w, seed, 1.0, False, "gumbel", v - 44)),
        (cu_gumbel._gumbel_op, (logits.detach(), seed, 1.0, ids, "gumbel", v)),
        (cu_gumbel._gumbel_op, (logits.detach(), seed, 0.5, None, "cdf", v - 44)),
        (cu_gather._gather_op, (hidden, positions)),
        (cu_gather._scatter_add_op, (torch.randn(2, 7, 16, device="cuda"), positions, 40)),
        (cu_replace._replace_op, (torch.randint(0, v, (2, 40), device="cuda"), positions,
                                  torch.ones(2, 7, device="cuda"), torch.randint(0, v, (2, 7), device="cuda"))),
        (cu_bce._bce_op, (bce_logits, torch.rand(2, 40, device="cuda") < 0.5, torch.ones(2, 40, device="cuda"))),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


@requires_cuda
def test_row_offsets_beyond_int32(ext):
    v = VOCAB
    m = 2**31 // v + 64  # M * V > 2^31 elements: int32 offsets would wrap in the last rows
    need = m * v * 2 * 2 + (2 << 30)  # bf16 logits and their gradient, plus headroom
    if torch.cuda.mem_get_info()[0] < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory")
    logits = torch.empty(m, v, device="cuda", dtype=torch.bfloat16).normal_().requires_grad_(True)
    targets = torch.randint(0, v, (m,), device="cuda")
    weights = torch.zeros(m, device="cuda")
    weights[-64:] = 1.0  # only the rows past 2^31 count
    loss, _, correct = cu_mlm.mlm_loss_and_sample(logits, targets, weights, _seed(), 1.0, False)
    loss.backward()
    tail = logits.detach()[-64:].double().requires_grad_(True)
    ref_loss, _, ref_correct = ops.mlm_loss_and_sample(tail, targets[-64:], weights[-64:], backend="torch")
    ref_loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-5, atol=1e-6)
    assert torch.equal(correct[-64:], ref_correct)
    _close(logits.grad[-64:], tail.grad, torch.bfloat16, "gradient past 2^31")
    assert not logits.grad[:-64].any()  # weight-0 rows: zero gradient, written
    # At T -> 0 the sample is a maximal logit of its row.
    sampled = cu_gumbel.gumbel_sample(logits.detach(), _seed(), 1e-6, None)
    picked = logits.detach()[-64:].gather(1, sampled[-64:, None])[:, 0]
    assert torch.equal(picked, logits.detach()[-64:].max(1).values)
    del logits
    torch.cuda.empty_cache()


@requires_cuda
@pytest.mark.parametrize("op", ["masked_gather", "mlm_loss_and_sample", "gumbel_sample", "replace_tokens",
                                "rtd_bce_loss"])
def test_backend_is_listed_on_cuda(ext, op):
    assert "cuda" in ops.available_backends("cuda", op)
