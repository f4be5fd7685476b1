"""bench_e2e.py's first-step check on the CPU at the tiny preset (`--smoke`'s): it passes the step as it is,
through the torch backend and through the Triton kernels in the interpreter, and fails a step that is wrong (a
loss term, a head weight, the labels, the replacement or the masking); such a row is still timed but marked, and
the run goes on. Rows record the backend each op resolved to, the attention path and the sampler."""
import json
import os
import sys

import pytest
import torch

from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_e2e  # noqa: E402
import electra_fast.pretraining.rtd_step as pretrainer  # noqa: E402
from electra_fast.ops import get_backend  # noqa: E402

OPS_OF_OURS = {"mask_tokens", "dropout_add_layer_norm", "masked_gather", "lm_head_loss_and_sample",
               "replace_tokens", "rtd_head_loss"}


def run(tmp_path, *args):
    """bench_e2e.py --smoke in this process (so a monkeypatched step is the one it checks) -> its rows."""
    before = get_backend()
    bench_e2e.main(["--smoke", "--out", str(tmp_path), *args])
    assert get_backend() == before, "the run's forced backend outlived it"
    rows = json.loads((tmp_path / "e2e.json").read_text())["rows"]
    assert rows
    return rows


def _scaled_mlm_loss(monkeypatch):
    fused = pretrainer.lm_head_loss_and_sample

    def wrong(*args, **kwargs):
        loss, sampled, correct = fused(*args, **kwargs)
        return loss * 1.02, sampled, correct  # one loss term 2% off

    monkeypatch.setattr(pretrainer, "lm_head_loss_and_sample", wrong)
    return "mlm_loss"


def _shifted_head_bias(monkeypatch):
    head = pretrainer.rtd_head_loss

    def wrong(hidden, weight, bias, *args, **kwargs):
        return head(hidden, weight, bias + 0.5, *args, **kwargs)  # the discriminator's output bias, one weight

    monkeypatch.setattr(pretrainer, "rtd_head_loss", wrong)
    return "disc_loss"


def _flipped_labels(monkeypatch):
    head = pretrainer.rtd_head_loss

    def wrong(hidden, weight, bias, labels, *args, **kwargs):
        return head(hidden, weight, bias, ~labels.bool(), *args, **kwargs)  # replaced read as original, and back

    monkeypatch.setattr(pretrainer, "rtd_head_loss", wrong)
    return "replaced_frac"


def _dropped_sample(monkeypatch):
    replace = pretrainer.replace_tokens

    def wrong(input_ids, positions, weights, sampled, **kwargs):
        sampled = sampled.clone()
        sampled[0] = input_ids.gather(1, positions).reshape(-1)[0]  # the first slot keeps its original token
        sampled[1] = (sampled[1] + 1) % 1000  # and the second a sample it was not given
        return replace(input_ids, positions, weights, sampled, **kwargs)

    monkeypatch.setattr(pretrainer, "replace_tokens", wrong)
    return "replaced ids differ"


def _masked_cls(monkeypatch):
    mask = pretrainer.mask_tokens

    def wrong(input_ids, *args, **kwargs):
        masked_ids, positions, weights = mask(input_ids, *args, **kwargs)
        return masked_ids.index_fill(1, torch.tensor([0]), bench_e2e.MASK_ID), positions, weights  # [CLS] masked

    monkeypatch.setattr(pretrainer, "mask_tokens", wrong)
    return "masked ids changed"


def _check(backend="torch", padded=True):
    """`first_step_check` of a fresh tiny model on a fresh batch, as bench_e2e.py runs it for a row."""
    from electra_fast.ops import set_backend

    ids, mask = bench_e2e.make_batches(1, 8, 32, 1000, "cpu", padded=padded)[0]
    set_backend(backend)
    try:
        return bench_e2e.first_step_check(bench_e2e.ours("tiny", 1000), ids, mask if padded else None, "cpu")
    finally:
        set_backend(None)


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "packed"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_check_passes_the_step_as_it_is(backend, padded):
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels run on the CPU only under TRITON_INTERPRET=1")
    result = _check(backend, padded)
    assert result["check"] == "ok", result
    assert result["reference_losses"]["replaced_frac"] > 0  # some samples differ from the original: labels matter
    # what ran: every op of the step on the asked backend, its sampler, and the attention path (on a CPU a padded
    # batch takes the dense bias; a packed one has no mask at all)
    assert set(result["backends"]) == OPS_OF_OURS and set(result["backends"].values()) == {backend}
    assert result["sampler"] == ("torch:gumbel" if backend == "torch" else "triton:cdf")
    assert result["attention_taken"] == ("sdpa:bias" if padded else "sdpa:no-mask")


@pytest.mark.parametrize("wrong", [_scaled_mlm_loss, _shifted_head_bias, _flipped_labels, _dropped_sample,
                                   _masked_cls])
def test_check_catches_a_wrong_step(monkeypatch, wrong):
    expected = wrong(monkeypatch)
    result = _check()
    assert result["check"].startswith("failed") and expected in result["check"], result["check"]


def test_failed_check_marks_its_row_and_the_run_goes_on(tmp_path, monkeypatch):
    fused, calls = pretrainer.lm_head_loss_and_sample, []

    def wrong_once(*args, **kwargs):  # the first row's check gets a wrong MLM loss; every later call is right
        loss, sampled, correct = fused(*args, **kwargs)
        calls.append(1)
        return (loss * 1.02 if len(calls) == 1 else loss), sampled, correct

    monkeypatch.setattr(pretrainer, "lm_head_loss_and_sample", wrong_once)
    rows = run(tmp_path, "--impls", "ours", "--shapes", "small,small-full")
    wrong, right = rows
    assert wrong["check"].startswith("failed") and "mlm_loss" in wrong["check"], wrong["check"]
    assert wrong["error"].startswith("first-step check failed"), wrong
    assert wrong["ms_per_step"] > 0  # timed all the same, but marked: no figure of it is reported
    assert "failed: first-step check" in (tmp_path / "e2e.md").read_text()
    assert right["check"] == "ok" and "error" not in right and right["ms_per_step"] > 0
    for row in rows:  # what ran, and no memory figure without a GPU (the field is there)
        assert set(row["backends"]) == OPS_OF_OURS and set(row["backends"].values()) == {"torch"}  # --smoke's
        assert row["sampler"] == "torch:gumbel"
        assert row["peak_mem_gb"] is None and row["peak_mem_row_gb"] is None
    assert [r["attention_taken"] for r in rows] == ["sdpa:bias", "sdpa:no-mask"]
    header = (tmp_path / "e2e.csv").read_text().splitlines()[0].split(",")
    assert {"check", "backends", "attention_taken", "sampler", "peak_mem_row_gb"} <= set(header)


def test_dropout_off_restores_the_training_step():
    """The check switches dropout off for its forward only: the timed step trains with the model's dropout."""
    model = bench_e2e.ours("tiny", 1000)
    before = {n: m.p for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
    attn = {n: m.attn_dropout for n, m in model.named_modules() if hasattr(m, "attn_dropout")}
    assert before and attn and all(p > 0 for p in [*before.values(), *attn.values()])
    with bench_e2e.dropout_off(model):
        assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
        assert all(m.attn_dropout == 0 for m in model.modules() if hasattr(m, "attn_dropout"))
        assert model.training
    assert before == {n: m.p for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
    assert attn == {n: m.attn_dropout for n, m in model.named_modules() if hasattr(m, "attn_dropout")}
