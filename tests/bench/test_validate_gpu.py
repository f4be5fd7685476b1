"""benchmarks/validate_gpu.py, the plan a GPU machine runs first, checked on a CPU so that the GPU minutes are not
lost to a typo: the plan and its budgets, each stage's command line against the parser of the program it calls,
the scheduler's marking of every stage (ok, failed, cut with SIGINT and its partial results kept, killed after the
grace period, skipped), the stale JIT build lock, and a real smoke run of the stages on tiny shapes, one stage of
which its budget cuts."""
import argparse
import importlib.util
import json
import math
import os
import re
import runpy
import subprocess
import sys
import time

import pytest

from helpers import ROOT

SCRIPT = os.path.join(ROOT, "benchmarks", "validate_gpu.py")
STATUS = re.compile(r"^(ok|failed: .+|cut at \d+ s.*|skipped: .+)$")


@pytest.fixture(scope="module")
def vg():
    if "validate_gpu" not in sys.modules:  # the name the script's pytest plugin has too
        spec = importlib.util.spec_from_file_location("validate_gpu", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["validate_gpu"] = module  # before running it: its dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules["validate_gpu"]


def dry_run(vg, capsys, *args):
    assert vg.main(["--dry-run", *args]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(re.fullmatch(r"stage \S+ budget_s \d+", line) for line in lines), lines
    return [(line.split()[1], int(line.split()[3])) for line in lines]


def test_dry_run_plan_is_value_first_and_fits_its_budget(vg, capsys, tmp_path):
    out = tmp_path / "gpu"
    first = dry_run(vg, capsys, "--out", str(out))
    names = [n for n, _ in first]
    assert names[:8] == ["env", "build", "e2e_small", "e2e_base", "ops_mlm", "hf_compiled_small", "tests",
                         "hf_compiled_base"]
    assert sum(b for _, b in first) == 420 and all(b > 0 for _, b in first[:8])
    # the rest's stages follow, on seconds left unused only
    assert names[8:] == ["tests_rest", "tests_triton", "pretrain", "dropin", "ours_compiled", "ops_all"]
    assert all(b == 0 for _, b in first[8:])
    rest = dry_run(vg, capsys, "--out", str(out), "--rest")
    assert [n for n, _ in rest] == ["build", "tests_rest", "tests_triton", "pretrain", "dropin", "ours_compiled",
                                    "ops_all"]
    assert sum(b for _, b in rest) == 180
    # a shorter call keeps the order and the first stages' budgets; the tail gives way
    short = dry_run(vg, capsys, "--out", str(out), "--budget-s", "300")
    assert [n for n, _ in short] == names and sum(b for _, b in short) == 300
    assert short[:4] == first[:4]
    assert dry_run(vg, capsys, "--part", "ops_all,tests", "--budget-s", "100") == [("tests", 90), ("ops_all", 10)]
    smoke = dry_run(vg, capsys, "--smoke")
    assert [n for n, _ in smoke] == names and all(b > 0 for _, b in smoke[:8])
    assert not out.exists()  # ran nothing, wrote nothing


class _Parsed(Exception):
    pass


def _parse_script(monkeypatch, path, argv):
    """Parse `argv` with the parser of the script at `path`, stopping right after a successful parse."""
    real = argparse.ArgumentParser.parse_args

    def parse(self, args=None, namespace=None):
        raise _Parsed(real(self, args, namespace))

    had_common = "common" in sys.modules  # the benchmarks' shared module, imported by the script
    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", parse)
        m.setattr(sys, "argv", [path, *argv])
        m.setattr(sys, "path", [os.path.dirname(path), *sys.path])
        with pytest.raises(_Parsed) as parsed:
            runpy.run_path(path, run_name="__main__")
    if not had_common:
        sys.modules.pop("common", None)
    return parsed.value.args[0]


@pytest.mark.parametrize("smoke", [False, True], ids=["gpu", "smoke"])
def test_every_stage_command_parses_and_gpu_tests_are_chosen_by_marker(vg, monkeypatch, tmp_path, smoke):
    from electra_fast.cli import build_parser

    ctx = vg.Ctx(str(tmp_path), smoke)
    for name in vg.ORDER:
        stage = vg.STAGES[name]
        os.makedirs(ctx.dir(name), exist_ok=True)
        commands = stage.commands(ctx, stage)
        assert commands, name
        for cmd in commands:
            if isinstance(cmd, tuple):  # with an environment variable of its own
                cmd, extra = cmd
                assert extra == {"PYTHONPATH": os.path.join(ROOT, "benchmarks")}
            assert cmd[0] == sys.executable
            if cmd[1:3] == ["-m", "pytest"]:
                assert cmd[cmd.index("-p", 3) + 1] == "no:cacheprovider" and "validate_gpu" in cmd
                assert cmd[cmd.index("-m", 3) + 1] == vg.TEST_MARKERS[name]  # a marker, never a list of files
                paths = [a for a in cmd[3:] if os.path.isabs(a) and not a.startswith("-")]
                assert paths == [os.path.join(ROOT, "tests")]
                assert f"--junitxml={os.path.join(ctx.dir(name), 'junit.xml')}" in cmd
                assert cmd[cmd.index("-n") + 1] == ("0" if smoke else "4")
            elif cmd[1:3] == ["-m", "electra_fast"]:
                ns = build_parser().parse_args(cmd[3:])
                if ns.command == "pretrain" and not ns.resume:
                    assert ns.steps == (vg.SMOKE_PRETRAIN_STEPS if smoke else vg.PRETRAIN_STEPS)
                    assert ns.device == ("cpu" if smoke else None)
            elif cmd[1] == os.path.abspath(SCRIPT):
                assert cmd[cmd.index("--stage-body") + 1] in vg.BODIES
            else:
                ns = _parse_script(monkeypatch, cmd[1], cmd[2:])
                assert ns.out == ctx.dir(name) and getattr(ns, "smoke") is smoke
    pretrain = vg.STAGES["pretrain"].commands(ctx, vg.STAGES["pretrain"])
    if not smoke:
        assert [c[3] for c in pretrain] == ["prepare", "pretrain", "pretrain"]
        assert "--resume" in pretrain[-1]


def _fake(vg, name, code, budget):
    """A stage running `code` (Python) with `OUT` (its own folder) defined."""
    def commands(ctx, stage):
        return [[sys.executable, "-c", f"OUT = {ctx.dir(stage.name)!r}\n" + code]]
    return vg.Stage(name, "build", budget, budget, commands, name), budget


SLOW = """
import os, time
try:
    for i in range(1000):
        with open(os.path.join(OUT, "rows.txt"), "a") as f:
            f.write(f"row {i}\\n")
        time.sleep(0.1)
except KeyboardInterrupt:
    open(os.path.join(OUT, "interrupted"), "w").close()
    raise
"""
STUBBORN = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by its child: only SIGKILL of the group ends both
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
open(os.path.join(OUT, "child.pid"), "w").write(str(child.pid))
time.sleep(60)
"""


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_scheduler_marks_every_stage_and_keeps_what_a_cut_stage_wrote(vg, tmp_path):
    ctx = vg.Ctx(str(tmp_path), True)
    planned = [_fake(vg, "fine", "print('fine')", 1), _fake(vg, "broken", "raise SystemExit(3)", 1),
               _fake(vg, "slow", SLOW, 1), _fake(vg, "stubborn", STUBBORN, 2), _fake(vg, "late", "pass", 0)]
    seen = []
    t0 = time.monotonic()
    records = vg.run_plan(planned, ctx, budget_s=100, grace_s=1.0, min_start_s=0.3, env=vg.child_env(True),
                          on_stage=lambda s, r: seen.append(s.name))
    took = time.monotonic() - t0
    assert seen == ["fine", "broken", "slow", "stubborn", "late"]  # every stage reported, in order
    assert all(STATUS.match(r["label"]) for r in records.values()), records
    assert records["fine"]["status"] == "ok"
    assert records["broken"]["label"] == "failed: exit 3"
    # slow: its budget plus the seconds fine and broken left, about 3 s from the start; SIGINT, and it stopped
    # between rows, keeping them
    slow = records["slow"]
    assert slow["status"] == "cut" and re.fullmatch(r"cut at [23] s", slow["label"]), slow
    rows = open(os.path.join(ctx.dir("slow"), "rows.txt")).read().splitlines()
    assert len(rows) >= 10 and rows[-1].startswith("row ")
    assert os.path.exists(os.path.join(ctx.dir("slow"), "interrupted"))  # SIGINT, not SIGKILL
    # stubborn ignores SIGINT: killed with its whole process group after the grace period
    assert records["stubborn"]["status"] == "cut" and "killed" in records["stubborn"]["label"]
    child = int(open(os.path.join(ctx.dir("stubborn"), "child.pid")).read())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)
    # late: the grace period overran the planned seconds, so nothing is left for it
    assert records["late"]["status"] == "skipped" and records["late"]["label"].startswith("skipped: ")
    assert 5.5 < took < 15
    for name in seen:
        assert os.path.exists(os.path.join(ctx.out, "logs", f"{name}.log")) or name == "late"


def test_stale_build_lock_is_removed_only_when_no_build_is_alive(vg, tmp_path, monkeypatch, capsys):
    from torch.utils.file_baton import FileBaton

    from electra_fast.csrc import _extension as ef_cuda

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    build_dir = ef_cuda.jit_build_directory()  # where torch's `load` builds and locks
    assert build_dir == str(tmp_path / "ext" / "electra_fast_cuda")
    lock = os.path.join(build_dir, "lock")
    assert ef_cuda.clear_stale_build_lock() is None  # no lock: nothing to do
    open(lock, "w").close()  # what a build killed with SIGKILL leaves: every later build would wait forever
    assert not FileBaton(lock).try_acquire()
    holders = [  # a builder holding the lock open, and a ninja working in the build directory
        subprocess.Popen([sys.executable, "-c", f"import os, time; fd = os.open({lock!r}, os.O_RDONLY); "
                          "print('ready', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True),
        subprocess.Popen([sys.executable, "-c", "print('ready', flush=True); import time; time.sleep(60)"],
                         cwd=build_dir, stdout=subprocess.PIPE, text=True)]
    try:
        for h in holders:
            assert h.stdout.readline().strip() == "ready"
        for live in holders:
            assert ef_cuda.clear_stale_build_lock() is None and os.path.exists(lock)
            live.kill()
            live.wait()
    finally:
        for h in holders:
            h.kill()
            h.wait()
    assert ef_cuda.clear_stale_build_lock() == lock and not os.path.exists(lock)
    baton = FileBaton(lock)
    assert baton.try_acquire()  # the next build goes ahead
    baton.release()
    # the build stage removes it before it builds (here, without CUDA, it then says why nothing is built)
    import torch

    if not torch.cuda.is_available():
        open(lock, "w").close()
        assert vg.body_build(str(tmp_path / "build"), smoke=True) == 0
        rec = json.loads((tmp_path / "build" / "build.json").read_text())
        assert rec["stale_lock_removed"] == lock and not os.path.exists(lock)
        assert rec["built"] is False and rec["reason"] == ef_cuda.unavailable_reason() != ""
        assert vg.body_build(str(tmp_path / "gpu"), smoke=False) == 1  # the GPU plan needs the extension
        capsys.readouterr()


def test_env_stage_fails_when_the_default_path_is_not_the_intended_one(vg, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("ELECTRA_FAST_BACKEND", raising=False)
    assert vg.body_env(str(tmp_path / "ok"), smoke=True) == 0
    env = json.loads((tmp_path / "ok" / "env.json").read_text())
    assert env["problems"] == [] and env["default_backends"]["device"] == "cpu"
    from electra_fast.ops import _backend

    assert set(env["default_backends"]["ops"]) == set(_backend.DEFAULT_ORDER)
    monkeypatch.setenv("ELECTRA_FAST_BACKEND", "triton")  # every op asked to take a path it cannot take here
    assert vg.body_env(str(tmp_path / "forced"), smoke=True) == 1
    env = json.loads((tmp_path / "forced" / "env.json").read_text())
    assert {p.split(":")[0] for p in env["problems"]} >= {"mlm_loss_and_sample", "mask_tokens"}
    monkeypatch.delenv("ELECTRA_FAST_BACKEND")
    import torch

    if not torch.cuda.is_available():  # the GPU plan on a machine without one fails its first stage
        assert vg.body_env(str(tmp_path / "gpu"), smoke=False) == 1
    capsys.readouterr()


def _numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)
    elif isinstance(obj, float):
        yield obj


def smoke(out, *args):
    done = subprocess.run([sys.executable, SCRIPT, "--smoke", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def test_smoke_run_with_a_cut_stage_keeps_its_partial_results(vg, tmp_path):
    out = tmp_path / "gpu"
    # The first call: the stages that give the headline figures and the GPU tests, as subprocesses on tiny shapes.
    first = smoke(out, "--part", "env,e2e_small,ops_mlm,tests")
    for name in ("env", "e2e_small", "ops_mlm", "tests"):
        assert first["stages"][name]["status"] == "ok", first["stages"][name]
    assert first["env"]["default_backends"]["device"] == "cpu" and first["env"]["problems"] == []
    tests = first["tests"]["tests"]
    assert tests["present"] and tests["skipped"] > 0 and tests["failed"] == tests["errors"] == 0
    rows = first["e2e"]["e2e_small"]["rows"]
    assert {r["impl"] for r in rows} == {"ours", "transformers"}
    assert all("error" not in r and r["ms_per_step"] > 0 and math.isfinite(r["first_loss"]) for r in rows)
    ops = first["ops"]["ops_mlm"]["rows"]
    assert {(r["op"], r["impl"], r["pass"]) for r in ops} == {("mlm_loss_and_sample", "torch", "fwd"),
                                                             ("mlm_loss_and_sample", "torch", "fwd+bwd")}
    # The second call, with a budget its pretrain cannot finish in (its dataset prepared ahead, as before a GPU
    # starts): SIGINT, and the metrics it logged stay.
    prebuild = subprocess.run([sys.executable, SCRIPT, "--smoke", "--prebuild", "--out", str(out)],
                              capture_output=True, text=True, timeout=300)
    assert prebuild.returncode == 0, prebuild.stdout[-2000:] + prebuild.stderr[-2000:]
    res = smoke(out, "--rest", "--part", "pretrain", "--budget-s", "22")
    cut = res["stages"]["pretrain"]
    assert cut["status"] == "cut" and re.fullmatch(r"cut at 1[0-9] s", cut["label"]), cut
    log = (out / "logs" / "pretrain.log").read_text()
    assert " pretrain " in log and " prepare " not in log  # it started from the prebuilt dataset
    pre = res["pretrain"]
    assert pre["train_records"] and pre["last_step"] >= vg.SMOKE_PRETRAIN_LOG and pre["tokens_per_s"] > 0
    assert pre["last_step"] < vg.SMOKE_PRETRAIN_STEPS
    assert os.path.getsize(out / "pretrain" / "run" / "metrics.jsonl") > 0
    # merged: the first call's stages and figures are still there
    assert {n: res["stages"][n]["status"] for n in first["stages"]} == {n: "ok" for n in first["stages"]}
    assert res["e2e"] == first["e2e"] and res["ops"] == first["ops"]
    assert set(res["targets"]) == {"small_vs_hf_eager", "small_vs_hf_compiled", "base_vs_hf_eager", "base_mfu",
                                   "mlm_frac_copy_bw"}
    assert all(math.isfinite(x) for x in _numbers(res))
    md = (out / "validation.md").read_text()
    stages_table = md.split("### Stages", 1)[1].split("###", 1)[0]
    table = dict(re.findall(r"^\| (\w+) \| ([^|]+?) \|", stages_table, re.M)[1:])
    assert list(table) == list(vg.ORDER)  # every stage is there, never silently missing
    assert all(STATUS.match(re.sub(r" \(.*\)$", "", s)) for s in table.values()), table
    assert re.fullmatch(r"cut at 1[0-9] s \(\d+ steps, [1-9]\d* metric records\)", table["pretrain"])
    assert table["e2e_base"] == "skipped: not run by any call yet"
    for section in ("## GPU validation", "### Stages", "### Default backend", "### GPU tests",
                    "### Op microbenchmarks", "### End to end", "### Pretraining", "### Targets"):
        assert section in md
