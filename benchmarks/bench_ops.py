"""Kernel microbenchmarks (docs/contracts.md#how-we-measure): every available backend of each hot op vs the PyTorch
reference eager and `torch.compile`d, at ELECTRA-small and -base shapes, forward and forward+backward.

Reports the median time, GB/s over the bytes the op must move at the least (each input read once, each output
written once; written beside each case) and the fraction of the device-to-device copy bandwidth measured in the
same run. Inputs rotate through more than the L2 cache. Writes ops.csv, env.json and one PNG per op under --out.
The torch.compile baseline is compiled afresh at each shape with static sizes. Before anything is timed the CUDA
extension is built (or loaded) and every Triton module imported; each implementation's first call (compile,
autotune, JIT) is untimed. Each row records the backend every op resolved to (`backends`) and, for the sampling
ops, the sampler.

    python benchmarks/bench_ops.py --out benchmarks/results/ops
    python benchmarks/bench_ops.py --ops mlm_loss_and_sample,rtd_bce_loss --shapes small
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import backends_text, bar_plot, copy_bandwidth_gbs, cycle, device, do_bench, environment, \
    prepare_backends, record_backends, require_cuda, rotation, sampler_of, write_csv  # noqa: E402

from electra_fast import ops  # noqa: E402
from electra_fast.ops.dropout_add_layer_norm import dropout_add_layer_norm_reference  # noqa: E402
from electra_fast.ops.mask_tokens import mask_tokens_reference  # noqa: E402
from electra_fast.ops.masked_gather import masked_gather_reference  # noqa: E402
from electra_fast.ops.mlm_loss_and_sample import mlm_loss_and_sample_reference  # noqa: E402
from electra_fast.ops.gumbel_sample import gumbel_sample_reference  # noqa: E402
from electra_fast.ops.replace_tokens import replace_tokens_reference  # noqa: E402
from electra_fast.ops.rtd_bce_loss import rtd_bce_reference  # noqa: E402
from electra_fast.ops.rtd_head_loss import rtd_head_reference  # noqa: E402

VOCAB = 30522
SHAPES = {"small": (128, 128, 256), "base": (64, 512, 768), "tiny": (2, 32, 16)}  # B, L, H; tiny: --smoke
VOCABS = {"tiny": 500}  # vocabulary per shape, VOCAB unless named
EMBED = {"small": 128, "base": 768, "tiny": 16}  # the LM head's width E (embedding size)
PAD_VOCAB = 128  # the models pad the vocabulary to a multiple of 128 (logit rows 16-byte aligned): so do the cases


@dataclass
class Case:
    """One op at one shape: `make()` draws a fresh input set; `run(impl, grad)` returns the callable to time."""
    op: str
    make: Callable[[], tuple]
    fwd_bytes: int
    bwd_bytes: Optional[int]  # extra bytes of the backward; None: not differentiable
    public: Callable  # (backend, *inputs) -> outputs (the public op); the sampling ops also take sampler=
    reference: Callable  # plain-torch function of the inputs, for torch.compile
    loss: Callable = lambda out: out  # output -> scalar to differentiate
    grad_inputs: tuple = (0,)  # which inputs the fwd+bwd pass differentiates
    unfused: Optional[Callable] = None  # (backend, *inputs) -> outputs: what the fused op replaces, timed beside it


def _positions(b, seq_len, n, device):
    return torch.rand(b, seq_len, device=device).argsort(dim=1)[:, :n].sort(dim=1).values


def cases(shape: str, device="cuda"):
    b, seq_len, h = SHAPES[shape]
    vocab = VOCABS.get(shape, VOCAB)
    width = -(-vocab // PAD_VOCAB) * PAD_VOCAB  # the logits' row width inside the models
    n = ops.num_slots(seq_len, 0.15)
    m = b * n
    e = EMBED[shape]
    bf16 = dict(device=device, dtype=torch.bfloat16)

    def targets_weights():
        return torch.randint(0, vocab, (m,), device=device), (torch.rand(m, device=device) > 0.05).float()

    def logits():
        return (torch.randn(m, width, **bf16) * 2, *targets_weights())

    def mlm_reference(x, t, w):
        return mlm_loss_and_sample_reference(x, t, w, torch.rand(m, vocab, device=x.device), 1.0, False, vocab)[:3]

    yield Case("mlm_loss_and_sample", logits, m * vocab * 2 + m * 12, 2 * m * vocab * 2,
               lambda be, x, t, w, sampler=None: ops.mlm_loss_and_sample(x, t, w, vocab_size=vocab, backend=be,
                                                                         sampler=sampler), mlm_reference,
               loss=lambda out: out[0])
    yield Case("gumbel_sample", lambda: (torch.randn(m, width, **bf16) * 2,), m * vocab * 2 + m * 8, None,
               lambda be, x, sampler=None: ops.gumbel_sample(x, vocab_size=vocab, backend=be, sampler=sampler),
               lambda x: gumbel_sample_reference(x[:, :vocab], torch.rand(m, vocab, device=x.device), 1.0))

    def head():  # the generator's LM head input, the tied (padded) word table and its bias
        return (torch.randn(m, e, **bf16), torch.randn(width, e, **bf16) * 0.02, torch.zeros(width, **bf16),
                *targets_weights())

    # Least bytes: the fused op reads hidden and the table once and never writes the logits; the backward writes the
    # gradients of hidden and of the table. "unfused" (F.linear + our MLM op) and torch.compile write [M, V] logits.
    yield Case("lm_head_loss_and_sample", head, (m * e + width * e + width) * 2 + m * 12, (m * e + width * e) * 2,
               lambda be, h, wt, bias, t, w, sampler=None: ops.lm_head_loss_and_sample(h, wt, bias, t, w,
                                                                                      vocab_size=vocab, backend=be,
                                                                                      sampler=sampler),
               lambda h, wt, bias, t, w: mlm_reference(F.linear(h, wt, bias), t, w),
               loss=lambda out: out[0], grad_inputs=(0, 1, 2),
               unfused=lambda be, h, wt, bias, t, w: ops.mlm_loss_and_sample(F.linear(h, wt, bias), t, w,
                                                                             vocab_size=vocab, backend=be))

    def mask_inputs():
        ids = torch.randint(5, vocab, (b, seq_len), device=device)
        ids[:, 0], ids[:, -1] = 1, 2
        return ids, torch.ones_like(ids), torch.tensor([0, 1, 2, 3], device=device)

    def mask_reference(ids, mask, special):
        scores = torch.rand(ids.shape, device=ids.device)
        keep = torch.rand(b, n, device=ids.device)
        return mask_tokens_reference(ids, mask, special, scores, keep, 0.15, 3)

    yield Case("mask_tokens", mask_inputs, b * seq_len * (8 + 8 + 8) + m * (8 + 4), None,
               lambda be, ids, mask, special: ops.mask_tokens(ids, mask, mask_prob=0.15, mask_token_id=3,
                                                              special_token_ids=special, backend=be),
               mask_reference)

    def norm_inputs():  # one residual + dropout + LayerNorm site of the encoder, [B * L, H]
        return (torch.randn(b * seq_len, h, **bf16), torch.randn(b * seq_len, h, **bf16), torch.ones(h, **bf16),
                torch.zeros(h, **bf16))

    yield Case("dropout_add_layer_norm", norm_inputs, 3 * b * seq_len * h * 2, 4 * b * seq_len * h * 2,
               lambda be, x, r, w, bias: ops.dropout_add_layer_norm(x, r, w, bias, p=0.1, eps=1e-12, backend=be),
               lambda x, r, w, bias: dropout_add_layer_norm_reference(x, r, w, bias, 0.1, 1e-12),
               loss=lambda out: out.float().square().sum(), grad_inputs=(0, 1, 2, 3))
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


def implementations(case: Case, smoke: bool = False) -> list:
    """Every backend available for the op, the Triton samplers side by side for the sampling ops, the unfused
    chain a fused op replaces ("unfused:<backend>"), torch.compile of the reference. `smoke` (a CPU check of this
    script): the torch reference, and its unfused chain."""
    unfused = ["unfused:torch"] if case.unfused is not None else []
    if smoke:
        return ["torch"] + unfused
    impls = ops.available_backends("cuda", case.op)
    if case.op in SAMPLING_OPS and "triton" in impls:
        impls.insert(impls.index("triton") + 1, "triton:gumbel")  # "triton" runs the default "cdf" sampler
    if case.unfused is not None:
        unfused = [f"unfused:{b}" for b in ops.available_backends("cuda", "mlm_loss_and_sample")]
    return impls + unfused + ["torch.compile"]


def _timed(case: Case, impl: str, grad: bool, sets):
    """The callable to time for one implementation ('torch.compile', a backend name, or 'triton:<sampler>'), the
    seconds of its first call (compile / autotune / JIT, never timed) and what that call ran: `{"backends":
    {op: backend} as the ops resolved them, "sampler": ...}`."""
    if impl == "torch.compile":
        # One static build per shape: the references share their code objects across shapes, so without a fresh
        # dynamo cache the second shape would recompile them with dynamic shapes (automatic dynamic), a slower
        # baseline than the one a user gets at that shape; dynamic=False keeps every size a constant.
        torch._dynamo.reset()
        fn = torch.compile(case.reference, dynamic=False)
    elif impl.startswith("unfused:"):
        def fn(*a):
            return case.unfused(impl.split(":", 1)[1], *a)
    else:
        backend, _, sampler = impl.partition(":")

        def fn(*a):
            return case.public(backend, *a, sampler=sampler) if sampler else case.public(backend, *a)
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
    with record_backends() as backends:
        call()  # first call: compile / autotune / JIT build
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return call, time.perf_counter() - t0, {"backends": backends, "sampler": _sampler(case, impl, backends)}


def _sampler(case: Case, impl: str, backends: dict) -> str:
    """The sampler a sampling op's implementation ran ("" for the other ops)."""
    if case.op not in SAMPLING_OPS and case.op != "lm_head_loss_and_sample":
        return ""
    backend, _, sampler = impl.partition(":")
    if impl == "torch.compile":
        return "torch:gumbel"  # the reference's Gumbel-max, compiled
    if sampler and backend != "unfused":
        return f"{backend}:{sampler}"
    ran = backends.get(case.op) or backends.get("mlm_loss_and_sample", "")
    return sampler_of(ran.split("|")[0]) if ran else ""


