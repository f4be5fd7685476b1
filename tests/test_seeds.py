"""Philox seeds carry 63 random bits, and every bit reaches the kernels' random streams (with 31-bit seeds, 1M
training steps have ~233 pairs of steps drawing the same stream)."""
import importlib

import pytest
import torch

from conftest import gpu_param, interpreter_param
from helpers import use_sampler
from electra_fast import ops
from electra_fast.ops._backend import draw_seed

SAMPLE_OP = importlib.import_module("electra_fast.ops.gumbel_sample")


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
