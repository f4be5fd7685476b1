"""Validation on a GPU in the minutes a GPU machine is lent: one plan of stages, the most valuable figures first.

    python benchmarks/validate_gpu.py --out benchmarks/results/gpu           # the plan: 420 s
    python benchmarks/validate_gpu.py --out benchmarks/results/gpu --rest    # what it leaves: 180 s

Each stage is its own subprocess (its own process group) with its own budget; the budgets of a call sum to
`--budget-s` (420 s, or 180 s with `--rest`). On the GPU a stage that ends early leaves its unused seconds to the
stages after it (the smoke keeps each stage to its own budget). A stage that reaches its time gets SIGINT (pytest
then writes its junit, a benchmark keeps the rows it wrote, the build's ninja keeps the objects it finished) and,
`--grace-s` later, SIGKILL of its process group. `validation.md` marks every stage `ok`, `failed: why`,
`cut at N s` or `skipped: why`, never leaving one out. `--dry-run` prints the plan, one `stage NAME budget_s N`
line per stage in run order, and runs nothing.

The plan (`FIRST`, in this order):
  env                versions, the GPU, and the backend each public op's default path really resolves to on it
                     (`electra_fast.ops._backend.resolve`); an op whose default is not its first choice in
                     `DEFAULT_ORDER` (Triton) fails the stage instead of falling back silently
  build              the CUDA C++ extension, once, before any benchmark process starts (each one loads it first
                     thing); a lock file left by a build killed half-way is removed first, when no build is alive
  e2e_small          bench_e2e.py at small (B=128 L=128): ours captured (graph) and eager, transformers eager;
                     3 warm-up steps, median of 3 repeats of 10
  e2e_base           the same at base (B=64 L=512)
  ops_mlm            bench_ops.py, the fused MLM loss + sample kernel (Triton, and the torch reference) in GB/s
                     beside the device-to-device copy bandwidth measured in the same process
  hf_compiled_small  transformers compiled at small (two cold Inductor compiles)
  tests              the GPU tests: pytest -m cuda (the marker, never a list of files), 4 xdist workers, without
                     TRITON_INTERPRET; junit under --out
  hf_compiled_base   transformers compiled at base
then, with budget 0, the stages of `--rest` below, run only on seconds the others left unused.

`--rest` (`REST`): build again (nothing to do on the same machine; a fresh machine builds), `tests_rest` (the
`-m cuda` tests the first call did not reach: it skips every test the first call's pytest reported),
`tests_triton` (the Triton kernels' own suites, marker `triton`, compiled instead of interpreted), `pretrain`
(the real path through the command line: `electra-fast prepare`, then `electra-fast pretrain` at small for 300
steps with bf16, torch.compile, CUDA graph, evaluation and checkpoints, then `--resume` to step 400; its tokens/s),
`dropin` (hf-dropin eager, small and base), `ours_compiled` (ours compiled and compiled+graph, small and base) and
`ops_all` (the op matrix, bench_ops.py over every op and backend). Stages the first call finished are skipped.

`--part NAME` (repeatable, or comma separated) runs just those stages, in plan order, with the whole budget.
Every call rebuilds results.json, validation.md and e2e.png from everything --out holds, so calls merge.

Before the GPU machine starts: `--prebuild` runs `electra-fast prepare` for the pretrain stage here, on a CPU,
into `<out>/prebuilt/` (a copy of the working tree carries it when --out lies inside it and is not git-ignored, as
benchmarks/results/ is not); the pretrain stage then starts from it instead of preparing on the clock.
Nothing else can honestly be built ahead: the CUDA extension links against the GPU machine's torch (a CUDA build,
its exact version and Python ABI), and Triton's kernel cache is keyed by a hash of the Triton installation itself
(its version, compiler sources and the libtriton binary of that Python build) plus the GPU's target, so kernels
compiled here with another Triton or Python would never be found there. tests/sm90.py's cache
(ELECTRA_FAST_SM90_CACHE) holds register and SASS analyses, not kernels a GPU process loads. On the GPU machine
itself the stages share Triton's and Inductor's caches on disk, so each kernel compiles once per machine.

On the GPU the stages run with TRITON_INTERPRET unset, PYTHONPATH including the checkout, and (unless already set)
TORCH_CUDA_ARCH_LIST set to the GPU's compute capability, so the extension is built for that GPU only and every
later process finds the same build.

`--smoke` runs the same stages on a CPU: tiny shapes, the torch backend, the env stage checking the CPU path's
resolution (the torch reference for every op) instead of the GPU's, the build stage saying why nothing is built,
pytest in one process (the `cuda` tests are collected and skipped), and a pretrain of 2000 tiny steps, more than a
CPU runs in that stage's smoke budget: a smoke run always shows a stage cut, with the metrics it logged before the
cut. CI runs it so, on a few stages (tests/test_validate_gpu.py).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import date, datetime
from typing import Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable
FIRST_BUDGET_S, REST_BUDGET_S = 420, 180
GRACE_S, SMOKE_GRACE_S = 12, 5  # SIGINT -> SIGKILL
MIN_START_S, SMOKE_MIN_START_S = 15, 2  # a stage with less time than this is skipped, not started
# The project's speed goals (benchmarks/RESULTS.md, Targets): what the figures are judged against.
TARGETS = {"small_vs_hf_eager": 6.0, "small_vs_hf_compiled": 2.5, "base_vs_hf_eager": 3.0, "base_mfu": 0.45,
           "mlm_frac_copy_bw": 0.80}
E2E_TIMING = ["--warmup", "3", "--iters", "10", "--repeats", "3"]
# The pretrain stage: 300 steps, evaluation and a checkpoint at 150 and 300, then a resumed run to 400.
PRETRAIN_STEPS, RESUME_STEPS, PRETRAIN_LOG = 300, 400, 50
SMOKE_PRETRAIN_STEPS, SMOKE_PRETRAIN_LOG = 2000, 2
PREPARE_ARGS = {False: ["--preset", "small"], True: ["--preset", "tiny", "--vocab-size", "1000"]}  # by smoke


@dataclass
class Ctx:
    out: str
    smoke: bool

    def dir(self, name: str) -> str:
        return os.path.join(self.out, name)


@dataclass(frozen=True)
class Stage:
    """One row of the plan. `commands(ctx, stage)` gives the argv lists the stage runs, one after the other, within
    its time; `kind` says how its results are read back and judged. `always`: `--rest` runs it even when the first
    call finished it (the build: a fresh machine has no cache)."""
    name: str
    kind: str  # env | build | e2e | ops | tests | pretrain
    budget_s: int  # on the GPU
    smoke_s: int  # with --smoke on a CPU
    commands: Callable[[Ctx, "Stage"], list]
    what: str
    always: bool = False


# ------------------------------------------------------------------------------------------------ command builders
def _body(ctx: Ctx, stage: Stage) -> list:
    """A stage whose work is Python in this file (`--stage-body`), still run as its own process."""
    return [[PY, os.path.abspath(__file__), "--stage-body", stage.name, "--out", ctx.dir(stage.name)]
            + (["--smoke"] if ctx.smoke else [])]


def _e2e(shapes: str, impls: str, modes: str):
    def commands(ctx: Ctx, stage: Stage) -> list:
        # --smoke picks its own single steps (tiny shapes, eager, torch backend)
        return [[PY, os.path.join(HERE, "bench_e2e.py"), "--out", ctx.dir(stage.name), "--shapes", shapes,
                 "--impls", impls, "--modes", modes] + (["--smoke"] if ctx.smoke else E2E_TIMING)]
    return commands


def _ops_all(ctx: Ctx, stage: Stage) -> list:
    return [[PY, os.path.join(HERE, "bench_ops.py"), "--out", ctx.dir(stage.name)]
            + (["--smoke"] if ctx.smoke else ["--shapes", "small,base"])]


def _pytest(ctx: Ctx, stage: Stage) -> list:
    d = ctx.dir(stage.name)
    plugin = ["-p", "validate_gpu", f"--validate-gpu-ran={os.path.join(d, 'ran.txt')}"]
    done = os.path.join(ctx.dir("tests"), "ran.txt")
    if stage.name != "tests" and os.path.exists(done):  # what the first call's pytest ran, passed or not
        shutil.copyfile(done, os.path.join(d, "skipped.txt"))
        plugin.append(f"--validate-gpu-skip={os.path.join(d, 'skipped.txt')}")
    # One process on a CPU: the smoke checks the selection and the junit, and xdist workers would each collect the
    # whole suite again on a CI machine's two cores. A file that fails to import is reported as an error and the
    # other files' tests still run: one broken file must not cost the whole stage.
    workers = "0" if ctx.smoke else "4"
    argv = [PY, "-m", "pytest", "-q", "-rfE", "--durations=10", "-p", "no:cacheprovider", *plugin,
            "-m", TEST_MARKERS[stage.name],
            "-n", workers, "--continue-on-collection-errors", f"--junitxml={os.path.join(d, 'junit.xml')}",
            os.path.join(ROOT, "tests")]
    return [(argv, {"PYTHONPATH": HERE})]  # this file, as the plugin `validate_gpu`, for pytest and its workers


# What each tests stage selects, by marker (never by file): the GPU tests, then the Triton kernels' own suites, which
# run in the interpreter on a CPU and compiled on a GPU.
TEST_MARKERS = {"tests": "cuda", "tests_rest": "cuda", "tests_triton": "triton and not cuda"}


def prebuilt_data(out: str, smoke: bool) -> str:
    return os.path.join(out, "prebuilt", "pretrain-data-" + PREPARE_ARGS[smoke][1])


def _prepare_argv(data: str, smoke: bool) -> list:
    return [PY, "-m", "electra_fast", "prepare", "-o", data, *PREPARE_ARGS[smoke], "--no-progress"]


def _pretrain(ctx: Ctx, stage: Stage) -> list:
    d = ctx.dir(stage.name)
    run = os.path.join(d, "run")
    data = prebuilt_data(ctx.out, ctx.smoke)
    commands = []
    if not os.path.exists(os.path.join(data, "index.json")):
        data = os.path.join(d, "data")
        commands.append(_prepare_argv(data, ctx.smoke))
    cli = [PY, "-m", "electra_fast", "pretrain"]
    if ctx.smoke:
        commands.append(cli + ["--preset", "tiny", "--data", data, "-o", run, "--device", "cpu",
                               "--steps", str(SMOKE_PRETRAIN_STEPS), "--log-interval", str(SMOKE_PRETRAIN_LOG),
                               "--eval-interval", "100", "--save-interval", "100", "--no-progress"])
        return commands
    half = str(PRETRAIN_STEPS // 2)
    commands.append(cli + ["--preset", "small", "--data", data, "-o", run, "--steps", str(PRETRAIN_STEPS),
                           "--bf16", "--compile", "--cuda-graph", "--log-interval", str(PRETRAIN_LOG),
                           "--eval-interval", half, "--save-interval", half, "--no-progress"])
    commands.append(cli + ["--resume", "-o", run, "--steps", str(RESUME_STEPS), "--no-progress"])
    return commands


STAGES = {s.name: s for s in (
    Stage("env", "env", 15, 30, _body, "versions, GPU, and the backend of each op's default path"),
    Stage("build", "build", 55, 30, _body, "CUDA C++ extension built once (stale JIT lock removed first)",
          always=True),
    Stage("e2e_small", "e2e", 60, 60, _e2e("small", "ours,transformers", "graph,eager"),
          "end to end, small: ours graph + eager, transformers eager"),
    Stage("e2e_base", "e2e", 60, 60, _e2e("base", "ours,transformers", "graph,eager"),
          "end to end, base: ours graph + eager, transformers eager"),
    Stage("ops_mlm", "ops", 30, 45, _body, "fused MLM loss + sample: GB/s vs copy bandwidth (Triton, torch)"),
    Stage("hf_compiled_small", "e2e", 80, 60, _e2e("small", "transformers", "compiled"),
          "end to end, small: transformers compiled"),
    Stage("tests", "tests", 90, 90, _pytest, "GPU tests: pytest -m cuda, 4 workers"),
    Stage("hf_compiled_base", "e2e", 30, 60, _e2e("base", "transformers", "compiled"),
          "end to end, base: transformers compiled"),
    Stage("tests_rest", "tests", 30, 90, _pytest, "the -m cuda tests the first call did not reach"),
    Stage("tests_triton", "tests", 30, 30, _pytest,
          "the Triton kernels' own suites, compiled: -m 'triton and not cuda'"),
    Stage("pretrain", "pretrain", 40, 20, _pretrain,
          "electra-fast prepare, pretrain (small: 300 steps, compile, CUDA graph, eval, checkpoints), --resume"),
    Stage("dropin", "e2e", 10, 60, _e2e("small,base", "hf-dropin", "eager"), "end to end: hf-dropin eager"),
    Stage("ours_compiled", "e2e", 15, 60, _e2e("small,base", "ours", "compiled,compiled+graph"),
          "end to end: ours compiled and compiled+graph"),
    Stage("ops_all", "ops", 0, 60, _ops_all, "op matrix: bench_ops.py, every op and backend"),
)}
FIRST = ("env", "build", "e2e_small", "e2e_base", "ops_mlm", "hf_compiled_small", "tests", "hf_compiled_base")
REST = ("build", "tests_rest", "tests_triton", "pretrain", "dropin", "ours_compiled", "ops_all")
ORDER = FIRST + tuple(s for s in REST if s not in FIRST)  # every stage, in run order


def plan(rest: bool, parts, smoke: bool, budget_s: Optional[float]) -> list:
    """[(Stage, planned seconds)] in run order: each stage's own budget while the total allows, the last one taking
    whatever `budget_s` leaves (so the planned seconds sum to exactly `budget_s`)."""
    if parts:
        names = [n for n in ORDER if n in parts]
        nominal = [(STAGES[n], STAGES[n].smoke_s if smoke else STAGES[n].budget_s) for n in names]
    else:
        names = REST if rest else ORDER
        extra = () if rest else ORDER[len(FIRST):]  # the rest's stages: only on seconds left unused
        nominal = [(STAGES[n], 0 if n in extra else STAGES[n].smoke_s if smoke else STAGES[n].budget_s)
                   for n in names]
    if budget_s is None:
        budget_s = (sum(b for _, b in nominal) if smoke or not nominal else
                    REST_BUDGET_S if rest else FIRST_BUDGET_S)
    planned, left = [], int(round(budget_s))
    for stage, b in nominal:
        planned.append([stage, min(b, left)])
        left -= planned[-1][1]
    if planned:
        planned[-1][1] += left
    return [(s, b) for s, b in planned]


# ------------------------------------------------------------------------------------------------ running
def child_env(smoke: bool) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the real Triton compiler on the GPU; the smoke never asks for Triton
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    if not smoke and not env.get("TORCH_CUDA_ARCH_LIST"):
        cap = _nvidia_smi("compute_cap")
        if cap:
            env["TORCH_CUDA_ARCH_LIST"] = cap.splitlines()[0].strip()
    return env


def _nvidia_smi(field: str) -> Optional[str]:
    try:
        return subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def _signal_group(pid: int, sig) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_commands(commands: list, limit_s: float, grace_s: float, log_path: str, env: dict, cwd: str = ROOT) -> dict:
    """Run `commands` (argv lists, or (argv, {VAR: path to put first on that path-like variable})) one after the
    other within `limit_s` seconds in all, each in its own process group, output to `log_path`. Returns {"rc",
    "seconds", "cut_at" (None unless the time ran out), "killed", "interrupted"}."""
    t0 = time.monotonic()
    res = {"rc": 0, "cut_at": None, "killed": False, "interrupted": False}
    with open(log_path, "a") as log:
        for cmd in commands:
            cmd_env = env
            if isinstance(cmd, tuple):
                cmd, extra = cmd
                cmd_env = dict(env)
                for k, v in extra.items():
                    cmd_env[k] = os.pathsep.join([v] + ([env[k]] if env.get(k) else []))
            left = limit_s - (time.monotonic() - t0)
            if left <= 0:
                res["cut_at"] = time.monotonic() - t0
                break
            log.write("+ " + shlex.join(cmd) + "\n")
            log.flush()
            proc = subprocess.Popen(cmd, cwd=cwd, env=cmd_env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                try:
                    res["rc"] = proc.wait(timeout=left)
                except subprocess.TimeoutExpired:
                    res["cut_at"] = time.monotonic() - t0
                except KeyboardInterrupt:  # this driver was interrupted: stop the stage the same gentle way
                    res["interrupted"] = True
                    res["cut_at"] = time.monotonic() - t0
                if res["cut_at"] is not None:
                    # SIGINT to the whole group, as Ctrl-C in a terminal: pytest and its xdist workers write the
                    # junit, a benchmark stops between rows it already wrote, ninja keeps the objects it finished.
                    _signal_group(proc.pid, signal.SIGINT)
                    try:
                        res["rc"] = proc.wait(timeout=grace_s)
                    except subprocess.TimeoutExpired:
                        _signal_group(proc.pid, signal.SIGKILL)
                        res["rc"] = proc.wait()
                        res["killed"] = True
            finally:
                _signal_group(proc.pid, signal.SIGKILL)  # whatever the stage left behind in its group
            if res["cut_at"] is not None or res["rc"] != 0:
                break
    res["seconds"] = time.monotonic() - t0
    return res


def run_plan(planned: list, ctx: Ctx, budget_s: float, grace_s: float, min_start_s: float, env: dict,
             on_stage: Callable[[Stage, dict], None] = lambda s, r: None, skip: Callable[[Stage], Optional[str]]
             = lambda s: None, carry: bool = True) -> dict:
    """Run the planned stages in order. A stage's time is its planned seconds plus (`carry`) what the stages before
    it left unused, never past `budget_s` from the start (its grace period included). Returns {name: record}."""
    os.makedirs(os.path.join(ctx.out, "logs"), exist_ok=True)
    t0, promised, records, interrupted = time.monotonic(), 0.0, {}, False
    for stage, budget in planned:
        promised += budget
        why = "the driver was interrupted" if interrupted else skip(stage)
        now = time.monotonic() - t0
        limit = min(promised - now if carry else budget, budget_s - now - grace_s)
        rec = {"budget_s": budget, "date": date.today().isoformat()}
        if why is None and limit < min_start_s:
            why = f"{max(0, limit):.0f} s left"
        if why is not None:
            rec.update(status="skipped", label=f"skipped: {why}", seconds=0, limit_s=0)
        else:
            print(f"[{stage.name}] {stage.what} (up to {limit:.0f} s; log {ctx.out}/logs/{stage.name}.log)",
                  flush=True)
            shutil.rmtree(ctx.dir(stage.name), ignore_errors=True)  # no rows of an older run mixed in
            os.makedirs(ctx.dir(stage.name), exist_ok=True)
            log_path = os.path.join(ctx.out, "logs", f"{stage.name}.log")
            open(log_path, "w").close()
            try:
                commands = stage.commands(ctx, stage)
                res = run_commands(commands, limit, grace_s, log_path, env)
            except Exception as exc:  # a stage that cannot even start is a failed stage, and the plan goes on
                res = {"rc": None, "cut_at": None, "seconds": 0.0, "killed": False, "interrupted": False,
                       "error": f"{type(exc).__name__}: {exc}"}
            rec.update(limit_s=round(limit), seconds=round(res["seconds"], 1), rc=res["rc"])
            if res["cut_at"] is not None:
                rec.update(status="cut", label=f"cut at {res['cut_at']:.0f} s"
                           + (" (driver interrupted)" if res["interrupted"] else "")
                           + (f" (killed {grace_s:.0f} s after SIGINT)" if res["killed"] else ""))
            elif "error" in res:
                rec.update(status="failed", label=f"failed: {res['error']}")
            else:
                ok, why_not = judge_stage(stage, ctx, res["rc"])
                rec.update(status="ok" if ok else "failed", label="ok" if ok else f"failed: {why_not}")
            rec["note"] = stage_note(stage, ctx)
            _print_tail(log_path)
            interrupted = rec["interrupted"] = res["interrupted"]
        records[stage.name] = rec
        print(f"[{stage.name}] {rec['label']}" + (f" ({rec['note']})" if rec.get("note") else "")
              + (f" in {rec['seconds']} s" if rec["seconds"] else ""), flush=True)
        on_stage(stage, rec)
    return records


def _print_tail(path: str, n: int = 6) -> None:
    try:
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()[-n:]
    except OSError:
        return
    for line in lines:
        print("    " + line[:200])


# ------------------------------------------------------------------------------------------------ judging a stage
def judge_stage(stage: Stage, ctx: Ctx, rc) -> tuple:
    """(ok, why not) of a stage that ended by itself."""
    d = ctx.dir(stage.name)
    if stage.kind == "tests":
        skipped = os.path.exists(os.path.join(d, "skipped.txt"))
        if rc == 5:  # nothing selected
            return (True, "") if skipped else (False, f"no test selected by -m {TEST_MARKERS[stage.name]!r}")
        if rc == 1:
            t = read_junit(os.path.join(d, "junit.xml"))
            return False, f"{t['failed']} failed, {t['errors']} errors"
        return (rc == 0), f"pytest exit {rc}"
    if rc != 0:
        return False, f"exit {rc}"
    if stage.kind == "e2e":
        rows = read_e2e(d).get("rows", [])
        bad = [r for r in rows if "error" in r]
        if not rows:
            return False, "no rows"
        if bad:
            return False, f"{len(bad)} of {len(rows)} rows failed: " + "; ".join(
                f"{r['shape']} {r['impl']} {r['mode']}: {str(r['error'])[:120]}" for r in bad[:3])
    if stage.kind == "ops" and not read_ops(d)["rows"]:
        return False, "no rows"
    if stage.kind == "pretrain" and not read_pretrain(d).get("train_records"):
        return False, "no training metrics"
    return True, ""


def stage_note(stage: Stage, ctx: Ctx) -> str:
    """What a stage left under --out: for a cut stage, its partial results."""
    d = ctx.dir(stage.name)
    if stage.kind == "env":
        problems = (_load(os.path.join(d, "env.json")) or {}).get("problems") or []
        return "; ".join(problems)[:300]
    if stage.kind == "build":
        b = _load(os.path.join(d, "build.json")) or {}
        return (f"built or loaded in {b.get('seconds')} s" if b.get("built") else
                f"not built: {str(b.get('reason'))[:150]}" if b else "")
    if stage.kind == "e2e":
        rows = read_e2e(d).get("rows", [])
        return f"{len(rows)} rows" if rows or os.path.exists(os.path.join(d, "e2e.json")) else ""
    if stage.kind == "ops":
        rows = read_ops(d)["rows"]
        return f"{len(rows)} rows" if rows else ""
    if stage.kind == "tests":
        t = read_junit(os.path.join(d, "junit.xml"))
        return (f"{t['passed']} passed, {t['failed']} failed, {t['errors']} errors, {t['skipped']} skipped"
                if t["present"] else "no junit")
    if stage.kind == "pretrain":
        p = read_pretrain(d)
        return (f"{p['last_step']} steps, {len(p['train_records'])} metric records"
                if p.get("train_records") else "")
    return ""


# ------------------------------------------------------------------------------------------------ stage bodies
def body_env(out: str, smoke: bool) -> int:
    """Versions, the device, and each op's default backend; exit 1 when a default is not the intended one."""
    import platform

    import torch

    from electra_fast.ops import _backend

    info = {"date": date.today().isoformat(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "smoke": smoke,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "capability": ".".join(map(str, torch.cuda.get_device_capability())) if torch.cuda.is_available()
            else None, "driver": _nvidia_smi("driver_version"),
            "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST"),
            "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET")}
    for name in ("triton", "transformers", "electra_fast"):
        try:
            info[name] = __import__(name).__version__
        except (ImportError, AttributeError):
            info[name] = None
    try:
        from electra_fast.csrc import _extension as ef_cuda

        info["cuda_backend"] = ef_cuda.unavailable_reason() or "available"
    except ImportError as exc:
        info["cuda_backend"] = f"not importable: {exc}"
    info["device"] = info["gpu"] or f"CPU ({platform.processor() or platform.machine()}), smoke run"
    problems = []
    if not smoke and not torch.cuda.is_available():
        problems.append("no CUDA GPU visible (torch.cuda.is_available() is False)")
    # On a CPU (the smoke) the default path is the torch reference by design; on the GPU it must be the op's first
    # choice, since the default order would otherwise fall back without a word.
    device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    table = {}
    for op, order in _backend.DEFAULT_ORDER.items():
        want = "torch" if device.type == "cpu" else order[0]
        try:
            got = _backend.resolve(op, None, device, torch.bfloat16)[0]
        except Exception as exc:  # resolution itself failing is the same failure, with its reason
            got = f"error: {type(exc).__name__}: {exc}"
        row = {"default": got, "intended": want, "available": _backend.available_backends(device, op)}
        if got != want:
            row["why_not_intended"] = _backend._why_unavailable(want, op, device)
            problems.append(f"{op}: default path takes {got!r}, not {want!r} ({row['why_not_intended']})")
        table[op] = row
    info["default_backends"] = {"device": str(device), "ops": table}
    info["problems"] = problems
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "env.json"), "w") as f:
        json.dump(info, f, indent=2)
    print(json.dumps({k: v for k, v in info.items() if k != "default_backends"}, indent=1))
    for op, row in table.items():
        print(f"{op:26s} default {row['default']:8s} intended {row['intended']:8s} available {row['available']}")
    for p in problems:
        print(f"FAILED: {p}", file=sys.stderr)
    return 1 if problems else 0


