"""Checkpoints: an interrupted and resumed run repeats the uninterrupted one exactly; writes are atomic (also
under SIGKILL); a corrupt file is a clear error."""
import dataclasses
import os
import random
import re
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch

pytest.importorskip("tokenizers")

from electra_fast.io.checkpoint import (latest_checkpoint, list_checkpoints, load_checkpoint,  # noqa: E402
                                     payload_checksum, rng_state, save_checkpoint, set_rng_state)
from electra_fast.cli import main  # noqa: E402
from electra_fast.errors import InputError, lock_directory  # noqa: E402
from electra_fast.train.loop import TrainConfig, train  # noqa: E402
import helpers  # noqa: E402
from helpers import ROOT, train_killed_at  # noqa: E402

VOLATILE = ("tokens_per_s",)  # differs between two runs of the same steps


def config(dataset, out, **kw):
    base = dict(preset="tiny", data=[dataset], output_dir=str(out), steps=8, batch_size=8, seq_len=32,
                log_interval=1, save_interval=3, grad_accum=2, seed=random.randrange(1 << 20), threads=1,
                progress=False, export=False, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def read_metrics(out):
    return helpers.read_metrics(out, drop=VOLATILE)


def test_resume_repeats_uninterrupted_losses(dataset, tmp_path):
    cfg = config(dataset, tmp_path / "straight")
    straight = train(cfg)
    want = read_metrics(cfg.output_dir)
    assert [r["step"] for r in want] == list(range(1, 9))
    assert len({r["loss"] for r in want}) == 8  # the run really trains (losses differ step to step)

    # Same run, killed in the middle of step 5 (after the step-3 checkpoint, with steps 4-5 logged), resumed.
    cfg2 = dataclasses.replace(cfg, output_dir=str(tmp_path / "resumed"))
    train_killed_at(cfg2, step=4, chunk=1)
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


def test_checkpoint_round_trip_keeps_containers_and_shared_tensors(tmp_path):
    import collections

    shared = torch.randn(4)
    state = {"model": collections.OrderedDict(w=shared, b=torch.arange(3)), "tied": shared,
             "opt": {"state": {0: {"step": torch.tensor(7.0)}}, "groups": [{"lr": 0.1, "params": (0, 1)}]},
             "rng": (1, [2.5, "x"], None)}
    loaded = load_checkpoint(save_checkpoint(state, str(tmp_path), 3))
    assert loaded.pop("format") and loaded.pop("step") == 3
    assert type(loaded["model"]) is collections.OrderedDict and loaded["opt"]["groups"][0]["params"] == (0, 1)
    assert loaded["rng"] == (1, [2.5, "x"], None)
    torch.testing.assert_close(loaded["model"]["w"], shared, rtol=0, atol=0)
    torch.testing.assert_close(loaded["opt"]["state"][0]["step"], torch.tensor(7.0))
    assert loaded["tied"].untyped_storage().data_ptr() == loaded["model"]["w"].untyped_storage().data_ptr()
    assert payload_checksum(loaded) == payload_checksum(state)  # what was hashed is what was saved


def test_corrupt_checkpoint_error_names_the_way_out(tmp_path):
    d = str(tmp_path)
    save_checkpoint({"x": torch.ones(2)}, d, 10)
    path = save_checkpoint({"x": torch.ones(2)}, d, 20)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(InputError, match=r"checkpoint-00000020.pt' is damaged: it cannot be read as a checkpoint: "
                                         r"delete it to resume from the previous good one, .*checkpoint-00000010"):
        load_checkpoint(path)
    with open(os.path.join(d, "checkpoint-00000030.pt"), "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(InputError, match="damaged") as e:
        load_checkpoint(latest_checkpoint(d))
    assert "checkpoint-00000010" in str(e.value)  # the newest one that is intact, not merely the one before
    torch.save({"something": "else"}, os.path.join(d, "checkpoint-00000040.pt"))
    with pytest.raises(InputError, match="not an electra-fast training checkpoint"):
        load_checkpoint(latest_checkpoint(d))


def zero_bytes(path, n=5000):
    """Overwrite `n` bytes inside one tensor's data with zeros (what a bad disk or an aborted copy leaves; zeros in
    the zip structure make the file unreadable, a case of its own). A tensor past the file's first third whose
    bytes are mostly non-zero: Adam moments of embedding rows never used are zeros already."""
    data = np.fromfile(path, dtype=np.uint8)
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            h = info.header_offset  # local header: 30 bytes, then the name and the extra field, then the data
            start = h + 30 + int(data[h + 26:h + 28].view("<u2")[0]) + int(data[h + 28:h + 30].view("<u2")[0])
            if start > len(data) // 3 and info.file_size >= n and np.count_nonzero(data[start:start + n]) > n // 2:
                break
        else:
            raise AssertionError("no tensor to damage")
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(bytes(n))


def test_zeroed_bytes_in_a_checkpoint_are_an_error_naming_the_previous_good_one(dataset, tmp_path, capsys):
    cfg = config(dataset, tmp_path / "run", steps=4, save_interval=2, keep_checkpoints=0, grad_accum=1)
    train(cfg)
    ckpts = os.path.join(cfg.output_dir, "checkpoints")
    (_, good), (_, last) = list_checkpoints(ckpts)
    intact = load_checkpoint(last)
    assert "checksum" not in intact and intact["step"] == 4
    zero_bytes(last)
    with pytest.raises(InputError) as e:
        load_checkpoint(last)
    message = str(e.value)
    assert message == (f"checkpoint {last!r} is damaged: its contents do not match their checksum: delete it to "
                       f"resume from the previous good one, {good!r}")
    # On the command line: one line, ours (torch's advice about weights_only never shows), nothing resumed.
    assert main(["pretrain", "-o", cfg.output_dir, "--resume", "--steps", "6", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == f"electra-fast: error: {message}\n" and "weights_only" not in err
    assert [s for s, _ in list_checkpoints(ckpts)] == [2, 4]
    zero_bytes(good)
    with pytest.raises(InputError, match="no earlier checkpoint is intact"):
        load_checkpoint(last)


def test_checksum_covers_every_value():
    state = {"model": {"w": torch.randn(3, 4), "h": torch.randn(5).to(torch.bfloat16)}, "step": 7,
             "rng": {"python": (3, (1, 2, 3), None)}, "config": {"lr": 1e-3, "name": "tiny"}}
    base = payload_checksum(state)
    assert payload_checksum(state) == base
    changed = [{**state, "step": 8}, {**state, "config": {"lr": 1e-3, "name": "tinY"}},
               {**state, "rng": {"python": (3, (1, 2, 4), None)}},
               {**state, "model": {**state["model"], "h": state["model"]["h"].float()}},  # same values, other dtype
               {**state, "model": {**state["model"], "w": state["model"]["w"].reshape(4, 3)}}]  # other shape
    w = state["model"]["w"].clone()
    w.view(torch.int32)[1, 2] ^= 1  # one bit
    changed.append({**state, "model": {**state["model"], "w": w}})
    assert len({payload_checksum(c) for c in changed} | {base}) == len(changed) + 1


def test_run_directory_is_locked(dataset, tmp_path):
    cfg = config(dataset, tmp_path / "run", steps=2)
    held = lock_directory(cfg.output_dir, "--output-dir", "a pretrain run")  # as a run in another process does
    try:
        with pytest.raises(InputError, match=r"--output-dir .* is in use by a pretrain run \(pid \d+\): wait for "
                                             r"it to finish, or choose another --output-dir"):
            train(cfg)
    finally:
        held.close()
    assert not os.path.exists(os.path.join(cfg.output_dir, "checkpoints"))
    assert train(cfg)["step"] == 2  # released: the directory is free again


def test_sigkill_leaves_loadable_checkpoints_and_resume_finishes(dataset, tmp_path, capsys):
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
    # A second run into the same directory while the first one runs: refused at once, even with --overwrite (which
    # would delete the running one's checkpoints), and the first keeps going.
    started = time.time()
    assert main(["pretrain", "--data", dataset, "-o", out, "--overwrite", "--steps", "5", "--batch-size", "8",
                 "--seq-len", "32", "--threads", "1", "--no-progress", "--device", "cpu"]) == 2
    assert time.time() - started < 30 and proc.poll() is None
    assert re.fullmatch(rf"electra-fast: error: --output-dir {re.escape(repr(out))} is in use by a pretrain run "
                        rf"\(pid {proc.pid}\): wait for it to finish, or choose another --output-dir\n",
                        capsys.readouterr().err)
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
    steps = [r["step"] for r in read_metrics(out)]
    # Steps up to the checkpoint from the killed run (logged every step), then the resumed run's every 5th + last.
    assert steps == list(range(1, last + 1)) + [s for s in range(last + 1, last + 12) if s % 5 == 0] + [last + 12]
