"""Multi-process training on a CPU (gloo, 2 processes launched by torchrun): parameters identical on every
rank, the ranks' data never overlaps, and the run matches one process that accumulates the same global batch."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("tokenizers")

from electra_fast.io.checkpoint import latest_checkpoint, load_checkpoint  # noqa: E402
from electra_fast.train.distributed import consolidated_model  # noqa: E402
from electra_fast.train.loop import TrainConfig, train  # noqa: E402
from helpers import ROOT, read_metrics  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

# Each rank trains, then records its final parameters and every example index it read.
WORKER = r"""
import json, os, sys
import torch
import electra_fast.data.loader as loader
from electra_fast.train.loop import TrainConfig, train

seen, gather = [], loader.PretrainingData.gather
def recording_gather(self, indices, **kw):
    if kw:  # training batches (evaluation gathers its held-out rows without options)
        seen.append([int(i) for i in indices])
    return gather(self, indices, **kw)
loader.PretrainingData.gather = recording_gather

from electra_fast.io.checkpoint import load_checkpoint
cfg = TrainConfig(**json.loads(sys.argv[1]))
model = train(cfg, resume=load_checkpoint(sys.argv[3]) if len(sys.argv) > 3 else None)["model"]
rank = int(os.environ["RANK"])
if not cfg.fsdp:
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, f"{sys.argv[2]}/params{rank}.pt")
with open(f"{sys.argv[2]}/seen{rank}.json", "w") as f:
    json.dump(seen, f)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp_path, cfg: dict, *extra):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(free_port()), str(script), json.dumps(cfg), str(tmp_path), *extra],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


BASE = dict(preset="tiny", steps=6, batch_size=8, seq_len=32, log_interval=1, save_interval=3, threads=1,
            progress=False, export=False, device="cpu", lr=2e-3)


@pytest.mark.parametrize("fsdp,masking", [(False, "distinct"), (True, "distinct"), (False, "whole_word")],
                         ids=["ddp", "fsdp2", "ddp-whole-word"])
def test_two_ranks_match_one_process(dataset, tmp_path, fsdp, masking):
    if fsdp:
        pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch >= 2.6")
        from torch.distributed import fsdp as fsdp_mod

        if not hasattr(fsdp_mod, "fully_shard"):
            pytest.skip("FSDP2 (fully_shard) needs torch >= 2.6")
    seed = int.from_bytes(os.urandom(2), "little")
    ddp_dir = tmp_path / "ddp"
    ddp_dir.mkdir()
    torchrun(ddp_dir, {**BASE, "data": [dataset], "output_dir": str(ddp_dir / "run"), "seed": seed, "fsdp": fsdp,
                       "masking": masking})

    # The single-process reference: the same global batch of 8 as 2 accumulated micro-batches of 4.
    single = train(TrainConfig(**BASE, data=[dataset], output_dir=str(tmp_path / "single"), seed=seed, grad_accum=2,
                               masking=masking))
    assert single["model"].masking == masking and (single["model"].vocab_word_starts is not None) == (
        masking == "whole_word")

    seen = [json.load(open(ddp_dir / f"seen{r}.json")) for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == BASE["steps"]
    for step, (a, b) in enumerate(zip(*seen)):
        assert len(a) == len(b) == 4 and not set(a) & set(b), f"ranks overlap at step {step}"

    want, got = read_metrics(tmp_path / "single"), read_metrics(ddp_dir / "run")
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 7))
    for w, g in zip(want, got):
        for k in ("loss", "mlm_loss", "disc_loss", "disc_accuracy", "gen_accuracy", "grad_norm"):
            assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-5), (g["step"], k)
    (want_eval,), (got_eval,) = read_metrics(tmp_path / "single", "eval"), read_metrics(ddp_dir / "run", "eval")
    for k in ("disc_auc", "disc_accuracy", "mlm_loss", "gen_accuracy"):  # every rank scores the held-out rows
        assert got_eval[k] == pytest.approx(want_eval[k], rel=1e-4, abs=1e-5), k

    ref = {k: v.detach() for k, v in single["model"].state_dict().items()}
    if not fsdp:
        params = [torch.load(ddp_dir / f"params{r}.pt") for r in (0, 1)]
        for k in params[0]:
            assert torch.equal(params[0][k], params[1][k]), f"{k} differs between ranks"
    else:  # sharded: each rank saved its part (no gather), put together here from the shards
        manifest = load_checkpoint(latest_checkpoint(str(ddp_dir / "run" / "checkpoints")))
        assert "model" not in manifest
        params = [consolidated_model(manifest)]
    for k, v in ref.items():
        torch.testing.assert_close(params[0][k], v, rtol=1e-4, atol=2e-5, msg=lambda m: f"{k}: {m}")

    if fsdp:  # resuming a sharded run from its step-3 checkpoint repeats steps 4-6
        resumed = tmp_path / "resumed"
        resumed.mkdir()
        ckpt = str(ddp_dir / "run" / "checkpoints" / "checkpoint-00000003.pt")
        torchrun(resumed, {**BASE, "data": [dataset], "output_dir": str(resumed / "run"), "seed": seed,
                           "fsdp": True}, ckpt)
        again = read_metrics(resumed / "run")
        assert [r["step"] for r in again] == [4, 5, 6]
        for w, g in zip(got[3:], again):
            for k in ("loss", "mlm_loss", "disc_loss", "grad_norm"):
                assert g[k] == pytest.approx(w[k], rel=1e-5, abs=1e-6), (g["step"], k)
