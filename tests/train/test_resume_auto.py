"""`--resume auto`: the newest checkpoint that verifies, each damaged file or unfinished write passed over with one
warning line; a fresh start where there is no checkpoint; the resumed run ends with an uninterrupted run's weights."""
import dataclasses
import os
import random

import pytest
import torch

pytest.importorskip("tokenizers")

from electra_fast.cli import main  # noqa: E402
from electra_fast.errors import InputError  # noqa: E402
from electra_fast.io.checkpoint import (checkpoint_path, list_checkpoints, load_checkpoint,  # noqa: E402
                                        newest_intact_checkpoint, save_checkpoint)
from electra_fast.train.loop import TrainConfig, resume_state, train  # noqa: E402
from helpers import read_metrics, train_killed_at  # noqa: E402

WARNING = "electra-fast: warning: --resume auto: skipping "


def tamper(path):
    """Change one value of a saved checkpoint and write it back with its old checksum (as silent damage would)."""
    state = torch.load(path, weights_only=True)
    tensor = next(v for v in state["model"].values() if v.is_floating_point())
    tensor.view(-1)[0] += 1
    torch.save(state, path)


def unfinished_write(directory, step):
    """What a save killed mid-write leaves: a temporary holding the first bytes of a zip."""
    path = checkpoint_path(directory, step) + ".tmp-999999"
    with open(path, "wb") as f:
        f.write(b"PK\x03\x04 part of a checkpoint")
    return path


def test_newest_intact_skips_damaged_and_unfinished_files_with_a_warning_each(tmp_path, capsys):
    d = str(tmp_path / "run" / "checkpoints")
    for step in (10, 20, 30):
        save_checkpoint({"model": {"w": torch.full((4,), float(step))}}, d, step, keep=0)
    tamper(checkpoint_path(d, 30))
    partial = unfinished_write(d, 40)
    warned = []
    state = newest_intact_checkpoint(d, warned.append)
    assert state["step"] == 20 and torch.equal(state["model"]["w"], torch.full((4,), 20.0))
    assert warned == [f"skipping {partial!r}: an unfinished write (a save was interrupted; the next save removes it)",
                      f"skipping {checkpoint_path(d, 30)!r}: it is damaged: its contents do not match their checksum"]
    # Through the CLI's entry: one line each on stderr, nothing else.
    assert resume_state("auto", str(tmp_path / "run"))["step"] == 20
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all(line.startswith(WARNING) for line in lines), lines
    # Nothing intact: an error, never a silent fresh start over a damaged run.
    tamper(checkpoint_path(d, 20))
    with open(checkpoint_path(d, 10), "r+b") as f:
        f.truncate(100)
    with pytest.raises(InputError, match=r"--resume auto: none of the 3 checkpoint\(s\) in .* is intact: delete"):
        newest_intact_checkpoint(d, warned.append)


def config(dataset, out, **kw):
    return TrainConfig(**{**dict(preset="tiny", data=[dataset], output_dir=str(out), steps=6, batch_size=8,
                                 seq_len=32, log_interval=1, save_interval=2, keep_checkpoints=0, eval_interval=0,
                                 seed=random.randrange(1 << 20), threads=1, progress=False, export=False,
                                 device="cpu"), **kw})


def test_auto_in_an_empty_directory_starts_afresh(dataset, tmp_path, capsys):
    for out in (tmp_path / "new", tmp_path / "empty"):  # missing, and empty but for an empty checkpoints/
        if out.name == "empty":
            (out / "checkpoints").mkdir(parents=True)
        argv = ["pretrain", "--data", dataset, "-o", str(out), "--resume", "auto", "--steps", "3", "--batch-size",
                "8", "--seq-len", "32", "--log-interval", "1", "--eval-interval", "0", "--threads", "1",
                "--no-progress", "--no-export", "--device", "cpu"]
        assert main(argv) == 0
        assert "warning" not in capsys.readouterr().err
        assert [r["step"] for r in read_metrics(str(out))] == [1, 2, 3]
        assert [s for s, _ in list_checkpoints(str(out / "checkpoints"))] == [3]


def test_auto_takes_the_older_checkpoint_and_ends_with_an_uninterrupted_runs_weights(dataset, tmp_path, capsys):
    cfg = config(dataset, tmp_path / "straight")
    want = train(cfg)["model"].state_dict()
    cfg2 = dataclasses.replace(cfg, output_dir=str(tmp_path / "resumed"))
    train_killed_at(cfg2, step=5)
    ckpts = os.path.join(cfg2.output_dir, "checkpoints")
    assert [s for s, _ in list_checkpoints(ckpts)] == [2, 4]
    tamper(checkpoint_path(ckpts, 4))
    unfinished_write(ckpts, 6)
    capsys.readouterr()
    assert main(["pretrain", "-o", cfg2.output_dir, "--resume", "auto"]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert [line[len(WARNING):].split("'")[1] for line in lines] == [checkpoint_path(ckpts, 6) + ".tmp-999999",
                                                                     checkpoint_path(ckpts, 4)], lines
    assert sorted(os.listdir(ckpts)) == [os.path.basename(checkpoint_path(ckpts, s)) for s in (2, 4, 6)]
    got = load_checkpoint(checkpoint_path(ckpts, 6))["model"]
    for name, value in want.items():
        assert torch.equal(got[name], value), name
    assert [r["step"] for r in read_metrics(cfg2.output_dir)] == list(range(1, 7))
