"""What one H100 training step must cost, computed on a CPU: FLOPs, kernel launches,
bytes moved, peak memory and a predicted step time, for `ours` and the `transformers` way as bench_e2e.py builds
them, at small (B128 L128) and base (B64 L512). Nothing here is a measurement of a GPU.

How it counts. The models are built on the CPU, their parameters turned into fake tensors (shapes only, no
data), and two full steps (forward, backward, fused AdamW; bf16 autocast) run under a TorchDispatchMode that sees
every ATen op the step issues at run time; the second step is the one reported (optimizer state exists, as in a
training loop). A CPU build cannot hold fake CUDA tensors through autograd, so the CUDA behaviour that changes the
op stream is emulated on the CPU, each point stated here:
- autocast: CPU autocast in bf16, plus CUDA autocast's fp32 policy for the ops CPU autocast runs in bf16
  (`CUDA_FP32_OPS`: LayerNorm, softmax, ... run in fp32 on a GPU, which costs a cast before and after);
- dropout: `native_dropout`, the one fused kernel CUDA uses (the CPU composite would issue bernoulli + mul);
- attention: what an H100 picks: flash without a mask; with one, ours under autocast takes flash's variable-length
  kernel (`electra_fast.model.attention` "auto", whose flash check is forced true here; its FLOPs at the batch's real
  sequence lengths), an additive mask (transformers) the memory-efficient kernel;
- our ops: the Triton backend (first in `DEFAULT_ORDER` on CUDA), each custom op's body run on the fake tensors
  with Triton's launch intercepted, so each Triton launch counts once and the body's own ATen ops count too;
- boolean indexing (the transformers way: `logits[masked]`): a data-dependent size, replaced by its expectation
  (`mask_prob` x the batch's candidate tokens) for every boolean index of the step; counted as one launch plus a
  host sync (the discriminator's `[real]` selections are sized the same; they move < 1 MB either way).

What counts as a launch (GPU-adjusted): every ATen op with a non-empty output is one kernel, except views and
metadata (schema aliases without a write: view, transpose, expand, ...; empty/empty_like/detach) which launch
nothing; multi-tensor ops (`_foreach_*`, `_fused_adamw_`) count the launches of CUDA's multi_tensor_apply (65536
elements per chunk, 320 chunks or 110/64/48/36/30 tensors per launch for 1-5 lists); Triton kernels count one per
launch. Ops that CUDA runs as several kernels (embedding backward's sort, cuBLAS split-K, attention backward's
pre-pass) count one: the totals are a lower bound. FLOPs: torch.utils.flop_counter's formulas (matmuls and
attention only), checked against FlopCounterMode over the same step. Bytes: each launch reads its tensor inputs
and writes its outputs once (mutated arguments count as written). Memory: live bytes of every storage (parameters,
gradients, optimizer state, autocast's weight copies, activations), no allocator rounding.

The step-time model (predictions, not measurements): each kernel takes t = max(FLOPs / (989 TFLOP/s x MM_EFF),
bytes / (3.0 TB/s x BW_EFF)) + GAP_S on the device. Eager and compiled: the host issues each launch in
HOST_LAUNCH_S, so a kernel costs max(t, HOST_LAUNCH_S). Graph modes replay without the host: t only. Compiled:
the eager op stream with every run of consecutive non-matmul ATen ops fused into one kernel that reads only what
the run did not produce and writes only what outlives the run (Inductor's fusion, no epilogue fusion into
matmuls). The transformers way's boolean indexing syncs the host; its step cannot be captured, so it has no graph
rows.

    python benchmarks/step_model.py                        # both shapes, both implementations (~1-2 min)
    python benchmarks/step_model.py --measured results/gpu/results.json   # add the measured ms column
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from dataclasses import dataclass

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry
from torch.utils.module_tracker import ModuleTracker

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_e2e  # noqa: E402
import e2e_models  # noqa: E402
from electra_fast.model import attention  # noqa: E402
from electra_fast.pretraining.pretrainer import param_groups  # noqa: E402
from cuda_emulation import cuda_like, varlen_flop_formulas  # noqa: E402
# multi_tensor_launches: the tests check the launch rule through this module
from step_counter import Launch, StepCounter, _tensors, multi_tensor_launches  # noqa: E402,F401

PEAK_FLOPS = 989e12    # H100 SXM dense bf16
COPY_BW = 3.0e12       # H100 device-to-device copy, bytes read + written (measured; benchmarks/RESULTS.md)
HOST_LAUNCH_S = 4e-6   # host time per launch outside a graph
GAP_S = 1e-6           # device time between two dependent kernels, graph or not
MM_EFF = 0.7           # fraction of peak that cuBLAS / attention kernels reach at these shapes (assumed)
BW_EFF = 0.8           # fraction of copy bandwidth that elementwise / reduction kernels reach (assumed)
SHAPES = bench_e2e.SHAPES
IMPLS = ("ours", "transformers")


# ------------------------------------------------------------------------------------------------ the step
GROUPS = [(r"(^|\.)embeddings(\.|$)", "embeddings (shared)"),
          (r"^generator\.(head|generator_predictions|generator_lm_head)", "generator head"),
          (r"^generator\.", "generator encoder"),
          (r"^discriminator\.(head|discriminator_predictions)", "discriminator head"),
          (r"^discriminator\.", "discriminator encoder")]


def _to_fake(module: nn.Module, mode: FakeTensorMode) -> None:
    """Every parameter and buffer replaced by a fake tensor of the same shape; shared ones stay shared."""
    memo = {}
    for mod in module.modules():
        for store in (mod._parameters, mod._buffers):
            for name, t in store.items():
                if t is None:
                    continue
                if id(t) not in memo:
                    fake = mode.from_tensor(t.detach())
                    memo[id(t)] = nn.Parameter(fake, t.requires_grad) if isinstance(t, nn.Parameter) else fake
                store[name] = memo[id(t)]


def build(impl: str, preset: str, vocab: int):
    """(module naming every trained submodule, forward (ids, mask) -> loss, vocabulary sizes) on the CPU."""
    from electra_fast.model.config import preset_configs
    gen_cfg, disc_cfg = preset_configs(preset, vocab_size=vocab)
    if impl == "ours":
        model = e2e_models.ours(preset, vocab)
        vocabs = {vocab, getattr(disc_cfg, "padded_vocab_size", vocab)}
        return model, lambda ids, mask: model(ids, mask).loss, vocabs
    gen, disc = e2e_models.hf_models(gen_cfg, disc_cfg, device="cpu")
    model = nn.ModuleDict({"generator": gen, "discriminator": disc})
    return model, e2e_models.transformers_step_fn(gen, disc, 0.15), {vocab}


@dataclass
class StepCount:
    impl: str
    shape: str
    records: list
    syncs: int
    flops_check: float          # FlopCounterMode's total over the same step
    start_bytes: int            # live at the start of the counted step: parameters, optimizer state
    peak_bytes: int
    persistent: set
    tokens: int


def count_step(impl: str, shape: str, vocab: int = 30522, preset: str | None = None, batch: int | None = None,
               seq_len: int | None = None) -> StepCount:
    """Run two fake steps of `impl` and count the second (module docstring)."""
    name, b, seq = SHAPES.get(shape, (None, None, None))
    preset, batch, seq_len = preset or name, batch or b, seq_len or seq
    torch.manual_seed(0)
    model, forward, vocabs = build(impl, preset, vocab)
    model.train()
    ids, mask = bench_e2e.make_batches(1, batch, seq_len, vocab, device="cpu")[0]
    candidates = mask.bool() & ~torch.isin(ids, torch.tensor(e2e_models.SPECIAL))
    fraction = 0.15 * candidates.float().mean().item()
    formulas = varlen_flop_formulas(attention.varlen_mask(mask, flash=True).cu_seqlens)

    fake_mode = FakeTensorMode()
    _to_fake(model, fake_mode)
    ids, mask = fake_mode.from_tensor(ids), fake_mode.from_tensor(mask)
    tracker = ModuleTracker()
    for fqn, mod in model.named_modules():
        tracker._known_modules[mod] = fqn or "root"
        tracker._seen_modules.add(mod)
    counter = StepCounter(tracker, GROUPS, vocabs, fraction)
    counter.flop_formulas = {**flop_registry, **formulas}
    with fake_mode:
        opt, _ = e2e_models.make_optimizer(param_groups(model), capturable=False)
    with fake_mode, tracker, counter, cuda_like(counter):
        for t in _tensors((list(model.parameters()), list(model.buffers()), ids, mask)):
            counter.storage_id(t)
        for step in range(2):
            counter.counting = step == 1
            flops = (FlopCounterMode(display=False, custom_mapping=formulas) if counter.counting
                     else contextlib.nullcontext())
            if counter.counting:
                start = counter.live
                counter.peak = start
            with flops:
                opt.zero_grad(set_to_none=True)
                counter.phase = "forward"
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = forward(ids, mask)
                counter.phase = "backward"
                loss.backward()
                counter.phase = "optimizer"
                opt.step()
            del loss
        persistent = counter.alive_ids()
    return StepCount(impl, shape, counter.records, counter.syncs, float(flops.get_total_flops()), start,
                     counter.peak, persistent, batch * seq_len)


# ---------------------------------------------------------------------------------------------- the model
def fused(count: StepCount) -> list:
    """The op stream as torch.compile would launch it: runs of fusible ops become one kernel each."""
    last_read = {}
    for i, r in enumerate(count.records):
        for s in r.reads:
            last_read[s] = i
    out, run = [], []

    def close():
        if not run:
            return
        end = run[-1][0]
        produced, nbytes = set(), 0
        sizes = {}
        for _, r in run:
            per = r.nbytes / max(1, len(r.reads) + len(r.writes))  # this op's average bytes per tensor
            for s in r.reads:
                if s not in produced:
                    nbytes += per
                    produced.add(s)  # read once per fused kernel
            for s in r.writes:
                produced.add(s)
                sizes[s] = per
        nbytes += sum(sizes[s] for s in sizes if last_read.get(s, -1) > end or s in count.persistent)
        first = run[0][1]
        out.append(Launch("fused", first.phase, first.group, 1, 0.0, int(nbytes), fusible=True))
        run.clear()

    for i, r in enumerate(count.records):
        if r.fusible and r.op != "nonzero":
            run.append((i, r))
            if i + 1 < len(count.records) and count.records[i + 1].phase != r.phase:
                close()
        else:
            close()
            out.append(r)
    close()
    return out


def kernel_s(r: Launch, mm_eff=MM_EFF, bw_eff=BW_EFF) -> float:
    return max(r.flops / (PEAK_FLOPS * mm_eff), r.nbytes / (COPY_BW * bw_eff)) + GAP_S * r.launches


def predict_ms(records: list, graph: bool) -> float:
    host = 0.0 if graph else HOST_LAUNCH_S
    return 1e3 * sum(max(kernel_s(r), host * r.launches) for r in records)


def summarize(count: StepCount) -> dict:
    rec = count.records
    tot = lambda key, rs=rec: sum(getattr(r, key) for r in rs)  # noqa: E731
    phases = {p: tot("launches", [r for r in rec if r.phase == p]) for p in ("forward", "backward", "optimizer")}
    groups = {}
    for r in rec:
        g = groups.setdefault(r.group, {"launches": 0, "flops": 0.0})
        g["launches"] += r.launches
        g["flops"] += r.flops
    casts = sum(r.launches for r in rec if r.op == "_to_copy" and r.phase != "optimizer")
    comp = fused(count)
    row = {"impl": count.impl, "shape": count.shape, "flops": tot("flops"), "flops_counter_mode": count.flops_check,
           "lm_head_flops": tot("flops", [r for r in rec if r.vocab]),
           "attention_flops": tot("flops", [r for r in rec if r.attention]),
           "launches": tot("launches"), "launches_by_phase": phases, "autocast_casts": casts,
           "launches_compiled": tot("launches", comp), "bytes": tot("nbytes"), "bytes_compiled": tot("nbytes", comp),
           "host_syncs": count.syncs, "groups": groups, "start_gb": count.start_bytes / 1e9,
           "peak_gb": count.peak_bytes / 1e9, "activation_gb": (count.peak_bytes - count.start_bytes) / 1e9,
           "tokens": count.tokens}
    row["floor_ms"] = {"flops": 1e3 * row["flops"] / PEAK_FLOPS, "bytes": 1e3 * row["bytes"] / COPY_BW,
                       "launches": 1e3 * row["launches"] * HOST_LAUNCH_S}
    row["predicted_ms"] = {"eager": predict_ms(rec, graph=False), "compiled": predict_ms(comp, graph=False)}
    if not count.syncs:
        row["predicted_ms"].update({"graph": predict_ms(rec, graph=True), "compiled+graph": predict_ms(comp, True)})
    return row


# ------------------------------------------------------------------------------------------------- output
def measured_ms(path: str | None) -> dict:
    """(shape, impl, mode) -> ms/step from bench_e2e's e2e.json or validate_gpu's results.json."""
    if not path:
        return {}
    with open(path) as f:
        data = json.load(f)
    rows = data.get("rows") or [r for part in data.get("e2e", {}).values() for r in part.get("rows", [])]
    return {(r["shape"], r["impl"], r["mode"]): r["ms_per_step"] for r in rows if "ms_per_step" in r}


# benchmarks/RESULTS.md, "Reference figures to beat": the transformers way, measured on an H100 (torch 2.11)
REFERENCE_MS = {("small", "eager"): 68.1, ("small", "compiled"): 54.7, ("base", "eager"): 147.9,
                ("base", "compiled"): 112.4}


def markdown(rows: list, measured: dict) -> str:
    g = lambda x: f"{x / 1e9:.1f} GB"  # noqa: E731
    out = ["### Counted on a CPU (fake tensors, bf16 autocast, CUDA op stream emulated; not a GPU measurement)", "",
           "| shape | impl | TFLOP fwd+bwd (FlopCounterMode) | of which LM head / attention | eager launches "
           "(fwd / bwd / opt) | autocast casts fwd+bwd | est. compiled launches | GB moved eager / compiled | "
           "host syncs | peak memory (params + Adam at start) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["launches_by_phase"]
        out.append(f"| {r['shape']} | {r['impl']} | {r['flops'] / 1e12:.2f} ({r['flops_counter_mode'] / 1e12:.2f}) | "
                   f"{r['lm_head_flops'] / 1e12:.2f} / {r['attention_flops'] / 1e12:.2f} | {r['launches']:,} "
                   f"({p['forward']} / {p['backward']} / {p['optimizer']}) | {r['autocast_casts']} | "
                   f"{r['launches_compiled']:,} | {g(r['bytes'])} / {g(r['bytes_compiled'])} | {r['host_syncs']} | "
                   f"{r['peak_gb']:.1f} GB ({r['start_gb']:.2f}) |")
    out += ["", "Floors on an H100 (989 TFLOP/s, 3.0 TB/s, 4 us per launch):", "",
            "| shape | impl | FLOP floor ms | byte floor ms (eager) | launch floor ms (eager) |",
            "|---|---|---|---|---|"]
    for r in rows:
        f = r["floor_ms"]
        out.append(f"| {r['shape']} | {r['impl']} | {f['flops']:.2f} | {f['bytes']:.2f} | {f['launches']:.2f} |")
    out += ["", "Launches per component (fwd + bwd; optimizer apart):", "",
            "| shape | impl | " + " | ".join(lbl for _, lbl in GROUPS) + " | step glue | optimizer |",
            "|---|---|" + "---|" * (len(GROUPS) + 2)]
    for r in rows:
        cells = [r["groups"].get(lbl, {}).get("launches", 0) for _, lbl in GROUPS]
        glue = sum(v["launches"] for k, v in r["groups"].items() if k.startswith("step glue"))
        out.append(f"| {r['shape']} | {r['impl']} | " + " | ".join(map(str, cells)) +
                   f" | {glue} | {r['groups'].get('optimizer', {}).get('launches', 0)} |")
    out += ["", f"### Predicted H100 step time (a model, not a measurement: kernel = max(FLOPs / (989 TFLOP/s x "
            f"{MM_EFF}), bytes / (3.0 TB/s x {BW_EFF})) + {GAP_S * 1e6:g} us; outside a graph each launch costs at "
            f"least {HOST_LAUNCH_S * 1e6:g} us of host time)", "",
            "| shape | impl | mode | predicted ms | measured ms | measured (reference figures, H100) |",
            "|---|---|---|---|---|---|"]
    for r in rows:
        for mode, ms in r["predicted_ms"].items():
            got = measured.get((r["shape"], r["impl"], mode))
            ref = REFERENCE_MS.get((r["shape"], mode)) if r["impl"] == "transformers" else None
            out.append(f"| {r['shape']} | {r['impl']} | {mode} | {ms:.1f} | {'-' if got is None else f'{got:.1f}'} | "
                       f"{'-' if ref is None else ref} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="small,base", help=f"comma list of {list(SHAPES)}")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {list(IMPLS)}")
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--measured", default=None, help="e2e.json (bench_e2e) or results.json (validate_gpu)")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)
    configs = [(impl, shape) for shape in args.shapes.split(",") for impl in args.impls.split(",")]
    rows = [summarize(count_step(impl, shape, args.vocab)) for impl, shape in configs]
    print(markdown(rows, measured_ms(args.measured)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
