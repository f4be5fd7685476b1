"""Faults of multi-process runs on a CPU (gloo, 2 processes under torchrun): a rank that dies mid-run makes torchrun
restart the group, which continues from the last checkpoint (`--resume auto`) and ends with the weights of a run
that was never interrupted, bit for bit; a rank that hangs makes the other end itself within `--collective-timeout`
with a line naming it; FSDP2 runs save sharded checkpoints (no rank gathers the whole state) that resume exactly."""
import glob
import os
import re
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("tokenizers")

from electra_fast.io.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, read_shard  # noqa: E402
from electra_fast.train.distributed import consolidated_model  # noqa: E402
from helpers import ROOT  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

# The CLI under torchrun, with a fault injected on the first attempt only (torchrun counts its restarts in
# TORCHELASTIC_RESTART_COUNT): FAULT="kill|hang|exit RANK STEP" strikes that rank once it has run STEP steps.
# Every attempt records the step it started from.
WORKER = r"""
import os, signal, sys, time
import electra_fast.train.loop as loop

rank, attempt = int(os.environ["RANK"]), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
fault = os.environ.get("FAULT", "").split()
run_step_loop, after_step = loop._Run.step_loop, loop._Run.after_step

def step_loop(self):
    with open(os.path.join(os.environ["RECORD"], f"start-attempt{attempt}-rank{rank}"), "w") as f:
        f.write(str(self.start))
    return run_step_loop(self)

def faulty_after_step(self, done):
    if fault and attempt == 0 and rank == int(fault[1]) and done == int(fault[2]):
        if fault[0] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if fault[0] == "hang":
            while True:
                time.sleep(60)
    return after_step(self, done)

loop._Run.step_loop, loop._Run.after_step = step_loop, faulty_after_step
from electra_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(launch, args, fault="", restarts=0, timeout=240):
    """`electra-fast pretrain ARGS` on 2 CPU processes -> (CompletedProcess, seconds); the workers record in
    `launch/record`."""
    record = launch / "record"
    record.mkdir(parents=True)
    script = launch / "fault_worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
           "FAULT": fault, "RECORD": str(record)}
    began = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", str(restarts),
         "--monitor-interval", "0.2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script),
         "pretrain", *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - began


def pretrain_args(dataset, out, seed, steps=6, save_interval=2, fsdp=False, export=False):
    return ["--data", dataset, "-o", out, "--preset", "tiny", "--steps", steps, "--batch-size", 8, "--seq-len", 32,
            "--lr", 2e-3, "--seed", seed, "--log-interval", 1, "--save-interval", save_interval, "--keep-checkpoints",
            0, "--eval-interval", 0, "--threads", 1, "--device", "cpu", "--no-progress"] + (
        ["--fsdp"] if fsdp else []) + ([] if export else ["--no-export"])


def final_state(out) -> dict:
    return load_checkpoint(latest_checkpoint(os.path.join(out, "checkpoints")))


def assert_same_weights(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), f"{k}: max abs diff {(got[k] - want[k]).abs().max().item()}"


def test_dead_rank_restarts_and_matches_uninterrupted(dataset, tmp_path):
    seed = int.from_bytes(os.urandom(2), "little")
    ref_out, out = str(tmp_path / "ref"), str(tmp_path / "run")
    ref, _ = torchrun(tmp_path / "ref_launch", pretrain_args(dataset, ref_out, seed))
    assert ref.returncode == 0, ref.stderr[-4000:]

    # Rank 1 is killed (SIGKILL) after step 3, before step 3's checkpoint could exist (they come every 2 steps):
    # torchrun restarts both, and the restarted group starts from step 2's checkpoint.
    proc, _ = torchrun(tmp_path / "launch", pretrain_args(dataset, out, seed) + ["--resume", "auto"],
                       fault="kill 1 3", restarts=1)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = tmp_path / "launch" / "record"
    assert (record / "start-attempt0-rank1").read_text() == "0"
    assert [(record / f"start-attempt1-rank{r}").read_text() for r in (0, 1)] == ["2", "2"]

    got, want = final_state(out), final_state(ref_out)
    assert got["step"] == want["step"] == 6
    assert_same_weights(got["model"], want["model"])
    assert got["optimizer"]["state"].keys() == want["optimizer"]["state"].keys()
    for k in want["optimizer"]["state"]:
        assert_same_weights(got["optimizer"]["state"][k], want["optimizer"]["state"][k])


def test_hung_rank_ends_within_collective_timeout(dataset, tmp_path):
    # Rank 1 hangs after step 2; rank 0 waits for it in a collective (step 2's metrics, or step 3's gradients) until
    # its watchdog ends it.
    timeout = 4
    args = pretrain_args(dataset, str(tmp_path / "run"), 7, steps=8, save_interval=8)
    proc, seconds = torchrun(tmp_path / "launch", args + ["--collective-timeout", timeout], fault="hang 1 2",
                             timeout=180)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    line = re.search(r"^electra-fast: error: rank 0: step [23] did not finish within 4 s "
                     r"\(a collective waiting on another rank\?\).*$", out, re.MULTILINE)
    assert line is not None, out[-4000:]
    assert "exitcode  : 124" in out or "exitcode: 124" in out or "exit code 124" in out.lower(), out[-4000:]
    # Start-up (two interpreters, torch, the data) takes a few seconds; the hang itself may cost the timeout, and
    # torchrun's stopping of the other rank.
    assert seconds < 90, seconds


def fsdp2_available() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not fsdp2_available(), reason="FSDP2 (fully_shard) needs torch >= 2.6")
def test_fsdp_sharded_checkpoints_resume_after_a_dead_rank(dataset, tmp_path):
    seed = int.from_bytes(os.urandom(2), "little")
    ref_out, out = str(tmp_path / "ref"), str(tmp_path / "run")
    ref, _ = torchrun(tmp_path / "ref_launch", pretrain_args(dataset, ref_out, seed, fsdp=True, export=True))
    assert ref.returncode == 0, ref.stderr[-4000:]
    proc, _ = torchrun(tmp_path / "launch", pretrain_args(dataset, out, seed, fsdp=True) + ["--resume", "auto"],
                       fault="kill 1 3", restarts=1)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = tmp_path / "launch" / "record"
    assert [(record / f"start-attempt1-rank{r}").read_text() for r in (0, 1)] == ["2", "2"]

    # No rank gathered the state: the checkpoint is a manifest, and each rank's shard holds its part of the
    # weights (about half of every sharded tensor's rows).
    want, got = final_state(ref_out), final_state(out)
    assert [s for s, _ in list_checkpoints(os.path.join(out, "checkpoints"))] == [2, 4, 6]
    assert "model" not in got and "optimizer" not in got and got["sharded"]["world_size"] == 2
    shards = [[read_shard(state, r) for r in (0, 1)] for state in (want, got)]
    full = consolidated_model(want)
    for name in shards[0][0]["dtensors"]["model"]:
        rows = [shards[0][r]["model"][name[0]].shape[0] for r in (0, 1)]
        assert sum(rows) == full[name[0]].shape[0] and max(rows) <= (full[name[0]].shape[0] + 1) // 2, name
    assert len(glob.glob(os.path.join(out, "checkpoints", "*.shard-*"))) == 6  # 3 checkpoints x 2 ranks

    # The restarted run ends where the uninterrupted one did, bit for bit: weights, and each rank's optimizer shard.
    assert_same_weights(consolidated_model(got), full)
    for r in (0, 1):
        w, g = shards[0][r]["optimizer"]["state"], shards[1][r]["optimizer"]["state"]
        assert w.keys() == g.keys()
        for k in w:
            assert_same_weights(g[k], w[k])

    # The transformers export of a sharded run holds the consolidated weights.
    from electra_fast.pretraining.pretrainer import ElectraPretrainer

    exported = ElectraPretrainer.from_pretrained(ref_out).state_dict()
    assert exported.keys() == full.keys()
    assert_same_weights(exported, full)


def test_sharded_checkpoint_verification(tmp_path):
    """A manifest counts only with all its shards whole: a missing or cut shard makes it damaged (`--resume auto`
    passes over it to the previous one), and a shard whose bytes changed fails its checksum when read."""
    from electra_fast.errors import InputError
    from electra_fast.io.checkpoint import newest_intact_checkpoint, save_checkpoint, save_shard, shard_path

    directory = str(tmp_path)
    parts = {s: [torch.randn(5, 3) for _ in range(2)] for s in (1, 2)}
    for step, tensors in parts.items():
        written = [save_shard({"model": {"w": t}}, directory, step, r, 2) for r, t in enumerate(tensors)]
        save_checkpoint({"sharded": {"world_size": 2, "checksums": [c for c, _ in written],
                                     "sizes": [n for _, n in written]}}, directory, step, keep=0)
    manifest = load_checkpoint(latest_checkpoint(directory))
    assert [torch.equal(read_shard(manifest, r)["model"]["w"], parts[2][r]) for r in (0, 1)] == [True, True]

    # Flip one byte inside shard 1's tensor data (same size: only the checksum can tell).
    path = shard_path(directory, 2, 1, 2)
    data = bytearray(open(path, "rb").read())
    at = data.find(parts[2][1].numpy().tobytes()[:8])
    assert at > 0
    data[at] ^= 0xFF
    open(path, "wb").write(data)
    with pytest.raises(InputError, match=r"shard .*shard-00001-of-00002\.pt' is damaged"):
        read_shard(load_checkpoint(latest_checkpoint(directory)), 1)

    # Cut short, then missing: the manifest itself no longer loads, and --resume auto takes step 1's.
    open(path, "wb").write(data[:100])
    with pytest.raises(InputError, match="holds 100 bytes"):
        load_checkpoint(latest_checkpoint(directory))
    os.remove(path)
    warned = []
    state = newest_intact_checkpoint(directory, warned.append)
    assert state["step"] == 1 and len(warned) == 1 and "missing its shard" in warned[0]


WATCHDOG = r"""
import sys, time
from electra_fast.train.watchdog import StepWatchdog
with StepWatchdog(rank=3, timeout_s=0.5) as w:
    w.arm(1); time.sleep(0.8); w.disarm()  # the first step may take longer (it compiles)
    for step in (2, 3, 4):
        w.arm(step); time.sleep(1.0 if sys.argv[1] == "late" and step == 3 else 0.1); w.disarm()
    time.sleep(1.0)  # disarmed: no limit between steps
print("finished")
"""


@pytest.mark.parametrize("case", ["late", "in_time"])
def test_step_watchdog(tmp_path, case):
    """A step past its limit ends the process with code 124 and the line naming rank and step; steps in time, the
    first step's longer limit and the time between steps never do."""
    script = tmp_path / "watchdog.py"
    script.write_text(WATCHDOG)
    began = time.monotonic()
    proc = subprocess.run([sys.executable, str(script), case], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": ROOT})
    if case == "late":
        assert proc.returncode == 124 and "finished" not in proc.stdout, (proc.returncode, proc.stdout)
        assert proc.stderr.strip() == ("electra-fast: error: rank 3: step 3 did not finish within 0.5 s (a collective "
                                       "waiting on another rank?); exiting so that torchrun can restart the group")
        assert time.monotonic() - began < 30
    else:
        assert proc.returncode == 0 and proc.stdout.strip() == "finished", proc.stderr
