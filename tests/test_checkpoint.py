"""Checkpoints: an interrupted and resumed run repeats the uninterrupted one exactly; writes are atomic (also
under SIGKILL); a corrupt file is a clear error."""
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

pytest.importorskip("tokenizers")

import electra_fast.train as train_mod  # noqa: E402
from electra_fast.checkpoint import (latest_checkpoint, list_checkpoints, load_checkpoint, rng_state,  # noqa: E402
                                     save_checkpoint, set_rng_state)
from electra_fast.cli import main  # noqa: E402
from electra_fast.errors import InputError  # noqa: E402
from electra_fast.train import TrainConfig, train  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOLATILE = ("tokens_per_s",)


def config(dataset, out, **kw):
    base = dict(preset="tiny", data=[dataset], output_dir=str(out), steps=8, batch_size=8, seq_len=32,
                log_interval=1, save_interval=3, grad_accum=2, seed=random.randrange(1 << 20), threads=1,
                progress=False, export=False, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(l).items() if k not in VOLATILE} for l in f]


class Killed(Exception):
    pass


def test_resume_repeats_uninterrupted_losses(dataset, tmp_path, monkeypatch):
    cfg = config(dataset, tmp_path / "straight")
    straight = train(cfg)
    want = read_metrics(cfg.output_dir)
    assert [r["step"] for r in want] == list(range(1, 9))
    assert len({r["loss"] for r in want}) == 8  # the run really trains (losses differ step to step)

    # Same run, killed in the middle of step 5 (after the step-3 checkpoint, with steps 4-5 logged), resumed.
    cfg2 = dataclasses.replace(cfg, output_dir=str(tmp_path / "resumed"))
    real_seed = train_mod.chunk_seed

    def dying(seed, step, chunk):
        if step == 4 and chunk == 1:
            raise Killed
        return real_seed(seed, step, chunk)

    monkeypatch.setattr(train_mod, "chunk_seed", dying)
    with pytest.raises(Killed):
        train(cfg2)
    monkeypatch.setattr(train_mod, "chunk_seed", real_seed)
    assert [s for s, _ in list_checkpoints(os.path.join(cfg2.output_dir, "checkpoints"))] == [3]
    assert len(read_metrics(cfg2.output_dir)) == 4  # steps 1-4 logged before the kill
    # Python and NumPy RNGs drawn from after the checkpoint must come back too.
    random.random(), np.random.rand(), torch.rand(3)
    ckpt = load_checkpoint(latest_checkpoint(os.path.join(cfg2.output_dir, "checkpoints")))
    resumed = train(cfg2, resume=ckpt)

    assert read_metrics(cfg2.output_dir) == want  # every step's losses, metrics, lr, grad norm: exactly
    for (name, a), (_, b) in zip(straight["model"].state_dict().items(), resumed["model"].state_dict().items()):
        assert torch.equal(a, b), name
    final = [load_checkpoint(latest_checkpoint(os.path.join(c.output_dir, "checkpoints"))) for c in (cfg, cfg2)]
    assert final[0]["step"] == final[1]["step"] == 8
    for k in ("torch", "python"):
        assert str(final[0]["rng"][k]) == str(final[1]["rng"][k])
    assert torch.equal(final[0]["rng"]["numpy"][1], final[1]["rng"]["numpy"][1])
    for group_a, group_b in zip(final[0]["optimizer"]["state"].values(), final[1]["optimizer"]["state"].values()):
        assert all(torch.equal(group_a[k], group_b[k]) for k in group_a)


def test_rng_state_roundtrip():
    torch.manual_seed(random.randrange(1 << 30))
    state = rng_state()
    first = (random.random(), np.random.rand(2).tolist(), torch.rand(4).tolist())
    random.random(), np.random.rand(), torch.rand(9)
    set_rng_state(state)
    assert (random.random(), np.random.rand(2).tolist(), torch.rand(4).tolist()) == first


def test_save_is_atomic_and_prunes(tmp_path, monkeypatch):
    d = str(tmp_path)
    for step in (1, 2, 3, 4):
        save_checkpoint({"x": torch.full((3,), float(step))}, d, step, keep=2)
    assert [s for s, _ in list_checkpoints(d)] == [3, 4]

    real_save = torch.save

    def dies_halfway(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"x": torch.zeros(3)}, d, 5, keep=2)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(os.listdir(d)) == ["checkpoint-00000003.pt", "checkpoint-00000004.pt"]
    assert torch.equal(load_checkpoint(latest_checkpoint(d))["x"], torch.full((3,), 4.0))
    # What a SIGKILL mid-write leaves (a temporary of another process) is ignored, then cleaned up.
    stale = os.path.join(d, "checkpoint-00000005.pt.tmp-999999")
    open(stale, "wb").close()
    assert latest_checkpoint(d).endswith("checkpoint-00000004.pt")
    save_checkpoint({"x": torch.zeros(3)}, d, 5, keep=2)
    assert sorted(os.listdir(d)) == ["checkpoint-00000004.pt", "checkpoint-00000005.pt"]


def test_corrupt_checkpoint_error_names_the_way_out(tmp_path):
    d = str(tmp_path)
    save_checkpoint({"x": torch.ones(2)}, d, 10)
    path = save_checkpoint({"x": torch.ones(2)}, d, 20)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(InputError, match=r"corrupt or unreadable .*delete it to resume from checkpoint-00000010"):
        load_checkpoint(path)
    with open(os.path.join(d, "checkpoint-00000030.pt"), "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(InputError, match="corrupt"):
        load_checkpoint(latest_checkpoint(d))
    torch.save({"something": "else"}, os.path.join(d, "checkpoint-00000040.pt"))
    with pytest.raises(InputError, match="not an electra-fast training checkpoint"):
        load_checkpoint(latest_checkpoint(d))


def test_sigkill_leaves_loadable_checkpoints_and_resume_finishes(dataset, tmp_path):
    out = str(tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "electra_fast", "pretrain", "--data", dataset, "-o", out, "--steps", "400",
           "--batch-size", "8", "--seq-len", "32", "--save-interval", "1", "--keep-checkpoints", "0",
           "--log-interval", "1",
           "--threads", "1", "--no-progress", "--no-export", "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = os.path.join(out, "checkpoints")
    deadline = time.time() + 120
    while len(list_checkpoints(ckpts)) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # at whatever point it is: possibly mid-write
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    found = list_checkpoints(ckpts)
    assert len(found) >= 3
    for step, path in found:
        assert load_checkpoint(path)["step"] == step
    last = found[-1][0]
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 99')  # as if the kill had cut a line off
    # The command line's --resume: the newest checkpoint in the output dir, the run's own settings.
    assert main(["pretrain", "-o", out, "--resume", "--steps", str(last + 12), "--log-interval", "5"]) == 0
    assert list_checkpoints(ckpts)[-1][0] == last + 12
    with open(os.path.join(out, "metrics.jsonl")) as f:
        steps = [json.loads(l)["step"] for l in f]
    # Steps up to the checkpoint from the killed run (logged every step), then the resumed run's every 5th + last.
    assert steps == list(range(1, last + 1)) + [s for s in range(last + 1, last + 12) if s % 5 == 0] + [last + 12]
