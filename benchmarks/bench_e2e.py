"""End-to-end ELECTRA training step: electra-fast vs the way it is written with `transformers` today.

One step = forward, backward and a fused AdamW step of generator + discriminator, bf16 autocast, in one run:
- `transformers`: ElectraForMaskedLM over all L positions, boolean indexing for the masked tokens, Gumbel-max
  sampling in eager PyTorch, ElectraForPreTraining, BCE over real tokens (the shared embeddings tied as ELECTRA
  does); modes eager and compiled (`torch.compile` of both models: the boolean indexing keeps the step itself
  out of one graph).
- `hf-dropin`: the same transformers models through `ElectraPretrainer` (static shapes, LM head at the slots only,
  our ops); modes eager and compiled (graph breaks allowed, as transformers' internals vary by version).
- `ours`: `ElectraPretrainer.from_preset` (slim model); modes eager, compiled (`fullgraph=True`), graph (the
  eager step captured whole with `CUDAGraphStep`) and compiled+graph.
Timing (docs/contracts.md#how-we-measure): CUDA events around `--iters` steps, median of `--repeats`, after `--warmup`
steps; compile time (first steps' wall time minus their steady-state cost) reported apart. Peak memory covers
parameters, optimizer state and activations during the timed steps (`peak_mem_gb`); `peak_mem_row_gb` is the whole
row's, compile and capture and the first-step check included. The id-range check (`validate`, one host sync) is off for
`ours`.
First-step check (ours and hf-dropin; transformers' own step has nothing of ours to check): before its first step,
each row runs that step's forward on the same weights and first batch with dropout off, keeps the masks and samples
it drew, and compares its losses with an fp64 torch-backend reference step from those masks and samples
(e2e_check.py, tolerance `CHECK_RTOL` / `CHECK_ATOL`). A row that differs is still timed but marked failed
("error"), so no speed-up is reported for it. Every row records what ran: each op's backend (`backends`), the
attention path each encoder took (`attention_taken`) and the sampler. The CUDA extension is built before any row.

    python benchmarks/bench_e2e.py --out benchmarks/results/e2e               # small and base
    python benchmarks/bench_e2e.py --shapes small --impls ours,transformers   # a subset
    python benchmarks/bench_e2e.py --shapes small,base --impls ours --modes eager,graph --attention auto,sdpa
        # ours' padded batches through each attention path (electra_fast.model.attention): varlen flash vs dense bias
Writes e2e.json, e2e.csv and e2e.md under --out.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import backends_text, device_name, prepare_backends  # noqa: E402
from e2e_check import first_step_check, forced_backend  # noqa: E402
from e2e_models import CLS, PAD, SEP, build  # noqa: E402
# the tests build and check a step through this module, as `--smoke` does
from e2e_check import dropout_off  # noqa: E402,F401
from e2e_models import MASK_ID, ours  # noqa: E402,F401

SHAPES = {"small": ("small", 128, 128), "base": ("base", 64, 512),  # name -> (preset, batch, seq_len)
          "tiny": ("tiny", 8, 32)}  # --smoke: checks this script on a CPU
# "<shape>-full": every row full (packed pretraining data); ours then gets attention_mask=None (no mask at all, so
# SDPA may take flash attention), transformers an all-ones mask. The plain shapes have 1 short row in 8.
SHAPES.update({f"{k}-full": v for k, v in list(SHAPES.items())})
IMPLS = ("transformers", "hf-dropin", "ours")
MODES = {"transformers": ("eager", "compiled"), "hf-dropin": ("eager", "compiled"),
         "ours": ("eager", "compiled", "graph", "compiled+graph")}
# Dense bf16 peak by device-name substring, first match wins (datasheet figures; override with --peak-flops).
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


# ------------------------------------------------------------------------------------------------ FLOPs / MFU
def model_flops_per_step(gen_cfg, disc_cfg, batch: int, seq_len: int, mask_prob: float) -> float:
    """Useful training FLOPs of one step (forward + backward = 3 x forward = 6 per multiply-add per token).

    Per encoder and token: 6 x (matmul parameters: 4H^2 + 2HI per layer, plus E x H for embeddings_project when
    E != H) + 12 x layers x L x H (attention scores QK^T and the weighted sum AV: 2 x 2 x L x H forward, x3).
    Generator head at the real slots only (B x round(mask_prob x L) of them): 6 x (H_g x E + E x V) per slot.
    Discriminator head at every token: 6 x (H x H + H). Embedding lookups, LayerNorm, softmax, GELU and the
    optimizer are not counted. The same count is used for every implementation (wasted work is not credited).
    """
    def encoder(c):
        h, i, e = c.hidden_size, c.intermediate_size, c.embedding_size
        matmul = c.num_hidden_layers * (4 * h * h + 2 * h * i) + (e * h if e != h else 0)
        return 6.0 * matmul + 12.0 * c.num_hidden_layers * seq_len * h

    tokens = batch * seq_len
    slots = batch * round(mask_prob * seq_len)
    gen_head = 6.0 * (gen_cfg.hidden_size * gen_cfg.embedding_size + gen_cfg.embedding_size * gen_cfg.vocab_size)
    disc_head = 6.0 * (disc_cfg.hidden_size * disc_cfg.hidden_size + disc_cfg.hidden_size)
    return tokens * (encoder(gen_cfg) + encoder(disc_cfg) + disc_head) + slots * gen_head


def peak_flops(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


# ------------------------------------------------------------------------------------------------ measuring
def make_batches(n: int, batch: int, seq_len: int, vocab: int, device="cuda", padded: bool = True):
    out = []
    for _ in range(n):
        ids = torch.randint(999, vocab, (batch, seq_len), device=device)
        ids[:, 0] = CLS
        mask = torch.ones_like(ids)
        lengths = torch.randint(seq_len // 2, seq_len + 1, (batch // 8,), device=device)  # 1 row in 8 is short
        if not padded:
            lengths.fill_(seq_len)
        mask[: batch // 8] = (torch.arange(seq_len, device=device) < lengths[:, None]).long()
        ids = torch.where(mask.bool(), ids, PAD)
        ids[torch.arange(batch // 8, device=device), lengths - 1] = SEP
        ids[batch // 8:, -1] = SEP
        out.append((ids, mask))
    return out


def measure(step, batches, warmup: int, iters: int, repeats: int) -> dict:
    """Median ms per step over `repeats` runs of `iters` steps, after `warmup` steps: CUDA events on a GPU, the wall
    clock on a CPU (--smoke; no memory figure there)."""
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def run(stop: int, start: int = 0) -> None:
        for i in range(start, stop):
            step(*batches[i % len(batches)])

    sync()
    t0 = time.perf_counter()
    first_loss = float(step(*batches[0]).detach())  # compile / capture happen here
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    run(warmup, 1)
    sync()
    warm = (time.perf_counter() - t0) / max(1, warmup - 1)
    before_timing = torch.cuda.max_memory_allocated() if cuda else 0  # compile, capture, warm-up (and the check)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run(iters)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / iters)
        else:
            t0 = time.perf_counter()
            run(iters)
            times.append((time.perf_counter() - t0) * 1e3 / iters)
    return {"ms_per_step": statistics.median(times), "ms_spread": [min(times), max(times)],
            "compile_s": max(0.0, first - warm), "first_loss": first_loss,
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
            "peak_before_timing_gb": before_timing / 1e9 if cuda else None}


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    torch._dynamo.reset()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="directory for e2e.json, e2e.csv, e2e.md")
    p.add_argument("--shapes", default="small,base", help=f"comma list of {list(SHAPES)}")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {list(IMPLS)}")
    p.add_argument("--modes", default="eager,compiled,graph,compiled+graph",
                   help="comma list; each impl runs the modes it has")
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; --smoke: 1)")
    p.add_argument("--iters", type=int, default=None, help="timed steps per repeat (default 20; --smoke: 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs, the median reported (default 3; --smoke: 1)")
    p.add_argument("--backend", default=None, help="force an ops backend (torch/triton/cuda); default per op")
    p.add_argument("--attention", default="auto",
                   help="comma list of attention paths for ours' padded batches (electra_fast.model.attention), "
                        "a row each")
    p.add_argument("--peak-flops", type=float, default=None, help="peak bf16 FLOP/s (default: by GPU name)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the first-step check of ours and hf-dropin against the fp64 torch reference (the "
                        "path that ran is still recorded)")
    p.add_argument("--smoke", action="store_true",
                   help="check this script on a CPU: tiny preset, vocabulary 1000, eager steps, torch backend "
                        "(or --backend's: triton runs in the interpreter under TRITON_INTERPRET=1)")
    args = p.parse_args(argv)
    if args.smoke:
        # each shape becomes the tiny one, keeping "-full" (no padding) where asked, so both input paths run
        args.shapes = ",".join(dict.fromkeys("tiny-full" if s.endswith("-full") else "tiny"
                                             for s in args.shapes.split(",")))
        args.vocab, args.modes, args.backend = 1000, "eager", args.backend or "torch"
    elif not torch.cuda.is_available():
        sys.exit("bench_e2e.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured.")
    for name, default, smoke in (("warmup", 5, 1), ("iters", 20, 1), ("repeats", 3, 1)):  # given ones are kept
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else default)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with forced_backend(args.backend) if args.backend else contextlib.nullcontext():  # undone on return
        run(args, dev)


def run(args, dev: str) -> None:
    """Every row of `args` (parsed by `main`) on `dev`, written under `args.out` after each one."""
    import transformers

    import electra_fast
    from electra_fast.model.config import preset_configs

    prepared = prepare_backends()  # the CUDA extension built or loaded here, never inside a row's first steps
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    device = device_name()
    peak = peak_flops(device, args.peak_flops)
    env = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
           "electra_fast": electra_fast.__version__, "python": platform.python_version(), "backend": args.backend,
           "peak_bf16_flops": peak, "warmup": args.warmup, "iters": args.iters, "repeats": args.repeats,
           "cuda_extension": prepared["cuda_extension"]}
    print(json.dumps(env))
    rows = []
    for shape in args.shapes.split(","):
        preset, batch, seq_len = SHAPES[shape]
        gen_cfg, disc_cfg = preset_configs(preset, vocab_size=args.vocab)
        flops = model_flops_per_step(gen_cfg, disc_cfg, batch, seq_len, 0.15)
        torch.manual_seed(0)
        full = shape.endswith("-full")
        batches = make_batches(4, batch, seq_len, args.vocab, dev, padded=not full)
        env.setdefault("model_flops_per_step", {})[shape] = flops
        for impl in args.impls.split(","):
            modes = [m for m in args.modes.split(",") if m in MODES[impl] and (dev == "cuda" or "graph" not in m)]
            attentions = args.attention.split(",") if impl == "ours" else ["-"]
            for mode, attention in [(m, a) for m in modes for a in attentions]:
                row = {"shape": shape, "batch": batch, "seq_len": seq_len, "impl": impl, "mode": mode,
                       "attention": attention}
                if dev == "cuda":  # the row's own peak: nothing left over from the previous row counts
                    torch.cuda.reset_peak_memory_stats()
                try:
                    torch.manual_seed(0)
                    step, notes, model = build(impl, mode, preset, args.vocab, dev, attention)
                    row.update(notes)
                    run_batches = [(ids, None) for ids, _ in batches] if full and impl == "ours" else batches
                    if model is not None:  # before the first step: its weights, its first batch
                        try:
                            row.update(first_step_check(model, *run_batches[0], dev, compare=args.check))
                        except Exception as e:  # a check that cannot run fails the row, which is still timed
                            row["check"] = f"failed: {type(e).__name__}: {str(e)[:300]}"
                            traceback.print_exc()
                    else:
                        row["check"] = "none (transformers' own step)"
                    model = None
                    row.update(measure(step, run_batches, args.warmup, args.iters, args.repeats))
                    row["tokens_per_s"] = batch * seq_len / (row["ms_per_step"] / 1e3)
                    row["mfu"] = flops / (row["ms_per_step"] / 1e3) / peak if peak else None
                    if row["check"].startswith("failed"):  # timed all the same, but never reported as a figure
                        row["error"] = "first-step check " + row["check"]
                except Exception as e:  # one failing configuration must not lose the others
                    row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
                    traceback.print_exc()
                if dev == "cuda":  # the row's whole peak: before the timed steps' reset, and after it
                    row["peak_mem_row_gb"] = max(row.pop("peak_before_timing_gb", None) or 0.0,
                                                 torch.cuda.max_memory_allocated() / 1e9)
                else:
                    row.pop("peak_before_timing_gb", None)
                    row["peak_mem_row_gb"] = None
                step = model = None
                free()
                rows.append(row)
                print(json.dumps(row), flush=True)
                ratios(rows, shape)
                write(args.out, env, rows)  # after every row: a run stopped by a time limit keeps what it measured
    write(args.out, env, rows)


def ratios(rows: list, shape: str) -> None:
    """Speed-up and memory ratio of every row of `shape` over the transformers eager step, once it is measured."""
    ref = next((r for r in rows if r["shape"] == shape and r["impl"] == "transformers" and r["mode"] == "eager"
                and "error" not in r), None)
    for r in rows:
        if r["shape"] == shape and ref and "error" not in r:
            r["speedup_vs_hf_eager"] = ref["ms_per_step"] / r["ms_per_step"]
            if r["peak_mem_gb"] and ref["peak_mem_gb"]:
                r["mem_vs_hf_eager"] = r["peak_mem_gb"] / ref["peak_mem_gb"]


def write(out: str, env: dict, rows: list) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "e2e.json"), "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=2)
    cols = ["shape", "batch", "seq_len", "impl", "mode", "attention", "ms_per_step", "tokens_per_s", "peak_mem_gb",
            "peak_mem_row_gb", "mfu", "speedup_vs_hf_eager", "mem_vs_hf_eager", "compile_s", "first_loss", "adamw",
            "check", "attention_taken", "sampler", "backends", "error"]
    with open(os.path.join(out, "e2e.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows({**r, "backends": backends_text(r.get("backends") or {})} for r in rows)

    def fmt(v, spec, suffix=""):
        return "-" if v is None else format(v, spec) + suffix

    lines = [f"{env['device']}, torch {env['torch']}, transformers {env['transformers']}, bf16 autocast, "
             "fused AdamW", "",
             "| shape | impl | mode | ms/step | tokens/s | peak GB | MFU | speed-up | compile s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['impl']} | {r['mode']} | failed: {r['error'][:80]} | | | | | |")
            continue
        impl = r["impl"] if r.get("attention", "-") in ("-", "auto") else f"{r['impl']} ({r['attention']})"
        lines.append(f"| {r['shape']} B={r['batch']} L={r['seq_len']} | {impl} | {r['mode']} | "
                     f"{r['ms_per_step']:.1f} | {r['tokens_per_s'] / 1e3:.0f}k | {fmt(r['peak_mem_gb'], '.1f')} | "
                     f"{fmt(r.get('mfu'), '.1%')} | {fmt(r.get('speedup_vs_hf_eager'), '.2f', 'x')} | "
                     f"{r['compile_s']:.0f} |")
    with open(os.path.join(out, "e2e.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
