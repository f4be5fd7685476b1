"""Running a stage's commands for benchmarks/validate_gpu.py: each in its own process group with the stage's
environment, SIGINT when its time is up and SIGKILL of the whole group a grace period later, output to its log."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from typing import Optional

from gpu_stage import ROOT


def child_env(smoke: bool) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the real Triton compiler on the GPU; the smoke never asks for Triton
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    if not smoke and not env.get("TORCH_CUDA_ARCH_LIST"):
        cap = nvidia_smi("compute_cap")
        if cap:
            env["TORCH_CUDA_ARCH_LIST"] = cap.splitlines()[0].strip()
    return env


def nvidia_smi(field: str) -> Optional[str]:
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


def print_tail(path: str, n: int = 6) -> None:
    try:
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()[-n:]
    except OSError:
        return
    for line in lines:
        print("    " + line[:200])
