"""Faults and recovery, measured: does a run that was interrupted and continued with `--resume auto` end with the
weights of a run that never was?

Each fault, `--trials` times at a random step, on the tiny preset on the CPU (one process, or two under torchrun with
gloo), then the resumed run's final weights against an uninterrupted run's with the same seed:

- kill -9: SIGKILL to the process once the metrics log reaches the step; `--resume auto` continues.
- SIGTERM: the run finishes its step, saves and exits (docs in README.md, "Long runs: preemption and faults");
  `--resume auto` continues.
- dead rank: rank 1 of 2 SIGKILLs itself after the step on torchrun's first attempt; `torchrun --max-restarts 1`
  restarts the group, which continues by itself (`--resume auto`). Once with DDP, once with FSDP2 (`--fsdp`: sharded
  checkpoints, compared after putting the shards together).
- failing disk: torch.save raises ENOSPC while writing the checkpoint at the step (`--on-save-error stop`: the run
  ends with an error), then `--resume auto` continues from the previous checkpoint.
- corrupt newest checkpoint: kill -9 at the step, then the middle byte of the newest checkpoint file flipped;
  `--resume auto` passes over it (unreadable, or its checksum differs) to the one before.

Prints a markdown table: fault, trials, trials in which the fault struck (a kill that came after the run had
finished, or a corruption before any checkpoint existed, does not), runs whose final weights are identical (bit for
bit) to the uninterrupted run's, the largest absolute difference seen, and the wall time of all its trials. CPU
timings on a shared machine are noisy; the identity column is the result.

    python benchmarks/faults.py --trials 5
    python benchmarks/faults.py --trials 2 --faults kill9,corrupt
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from electra_fast.io.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint  # noqa: E402
from electra_fast.train.distributed import model_weights  # noqa: E402

# The CLI with a fault injected from the environment: FAULT="kill RANK STEP" (on torchrun's first attempt only),
# FAULT="disk STEP" (torch.save fails with ENOSPC on checkpoint STEP).
WORKER = r"""
import errno, os, signal, sys
import torch
import electra_fast.train.loop as loop

rank, attempt = int(os.environ.get("RANK", "0")), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
fault = os.environ.get("FAULT", "").split()
if fault and fault[0] == "disk":
    real_save = torch.save
    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == int(fault[1]):
            f.write(b"PK\x03\x04" + bytes(1000))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)
    torch.save = save
if fault and fault[0] == "kill":
    after_step = loop._Run.after_step
    def faulty_after_step(self, done):
        if attempt == 0 and rank == int(fault[1]) and done == int(fault[2]):
            os.kill(os.getpid(), signal.SIGKILL)
        return after_step(self, done)
    loop._Run.after_step = faulty_after_step
from electra_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""

FAULTS = ("kill9", "sigterm", "dead_rank", "dead_rank_fsdp", "disk", "corrupt")
TITLES = {"kill9": "kill -9 (one process)", "sigterm": "SIGTERM (one process)",
          "dead_rank": "dead rank (2 processes, DDP, torchrun restart)",
          "dead_rank_fsdp": "dead rank (2 processes, FSDP2 sharded, torchrun restart)",
          "disk": "failing disk (ENOSPC on a save, then --resume auto)",
          "corrupt": "corrupt newest checkpoint (kill -9, flipped byte, --resume auto)"}


