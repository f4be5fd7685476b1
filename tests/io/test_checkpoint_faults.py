"""A checkpoint write that fails part-way (a full disk: OSError ENOSPC from the writer or the rename) leaves no file
under a checkpoint's name and the previous checkpoint the one `--resume auto` takes; the run then goes on with one
warning line (`--on-save-error warn`, the default) or stops with one error line naming the file (`stop`, and always
for the last save)."""
import errno
import os
import random
import re

import pytest
import torch

pytest.importorskip("tokenizers")

import electra_fast.io.checkpoint as checkpoint  # noqa: E402
from electra_fast.cli import main  # noqa: E402
from electra_fast.io.checkpoint import checkpoint_path, list_checkpoints, newest_intact_checkpoint  # noqa: E402
from helpers import read_metrics  # noqa: E402


def full_disk():
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def failing_writer(monkeypatch, at_step):
    """torch.save writes the first bytes of checkpoint `at_step`, then the disk is full."""
    real = torch.save

    def save(obj, f, *a, **kw):
        if isinstance(obj, dict) and obj.get("step") == at_step:
            f.write(b"PK\x03\x04" + bytes(1000))
            raise full_disk()
        return real(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save)


def failing_rename(monkeypatch, at_step):
    """The temporary of checkpoint `at_step` is written whole; its rename fails."""
    real = os.replace

    def replace(src, dst, *a, **kw):
        if dst == checkpoint_path(os.path.dirname(dst), at_step):
            raise full_disk()
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(checkpoint.os, "replace", replace)


@pytest.mark.parametrize("fail", [failing_writer, failing_rename], ids=["torch.save", "os.replace"])
def test_failed_write_leaves_the_previous_checkpoint_and_no_partial_file(tmp_path, monkeypatch, fail):
    d = str(tmp_path)
    for step in (1, 2):
        checkpoint.save_checkpoint({"x": torch.full((3,), float(step))}, d, step, keep=2)
    fail(monkeypatch, 3)
    with pytest.raises(OSError) as e:
        checkpoint.save_checkpoint({"x": torch.zeros(3)}, d, 3, keep=2)
    assert e.value.errno == errno.ENOSPC
    assert sorted(os.listdir(d)) == ["checkpoint-00000001.pt", "checkpoint-00000002.pt"]  # pruning never ran
    warned = []
    assert newest_intact_checkpoint(d, warned.append)["step"] == 2 and warned == []


ARGS = ["--steps", "6", "--batch-size", "8", "--seq-len", "32", "--log-interval", "1", "--save-interval", "2",
        "--keep-checkpoints", "0", "--eval-interval", "0", "--threads", "1", "--no-progress", "--no-export",
        "--device", "cpu"]


@pytest.mark.parametrize("policy, at_step", [(None, 4), ("stop", 4), (None, 6)],
                         ids=["warn-and-go-on", "stop", "last-save-always-stops"])
def test_run_with_a_failed_save(dataset, tmp_path, monkeypatch, capsys, policy, at_step):
    out = str(tmp_path / "run")
    ckpts = os.path.join(out, "checkpoints")
    failing_writer(monkeypatch, at_step)
    rc = main(["pretrain", "--data", dataset, "-o", out, "--seed", str(random.randrange(1000)), *ARGS,
               *(["--on-save-error", policy] if policy else [])])
    err = capsys.readouterr().err.splitlines()
    failed = (f"could not write checkpoint {checkpoint_path(ckpts, at_step)!r} (No space left on device); the newest "
              f"checkpoint is still {checkpoint_path(ckpts, at_step - 2)!r}")
    visible = sorted(os.listdir(ckpts))
    assert not [name for name in visible if ".tmp-" in name]  # no partial file left
    if policy is None and at_step < 6:  # one warning, the run went on to its end
        assert rc == 0
        assert err == [f"electra-fast: warning: {failed}; training goes on and saves again at the next interval"]
        assert [s for s, _ in list_checkpoints(ckpts)] == [2, 6]
        assert [r["step"] for r in read_metrics(out)] == list(range(1, 7))
        return
    assert rc == 2 and len(err) == 1, err
    assert re.fullmatch(rf"electra-fast: error: {re.escape(failed)}: free space \(or fix the directory\), then "
                        r"run again with --resume auto", err[0]), err[0]
    assert [s for s, _ in list_checkpoints(ckpts)] == list(range(2, at_step, 2))
    # The previous checkpoint is what --resume auto takes, silently (no damaged file, no unfinished write).
    monkeypatch.undo()
    assert main(["pretrain", "-o", out, "--resume", "auto"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert [s for s, _ in list_checkpoints(ckpts)] == [2, 4, 6]
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 7))
