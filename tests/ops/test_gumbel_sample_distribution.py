"""The sampling distribution of `ops.gumbel_sample` and of the samples of `ops.mlm_loss_and_sample`, on every
backend and sampler: chi-square tests of the counts against softmax(logits / T) over the ids allowed, fixed seeds
(`chi2_critical` at p ~ 5e-4).

- The reference (torch): fp16 logits at several temperatures; a disallowed id, and rows with a negative one.
- The Triton kernels at tiny shapes with tiles shrunk (in the interpreter, or compiled on a GPU): a maximum in the
  last tile, padding, both samplers.
- ELECTRA's full vocabulary on a GPU (Triton and CUDA backends, both samplers, plain and padded; its twin: the
  reference on the CPU at V = 1000); the CUDA backend's 200k draws of one row, and its inverse-CDF draw across warps
  and tiles (twin: the reference on the CPU)."""
import importlib

import pytest
import torch

from conftest import ENGINES, SAMPLED, TRITON_DEVICE as DEVICE, gpu_param, triton_test
from electra_fast import ops
from electra_fast.options import SAMPLERS
from helpers import by_device, chi2_critical, padded, pooled_chi2, use_sampler

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------- the reference

@pytest.mark.parametrize("temperature", [1.0, 0.6, 2.5])
def test_reference_distribution(temperature):
    v, draws = 6, 6000
    base = torch.tensor([1.5, 0.2, -1.0, 0.7, 0.0, 2.0])
    logits = base.expand(draws, v).to(torch.float16)  # fp16 logits: sampling still runs in fp32
    ids = ops.gumbel_sample(logits, temperature=temperature)
    counts = torch.bincount(ids, minlength=v).double()
    expected = torch.softmax(logits[0].double() / temperature, 0) * draws
    assert ((counts - expected) ** 2 / expected).sum() < chi2_critical(v - 1)


def test_reference_disallow():
    v, draws = 5, 5000
    logits = torch.tensor([0.3, 1.0, -0.5, 0.8, 0.1]).expand(draws, v)
    disallow = torch.where(torch.arange(draws) % 2 == 0, 1, -1)
    ids = ops.gumbel_sample(logits, disallow=disallow)
    assert not (ids[::2] == 1).any()
    counts = torch.bincount(ids[::2], minlength=v).double()[[0, 2, 3, 4]]
    p = torch.softmax(logits[0, [0, 2, 3, 4]].double(), 0) * (draws // 2)
    assert ((counts - p) ** 2 / p).sum() < chi2_critical(3)
    assert (ids[1::2] == 1).any()  # rows with a negative id disallow nothing


# ---------------------------------------------------------------- the Triton kernels, tiles shrunk

def chi2(samples, probs):
    counts = torch.bincount(samples.cpu(), minlength=probs.numel()).double()
    keep = probs > 0
    assert counts[~keep].sum() == 0, "sampled an id of probability 0"
    expected = probs[keep] * samples.numel()
    assert expected.min() >= 5, "too few draws for the chi-square approximation"
    return ((counts[keep] - expected) ** 2 / expected).sum().item(), int(keep.sum()) - 1


# V = 10: a tile of 8 and a partial one; the maximum sits in the last tile, so the first tile's mass must be
# rescaled to the final running max.
BASE = torch.tensor([0.3, -0.4, 0.1, 0.2, -0.5, 0.0, 0.4, -0.2, 0.0, 2.2])


@triton_test
@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("op, sampler, temperature, disallow, width", [
    ("mlm", "cdf", 1.0, False, 10),     # the default path: tile masses shared with the loss
    ("gumbel", "cdf", 0.8, True, 19),   # own running max for the scaled scores, a disallowed id, padding (+1e4)
    ("mlm", "gumbel", 1.7, False, 16),  # Gumbel-max with randint4x noise, padding to a multiple of 16
])
def test_triton_distribution_is_softmax(op, sampler, temperature, disallow, width):
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


# ---------------------------------------------------------------- at full vocabulary and scale, on a GPU

# Per backend: vocabulary, padded width, draws and the logit of the cold ids. The GPU's figures are ELECTRA's; the
# CPU's keep enough draws on the cold ids to fill a few dozen buckets.
FULL = {"torch": dict(device="cpu", v=1000, padded=1024, draws=10000, cold=-4.0),
        "triton": dict(device="cuda", v=30522, padded=30592, draws=40000, cold=-8.0)}
FULL["cuda"] = FULL["triton"]


@pytest.mark.parametrize("padded", [False, True])  # as is, and padded to a multiple of 128 (garbage in the padding)
@pytest.mark.parametrize("op", ["mlm", "gumbel"])
@pytest.mark.parametrize("backend, sampler", [pytest.param("torch", None, id="cpu-torch")] + [
    gpu_param(backend, sampler, id=f"cuda-{backend}-{sampler}", triton=backend == "triton")
    for backend in ("triton", "cuda") for sampler in SAMPLERS])
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
    v, width, m = by_device(device, (2000, 2048, 100_000), (500, 512, 25_000))
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
