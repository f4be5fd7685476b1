"""One command for a GPU machine (issue 9.3): the GPU tests, the op microbenchmarks, the end-to-end benchmarks,
then a markdown section with device, date, versions and every figure, ready to paste into benchmarks/RESULTS.md.

Parts, in order, each a subprocess bounded by --budget-s (killed at the limit; what it wrote stays):
  tests      pytest of the GPU tests without the Triton interpreter (GPU_TEST_FILES: the Triton kernel tests on the
             GPU, the CUDA backend, the captured step) and every test marked `cuda`
  ops        benchmarks/bench_ops.py (every backend vs torch eager / torch.compile, GB/s, copy bandwidth)
  e2e-small  benchmarks/bench_e2e.py --shapes small,small-full (transformers eager + compiled, hf-dropin, ours in
             every mode; with 1 short row in 8, and without padding)
  e2e-base   benchmarks/bench_e2e.py --shapes base,base-full
Each part writes under --out as it goes; every call (re)builds results.json, validation.md and e2e.png from all
that --out holds, so calls with different --part merge. With the device tool, calls under 9 minutes each:

    python benchmarks/validate_gpu.py --out benchmarks/results/gpu --part tests --budget-s 480
    python benchmarks/validate_gpu.py --out benchmarks/results/gpu --part ops --budget-s 480
    python benchmarks/validate_gpu.py --out benchmarks/results/gpu --part e2e-small --budget-s 480
    python benchmarks/validate_gpu.py --out benchmarks/results/gpu --part e2e-base --budget-s 480

`--smoke` runs the same parts on a CPU (tiny shapes, torch backend) in about a minute: CI runs it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from datetime import date

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PARTS = ("tests", "ops", "e2e-small", "e2e-base")
# Without TRITON_INTERPRET these run the Triton kernels on the GPU; the last one (a GPU-only file) is the smoke's.
GPU_TEST_FILES = ("tests/test_kernels_triton.py", "tests/test_lm_head.py", "tests/test_mask_tokens.py",
                  "tests/test_dropout_layer_norm.py", "tests/test_rtd_head.py", "tests/test_attention.py",
                  "tests/test_seeds.py", "tests/test_fuzz_ops.py", "tests/test_kernels_cuda.py",
                  "tests/test_cuda_backend.py", "tests/test_cuda_step.py")
# The goals (SPEC 5, issue 9.5): what the figures are judged against.
TARGETS = {"small_vs_hf_eager": 6.0, "small_vs_hf_compiled": 2.5, "base_vs_hf_eager": 3.0, "base_mfu": 0.45,
           "mlm_frac_copy_bw": 0.80}


def commands(part: str, out: str, smoke: bool) -> list:
    """The subprocess command lines of one part."""
    py = sys.executable
    if part == "tests":
        junit = os.path.join(out, "tests")
        files = GPU_TEST_FILES[-1:] if smoke else GPU_TEST_FILES  # smoke: one file (it skips on a CPU)
        first = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}/files.xml", *files]
        if smoke:
            return [first]  # each pytest start costs seconds of imports on a CI core; the file's run is the check
        marked = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}/marked.xml", "-m", "cuda",
                  "tests", *[f"--ignore={f}" for f in GPU_TEST_FILES]]
        return [first, marked]
    if part == "ops":
        return [[py, os.path.join(HERE, "bench_ops.py"), "--out", os.path.join(out, "ops")] +
                (["--smoke"] if smoke else [])]
    shape = part.split("-", 1)[1]
    # smoke: both e2e parts run the tiny preset, the implementations and the two input kinds (with padding, and
    # full rows without a mask) split between them to keep the check short
    if smoke:
        impls, shapes = ("transformers,ours", shape) if shape == "small" else ("hf-dropin,ours", f"{shape}-full")
        return [[py, os.path.join(HERE, "bench_e2e.py"), "--out", os.path.join(out, part), "--shapes", shapes,
                 "--smoke", "--impls", impls]]
    return [[py, os.path.join(HERE, "bench_e2e.py"), "--out", os.path.join(out, part),
             "--shapes", f"{shape},{shape}-full"]]


def run_part(part: str, out: str, smoke: bool, budget_s: float) -> dict:
    """Run one part's commands within `budget_s` seconds in all; its status as a dict."""
    env = dict(os.environ)
    if part == "tests" and not smoke:
        env.pop("TRITON_INTERPRET", None)  # the real Triton compiler, not the interpreter
    os.makedirs(os.path.join(out, "tests"), exist_ok=True)
    t0, status = time.time(), "ok"
    with open(os.path.join(out, f"{part}.log"), "a") as log:
        for cmd in commands(part, out, smoke):
            left = budget_s - (time.time() - t0)
            if left <= 0:
                status = "timeout"
                break
            log.write(f"+ {' '.join(cmd)}\n")
            log.flush()
            try:
                rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    timeout=left).returncode
            except subprocess.TimeoutExpired:
                status = "timeout"
                break
            # pytest: 1 = some test failed, 5 = none collected (every GPU test skipped on a CPU is fine)
            if rc not in (0, 5) and status == "ok":
                status = f"failed (exit {rc})"
    return {"status": status, "seconds": round(time.time() - t0, 1), "date": date.today().isoformat()}


