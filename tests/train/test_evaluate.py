"""Held-out evaluation: fixed masks and samples (two evaluations agree exactly), metrics against independent
oracles (the training step's fused counts, pairwise ROC-AUC and a naive average precision), and a split that the
trainer never trains on."""
import json
import os
import random

import numpy as np
import pytest
import torch

from electra_fast.train.evaluate import eval_seed, evaluate, holdout_rows
from electra_fast.pretraining.pretrainer import ElectraPretrainer
from helpers import naive_ap, naive_auc

VOCAB, L = 60, 24


class Rows:
    """A dataset's `gather` over fixed random rows, some padded."""

    def __init__(self, n):
        self.ids = torch.randint(5, VOCAB, (n, L))
        lengths = torch.randint(L // 2, L + 1, (n,))
        self.mask = (torch.arange(L) < lengths[:, None]).long()
        self.ids[:, 0] = 2
        self.ids = torch.where(self.mask.bool(), self.ids, 0)

    def gather(self, indices):
        idx = torch.as_tensor(np.asarray(indices))
        return {"input_ids": self.ids[idx], "attention_mask": self.mask[idx],
                "token_type_ids": torch.zeros_like(self.ids[idx])}


def tiny_model():
    return ElectraPretrainer.from_preset("tiny", vocab_size=VOCAB, mask_token_id=4, pad_token_id=0,
                                         special_token_ids=[0, 2, 3, 4], mask_prob=0.3)


def test_evaluation_is_deterministic_and_restores_the_mode():
    model, data, seed = tiny_model().train(), Rows(12), random.randrange(1 << 30)
    first = evaluate(model, data, np.arange(12), 4, seed, torch.device("cpu"))
    assert model.training  # dropout was off inside, the mode is back
    with torch.no_grad():  # the model's own randomness is not what evaluation uses
        torch.rand(100)
    assert evaluate(model, data, np.arange(12), 4, seed, torch.device("cpu")) == first
    other = evaluate(model, data, np.arange(12), 4, seed + 1, torch.device("cpu"))
    assert other["replaced_frac"] != first["replaced_frac"] or other["disc_auc"] != first["disc_auc"]


def test_metrics_match_the_step_and_naive_oracles():
    model, data, seed = tiny_model(), Rows(10), random.randrange(1 << 30)
    with torch.no_grad():  # a discriminator whose scores spread: random head weights
        model.discriminator.head.out.weight.normal_(0, 2.0)
    got = evaluate(model, data, np.arange(10), 5, seed, torch.device("cpu"))  # 2 batches
    model.eval()
    scores, labels, steps, slots = [], [], [], []
    with torch.no_grad():
        for k in range(2):
            batch = data.gather(np.arange(5 * k, 5 * k + 5))
            # The training step with the same seed: the same masks and samples, counted by the fused RTD head.
            steps.append(model(**batch, rng=torch.Generator().manual_seed(eval_seed(seed, k))).to_dict())
            out = model.scores(**batch, rng=torch.Generator().manual_seed(eval_seed(seed, k)))
            real = batch["attention_mask"].bool()
            scores += out["disc_logits"][real].tolist()
            labels += out["is_replaced"][real].tolist()
            slots.append(float(out["gen_weights"].sum()))
    n_real = [int(data.mask[5 * k:5 * k + 5].sum()) for k in range(2)]
    weights = np.array(n_real) / sum(n_real)
    assert got["eval_tokens"] == sum(n_real) == len(labels)
    for key in ("disc_accuracy", "replaced_frac"):  # per-batch token fractions, weighted by real tokens
        assert got[key] == pytest.approx(sum(w * s[key] for w, s in zip(weights, steps)), abs=1e-6), key
    assert got["baseline_accuracy"] == pytest.approx(1 - got["replaced_frac"])
    assert got["accuracy_lift"] == pytest.approx(got["disc_accuracy"] - got["baseline_accuracy"])
    assert 0 < got["replaced_frac"] < 1
    assert got["disc_auc"] == pytest.approx(naive_auc(scores, labels), abs=1e-9)
    assert got["disc_ap"] == pytest.approx(naive_ap(scores, labels), abs=1e-9)
    predicted = [s > 0 for s in scores]
    tp = sum(p and y for p, y in zip(predicted, labels))
    precision, recall = tp / max(sum(predicted), 1), tp / sum(labels)
    assert (got["disc_precision"], got["disc_recall"]) == pytest.approx((precision, recall))
    assert got["disc_f1"] == pytest.approx(2 * precision * recall / (precision + recall) if tp else 0.0)
    # Generator: the step's per-batch mean loss and accuracy, weighted by each batch's masked slots.
    n_slots = np.array(slots) / sum(slots)
    for key in ("mlm_loss", "gen_accuracy"):
        assert got[key] == pytest.approx(sum(w * s[key] for w, s in zip(n_slots, steps)), rel=1e-5), key

def test_holdout_rows():
    assert holdout_rows(100_000, 16, 16) == 160  # 10 batches cap ... 1% = 1000 > 160
    assert holdout_rows(10_000, 16, 8) == 96  # 1% = 100, a multiple of the micro-batch
    assert holdout_rows(1332, 16, 16) == 64  # small data: 4 batches, within 5%
    assert holdout_rows(40, 16, 8) == 16  # one batch at least
    assert holdout_rows(20, 16, 16) == 0  # the rest would not fill a batch: no split


def test_trainer_never_trains_on_the_held_out_rows(dataset, tmp_path, monkeypatch):
    from electra_fast.data.loader import PretrainingData
    from electra_fast.train.loop import TrainConfig, train

    calls = {"train": [], "eval": []}
    gather = PretrainingData.gather

    def spy(self, indices, **kw):
        calls["train" if kw else "eval"].append(np.asarray(indices).copy())
        return gather(self, indices, **kw)

    monkeypatch.setattr(PretrainingData, "gather", spy)
    cfg = TrainConfig(preset="tiny", data=[dataset], output_dir=str(tmp_path), steps=6, batch_size=8, seq_len=32,
                      log_interval=2, eval_interval=3, seed=random.randrange(1 << 20), threads=1, progress=False,
                      export=False, device="cpu")
    summary = train(cfg)
    n = len(PretrainingData(dataset))
    held = holdout_rows(n, 8, 8)
    trained = np.concatenate(calls["train"])
    evaluated = np.concatenate(calls["eval"])
    assert held > 0 and len(trained) == 6 * 8 and len(evaluated) == 2 * held  # evaluations at steps 3 and 6
    assert set(evaluated.tolist()) == set(range(n - held, n))
    assert trained.max() < n - held
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    evals = [r for r in records if r.get("split") == "eval"]
    assert [r["step"] for r in evals] == [3, 6] and evals[-1] == summary["eval"]
    assert [r["step"] for r in records if "split" not in r] == [2, 4, 6]
    for key in ("disc_auc", "disc_ap", "disc_precision", "disc_recall", "disc_f1", "disc_accuracy",
                "baseline_accuracy", "accuracy_lift", "mlm_loss", "gen_accuracy", "eval_tokens"):
        assert all(np.isfinite(r[key]) for r in evals), key


def test_metrics_log_sends_eval_records_to_their_own_tensorboard_section(tmp_path, monkeypatch):
    import electra_fast.train.metrics_log as metrics_log

    scalars = []

    class Writer:  # stands in for torch.utils.tensorboard.SummaryWriter (an optional dependency)
        def __init__(self, directory):
            pass

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def close(self):
            pass

    monkeypatch.setattr(metrics_log, "_summary_writer_class", lambda: Writer)
    log = metrics_log.MetricsLog(str(tmp_path), None, tensorboard=True)
    log.write({"step": 10, "loss": 2.5})
    log.write({"step": 10, "split": "eval", "disc_auc": 0.75, "eval_tokens": 96})
    log.close()
    assert scalars == [("train/loss", 2.5, 10), ("eval/disc_auc", 0.75, 10), ("eval/eval_tokens", 96, 10)]
    with open(tmp_path / "metrics.jsonl") as f:
        assert [json.loads(line).get("split") for line in f] == [None, "eval"]


def test_metrics_log_to_weights_and_biases_resumes_the_same_run(tmp_path, monkeypatch):
    """`--wandb PROJECT`: the same scalars as TensorBoard, under one run id that a resumed pretrain continues."""
    import sys
    import types

    import electra_fast.train.metrics_log as metrics_log

    calls = []

    class Run:
        def log(self, values, step):
            calls.append(("log", values, step))

        def finish(self):
            calls.append(("finish",))

    ids = iter(["run-a", "run-b"])
    fake = types.SimpleNamespace(util=types.SimpleNamespace(generate_id=lambda: next(ids)),
                                 init=lambda **kw: calls.append(("init", kw)) or Run())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for resume_step in (None, 10):
        log = metrics_log.MetricsLog(str(tmp_path), resume_step, tensorboard=False, wandb_project="proj",
                                     config={"lr": 1e-3})
        log.write({"step": 10, "loss": 2.5, "split": "eval"})
        log.close()
    inits = [c[1] for c in calls if c[0] == "init"]
    assert [(i["project"], i["id"], i["resume"], i["config"]) for i in inits] == [("proj", "run-a", "allow",
                                                                                   {"lr": 1e-3})] * 2
    assert ("log", {"eval/loss": 2.5}, 10) in calls and calls[-1] == ("finish",)

    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed: the error names the package
    with pytest.raises(metrics_log.InputError, match="pip install wandb"):
        metrics_log.MetricsLog(str(tmp_path), None, tensorboard=False, wandb_project="proj")