def body_build(out: str, smoke: bool) -> int:
    """Remove a stale JIT lock, then build (or load) the CUDA extension; without a GPU (the smoke) say why not."""
    from electra_fast.csrc import _extension as ef_cuda

    rec = {"stale_lock_removed": ef_cuda.clear_stale_build_lock(),
           "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST")}
    reason = ef_cuda.unavailable_reason()
    rc = 0
    if reason:
        rec.update(built=False, reason=reason)
        rc = 0 if smoke else 1  # on the GPU machine the CUDA C++ tests and the op matrix would then lack it
    else:
        t0 = time.perf_counter()
        try:
            module = ef_cuda.extension()
            rec.update(built=True, seconds=round(time.perf_counter() - t0, 1),
                       module=getattr(module, "__file__", None))
        except RuntimeError as exc:
            rec.update(built=False, reason=str(exc)[:2000])
            rc = 1
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "build.json"), "w") as f:
        json.dump(rec, f, indent=2)
    print(json.dumps(rec, indent=1))
    return rc


def body_ops_mlm(out: str, smoke: bool) -> int:
    """bench_ops.py for the fused MLM loss + sample only, Triton and the torch reference only (the other
    implementations belong to the op matrix of --rest)."""
    sys.path.insert(0, HERE)
    import bench_ops

    keep = ("torch",) if smoke else ("triton", "torch")
    every = bench_ops.implementations
    bench_ops.implementations = lambda *a, **k: [i for i in every(*a, **k) if i in keep]
    shapes = ["tiny"] if smoke else ["small", "base"]
    bench_ops.main(["--ops", "mlm_loss_and_sample", "--out", out] + (["--smoke"] if smoke else
                                                                      ["--shapes", ",".join(shapes)]))
    rows = read_ops(out)["rows"]
    missing = [(s, p, i) for s in shapes for p in ("fwd", "fwd+bwd") for i in keep
               if not any((r["shape"], r["pass"], r["impl"]) == (s, p, i) for r in rows)]
    for m in missing:
        print(f"FAILED: no row for {m}", file=sys.stderr)
    return 1 if missing else 0


