"""Preemption: SIGTERM / SIGUSR1 make `electra-fast pretrain` finish the step in flight, save, flush its metrics and
exit with its documented code; `--resume auto` then ends with the weights of an uninterrupted run, bit for bit (CPU).
A repeat of the signal at once is the same request; a later second signal ends the process at once. Under torchrun
a signal to one rank stops every rank after the same step (electra_fast.train.preemption)."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("tokenizers")

from electra_fast.cli import main  # noqa: E402
from electra_fast.io.checkpoint import list_checkpoints, load_checkpoint  # noqa: E402
from electra_fast.train.preemption import Preemption  # noqa: E402
from helpers import ROOT, read_metrics  # noqa: E402

STEPS, GATE = 12, 4  # the signal arrives while step GATE + 1 runs: the run stops after it
ARGS = ["--steps", str(STEPS), "--batch-size", "8", "--seq-len", "32", "--lr", "2e-3", "--log-interval", "4",
        "--save-interval", "4", "--keep-checkpoints", "0", "--eval-interval", "0", "--threads", "1", "--no-progress",
        "--no-export", "--device", "cpu"]

# `electra-fast pretrain` with one hook: the step numbered GATE (0-based) waits, after writing the marker file, until
# the test's signal has reached the handler, so the stop falls after a known step whatever the machine's speed.
# SAVE_MARKER: the checkpoint of the stop waits too (the marker says so), for a second signal to end it.
DRIVER = r"""
import os, signal, sys, time
import electra_fast.train.loop as loop
import electra_fast.train.preemption as preemption
preemption.REPEAT_S = float(os.environ.get("REPEAT_S", preemption.REPEAT_S))
gate, marker = int(os.environ["GATE_STEP"]), os.environ["GATE_MARKER"]
rank = os.environ.get("RANK", "0")

def wait_for_signal():
    handler = signal.getsignal(signal.SIGTERM)
    deadline = time.monotonic() + 60
    while handler.__self__.signum is None and time.monotonic() < deadline:
        time.sleep(0.005)

real_seed, held = loop.chunk_seed, []
def gated(seed, step, chunk):  # chunks number a global batch's micro-batches: a rank's first is not 0 on every rank
    if step == gate and not held and rank == os.environ.get("GATE_RANK", "0"):
        held.append(chunk)
        open(marker + rank, "w").close()
        wait_for_signal()
    return real_seed(seed, step, chunk)
loop.chunk_seed = gated

if os.environ.get("SAVE_MARKER"):
    real_save = loop.save_checkpoint
    def slow_save(state, directory, step, **kw):
        if step == gate + 1:  # the stop's checkpoint: held until a second signal ends the process
            open(os.environ["SAVE_MARKER"], "w").close()
            time.sleep(60)
        return real_save(state, directory, step, **kw)
    loop.save_checkpoint = slow_save

from electra_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""


def wait_for(path, proc, timeout=90):
    """Until `path` exists (the run reached the hook); fails if the process ends first."""
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, f"ended with {proc.returncode} first:\n{proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.01)


