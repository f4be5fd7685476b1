"""`ops.gumbel_sample`, and the samples of `ops.mlm_loss_and_sample` (drawn by the same samplers), on every backend;
their distributions: tests/ops/test_gumbel_sample_distribution.py.

- The reference (torch): the MLM op's sample is the Gumbel-max of torch's uniforms (computed here in Python); a
  padded vocabulary is never drawn.
- The Triton kernels at tiny shapes with tiles shrunk (the interpreter with `TRITON_INTERPRET=1`, or compiled on a
  GPU): each sampler keeps the loss and the disallowed id; the row offset of a chunk; `torch.manual_seed` and a
  generator replay the draws; disallowed and peaked rows. On a GPU at V = 30522, CUDA-graph replays draw fresh
  samples and `torch.manual_seed` replays the sequence (its twin: the same step eagerly in the interpreter).
- The CUDA C++ backend on a GPU (its twin: the reference on the CPU): the Gumbel sampler's draws replayed exactly from
  its own noise; seeds; CUDA-graph replays.
- Philox seeds carry 63 random bits, and the high word reaches the kernels' random streams (with 31-bit seeds, 1M
  training steps have ~233 pairs of steps drawing the same stream).
- opcheck of each backend's custom ops; bad arguments named; the empty batch."""
import importlib
import itertools
import math

import pytest
import torch

from conftest import (ENGINES, TRITON_DEVICE as DEVICE, TRITON_DEVICES, gpu_param, interpreter_param, triton_param,
                      triton_test)
from electra_fast import ops
from electra_fast.csrc import gumbel_sample as cu_gumbel
from electra_fast.ops._backend import draw_seed
from electra_fast.options import SAMPLERS
from helpers import (by_device, call_gumbel, cuda_seed, gumbel_draw, kernel, padded, poison_cuda_allocator, rand,
                     replayable, use_sampler)

INF = float("inf")
VOCAB = 30522
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------- the reference

def test_reference_mlm_sample_is_gumbel_max_of_torch_uniforms():
    m, v = 9, 21
    logits = torch.randn(m, v)
    targets = torch.randint(0, v, (m,))
    g = torch.Generator().manual_seed(11)
    _, sampled, _ = ops.mlm_loss_and_sample(logits, targets, torch.ones(m), temperature=0.5, generator=g)
    u = torch.rand((m, v), generator=torch.Generator().manual_seed(11))
    for r in range(m):
        scores = [float(logits[r, c]) / 0.5 - math.log(-math.log(float(u[r, c]))) for c in range(v)]
        assert int(sampled[r]) == scores.index(max(scores))


def test_reference_padded_vocabulary_is_never_drawn():
    m, v, width = 200, 7, 16
    real = torch.randn(m, v)
    logits = torch.cat([real, torch.full((m, width - v), 1e4)], 1)
    disallow = torch.randint(-1, v, (m,))
    ids = ops.gumbel_sample(logits, temperature=1.3, disallow=disallow, vocab_size=v,
                            generator=torch.Generator().manual_seed(5))
    same = ops.gumbel_sample(real, temperature=1.3, disallow=disallow, generator=torch.Generator().manual_seed(5))
    assert torch.equal(ids, same) and (ids < v).all() and not (ids == disallow).any()


# ---------------------------------------------------------------- the Triton kernels, tiles shrunk

@triton_test
@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_triton_sampler_choice_keeps_loss_and_disallow(sampler):
    m, v = 6, 13
    logits, targets, weights = rand(m, v), torch.randint(0, v, (m,), device=DEVICE), torch.rand(m, device=DEVICE)
    loss, sampled, _ = ops.mlm_loss_and_sample(logits, targets, weights, disallow_correct=True, backend="triton",
                                               sampler=sampler)
    torch.testing.assert_close(loss, ops.mlm_loss_and_sample(logits, targets, weights, backend="torch")[0])
    assert not (sampled == targets).any()
    with pytest.raises(ValueError, match="ELECTRA_FAST_SAMPLER.*nope"):
        ops.mlm_loss_and_sample(logits, targets, weights, backend="triton", sampler="nope")