BODIES = {"env": body_env, "build": body_build, "ops_mlm": body_ops_mlm}


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
    return {"env": _load(env_path) or {}, "rows": rows}


def read_e2e(d: str) -> dict:
    return _load(os.path.join(d, "e2e.json")) or {}


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


def _load(path: str):
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


def collect(out: str) -> dict:
    old = _load(os.path.join(out, "results.json")) or {}
    res = {"plan": old.get("plan", {}), "stages": old.get("stages", {}),
           "env": _load(os.path.join(out, "env", "env.json")) or {},
           "build": _load(os.path.join(out, "build", "build.json")) or {},
           "tests": {}, "ops": {}, "e2e": {}, "pretrain": None}
    for name in ORDER:
        d, kind = os.path.join(out, name), STAGES[name].kind
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
def markdown(res: dict) -> str:
    e = res["env"]
    lines = [f"## GPU validation: {e.get('device', 'device not recorded (env stage not run)')}, "
             f"{e.get('date', date.today().isoformat())}", "",
             f"torch {e.get('torch')}, CUDA {e.get('cuda')}, Triton {e.get('triton')}, transformers "
             f"{e.get('transformers')}, driver {e.get('driver')}, Python {e.get('python')}, electra-fast "
             f"{e.get('electra_fast')}. Produced by `benchmarks/validate_gpu.py`.", "",
             "### Stages", "", "| stage | status | seconds | budget s | what |", "|---|---|---|---|---|"]
    for name in ORDER:
        rec = res["stages"].get(name)
        status = (rec["label"] + (f" ({rec['note']})" if rec.get("note") else "") if rec
                  else "skipped: not run by any call yet")
        lines.append(f"| {name} | {status} | {rec.get('seconds', '') if rec else ''} | "
                     f"{rec.get('budget_s', '') if rec else ''} | {STAGES[name].what} |")
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


