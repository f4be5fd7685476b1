"""The op microbenchmarks through pytest-benchmark: `pytest benchmarks/ --benchmark-only` (skips without CUDA).
`bench_ops.py` is the full report (GB/s, copy-bandwidth fraction, torch.compile baseline, plots)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmarks need a CUDA GPU")

if torch.cuda.is_available():
    from bench_ops import _timed, cases, implementations  # noqa: E402
    from common import rotation  # noqa: E402

    CASES = [(shape, c.op, impl, p) for shape in ("small", "base") for c in cases(shape)
             for impl in implementations(c.op)
             for p in (["fwd"] + (["fwd+bwd"] if c.bwd_bytes is not None else []))]
else:
    CASES = []


@pytest.mark.parametrize("shape,op,impl,pass_", CASES)
def test_op(benchmark, shape, op, impl, pass_):
    case = next(c for c in cases(shape) if c.op == op)
    call, _ = _timed(case, impl, pass_ == "fwd+bwd", rotation(case.make, case.fwd_bytes))

    def synced():
        call()
        torch.cuda.synchronize()

    benchmark.pedantic(synced, rounds=50, warmup_rounds=5)