def start(tmp_path, argv, launcher=(), **env):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
           "GATE_STEP": str(GATE), "GATE_MARKER": str(tmp_path / "gate"), **env}
    return subprocess.Popen([sys.executable, *launcher, str(script), *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.fixture(scope="module")
def straight(dataset, tmp_path_factory):
    """An uninterrupted run: (its seed, its final checkpoint)."""
    seed = str(int.from_bytes(os.urandom(2), "little"))
    out = str(tmp_path_factory.mktemp("straight"))
    assert main(["pretrain", "--data", dataset, "-o", out, "--seed", seed, *ARGS]) == 0
    return seed, load_checkpoint(list_checkpoints(os.path.join(out, "checkpoints"))[-1][1])


def assert_same_state(got, want):
    assert got["step"] == want["step"] == STEPS
    for name, value in want["model"].items():
        assert torch.equal(got["model"][name], value), name
    for i, state in want["optimizer"]["state"].items():
        assert all(torch.equal(got["optimizer"]["state"][i][k], v) for k, v in state.items()), i


@pytest.mark.slow
@pytest.mark.parametrize("signum, extra, code", [(signal.SIGTERM, [], 0),
                                                 (signal.SIGUSR1, ["--requeue-exit-code", "3"], 3)],
                         ids=["sigterm", "sigusr1-requeue-code"])
def test_signal_saves_at_the_step_and_resume_auto_matches_an_uninterrupted_run(dataset, straight, tmp_path, signum,
                                                                                extra, code):
    seed, want = straight
    out = str(tmp_path / "run")
    proc = start(tmp_path, ["pretrain", "--data", dataset, "-o", out, "--seed", seed, *ARGS, *extra])
    wait_for(str(tmp_path / "gate0"), proc)
    proc.send_signal(signum)
    proc.send_signal(signum)  # the same request delivered twice at once (a launcher forwarding it): one stop
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-3000:]
    stop = GATE + 1
    name = signal.Signals(signum).name
    assert f"electra-fast: {name}: stopped after step {stop}, checkpoint " in err and "--resume auto" in err, err
    ckpts = os.path.join(out, "checkpoints")
    assert [s for s, _ in list_checkpoints(ckpts)] == [4, stop]  # the interval's, and the stop's
    assert sorted(os.listdir(ckpts)) == ["checkpoint-00000004.pt", f"checkpoint-{stop:08d}.pt"]  # no temporary
    assert load_checkpoint(list_checkpoints(ckpts)[-1][1])["data"]["batch"] == stop  # verifies (checksum)
    # Flushed: the open window's metrics (step 5 is off the log interval of 4) are on disk.
    assert [r["step"] for r in read_metrics(out)] == [4, stop]

    assert main(["pretrain", "-o", out, "--resume", "auto"]) == 0
    assert_same_state(load_checkpoint(list_checkpoints(ckpts)[-1][1]), want)
    assert [r["step"] for r in read_metrics(out)] == [4, stop, 8, 12]


@pytest.mark.slow
def test_second_signal_exits_at_once_and_leaves_the_previous_checkpoint(dataset, tmp_path):
    out = str(tmp_path / "run")
    proc = start(tmp_path, ["pretrain", "--data", dataset, "-o", out, *ARGS], SAVE_MARKER=str(tmp_path / "saving"),
                 REPEAT_S="0.2")
    wait_for(str(tmp_path / "gate0"), proc)
    first = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    wait_for(str(tmp_path / "saving"), proc)  # the stop's checkpoint is being written (held for 60 s)
    time.sleep(max(0.0, first + 0.3 - time.monotonic()))  # past the repeat window of 0.2 s
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert time.monotonic() - first < 30
    assert proc.returncode == -signal.SIGTERM  # ended by the signal itself, not after the held save
    ckpts = os.path.join(out, "checkpoints")
    assert [s for s, _ in list_checkpoints(ckpts)] == [4]
    assert load_checkpoint(list_checkpoints(ckpts)[0][1])["step"] == 4


def test_handler_only_sets_a_flag_and_restores_the_previous_one(monkeypatch):
    # A Preemption on the main thread: the signal sets the flag and nothing else; leaving restores the handler.
    # (A long repeat window: a repeat past it would end this very process.)
    from electra_fast.train import preemption

    monkeypatch.setattr(preemption, "REPEAT_S", 600.0)
    before = signal.getsignal(signal.SIGUSR1)
    with Preemption(0, 1, 10) as p:
        assert p.decide(1) == (False, False)
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)  # a repeat within REPEAT_S: the same request
        assert p.signal_name == "SIGUSR1"
        assert p.decide(2) == (True, False)
    assert signal.getsignal(signal.SIGUSR1) is before