# ------------------------------------------------------------------------------------------------ collecting
def versions() -> dict:
    import torch

    out = {"date": date.today().isoformat(), "python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    for name in ("triton", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    try:
        out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        out["driver"] = None
    from common import device_name

    out["device"] = device_name() + ("" if out["gpu"] else ", smoke run")
    return out


def read_tests(out: str) -> dict:
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    failures = []
    for name in ("files.xml", "marked.xml"):
        path = os.path.join(out, "tests", name)
        if not os.path.exists(path):
            continue
        for case in ET.parse(path).getroot().iter("testcase"):
            kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
            key = {"failure": "failed", "error": "errors"}.get(kind, kind)
            counts[key] += 1
            if key in ("failed", "errors"):
                failures.append(f"{case.get('classname')}::{case.get('name')}")
    return {**counts, "failures": failures}


def read_ops(out: str) -> dict:
    import csv

    path, env_path = os.path.join(out, "ops", "ops.csv"), os.path.join(out, "ops", "env.json")
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for r in csv.DictReader(f):
                rows.append({k: _num(v) for k, v in r.items()})
    env = json.load(open(env_path)) if os.path.exists(env_path) else {}
    return {"env": env, "rows": rows}


def _num(v):
    try:
        return float(v) if v not in ("", None) else None
    except ValueError:
        return v


def collect(out: str) -> dict:
    path = os.path.join(out, "results.json")
    old = json.load(open(path)) if os.path.exists(path) else {}
    res = {"env": versions(), "parts": old.get("parts", {}), "tests": read_tests(out), "ops": read_ops(out),
           "e2e": {}}
    for part in PARTS[2:]:
        p = os.path.join(out, part, "e2e.json")
        if os.path.exists(p):
            res["e2e"][part.split("-", 1)[1]] = json.load(open(p))
    res["targets"] = judge(res)
    return res


def judge(res: dict) -> dict:
    """Each target (TARGETS) with the measured figure, where the figures exist."""
    rows = [r for part in res["e2e"].values() for r in part.get("rows", []) if "error" not in r]

    def best(shape, impl="ours"):
        ms = [r["ms_per_step"] for r in rows if r["shape"] == shape and r["impl"] == impl]
        return min(ms) if ms else None

    def hf(shape, mode):
        return next((r["ms_per_step"] for r in rows if (r["shape"], r["impl"], r["mode"]) == (shape, "transformers",
                                                                                                mode)), None)
    figures = {}
    for shape in {r["shape"] for r in rows}:
        ours = best(shape)
        for mode in ("eager", "compiled"):
            if ours and hf(shape, mode):
                figures[f"{shape}_vs_hf_{mode}"] = hf(shape, mode) / ours
        mfu = [r["mfu"] for r in rows if r["shape"] == shape and r["impl"] == "ours" and r.get("mfu")]
        if mfu:
            figures[f"{shape}_mfu"] = max(mfu)
    mlm = [r["frac_copy_bw"] for r in res["ops"]["rows"] if r.get("op") == "mlm_loss_and_sample"
           and r.get("pass") == "fwd" and r.get("impl") != "torch.compile" and r.get("shape") != "tiny"]
    if mlm:
        figures["mlm_frac_copy_bw"] = max(mlm)
    return {k: {"target": t, "measured": figures.get(k), "met": None if figures.get(k) is None else figures[k] >= t}
            for k, t in TARGETS.items()}


# ------------------------------------------------------------------------------------------------- writing
def markdown(res: dict) -> str:
    e = res["env"]
    lines = [f"## GPU validation: {e['device']}, {e['date']}", "",
             f"torch {e['torch']}, CUDA {e['cuda']}, Triton {e['triton']}, transformers {e['transformers']}, "
             f"driver {e['driver']}, Python {e['python']}. Produced by `benchmarks/validate_gpu.py`.", "",
             "### Parts", "", "| part | status | seconds | date |", "|---|---|---|---|"]
    for part in PARTS:
        p = res["parts"].get(part)
        lines.append(f"| {part} | " + (f"{p['status']} | {p['seconds']} | {p['date']} |" if p else "not run | | |"))
    t = res["tests"]
    lines += ["", "### GPU tests", "", f"{t['passed']} passed, {t['failed']} failed, {t['errors']} errors, "
              f"{t['skipped']} skipped."] + [f"- failed: `{f}`" for f in t["failures"]]
    lines += ["", "### Op microbenchmarks", ""]
    ops = res["ops"]
    if ops["rows"]:
        lines += [f"copy bandwidth {ops['env'].get('copy_GB/s')} GB/s (read + write), same run", "",
                  "| op | shape | pass | impl | ms | GB/s | of copy bw | x vs torch.compile |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['op']} | {r['shape']} | {r['pass']} | {r['impl']} | {r['ms']:.4f} | {r['GB/s']:.1f} | "
                  f"{r['frac_copy_bw']:.1%} | {r.get('x_vs_compile') or '-'} |" for r in ops["rows"]]
    else:
        lines.append("not measured")
    lines += ["", "### End to end (one training step: forward, backward, fused AdamW; bf16)", ""]
    if res["e2e"]:
        lines += ["| shape | impl | mode | ms/step | tokens/s | peak GB | MFU | x vs transformers eager |",
                  "|---|---|---|---|---|---|---|---|"]
        for part in res["e2e"].values():
            for r in part["rows"]:
                if "error" in r:
                    lines.append(f"| {r['shape']} | {r['impl']} | {r['mode']} | failed: {r['error'][:80]} | | | | |")
                    continue
                lines.append(f"| {r['shape']} B={r['batch']} L={r['seq_len']} | {r['impl']} | {r['mode']} | "
                             f"{r['ms_per_step']:.1f} | {r['tokens_per_s'] / 1e3:.0f}k | "
                             f"{_fmt(r['peak_mem_gb'], '.1f')} "
                             f"| {_fmt(r.get('mfu'), '.1%')} | {_fmt(r.get('speedup_vs_hf_eager'), '.2f')} |")
    else:
        lines.append("not measured")
    lines += ["", "### Targets (SPEC 5)", "", "| target | goal | measured | met |", "|---|---|---|---|"]
    for k, v in res["targets"].items():
        lines.append(f"| {k} | {v['target']} | {_fmt(v['measured'], '.3f')} | "
                     f"{'-' if v['met'] is None else 'yes' if v['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def plot(res: dict, path: str) -> bool:
    rows = [r for part in res["e2e"].values() for r in part["rows"] if "error" not in r]
    if not rows:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1))
    labels = [f"{r['shape']} {r['impl']} {r['mode']}" for r in rows]
    ax.barh(labels, [r["ms_per_step"] for r in rows])
    ax.set_xlabel("ms per training step (lower is better)")
    ax.set_title(res["env"]["device"])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write(out: str) -> dict:
    res = collect(out)
    for r in [r for part in res["e2e"].values() for r in part.get("rows", [])]:
        for k, v in r.items():  # JSON must stay valid: no NaN / inf
            if isinstance(v, float) and not math.isfinite(v):
                r[k] = None
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(res, f, indent=2)
    with open(os.path.join(out, "validation.md"), "w") as f:
        f.write(markdown(res))
    plot(res, os.path.join(out, "e2e.png"))
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/gpu", help="folder for every result (merged across calls)")
    p.add_argument("--part", action="append", choices=PARTS, help="run only these parts (repeatable; default all)")
    p.add_argument("--budget-s", type=float, default=480, help="seconds per part (killed at the limit)")
    p.add_argument("--total-s", type=float, default=1500, help="start no part once this many seconds have passed")
    p.add_argument("--smoke", action="store_true", help="on a CPU: tiny shapes, torch backend, same code paths")
    args = p.parse_args(argv)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        sys.exit("validate_gpu.py needs a CUDA GPU (or --smoke to check it on a CPU); nothing was measured.")
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    for part in [q for q in PARTS if q in (args.part or PARTS)]:
        if time.time() - t0 > args.total_s:
            print(f"{part}: skipped, --total-s {args.total_s} spent", flush=True)
            continue
        print(f"{part}: running (budget {args.budget_s:.0f} s, log {out}/{part}.log)", flush=True)
        status = run_part(part, out, args.smoke, args.budget_s)
        path = os.path.join(out, "results.json")
        old = json.load(open(path)) if os.path.exists(path) else {}
        old.setdefault("parts", {})[part] = status
        with open(path, "w") as f:
            json.dump(old, f, indent=2)
        write(out)  # after every part: a later kill keeps what is done
        print(f"{part}: {status['status']} in {status['seconds']} s", flush=True)
    res = write(out)
    print(open(os.path.join(out, "validation.md")).read())
    return res


if __name__ == "__main__":
    main()
