"""Kernel microbenchmarks (SPEC 5, issues 3 and 5): every available backend of each hot op vs the PyTorch reference
eager and `torch.compile`d, at ELECTRA-small and -base shapes, forward and forward+backward.

Reports the median time, GB/s over the bytes the op must move at the least (each input read once, each output
written once; written beside each case) and the fraction of the device-to-device copy bandwidth measured in the
same run. Inputs rotate through more than the L2 cache. Writes ops.csv, env.json and one PNG per op under --out.

    python benchmarks/bench_ops.py --out benchmarks/results/ops
    python benchmarks/bench_ops.py --ops mlm_loss_and_sample,rtd_bce_loss --shapes small
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import bar_plot, copy_bandwidth_gbs, cycle, device, do_bench, environment, require_cuda, rotation, \
    write_csv  # noqa: E402

from electra_fast import ops  # noqa: E402
from electra_fast.ops.masked_gather import masked_gather_reference  # noqa: E402
from electra_fast.ops.mlm_loss import mlm_loss_and_sample_reference  # noqa: E402
from electra_fast.ops.gumbel_sample import gumbel_sample_reference  # noqa: E402
from electra_fast.ops.replace_tokens import replace_tokens_reference  # noqa: E402
from electra_fast.ops.rtd_bce import rtd_bce_reference  # noqa: E402
from electra_fast.ops.rtd_head import rtd_head_reference  # noqa: E402

VOCAB = 30522
SHAPES = {"small": (128, 128, 256), "base": (64, 512, 768), "tiny": (2, 32, 16)}  # B, L, H (SPEC 5); tiny: --smoke
VOCABS = {"tiny": 512}  # vocabulary per shape, VOCAB unless named


@dataclass
class Case:
    """One op at one shape: `make()` draws a fresh input set; `run(impl, grad)` returns the callable to time."""
    op: str
    make: Callable[[], tuple]
    fwd_bytes: int
    bwd_bytes: Optional[int]  # extra bytes of the backward; None: not differentiable
    public: Callable  # (backend, *inputs) -> outputs (the public op)
    reference: Callable  # plain-torch function of the inputs, for torch.compile
    loss: Callable = lambda out: out  # output -> scalar to differentiate
    grad_inputs: tuple = (0,)  # which inputs the fwd+bwd pass differentiates


def _positions(b, seq_len, n, device):
    return torch.rand(b, seq_len, device=device).argsort(dim=1)[:, :n].sort(dim=1).values


def cases(shape: str, device="cuda"):
    b, seq_len, h = SHAPES[shape]
    vocab = VOCABS.get(shape, VOCAB)
    n = ops.num_slots(seq_len, 0.15)
    m = b * n
    bf16 = dict(device=device, dtype=torch.bfloat16)

    def logits():
        return torch.randn(m, vocab, **bf16) * 2, torch.randint(0, vocab, (m,), device=device), \
            (torch.rand(m, device=device) > 0.05).float()

    yield Case("mlm_loss_and_sample", logits, m * vocab * 2 + m * 12, 2 * m * vocab * 2,
               lambda be, x, t, w: ops.mlm_loss_and_sample(x, t, w, backend=be),
               lambda x, t, w: mlm_loss_and_sample_reference(x, t, w, torch.rand(x.shape, device=x.device), 1.0,
                                                             False)[:3],
               loss=lambda out: out[0])
    yield Case("gumbel_sample", lambda: (torch.randn(m, vocab, **bf16) * 2,), m * vocab * 2 + m * 8, None,
               lambda be, x: ops.gumbel_sample(x, backend=be),
               lambda x: gumbel_sample_reference(x, torch.rand(x.shape, device=x.device), 1.0))
    yield Case("masked_gather", lambda: (torch.randn(b, seq_len, h, **bf16), _positions(b, seq_len, n, device)),
               2 * m * h * 2 + m * 8, m * h * 2 + b * seq_len * h * 2,
               lambda be, x, p: ops.masked_gather(x, p, backend=be), masked_gather_reference,
               loss=lambda out: out.float().square().sum())

    def replace_inputs():
        return (torch.randint(0, vocab, (b, seq_len), device=device), _positions(b, seq_len, n, device),
                (torch.rand(b, n, device=device) > 0.05).float(), torch.randint(0, vocab, (b, n), device=device))

    yield Case("replace_tokens", replace_inputs, b * seq_len * (8 + 8 + 1) + m * (8 + 4 + 8), None,
               lambda be, *a: ops.replace_tokens(*a, backend=be), replace_tokens_reference)

    def bce_inputs():
        return (torch.randn(b, seq_len, **bf16), torch.rand(b, seq_len, device=device) > 0.85,
                torch.ones(b, seq_len, device=device, dtype=torch.int64))

    yield Case("rtd_bce_loss", bce_inputs, b * seq_len * (2 + 1 + 8) + 4, b * seq_len * 2,
               lambda be, *a: ops.rtd_bce_loss(*a, backend=be), lambda *a: rtd_bce_reference(*a)[0])

    def head_inputs():
        return (torch.randn(b, seq_len, h, **bf16), torch.randn(1, h, **bf16) * 0.02, torch.zeros(1, **bf16),
                torch.rand(b, seq_len, device=device) > 0.85, torch.ones(b, seq_len, device=device, dtype=torch.int64))

    yield Case("rtd_head_loss", head_inputs, b * seq_len * (h * 2 + 9) + h * 2, b * seq_len * h * 2 + h * 2,
               lambda be, *a: ops.rtd_head_loss(*a, backend=be), lambda *a: rtd_head_reference(*a)[:2],
               loss=lambda out: out[0], grad_inputs=(0, 1, 2))


SAMPLING_OPS = ("mlm_loss_and_sample", "gumbel_sample")


def implementations(op: str, smoke: bool = False) -> list:
    """Every backend available for `op`, the Triton samplers side by side for the sampling ops, torch.compile.
    `smoke` (a CPU check of this script): the torch reference only."""
    if smoke:
        return ["torch"]
    impls = ops.available_backends("cuda", op)
    if op in SAMPLING_OPS and "triton" in impls:
        impls.insert(impls.index("triton") + 1, "triton:gumbel")  # "triton" runs the default "cdf" sampler
    return impls + ["torch.compile"]


def _timed(case: Case, impl: str, grad: bool, sets):
    """The callable to time for one implementation ('torch.compile', a backend name, or 'triton:<sampler>')."""
    if impl == "torch.compile":
        fn = torch.compile(case.reference)
    else:
        backend, _, sampler = impl.partition(":")

        def fn(*a):
            if not sampler:
                return case.public(backend, *a)
            kernel = importlib.import_module("electra_fast.kernels.mlm_loss_sample")
            default, kernel.SAMPLER = kernel.SAMPLER, sampler
            try:
                return case.public(backend, *a)
            finally:
                kernel.SAMPLER = default
    if not grad:
        def step(*a):
            with torch.no_grad():
                return fn(*a)
    else:
        def step(*a):
            return torch.autograd.grad(case.loss(fn(*a)), [a[i] for i in case.grad_inputs])
        sets = [tuple(x.detach().requires_grad_() if i in case.grad_inputs else x for i, x in enumerate(s))
                for s in sets]
    call = cycle(step, sets)
    t0 = time.perf_counter()
    call()  # first call: compile / autotune / JIT build
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return call, time.perf_counter() - t0


def run(op_names, shape_names, out_dir, smoke: bool = False):
    """Measure, writing ops.csv / env.json / PNGs under `out_dir` after every op and shape (a run stopped by a
    time limit keeps what it measured)."""
    dev = device()
    copy_gbs = copy_bandwidth_gbs()
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write)")
    rows = []
    for shape in shape_names:
        for case in cases(shape, device=dev):
            if case.op not in op_names:
                continue
            impls = implementations(case.op, smoke)
            passes = ["fwd"] + (["fwd+bwd"] if case.bwd_bytes is not None else [])
            sets = rotation(case.make, case.fwd_bytes)
            for p in passes:
                nbytes = case.fwd_bytes + (case.bwd_bytes if p == "fwd+bwd" else 0)
                for impl in impls:
                    try:
                        call, first_s = _timed(case, impl, p == "fwd+bwd", sets)
                        ms = do_bench(call)
                    except Exception as exc:  # one failing implementation must not lose the others' figures
                        print(f"{case.op} {shape} {p} {impl}: FAILED {type(exc).__name__}: {exc}", file=sys.stderr)
                        continue
                    gbs = nbytes / (ms * 1e-3) / 1e9
                    rows.append({"op": case.op, "shape": shape, "pass": p, "impl": impl, "ms": round(ms, 5),
                                 "GB/s": round(gbs, 1), "frac_copy_bw": round(gbs / copy_gbs, 3),
                                 "bytes": nbytes, "first_call_s": round(first_s, 2)})
                    print(f"{case.op:22s} {shape:6s} {p:8s} {impl:14s} {ms:9.4f} ms {gbs:8.1f} GB/s "
                          f"{gbs / copy_gbs:6.1%} of copy", flush=True)
            if dev == "cuda":
                torch.cuda.empty_cache()
            write(rows, out_dir, copy_gbs)
    return rows


def write(rows: list, out_dir: str, copy_gbs: float) -> None:
    for row in rows:  # speed-up over torch.compile of the reference, same op/shape/pass
        base = next((r["ms"] for r in rows if r["impl"] == "torch.compile" and
                     (r["op"], r["shape"], r["pass"]) == (row["op"], row["shape"], row["pass"])), None)
        row["x_vs_compile"] = round(base / row["ms"], 2) if base else ""
    os.makedirs(out_dir, exist_ok=True)
    if rows:
        write_csv(os.path.join(out_dir, "ops.csv"), rows)
    with open(os.path.join(out_dir, "env.json"), "w") as f:
        json.dump({**environment(), "copy_GB/s": round(copy_gbs, 1)}, f, indent=2)
    for op in sorted({r["op"] for r in rows}):
        bar_plot(os.path.join(out_dir, f"{op}.png"), op, [r for r in rows if r["op"] == op], copy_gbs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    all_ops = [c.op for c in cases("small", device="meta")]
    parser.add_argument("--ops", default=",".join(all_ops), help=f"comma-separated, of {all_ops}")
    parser.add_argument("--shapes", default="small,base", help=f"comma-separated, of {list(SHAPES)}")
    parser.add_argument("--out", default="benchmarks/results/ops", help="output folder")
    parser.add_argument("--smoke", action="store_true", help="CPU check of this script: tiny shape, torch reference")
    args = parser.parse_args(argv)
    if args.smoke:
        run(args.ops.split(","), ["tiny"], args.out, smoke=True)
        return
    require_cuda("bench_ops.py")
    run(args.ops.split(","), args.shapes.split(","), args.out)


if __name__ == "__main__":
    main()
