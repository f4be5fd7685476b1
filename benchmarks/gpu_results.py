"""What benchmarks/validate_gpu.py's stages left under --out, read back and reported: the junit of the tests
stages, the benchmarks' rows, the pretrain stage's metrics, the targets judged against them, and results.json,
validation.md and e2e.png written from all of it (so calls merge)."""
from __future__ import annotations

import csv
import json
import math
import os
import statistics
import xml.etree.ElementTree as ET
from datetime import date
from typing import Optional

from gpu_stage import PRETRAIN_LOG, PRETRAIN_STEPS, RESUME_STEPS, SMOKE_PRETRAIN_LOG

# The project's speed goals (benchmarks/RESULTS.md, Targets): what the figures are judged against.
TARGETS = {"small_vs_hf_eager": 6.0, "small_vs_hf_compiled": 2.5, "base_vs_hf_eager": 3.0, "base_mfu": 0.45,
           "mlm_frac_copy_bw": 0.80}


# ------------------------------------------------------------------------------------------------ reading results
def read_junit(path: str) -> dict:
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "failures": [], "present": False}
    if not os.path.exists(path):
        return counts
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return counts
    counts["present"] = True
    for case in root.iter("testcase"):
        kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        key = {"failure": "failed", "error": "errors"}.get(kind, kind)
        counts[key] += 1
        if key in ("failed", "errors"):
            counts["failures"].append(f"{case.get('classname')}::{case.get('name')}")
    return counts


def read_ops(d: str) -> dict:
    rows = []
    path, env_path = os.path.join(d, "ops.csv"), os.path.join(d, "env.json")
    if os.path.exists(path):
        with open(path) as f:
            rows = [{k: _num(v) for k, v in r.items()} for r in csv.DictReader(f)]
    return {"env": load_json(env_path) or {}, "rows": rows}


def read_e2e(d: str) -> dict:
    return load_json(os.path.join(d, "e2e.json")) or {}


def read_pretrain(d: str) -> dict:
    path = os.path.join(d, "run", "metrics.jsonl")
    records = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except ValueError:  # the line a cut run was writing
                    pass
    train = [r for r in records if "tokens_per_s" in r and r.get("split") != "eval"]
    evals = [r for r in records if r.get("split") == "eval"]
    # The first window of each run holds torch.compile and the graph capture: not steady-state throughput.
    first_windows = {PRETRAIN_LOG, PRETRAIN_STEPS + PRETRAIN_LOG, SMOKE_PRETRAIN_LOG}
    steady = [r["tokens_per_s"] for r in train if r.get("step") not in first_windows]
    ckpt_dir = os.path.join(d, "run", "checkpoints")
    return {"train_records": train, "eval_records": len(evals),
            "last_step": max((r.get("step", 0) for r in train), default=0),
            "tokens_per_s": statistics.median(steady) if steady else None,
            "last_eval": evals[-1] if evals else None,
            "checkpoints": sorted(os.listdir(ckpt_dir)) if os.path.isdir(ckpt_dir) else []}


def load_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _num(v):
    try:
        return float(v) if v not in ("", None) else None
    except ValueError:
        return v


def collect(out: str, stages: list) -> dict:
    """Everything under `out` that `stages` (every stage of the plan, in run order) left there."""
    old = load_json(os.path.join(out, "results.json")) or {}
    res = {"plan": old.get("plan", {}), "stages": old.get("stages", {}),
           "env": load_json(os.path.join(out, "env", "env.json")) or {},
           "build": load_json(os.path.join(out, "build", "build.json")) or {},
           "tests": {}, "ops": {}, "e2e": {}, "pretrain": None}
    for stage in stages:
        name, kind = stage.name, stage.kind
        d = os.path.join(out, name)
        if not os.path.isdir(d):
            continue
        if kind == "tests":
            res["tests"][name] = read_junit(os.path.join(d, "junit.xml"))
        elif kind == "ops":
            res["ops"][name] = read_ops(d)
        elif kind == "e2e" and os.path.exists(os.path.join(d, "e2e.json")):
            res["e2e"][name] = read_e2e(d)
        elif kind == "pretrain":
            res["pretrain"] = read_pretrain(d)
    res["targets"] = judge(res)
    return res