def write(out: str, stages: Optional[dict] = None, plan_info: Optional[dict] = None) -> dict:
    """results.json, validation.md and e2e.png from everything under `out`, with these stage records merged in."""
    res = collect(out)
    res["stages"].update(stages or {})
    if plan_info is not None:
        res["plan"] = plan_info
    res = _finite(res)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(res, f, indent=2)
    with open(os.path.join(out, "validation.md"), "w") as f:
        f.write(markdown(res))
    plot(res, os.path.join(out, "e2e.png"))
    return res


# ------------------------------------------------------------------------------------------------ pytest plugin
# Loaded into the tests stages' pytest (`-p validate_gpu`, this folder on PYTHONPATH); inert without its options.
_pytest_config = None


def pytest_addoption(parser):
    group = parser.getgroup("validate_gpu")
    group.addoption("--validate-gpu-skip", default=None, help="file of node ids to leave out (already run)")
    group.addoption("--validate-gpu-ran", default=None, help="file to append the node id of every test run to")


def pytest_configure(config):
    global _pytest_config
    _pytest_config = config


def pytest_collection_modifyitems(config, items):
    path = config.getoption("validate_gpu_skip", None)
    if not path or not os.path.exists(path):
        return
    with open(path) as f:
        done = {line.strip() for line in f if line.strip()}
    keep = [item for item in items if item.nodeid not in done]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if item.nodeid in done])
        items[:] = keep


