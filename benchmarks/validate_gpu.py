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
cut. CI runs it so, on a few stages (tests/bench/test_validate_gpu.py).
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import date, datetime
from typing import Callable, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # its modules, also when loaded by file path

from gpu_processes import child_env, nvidia_smi, print_tail, run_commands  # noqa: E402
from gpu_results import load_json, read_e2e, read_junit, read_ops, read_pretrain, write  # noqa: E402
from gpu_stage import (FIRST_BUDGET_S, GRACE_S, HERE, MIN_START_S, PY, REST_BUDGET_S, ROOT, SMOKE_GRACE_S,  # noqa: E402
                       SMOKE_MIN_START_S, Ctx, Stage, body_commands, e2e_commands, ops_all_commands, pretrain_commands,
                       prebuilt_data, prepare_argv)
from gpu_stage_bodies import BODIES  # noqa: E402
# The tests reach these through this module
from gpu_stage import PRETRAIN_STEPS, SMOKE_PRETRAIN_LOG, SMOKE_PRETRAIN_STEPS  # noqa: E402,F401
from gpu_stage_bodies import body_build, body_env  # noqa: E402,F401
# `-p validate_gpu`: the tests stages' pytest loads this module as its plugin, these hooks with it
from gpu_tests_plugin import (pytest_addoption, pytest_collection_modifyitems, pytest_configure,  # noqa: E402,F401
                              pytest_runtest_logreport)


# ------------------------------------------------------------------------------------------------ the plan
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


STAGES = {s.name: s for s in (
    Stage("env", "env", 15, 30, body_commands, "versions, GPU, and the backend of each op's default path"),
    Stage("build", "build", 55, 30, body_commands, "CUDA C++ extension built once (stale JIT lock removed first)",
          always=True),
    Stage("e2e_small", "e2e", 60, 60, e2e_commands("small", "ours,transformers", "graph,eager"),
          "end to end, small: ours graph + eager, transformers eager"),
    Stage("e2e_base", "e2e", 60, 60, e2e_commands("base", "ours,transformers", "graph,eager"),
          "end to end, base: ours graph + eager, transformers eager"),
    Stage("ops_mlm", "ops", 30, 45, body_commands, "fused MLM loss + sample: GB/s vs copy bandwidth (Triton, torch)"),
    Stage("hf_compiled_small", "e2e", 80, 60, e2e_commands("small", "transformers", "compiled"),
          "end to end, small: transformers compiled"),
    Stage("tests", "tests", 90, 90, _pytest, "GPU tests: pytest -m cuda, 4 workers"),
    Stage("hf_compiled_base", "e2e", 30, 60, e2e_commands("base", "transformers", "compiled"),
          "end to end, base: transformers compiled"),
    Stage("tests_rest", "tests", 30, 90, _pytest, "the -m cuda tests the first call did not reach"),
    Stage("tests_triton", "tests", 30, 30, _pytest,
          "the Triton kernels' own suites, compiled: -m 'triton and not cuda'"),
    Stage("pretrain", "pretrain", 40, 20, pretrain_commands,
          "electra-fast prepare, pretrain (small: 300 steps, compile, CUDA graph, eval, checkpoints), --resume"),
    Stage("dropin", "e2e", 10, 60, e2e_commands("small,base", "hf-dropin", "eager"), "end to end: hf-dropin eager"),
    Stage("ours_compiled", "e2e", 15, 60, e2e_commands("small,base", "ours", "compiled,compiled+graph"),
          "end to end: ours compiled and compiled+graph"),
    Stage("ops_all", "ops", 0, 60, ops_all_commands, "op matrix: bench_ops.py, every op and backend"),
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
            print_tail(log_path)
            interrupted = rec["interrupted"] = res["interrupted"]
        records[stage.name] = rec
        print(f"[{stage.name}] {rec['label']}" + (f" ({rec['note']})" if rec.get("note") else "")
              + (f" in {rec['seconds']} s" if rec["seconds"] else ""), flush=True)
        on_stage(stage, rec)
    return records


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
        problems = (load_json(os.path.join(d, "env.json")) or {}).get("problems") or []
        return "; ".join(problems)[:300]
    if stage.kind == "build":
        b = load_json(os.path.join(d, "build.json")) or {}
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
        return subprocess.run(prepare_argv(data, args.smoke), cwd=ROOT, env=child_env(smoke=True)).returncode
    if not args.smoke and nvidia_smi("name") is None:
        sys.exit("validate_gpu.py needs a CUDA GPU (nvidia-smi finds none); --smoke checks it on a CPU.")
    os.makedirs(out, exist_ok=True)
    old = load_json(os.path.join(out, "results.json")) or {}
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
    all_stages = [STAGES[n] for n in ORDER]  # the report lists every stage, run or not
    env = child_env(args.smoke)
    signal.signal(signal.SIGTERM, _terminate)  # a supervisor's SIGTERM ends the running stage as gently as Ctrl-C
    grace = args.grace_s if args.grace_s is not None else SMOKE_GRACE_S if args.smoke else GRACE_S
    print(f"validate_gpu: {call} call, {len(planned)} stages in {budget_s} s, results in {out}", flush=True)

    def on_stage(stage: Stage, rec: dict) -> None:
        rec.update(call=call, run_id=plan_info.get("run_id"))
        write(out, all_stages, {stage.name: rec}, plan_info)  # after every stage: a later kill keeps what is done

    write(out, all_stages, {}, plan_info)
    records = {}
    try:
        # The smoke gives each stage its own budget only: seconds the quick CPU stages leave unused would
        # otherwise all go to its open-ended pretrain.
        records = run_plan(planned, ctx, budget_s, grace, SMOKE_MIN_START_S if args.smoke else MIN_START_S, env,
                           on_stage, skip, carry=not args.smoke)
    except KeyboardInterrupt:
        print("validate_gpu: interrupted; results so far are in", out, flush=True)
    write(out, all_stages, {}, plan_info)
    print(open(os.path.join(out, "validation.md")).read())
    # A cut or skipped stage is the plan working as meant; a failed one, or an interrupted driver, is not.
    if not records or any(r.get("interrupted") for r in records.values()):
        return 130
    return 0 if all(r["status"] != "failed" for r in records.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