def test_timed_checkpoints_follow_the_clock(dataset, tmp_path, monkeypatch):
    # A fake clock that advances one minute per reading: --save-every-minutes 2.5 then saves every third check.
    from electra_fast.train import preemption

    ticks = iter(range(0, 10_000, 60))
    real_init = preemption.Preemption.__init__

    def init(self, *a, **kw):
        real_init(self, *a, **{**kw, "clock": lambda: next(ticks)})

    monkeypatch.setattr(preemption.Preemption, "__init__", init)
    out = str(tmp_path / "run")
    argv = ["pretrain", "--data", dataset, "-o", out, *ARGS, "--save-interval", "100", "--save-every-minutes", "2.5"]
    assert main(argv) == 0
    # Readings: one when made, one as the first step starts (the interval's start), then one per step (1 process)
    # and one after each save (the next interval's start): steps 1-3 are 1, 2, 3 minutes in -> a save after step 3;
    # steps 4-6 again 1, 2, 3 -> after 6; ...
    assert [s for s, _ in list_checkpoints(os.path.join(out, "checkpoints"))] == [3, 6, 9, 12]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed (gloo)")
@pytest.mark.parametrize("to", ["rank1", "everyone"])
def test_torchrun_ranks_agree_on_the_step_to_stop_at(dataset, tmp_path, to):
    # The signal arrives during step 5 (GATE + 1); with agreement every 2 steps, both ranks stop after 6.
    # rank1: only rank 1 gets it, so rank 0 stops on the agreement alone.
    # everyone: torchrun and both workers, as SLURM signals a job step; torchrun forwards it, so each worker gets it
    # twice at once (one stop, not an immediate exit).
    out = str(tmp_path / "run")
    launcher = ("-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                "--master-port", str(free_port()))
    argv = ["pretrain", "--data", dataset, "-o", out, *ARGS, "--signal-check-interval", "2", "--save-interval", "100"]
    proc = start(tmp_path, argv, launcher, GATE_RANK="1")
    wait_for(str(tmp_path / "gate1"), proc, timeout=120)
    pids = subprocess.run(["pgrep", "-f", str(tmp_path / "driver.py")], capture_output=True, text=True).stdout.split()
    ranks = {}
    for pid in (int(p) for p in pids if int(p) != proc.pid):  # the workers (torchrun runs them in their own sessions)
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        ranks[int(env[b"RANK"])] = pid
    assert sorted(ranks) == [0, 1]
    if to == "rank1":
        os.kill(ranks[1], signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
        for pid in ranks.values():
            os.kill(pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    # torchrun's own status: 0 when its workers exit 0; 1 (its SignalException) when it received the signal itself.
    assert proc.returncode == (0 if to == "rank1" else 1), err[-4000:]
    told = "a signal to another rank" if to == "rank1" else "SIGTERM"
    assert "electra-fast: rank 1: stopped after step 6 (SIGTERM)" in err, err[-4000:]
    assert f"electra-fast: rank 0: stopped after step 6 ({told})" in err, err[-4000:]
    ckpts = os.path.join(out, "checkpoints")
    assert sorted(os.listdir(ckpts)) == ["checkpoint-00000006.pt"]  # one checkpoint, at the agreed step
    assert load_checkpoint(list_checkpoints(ckpts)[0][1])["world_size"] == 2
    assert [r["step"] for r in read_metrics(out)] == [4, 6]


@pytest.mark.parametrize("option, value, expected", [("--requeue-exit-code", "256", "an int in [0, 255], got 256"),
                                                     ("--signal-check-interval", "0", "a positive int, got 0"),
                                                     ("--save-every-minutes", "0", "a finite number > 0, got 0.0")])
def test_bad_values_are_one_line_errors(tmp_path, capsys, option, value, expected):
    assert main(["pretrain", "-o", str(tmp_path / "run"), option, value, "--no-progress"]) == 2
    assert capsys.readouterr().err == f"electra-fast: error: {option} must be {expected}\n"