def peak_memory_mb(call) -> Optional[float]:
    """Peak device memory of one call above what was allocated before it (inputs excluded); None on a CPU."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    call()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - before) / 2**20, 1)


def run(op_names, shape_names, out_dir, smoke: bool = False):
    """Measure, writing ops.csv / env.json / PNGs under `out_dir` after every op and shape (a run stopped by a
    time limit keeps what it measured)."""
    dev = device()
    prepared = prepare_backends()  # the CUDA extension is built or loaded here, before anything is timed
    print(f"CUDA extension: {prepared['cuda_extension']}", flush=True)
    copy_gbs = copy_bandwidth_gbs()
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write)")
    rows = []
    for shape in shape_names:
        for case in cases(shape, device=dev):
            if case.op not in op_names:
                continue
            impls = implementations(case, smoke)
            passes = ["fwd"] + (["fwd+bwd"] if case.bwd_bytes is not None else [])
            sets = rotation(case.make, case.fwd_bytes)
            for p in passes:
                nbytes = case.fwd_bytes + (case.bwd_bytes if p == "fwd+bwd" else 0)
                for impl in impls:
                    try:
                        call, first_s, ran = _timed(case, impl, p == "fwd+bwd", sets)
                        ms = do_bench(call)
                        peak_mb = peak_memory_mb(call)
                    except Exception as exc:  # one failing implementation must not lose the others' figures
                        print(f"{case.op} {shape} {p} {impl}: FAILED {type(exc).__name__}: {exc}", file=sys.stderr)
                        continue
                    gbs = nbytes / (ms * 1e-3) / 1e9
                    rows.append({"op": case.op, "shape": shape, "pass": p, "impl": impl, "ms": round(ms, 5),
                                 "GB/s": round(gbs, 1), "frac_copy_bw": round(gbs / copy_gbs, 3),
                                 "bytes": nbytes, "first_call_s": round(first_s, 2), "peak_MB": peak_mb,
                                 "backends": backends_text(ran["backends"]) or impl, "sampler": ran["sampler"]})
                    print(f"{case.op:22s} {shape:6s} {p:8s} {impl:14s} {ms:9.4f} ms {gbs:8.1f} GB/s "
                          f"{gbs / copy_gbs:6.1%} of copy", flush=True)
            if dev == "cuda":
                torch.cuda.empty_cache()
            write(rows, out_dir, copy_gbs, plot=case.op, extra=prepared)  # a run cut short keeps its figures
    return rows


def write(rows: list, out_dir: str, copy_gbs: float, plot: str, extra: Optional[dict] = None) -> None:
    """ops.csv and env.json from every row so far; the plot of op `plot` (the others are drawn already)."""
    for row in rows:  # speed-up over torch.compile of the reference, same op/shape/pass
        base = next((r["ms"] for r in rows if r["impl"] == "torch.compile" and
                     (r["op"], r["shape"], r["pass"]) == (row["op"], row["shape"], row["pass"])), None)
        row["x_vs_compile"] = round(base / row["ms"], 2) if base else ""
    os.makedirs(out_dir, exist_ok=True)
    if rows:
        write_csv(os.path.join(out_dir, "ops.csv"), rows)
    with open(os.path.join(out_dir, "env.json"), "w") as f:
        json.dump({**environment(), "copy_GB/s": round(copy_gbs, 1), **(extra or {})}, f, indent=2)
    mine = [r for r in rows if r["op"] == plot]
    if mine:
        bar_plot(os.path.join(out_dir, f"{plot}.png"), plot, mine, copy_gbs)


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