@triton_test
@pytest.mark.usefixtures("small_tiles")
def test_triton_row_offset_draws_the_whole_matrix_samples():
    mls = kernel("mlm_loss_and_sample")
    m, v, width, seed = 9, 13, 32, torch.tensor([21], device=DEVICE)
    logits = padded(rand(m, v), width)
    targets = torch.randint(0, v, (m,), device=DEVICE)
    for sampler in mls.SAMPLERS:
        whole = mls.launch_sampler(logits, seed, 1.0, targets, sampler, v)
        chunks = [mls.launch_sampler(logits[r0:r0 + 4], seed, 1.0, targets[r0:r0 + 4], sampler, v, row_offset=r0)
                  for r0 in range(0, m, 4)]
        assert torch.equal(torch.cat(chunks), whole)
        shifted = mls.launch_sampler(logits[4:8], seed, 1.0, targets[4:8], sampler, v)
        assert not torch.equal(shifted, whole[4:8])  # without the offset, rows 4..7 draw rows 0..3's numbers


@triton_test
@pytest.mark.usefixtures("small_tiles")
def test_triton_samples_follow_manual_seed_and_generator():
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


@triton_test
@pytest.mark.usefixtures("small_tiles")
def test_triton_disallow_and_peaked_rows(poison):
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


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_cuda_graph_replays_draw_fresh_samples_and_follow_manual_seed(device):
    """On a GPU the step is captured and replayed; on the CPU the same step runs eagerly each time (everything
    the capture takes, without it)."""
    m, v = (256, VOCAB) if device == "cuda" else (6, 24)
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


# ---------------------------------------------------------------- the CUDA C++ backend (twin: the reference on the CPU)

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_disallow", [False, True])
@pytest.mark.parametrize("backend", ENGINES)
def test_matches_reference(backend, device, dtype, with_disallow):
    m, v, temperature = by_device(device, 4096, 256), VOCAB, 2.0
    logits = (torch.randn(m, v, device=device) * 2).to(dtype)
    disallow = None
    if with_disallow:  # a mix of rows without a restriction (-1) and rows that may not draw their argmax
        disallow = torch.where(torch.rand(m, device=device) < 0.5, logits.float().argmax(1), -1)
    poison_cuda_allocator(m * 8 * 4, device)
    sampled = ops.gumbel_sample(logits, temperature=temperature, disallow=disallow,
                                generator=torch.Generator(device).manual_seed(5), backend=backend,
                                sampler="gumbel")  # the sampler whose draws can be replayed
    want = gumbel_draw(backend, logits, torch.Generator(device).manual_seed(5), temperature, v, disallow)
    assert torch.equal(sampled, want)
    if with_disallow:
        assert not (sampled == disallow).any()


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


# ---------------------------------------------------------------- seeds: 63 random bits reach the streams

def test_draw_seed_uses_63_bits():
    seeds = torch.cat([draw_seed(torch.device("cpu")) for _ in range(64)])
    assert seeds.dtype == torch.int64 and seeds.shape == (64,)
    assert (seeds >= 0).all()
    # 64 draws from [0, 2**63): all below 2**62 has probability 2**-64; the high words vary.
    assert seeds.max() >= 2**62
    assert (seeds >> 32).unique().numel() > 32
    g = torch.Generator().manual_seed(7)
    again = torch.Generator().manual_seed(7)
    assert torch.equal(draw_seed(torch.device("cpu"), g), draw_seed(torch.device("cpu"), again))


SAMPLE_OP = importlib.import_module("electra_fast.ops.gumbel_sample")


def draws_under(seed: int, backend: str, monkeypatch, device: str, sampler: str = None):
    """Samples of 48 rows x 16 equal logits (uniform draws) with the kernel's Philox seed forced to `seed`."""
    monkeypatch.setattr(SAMPLE_OP, "draw_seed", lambda dev, gen=None: torch.tensor([seed], device=dev))
    use_sampler(monkeypatch, backend, sampler)
    return ops.gumbel_sample(torch.zeros(48, 16, device=device), backend=backend)


def high_word_pairs():
    """Seeds that differ only above bit 31 (the second Philox key word), with a random low word."""
    low = int(torch.randint(0, 2**32, ()))
    high = int(torch.randint(1, 2**31 - 1, ()))
    return low, (high << 32) | low


@pytest.mark.parametrize("sampler", ["cdf", "gumbel"])
@pytest.mark.parametrize("backend, device", [interpreter_param("triton", "cpu", id="cpu-triton"),
                                             gpu_param("triton", "cuda", id="cuda-triton", triton=True),
                                             gpu_param("cuda", "cuda", id="cuda")])