class Bench:
    def __init__(self, work: str, steps: int, seed: int):
        self.work, self.steps, self.seed = work, steps, seed
        self.worker = os.path.join(work, "worker.py")
        with open(self.worker, "w") as f:
            f.write(WORKER)
        self.data = os.path.join(work, "data")
        from electra_fast.data import builtin_lines, prepare, train_tokenizer

        lines = list(builtin_lines())[:1500]
        prepare(iter(lines), self.data, train_tokenizer(iter(lines), vocab_size=1000), seq_len=32)
        self.env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    "OMP_NUM_THREADS": "1"}
        self.refs: dict = {}
        self.runs = 0

    def args(self, out: str, fsdp: bool = False, extra=()) -> list:
        return ["pretrain", "--data", self.data, "-o", out, "--preset", "tiny", "--steps", str(self.steps),
                "--batch-size", "8", "--seq-len", "32", "--lr", "2e-3", "--seed", str(self.seed), "--log-interval",
                "1", "--save-interval", "2", "--keep-checkpoints", "0", "--eval-interval", "0", "--threads", "1",
                "--device", "cpu", "--no-export", "--no-progress", "--resume", "auto",
                *(["--fsdp"] if fsdp else []), *extra]

    def out(self) -> str:
        self.runs += 1
        return os.path.join(self.work, f"run{self.runs}")

    def single(self, args, fault: str = "") -> subprocess.Popen:
        return subprocess.Popen([sys.executable, self.worker, *args], env={**self.env, "FAULT": fault},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def torchrun(self, args, fault: str = "", restarts: int = 0) -> subprocess.CompletedProcess:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                               "--max-restarts", str(restarts), "--monitor-interval", "0.2", "--master-addr",
                               "127.0.0.1", "--master-port", str(port), self.worker, *args],
                              env={**self.env, "FAULT": fault}, capture_output=True, text=True, timeout=900)

    def finish(self, proc, what: str) -> str:
        """Wait for `proc`, which must succeed. -> its stderr."""
        out, err = proc.communicate() if isinstance(proc, subprocess.Popen) else (proc.stdout, proc.stderr)
        if proc.returncode != 0:
            raise RuntimeError(f"{what} failed with exit code {proc.returncode}:\n{err[-3000:]}")
        return err

    def reference(self, kind: str) -> dict:
        """The uninterrupted run's final weights for `kind` ("single", "ddp", "fsdp"), made once."""
        if kind not in self.refs:
            out = self.out()
            if kind == "single":
                self.finish(self.single(self.args(out)), "reference run")
            else:
                self.finish(self.torchrun(self.args(out, fsdp=kind == "fsdp")), f"{kind} reference run")
            self.refs[kind] = final_weights(out)
        return self.refs[kind]

    def signal_at(self, out: str, step: int, signum: int, fault: str = "") -> tuple:
        """Start a one-process run and send `signum` once its metrics log has reached `step`. -> (exit code,
        stderr)."""
        proc = self.single(self.args(out), fault)
        log = os.path.join(out, "metrics.jsonl")
        while proc.poll() is None:
            if os.path.exists(log) and sum(1 for line in open(log) if '"split"' not in line) >= step:
                proc.send_signal(signum)
                break
            time.sleep(0.02)
        err = proc.communicate()[1]
        return proc.returncode, err

    # -------------------------------------------------------- the faults: each -> (final weights, whether it struck)
    def kill9(self, step: int) -> tuple:
        out = self.out()
        code, _ = self.signal_at(out, step, signal.SIGKILL)
        self.finish(self.single(self.args(out)), "resumed run")
        return final_weights(out), code == -signal.SIGKILL  # else the run had finished first

    def sigterm(self, step: int) -> tuple:
        out = self.out()
        code, err = self.signal_at(out, step, signal.SIGTERM)
        if code != 0:
            raise RuntimeError(f"SIGTERM: the run exited with {code}, not 0:\n{err[-3000:]}")
        self.finish(self.single(self.args(out)), "resumed run")
        return final_weights(out), "stopped after step" in err

    def dead_rank(self, step: int, fsdp: bool = False) -> tuple:
        out = self.out()
        err = self.finish(self.torchrun(self.args(out, fsdp=fsdp), fault=f"kill 1 {step}", restarts=1), "torchrun")
        return final_weights(out), "(exitcode: -9)" in err

    def disk(self, step: int) -> tuple:
        out = self.out()
        save_step = 2 * max(1, step // 2)  # checkpoints come every 2 steps
        proc = self.single(self.args(out, extra=["--on-save-error", "stop"]), fault=f"disk {save_step}")
        err = proc.communicate()[1]
        if proc.returncode == 0:
            raise RuntimeError("failing disk: the run did not stop")
        self.finish(self.single(self.args(out)), "resumed run")
        return final_weights(out), "No space left on device" in err

    def corrupt(self, step: int) -> tuple:
        out = self.out()
        self.signal_at(out, step, signal.SIGKILL)
        found = list_checkpoints(os.path.join(out, "checkpoints"))
        if found:
            path = found[-1][1]
            data = bytearray(open(path, "rb").read())
            data[len(data) // 2] ^= 0xFF  # most of the file is tensor bytes
            with open(path, "wb") as f:
                f.write(data)
        err = self.finish(self.single(self.args(out)), "resumed run")
        return final_weights(out), "skipping" in err


def final_weights(out: str) -> dict:
    return model_weights(load_checkpoint(latest_checkpoint(os.path.join(out, "checkpoints"))))


def compare(got: dict, want: dict) -> tuple:
    """(identical, max abs diff) of two model state dicts."""
    if got.keys() != want.keys():
        return False, float("inf")
    diff = max((got[k].double() - want[k].double()).abs().max().item() if got[k].numel() else 0.0 for k in want)
    return all(torch.equal(got[k], want[k]) for k in want), diff


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=3, help="random fault steps per fault (default 3)")
    p.add_argument("--steps", type=int, default=12, help="steps of each run (default 12)")
    p.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated subset of {','.join(FAULTS)}")
    p.add_argument("--seed", type=int, default=1234, help="the runs' seed, and the fault steps' (default 1234)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = p.parse_args(argv)
    faults = [f for f in args.faults.split(",") if f]
    unknown = sorted(set(faults) - set(FAULTS))
    if unknown:
        p.error(f"--faults: unknown {unknown}; choose from {','.join(FAULTS)}")
    if args.steps < 4:
        p.error(f"--steps must be at least 4 (a fault between two checkpoints), got {args.steps}")
    rng = random.Random(args.seed)
    work = tempfile.mkdtemp(prefix="electra-fast-faults-")
    rows = []
    try:
        bench = Bench(work, args.steps, args.seed)
        for fault in faults:
            kind = {"dead_rank": "ddp", "dead_rank_fsdp": "fsdp"}.get(fault, "single")
            want = bench.reference(kind)
            identical, struck, worst, began, steps = 0, 0, 0.0, time.monotonic(), []
            for _ in range(args.trials):
                step = rng.randint(1, args.steps - 1)
                steps.append(step)
                run = (lambda s: bench.dead_rank(s, fsdp=True)) if fault == "dead_rank_fsdp" else getattr(bench, fault)
                got, hit = run(step)
                same, diff = compare(got, want)
                identical, struck = identical + same, struck + hit
                worst = max(worst, diff)
            rows.append({"fault": TITLES[fault], "trials": args.trials, "struck": struck, "identical": identical,
                         "max_abs_diff": worst, "wall_s": time.monotonic() - began, "steps": steps})
            print(f"{fault}: struck {struck}/{args.trials}, {identical}/{args.trials} identical, max abs diff "
                  f"{worst:g}, fault steps {steps}",
                  file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nTiny preset, {args.steps} steps, a checkpoint every 2, CPU (torch {torch.__version__}, "
          f"{os.cpu_count()} cores); wall time: the fault's trials (each a faulted run and its resumption), not the "
          "uninterrupted reference run.\n")
    print("| fault | trials | fault struck | identical weights | max abs diff | wall time |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['fault']} | {r['trials']} | {r['struck']}/{r['trials']} | {r['identical']}/{r['trials']} | "
              f"{r['max_abs_diff']:g} | "
              f"{r['wall_s']:.0f} s |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["identical"] == r["trials"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