def pytest_runtest_logreport(report):
    config = _pytest_config
    path = config.getoption("validate_gpu_ran", None) if config is not None else None
    # The xdist controller records what its workers report; the workers themselves do not write.
    if not path or hasattr(config, "workerinput"):
        return
    if report.when == "call" or (report.when == "setup" and not report.passed):
        with open(path, "a") as f:  # a line per test as it ends: a killed session keeps what it ran
            f.write(report.nodeid + "\n")


# ------------------------------------------------------------------------------------------------ main
def _terminate(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/gpu", help="folder for every result (merged across calls)")
    p.add_argument("--rest", action="store_true", help="the second call: what the first plan leaves (180 s)")
    p.add_argument("--part", action="append", default=[],
                   help=f"run only these stages, in plan order (repeatable or comma separated): {', '.join(ORDER)}")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"seconds for the whole call (default {FIRST_BUDGET_S}, {REST_BUDGET_S} with --rest, the "
                        "sum of the stages' smoke budgets with --smoke)")
    p.add_argument("--grace-s", type=float, default=None,
                   help=f"seconds between SIGINT and SIGKILL of a stage past its time (default {GRACE_S}, "
                        f"{SMOKE_GRACE_S} with --smoke)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (`stage NAME budget_s N`), run nothing")
    p.add_argument("--smoke", action="store_true", help="on a CPU: the same stages, tiny shapes, torch backend")
    p.add_argument("--prebuild", action="store_true",
                   help="before the GPU: prepare the pretrain stage's dataset here, into <out>/prebuilt/")
    p.add_argument("--stage-body", choices=sorted(BODIES), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out = os.path.abspath(args.out)
    if args.stage_body:  # inside a stage's own process
        return BODIES[args.stage_body](out, args.smoke)
    parts = {n.strip() for arg in args.part for n in arg.split(",") if n.strip()}
    unknown = parts - set(ORDER)
    if unknown:
        p.error(f"unknown stage(s) {sorted(unknown)}; stages: {', '.join(ORDER)}")
    planned = plan(args.rest, parts, args.smoke, args.budget_s)
    budget_s = sum(b for _, b in planned)
    if args.dry_run:
        for stage, b in planned:
            print(f"stage {stage.name} budget_s {b}")
        return 0
    if args.prebuild:
        data = prebuilt_data(out, args.smoke)
        shutil.rmtree(data, ignore_errors=True)
        print(f"preparing the pretrain stage's dataset in {data}", flush=True)
        return subprocess.run(_prepare_argv(data, args.smoke), cwd=ROOT, env=child_env(smoke=True)).returncode
    if not args.smoke and _nvidia_smi("name") is None:
        sys.exit("validate_gpu.py needs a CUDA GPU (nvidia-smi finds none); --smoke checks it on a CPU.")
    os.makedirs(out, exist_ok=True)
    old = _load(os.path.join(out, "results.json")) or {}
    call = "part" if parts else "rest" if args.rest else "first"
    if call == "first":
        plan_info = {"run_id": datetime.now().isoformat(timespec="seconds"), "smoke": args.smoke}
    else:
        plan_info = old.get("plan") or {"run_id": None, "smoke": args.smoke}
    stages_done = old.get("stages", {})

    def skip(stage: Stage) -> Optional[str]:
        rec = stages_done.get(stage.name, {})
        if (call == "rest" and not stage.always and rec.get("status") == "ok"
                and rec.get("run_id") == plan_info.get("run_id")):
            return "finished by the first call"
        return None

    ctx = Ctx(out, args.smoke)
    env = child_env(args.smoke)
    signal.signal(signal.SIGTERM, _terminate)  # a supervisor's SIGTERM ends the running stage as gently as Ctrl-C
    grace = args.grace_s if args.grace_s is not None else SMOKE_GRACE_S if args.smoke else GRACE_S
    print(f"validate_gpu: {call} call, {len(planned)} stages in {budget_s} s, results in {out}", flush=True)

    def on_stage(stage: Stage, rec: dict) -> None:
        rec.update(call=call, run_id=plan_info.get("run_id"))
        write(out, {stage.name: rec}, plan_info)  # after every stage: a later kill keeps what is done

    write(out, {}, plan_info)
    records = {}
    try:
        # The smoke gives each stage its own budget only: seconds the quick CPU stages leave unused would
        # otherwise all go to its open-ended pretrain.
        records = run_plan(planned, ctx, budget_s, grace, SMOKE_MIN_START_S if args.smoke else MIN_START_S, env,
                           on_stage, skip, carry=not args.smoke)
    except KeyboardInterrupt:
        print("validate_gpu: interrupted; results so far are in", out, flush=True)
    write(out, {}, plan_info)
    print(open(os.path.join(out, "validation.md")).read())
    # A cut or skipped stage is the plan working as meant; a failed one, or an interrupted driver, is not.
    if not records or any(r.get("interrupted") for r in records.values()):
        return 130
    return 0 if all(r["status"] != "failed" for r in records.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
