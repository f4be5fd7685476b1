"""A stage of benchmarks/validate_gpu.py's plan: what a stage is (`Stage`, and `Ctx`, where and how a call runs),
the plan's fixed figures, and the command lines of the stages that run a benchmark script or the command line
(validate_gpu.py holds the plan itself, `STAGES`, and the tests stages' pytest command)."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable
FIRST_BUDGET_S, REST_BUDGET_S = 420, 180
GRACE_S, SMOKE_GRACE_S = 12, 5  # SIGINT -> SIGKILL
MIN_START_S, SMOKE_MIN_START_S = 15, 2  # a stage with less time than this is skipped, not started
E2E_TIMING = ["--warmup", "3", "--iters", "10", "--repeats", "3"]
# The pretrain stage: 300 steps, evaluation and a checkpoint at 150 and 300, then a resumed run to 400.
PRETRAIN_STEPS, RESUME_STEPS, PRETRAIN_LOG = 300, 400, 50
SMOKE_PRETRAIN_STEPS, SMOKE_PRETRAIN_LOG = 2000, 2
PREPARE_ARGS = {False: ["--preset", "small"], True: ["--preset", "tiny", "--vocab-size", "1000"]}  # by smoke


@dataclass
class Ctx:
    """Where a call writes (`out`, a folder per stage under it) and whether it is the smoke run on a CPU."""
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
def body_commands(ctx: Ctx, stage: Stage) -> list:
    """A stage whose work is Python in validate_gpu.py (`--stage-body`), still run as its own process."""
    return [[PY, os.path.join(HERE, "validate_gpu.py"), "--stage-body", stage.name, "--out", ctx.dir(stage.name)]
            + (["--smoke"] if ctx.smoke else [])]


def e2e_commands(shapes: str, impls: str, modes: str):
    def commands(ctx: Ctx, stage: Stage) -> list:
        # --smoke picks its own single steps (tiny shapes, eager, torch backend)
        return [[PY, os.path.join(HERE, "bench_e2e.py"), "--out", ctx.dir(stage.name), "--shapes", shapes,
                 "--impls", impls, "--modes", modes] + (["--smoke"] if ctx.smoke else E2E_TIMING)]
    return commands


def ops_all_commands(ctx: Ctx, stage: Stage) -> list:
    return [[PY, os.path.join(HERE, "bench_ops.py"), "--out", ctx.dir(stage.name)]
            + (["--smoke"] if ctx.smoke else ["--shapes", "small,base"])]


def prebuilt_data(out: str, smoke: bool) -> str:
    return os.path.join(out, "prebuilt", "pretrain-data-" + PREPARE_ARGS[smoke][1])


def prepare_argv(data: str, smoke: bool) -> list:
    return [PY, "-m", "electra_fast", "prepare", "-o", data, *PREPARE_ARGS[smoke], "--no-progress"]


def pretrain_commands(ctx: Ctx, stage: Stage) -> list:
    d = ctx.dir(stage.name)
    run = os.path.join(d, "run")
    data = prebuilt_data(ctx.out, ctx.smoke)
    commands = []
    if not os.path.exists(os.path.join(data, "index.json")):
        data = os.path.join(d, "data")
        commands.append(prepare_argv(data, ctx.smoke))
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