def test_seed_high_word_changes_draws(monkeypatch, backend, device, sampler):
    if backend == "triton":
        pytest.importorskip("triton")
    else:
        cuda = importlib.import_module("electra_fast.csrc.gumbel_sample")
        if not cuda.is_available():
            pytest.skip(cuda.unavailable_reason())
    low, full = high_word_pairs()
    a = draws_under(low, backend, monkeypatch, device, sampler)
    b = draws_under(full, backend, monkeypatch, device, sampler)
    assert torch.equal(a, draws_under(low, backend, monkeypatch, device, sampler))  # same seed, same draws
    # Independent uniform draws over 16 ids agree in 3 of 48 rows on average; 16 or more has probability < 1e-6.
    assert (a == b).sum() < 16


# ---------------------------------------------------------------- registration, errors, the empty batch

def opcheck_cases(backend, device):
    """Each backend's custom ops with the arguments torch.library.opcheck checks them at."""
    if backend == "torch":
        from electra_fast.ops.gumbel_sample import _gumbel_sample_op

        m, v = 6, 9
        logits = torch.randn(m, v)
        return [
            (_gumbel_sample_op, (logits, torch.rand(m, v), 1.3, torch.randint(-1, v, (m,)), v)),
            (_gumbel_sample_op, (logits, torch.rand(m, v - 4), 1.0, None, v - 4)),
        ]
    if backend == "triton":
        op = kernel("gumbel_sample")._gumbel_sample_op
        m, v = 4, 11
        logits, seed = rand(m, v, device=device), torch.tensor([7], device=device)
        return [
            (op, (logits, seed, 1.3, torch.randint(-1, v, (m,), device=device), "cdf", v - 1)),
            (op, (logits, seed, 1.0, None, "gumbel", v)),
        ]
    m, v = 64, 300
    logits = torch.randn(m, v, device=device, dtype=torch.bfloat16)
    ids, seed = torch.randint(0, v, (m,), device=device), cuda_seed(device)
    return [
        (cu_gumbel._gumbel_op, (logits, seed, 1.0, ids, "gumbel", v)),
        (cu_gumbel._gumbel_op, (logits, seed, 0.5, None, "cdf", v - 44)),
    ]


@pytest.mark.parametrize("backend", ["torch", triton_param("triton"), gpu_param("cuda")])
def test_opcheck(request, backend, device):
    if backend == "triton":
        request.getfixturevalue("small_tiles")
    for op, args in opcheck_cases(backend, device):
        torch.library.opcheck(op, args)


META = dict(device="meta")  # another device than the CPU, without a GPU
BAD_INPUTS = [  # (call, error type, words the message must hold: the argument, what it expects, what it got)
    (lambda: ops.gumbel_sample(torch.randn(2, 5), temperature=0.0), ValueError, ["temperature", "> 0", "0.0"]),
    (lambda: ops.gumbel_sample(torch.randn(2, 0)), ValueError, ["logits", "vocabulary", "(2, 0)"]),
    (lambda: ops.gumbel_sample(torch.randn(2, 5), disallow=torch.zeros(3, dtype=torch.long)),
     ValueError, ["disallow", "(2,)", "(3,)"]),
    (lambda: ops.gumbel_sample(torch.randn(4, 5), vocab_size=0), ValueError, ["vocab_size", "[1, 5]", "0"]),
    (lambda: ops.gumbel_sample(torch.randn(4, 5), vocab_size=3.0), ValueError, ["vocab_size", "int", "3.0"]),
    (lambda: call_gumbel(temperature=INF), ValueError, ["temperature"]),
    (lambda: call_gumbel(logits=torch.ones(3, 5, dtype=torch.int32)), TypeError, ["logits"]),
    (lambda: call_gumbel(logits=torch.randn(2, 3, 5)), ValueError, ["logits"]),
    (lambda: call_gumbel(disallow=torch.zeros(3)), TypeError, ["disallow"]),
    (lambda: call_gumbel(disallow=torch.zeros(3, dtype=torch.long, **META)), ValueError, ["disallow"]),
]


@pytest.mark.parametrize("call, exc, words", BAD_INPUTS)
def test_bad_input_errors_name_the_argument(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize("backend", ["torch", triton_param("triton")])
def test_empty_batch(poison, backend):
    dev = "cpu" if backend == "torch" else DEVICE
    logits, none = torch.randn(0, 7, device=dev), torch.zeros(0, dtype=torch.long, device=dev)
    assert ops.gumbel_sample(logits, disallow=none, backend=backend).shape == (0,)
