"""Small helpers shared by the tests (fixtures live in conftest.py)."""
import importlib
import json
import math
import os
from unittest import mock

import pytest
import torch


# Kernel tiles small enough that the tests' tiny shapes span several of them, with a partial last one.
SMALL_TILES = {"mlm_loss_and_sample": {"BLOCK_V": 8, "BLOCK_BWD": 16},
               "masked_gather": {"BLOCK_H": 4, "SCATTER_BLOCK_H": 4, "DUP_CHUNK": 2},
               "replace_tokens": {"BLOCK_L": 4}, "rtd_bce_loss": {"BLOCK": 16},
               "rtd_head_loss": {"TILE_ELEMS": 16, "BWD_TILE_ELEMS": 32}, "varlen_plan": {"BLOCK_L": 16}}


def use_small_tiles(monkeypatch, kernels=tuple(SMALL_TILES)):
    """Set `SMALL_TILES` on the named `electra_fast.kernels` modules (all by default); returns the last module."""
    for name in kernels:
        module = importlib.import_module(f"electra_fast.kernels.{name}")
        for attr, value in SMALL_TILES[name].items():
            monkeypatch.setattr(module, attr, value)
    return module


def chi2_critical(df, z=3.29):
    """Upper chi-square quantile by Wilson-Hilferty; z = 3.29 is p ~ 5e-4 (the draws use fixed seeds)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def naive_auc(scores, labels):
    """ROC-AUC by its definition: P(a positive outscores a negative), ties counting one half."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg) / (len(pos) * len(neg))


def naive_ap(scores, labels):
    """Average precision by its definition: precision times the recall gained, at each distinct threshold."""
    total_pos, ap, prev_recall = sum(labels), 0.0, 0.0
    for t in sorted(set(scores), reverse=True):
        chosen = [y for s, y in zip(scores, labels) if s >= t]
        precision, recall = sum(chosen) / len(chosen), sum(chosen) / total_pos
        ap += precision * (recall - prev_recall)
        prev_recall = recall
    return ap


def read_metrics(run, split=None, drop=()):
    """A run's `metrics.jsonl` records: the training ones, or the evaluation ones with `split="eval"`; without the
    fields in `drop` (e.g. "tokens_per_s", which differs between two runs of the same steps)."""
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [{k: v for k, v in r.items() if k not in drop} for r in map(json.loads, f) if r.get("split") == split]


class Killed(Exception):
    """What `train_killed_at` raises where a crash would end the process."""


def train_killed_at(cfg, step: int, chunk: int = 0) -> None:
    """`train(cfg)` ended as a crash would end it, just before micro-batch `chunk` of optimizer step `step` (the
    loop seeds each micro-batch with `chunk_seed` first): what it wrote until then stays for a resume to find."""
    import electra_fast.train.loop as train_mod

    real = train_mod.chunk_seed

    def dying(seed, s, c):
        if (s, c) == (step, chunk):
            raise Killed
        return real(seed, s, c)

    with mock.patch.object(train_mod, "chunk_seed", dying), pytest.raises(Killed):
        train_mod.train(cfg)


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """The reference's LR multiplier at optimizer step `step` (0-based), in Python floats: linear decay to 0 over
    `steps`, times linear warm-up over `warmup` (the oracle of `electra_fast.train.schedules.warmup_linear_decay`)."""
    decay = max(0.0, 1.0 - step / steps)
    return decay * (min(1.0, step / warmup) if warmup > 0 else 1.0)


def pooled_chi2(counts, probs, min_expected=40.0):
    """Chi-square statistic and degrees of freedom of `counts` [V] against `counts.sum() * probs` [V] (fp64). An id
    expecting `min_expected` draws or more is its own bucket; the others are pooled in runs of neighbouring ids of
    at least `min_expected` each (a last short run joins the one before), so a range of rare ids drawn too often
    or never (a tile, the tail of a row) shows, where one bucket for all of them would hide it."""
    counts, expected = counts.double().cpu(), probs.double().cpu() * counts.sum().item()
    big = expected >= min_expected
    obs, exp = counts[big].tolist(), expected[big].tolist()
    runs = []
    for c, e in zip(counts[~big].tolist(), expected[~big].tolist()):
        if not runs or runs[-1][1] >= min_expected:
            runs.append([0.0, 0.0])
        runs[-1][0] += c
        runs[-1][1] += e
    if len(runs) > 1 and runs[-1][1] < min_expected:
        last = runs.pop()
        runs[-1] = [runs[-1][0] + last[0], runs[-1][1] + last[1]]
    for c, e in runs:
        obs.append(c)
        exp.append(e)
    assert min(exp) > 0, "an id of probability 0 in a bucket"
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    return stat, len(obs) - 1


def replayable(step, device):
    """`run()` returning `step()`'s outputs: on CUDA, replays of `step` captured once in a CUDA graph (warmed up on a
    side stream first, as torch.cuda.graph requires); elsewhere `step` itself, so a test's checks also run eagerly."""
    if torch.device(device).type != "cuda":
        return step
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()

    def run():
        graph.replay()
        return captured

    return run


def half_at_argmax(x):
    """Targets for the rows of logits `x [m, v]`: the argmax (first maximum) in a random half of the rows, another id
    in the rest, so that `correct` is True and False equally often (random targets make it False almost everywhere,
    on both sides of a comparison)."""
    m, v = x.shape
    top = x.float().argmax(1)
    other = (top + torch.randint(1, v, (m,), device=x.device)) % v
    aimed = torch.zeros(m, dtype=torch.bool, device=x.device)
    aimed[torch.randperm(m, device=x.device)[: m // 2]] = True
    return torch.where(aimed, top, other)


def use_sampler(monkeypatch, backend: str, sampler: str) -> None:
    """Select the kernels' sampler for the sampling ops called without `sampler=`, as ELECTRA_FAST_SAMPLER does (the
    public ops read it through `electra_fast.options.env_sampler` at each call; the torch reference has one only)."""
    if backend != "torch" and sampler is not None:
        monkeypatch.setenv("ELECTRA_FAST_SAMPLER", sampler)