def judge(res: dict) -> dict:
    """Each target (TARGETS) with the measured figure, where the figures exist."""
    rows = [r for part in res["e2e"].values() for r in part.get("rows", []) if "error" not in r]

    def ms(shape, impl, mode=None):
        found = [r["ms_per_step"] for r in rows if r["shape"] == shape and r["impl"] == impl
                 and (mode is None or r["mode"] == mode)]
        return min(found) if found else None

    figures = {}
    for shape in {r["shape"] for r in rows}:
        ours = ms(shape, "ours")
        for mode in ("eager", "compiled"):
            hf = ms(shape, "transformers", mode)
            if ours and hf:
                figures[f"{shape}_vs_hf_{mode}"] = hf / ours
        mfu = [r["mfu"] for r in rows if r["shape"] == shape and r["impl"] == "ours" and r.get("mfu")]
        if mfu:
            figures[f"{shape}_mfu"] = max(mfu)
    mlm = [r["frac_copy_bw"] for part in res["ops"].values() for r in part["rows"]
           if r.get("op") == "mlm_loss_and_sample" and r.get("pass") == "fwd" and str(r.get("impl")) == "triton"
           and r.get("shape") != "tiny" and r.get("frac_copy_bw") is not None]
    if mlm:
        figures["mlm_frac_copy_bw"] = max(mlm)
    return {k: {"target": t, "measured": figures.get(k), "met": None if figures.get(k) is None else figures[k] >= t}
            for k, t in TARGETS.items()}


