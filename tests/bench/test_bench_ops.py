"""The op microbenchmarks' CPU-checkable logic; `benchmarks/bench_ops.py` itself is the report (GB/s, copy-bandwidth
fraction, torch.compile baseline, plots), run on a GPU."""
import os
import sys

import pytest
import torch

from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_ops  # noqa: E402
from bench_ops import _timed, cases  # noqa: E402

def _symbolic(gm) -> bool:
    """Whether a dynamo graph has a symbolic size: a SymInt input, or an input tensor with a SymInt dimension."""
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        value = node.meta.get("example_value")
        if isinstance(value, torch.SymInt):
            return True
        if isinstance(value, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in value.shape):
            return True
    return False


@pytest.mark.parametrize("op,grad", [("mlm_loss_and_sample", False), ("dropout_add_layer_norm", True)])
def test_compiled_baseline_is_a_static_build_at_every_shape(monkeypatch, op, grad):
    """Each shape's torch.compile baseline is compiled for that shape with constant sizes: the second shape must not
    reuse the first one's cache entry as a dynamic-shape recompile (dynamo's automatic dynamic)."""
    monkeypatch.setitem(bench_ops.SHAPES, "tiny2", (3, 48, 24))  # a second shape, every size different
    monkeypatch.setitem(bench_ops.VOCABS, "tiny2", 700)
    monkeypatch.setitem(bench_ops.EMBED, "tiny2", 24)
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(_symbolic(gm))
        return gm.forward  # runs the captured graph eagerly: only what dynamo built is under test

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn=None, **kw: compile_(fn, **{**kw, "backend": recording_backend}))
    torch._dynamo.reset()
    per_shape = []
    for shape in ("tiny", "tiny2"):
        case = next(c for c in cases(shape, device="cpu") if c.op == op)
        before = len(graphs)
        call = _timed(case, "torch.compile", grad, [case.make(), case.make()])[0]
        call()  # the second input set: same shape, no new graph
        per_shape.append(graphs[before:])
    torch._dynamo.reset()
    assert all(per_shape), f"no graph compiled for a shape: {per_shape}"
    assert per_shape[1] == [False] * len(per_shape[1]), f"the second shape's baseline has symbolic sizes: {per_shape}"
    assert per_shape[0] == [False] * len(per_shape[0])


def test_rows_record_the_backend_and_sampler_that_ran(tmp_path):
    """Every row says which backend each op resolved to (not only the implementation asked for) and, for the
    sampling ops, the sampler."""
    rows = bench_ops.run(["mlm_loss_and_sample", "masked_gather", "lm_head_loss_and_sample"], ["tiny"],
                         str(tmp_path), smoke=True)
    assert rows
    for row in rows:
        assert row["backends"] == f"{row['op']}=torch" or row["impl"].startswith("unfused:"), row
        assert (row["sampler"] == "torch:gumbel") == (row["op"] != "masked_gather"), row
    unfused = [r for r in rows if r["impl"] == "unfused:torch"]
    assert unfused and all(r["backends"] == "mlm_loss_and_sample=torch" for r in unfused)
    assert "backends" in (tmp_path / "ops.csv").read_text().splitlines()[0]


def test_backends_are_prepared_before_anything_is_timed(monkeypatch, tmp_path):
    """The CUDA extension is built (and the Triton modules imported) before the first timed call."""
    events = []
    monkeypatch.setattr(bench_ops, "prepare_backends", lambda: events.append("prepare") or {"cuda_extension": "-"})
    do_bench = bench_ops.do_bench
    monkeypatch.setattr(bench_ops, "do_bench", lambda fn, *a, **k: events.append("time") or do_bench(fn, *a, **k))
    bench_ops.run(["masked_gather"], ["tiny"], str(tmp_path), smoke=True)
    assert events[0] == "prepare" and events.count("prepare") == 1 and "time" in events


def test_prepare_backends_builds_the_cuda_extension(monkeypatch):
    """Where the CUDA backend can run, `prepare_backends` calls its loader (the JIT build) and says how long it took;
    a failed build is recorded, not raised (the default order then skips the backend, as training does)."""
    import common
    from electra_fast.csrc import _extension as cuda

    built = []
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "extension", lambda: built.append("build"))
    monkeypatch.setattr(cuda, "clear_stale_build_lock", lambda: built.append("clear") or "/x/lock")
    info = common.prepare_backends()
    assert info["cuda_extension"].startswith("loaded in ")
    assert built == ["clear", "build"] and info["stale_build_lock_removed"] == "/x/lock"

    def broken():
        raise RuntimeError("nvcc exploded")

    monkeypatch.setattr(cuda, "extension", broken)
    assert common.prepare_backends()["cuda_extension"] == "build failed: nvcc exploded"