# ------------------------------------------------------------------------------------------------ writing
def markdown(res: dict, stages: list) -> str:
    e = res["env"]
    lines = [f"## GPU validation: {e.get('device', 'device not recorded (env stage not run)')}, "
             f"{e.get('date', date.today().isoformat())}", "",
             f"torch {e.get('torch')}, CUDA {e.get('cuda')}, Triton {e.get('triton')}, transformers "
             f"{e.get('transformers')}, driver {e.get('driver')}, Python {e.get('python')}, electra-fast "
             f"{e.get('electra_fast')}. Produced by `benchmarks/validate_gpu.py`.", "",
             "### Stages", "", "| stage | status | seconds | budget s | what |", "|---|---|---|---|---|"]
    for stage in stages:
        rec = res["stages"].get(stage.name)
        status = (rec["label"] + (f" ({rec['note']})" if rec.get("note") else "") if rec
                  else "skipped: not run by any call yet")
        lines.append(f"| {stage.name} | {status} | {rec.get('seconds', '') if rec else ''} | "
                     f"{rec.get('budget_s', '') if rec else ''} | {stage.what} |")
    backends = e.get("default_backends")
    if backends:
        lines += ["", f"### Default backend of each op ({backends['device']} tensors)", "",
                  "| op | default path takes | intended | available |", "|---|---|---|---|"]
        for op, row in backends["ops"].items():
            flag = "" if row["default"] == row["intended"] else " **NOT INTENDED**"
            lines.append(f"| {op} | {row['default']}{flag} | {row['intended']} | {', '.join(row['available'])} |")
    if res["build"]:
        b = res["build"]
        lines += ["", "### CUDA extension", "", (f"built or loaded in {b.get('seconds')} s: `{b.get('module')}`"
                                                if b.get("built") else f"not built: {b.get('reason')}")
                  + (f"; removed a stale lock `{b['stale_lock_removed']}`" if b.get("stale_lock_removed") else "")]
    lines += ["", "### GPU tests", ""]
    for name, t in res["tests"].items():
        lines.append(f"- {name}: {t['passed']} passed, {t['failed']} failed, {t['errors']} errors, "
                     f"{t['skipped']} skipped" + ("" if t["present"] else " (no junit written)"))
        lines += [f"  - failed: `{f}`" for f in t["failures"][:40]]
    if not res["tests"]:
        lines.append("not run")
    lines += ["", "### Op microbenchmarks", ""]
    if any(p["rows"] for p in res["ops"].values()):
        for name, p in res["ops"].items():
            lines.append(f"- copy bandwidth measured in {name}: {p['env'].get('copy_GB/s')} GB/s (read + write)")
        lines += ["", "| stage | op | shape | pass | impl | ms | GB/s | of copy bw | x vs torch.compile |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, p in res["ops"].items():
            lines += [f"| {name} | {r['op']} | {r['shape']} | {r['pass']} | {r['impl']} | {_fmt(r.get('ms'), '.4f')} | "
                      f"{_fmt(r.get('GB/s'), '.1f')} | {_fmt(r.get('frac_copy_bw'), '.1%')} | "
                      f"{r.get('x_vs_compile') or '-'} |" for r in p["rows"]]
    else:
        lines.append("not measured")
    lines += ["", "### End to end (one training step: forward, backward, fused AdamW; bf16)", ""]
    if res["e2e"]:
        lines += ["| stage | shape | impl | mode | ms/step | tokens/s | peak GB | MFU | x vs transformers eager |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, part in res["e2e"].items():
            for r in part.get("rows", []):
                if "error" in r:
                    lines.append(f"| {name} | {r['shape']} | {r['impl']} | {r['mode']} | failed: "
                                 f"{str(r['error'])[:100]} | | | | |")
                    continue
                lines.append(f"| {name} | {r['shape']} B={r['batch']} L={r['seq_len']} | {r['impl']} | {r['mode']} "
                             f"| {r['ms_per_step']:.1f} | {r['tokens_per_s'] / 1e3:.0f}k | "
                             f"{_fmt(r.get('peak_mem_gb'), '.1f')} | {_fmt(r.get('mfu'), '.1%')} | "
                             f"{_fmt(r.get('speedup_vs_hf_eager'), '.2f')} |")
    else:
        lines.append("not measured")
    lines += ["", "### Pretraining through the command line (prepare -> pretrain -> resume)", ""]
    p = res["pretrain"]
    if p and p["train_records"]:
        ev = p.get("last_eval") or {}
        lines.append(f"{p['last_step']} steps; steady tokens/s {_fmt(p['tokens_per_s'], ',.0f')} (median of the "
                     f"logged windows after the first of each run); {p['eval_records']} evaluations"
                     + (f", last discriminator ROC-AUC {ev['disc_auc']:.3f}" if ev.get("disc_auc") is not None
                        else "") + f"; checkpoints {p['checkpoints']} (on the GPU the plan is {PRETRAIN_STEPS} "
                     f"steps, then a resumed run to {RESUME_STEPS})")
    else:
        lines.append("not measured")
    lines += ["", "### Targets", "", "| target | goal | measured | met |", "|---|---|---|---|"]
    for k, v in res["targets"].items():
        lines.append(f"| {k} | {v['target']} | {_fmt(v['measured'], '.3f')} | "
                     f"{'-' if v['met'] is None else 'yes' if v['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def _fmt(v, spec):
    return "-" if v is None or isinstance(v, str) else format(v, spec)


def plot(res: dict, path: str) -> bool:
    rows = [r for part in res["e2e"].values() for r in part.get("rows", []) if "error" not in r]
    if not rows:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1))
    ax.barh([f"{r['shape']} {r['impl']} {r['mode']}" for r in rows], [r["ms_per_step"] for r in rows])
    ax.set_xlabel("ms per training step (lower is better)")
    ax.set_title(res["env"].get("device", ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _finite(obj):
    """JSON must stay valid: NaN / inf become null."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write(out: str, stages: list, records: Optional[dict] = None, plan_info: Optional[dict] = None) -> dict:
    """results.json, validation.md and e2e.png from everything under `out` that `stages` (every stage of the plan,
    in run order) left there, with these stage records merged in."""
    res = collect(out, stages)
    res["stages"].update(records or {})
    if plan_info is not None:
        res["plan"] = plan_info
    res = _finite(res)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(res, f, indent=2)
    with open(os.path.join(out, "validation.md"), "w") as f:
        f.write(markdown(res, stages))
    plot(res, os.path.join(out, "e2e.png"))
    return res
