"""Small helpers shared by the tests (fixtures live in conftest.py)."""
import importlib
import json
import math
import os
from unittest import mock

import pytest
import torch

from conftest import TRITON_DEVICE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout
PAD, CLS, SEP, MASK = 0, 1, 2, 3
SPECIAL = (PAD, CLS, SEP, MASK)


# Kernel tiles small enough that the tests' tiny shapes span several of them, with a partial last one.
SMALL_TILES = {"mlm_loss_and_sample": {"BLOCK_V": 8, "BLOCK_BWD": 16},
               "masked_gather": {"BLOCK_H": 4, "SCATTER_BLOCK_H": 4, "DUP_CHUNK": 2},
               "replace_tokens": {"BLOCK_L": 4}, "rtd_bce_loss": {"BLOCK": 16},
               "rtd_head_loss": {"TILE_ELEMS": 16, "BWD_TILE_ELEMS": 32}, "varlen_plan": {"BLOCK_L": 16}}


def kernel(name: str):
    """The Triton kernels' module `electra_fast.kernels.<name>`, imported when a test needs it (it imports triton,
    which a file of torch tests as well must not need at collection)."""
    return importlib.import_module(f"electra_fast.kernels.{name}")


def rand(*shape, dtype=torch.float32, scale=1.0, device=TRITON_DEVICE):
    """Normal random test data (times `scale`, in `dtype`) where the tiny-shape Triton tests run."""
    return (torch.randn(*shape, device=device) * scale).to(dtype)


def padded(real, width, value=1e4):
    """`real` [M, V] widened to [M, width] with `value` in the padded columns: a leak of the padding shows."""
    pad = torch.full((real.shape[0], width - real.shape[1]), value, device=real.device, dtype=real.dtype)
    return torch.cat([real, pad], 1)


def make_batch(b=6, seq_len=40, vocab=50, lengths=None):
    """[CLS] tokens [SEP] [PAD]...; lengths per row (real tokens incl. specials)."""
    lengths = lengths or [int(x) for x in torch.randint(3, seq_len + 1, (b,))]
    ids = torch.full((b, seq_len), PAD, dtype=torch.int64)
    mask = torch.zeros((b, seq_len), dtype=torch.int64)
    for r, n in enumerate(lengths):
        ids[r, :n] = torch.randint(4, vocab, (n,))
        ids[r, 0], ids[r, n - 1] = CLS, SEP
        mask[r, :n] = 1
    return ids, mask


def use_small_tiles(monkeypatch, kernels=tuple(SMALL_TILES)):
    """Set `SMALL_TILES` on the named `electra_fast.kernels` modules (all by default); returns the last module."""
    for name in kernels:
        module = importlib.import_module(f"electra_fast.kernels.{name}")
        for attr, value in SMALL_TILES[name].items():
            monkeypatch.setattr(module, attr, value)
    return module


def sized_for(device, monkeypatch):
    """A test at ELECTRA sizes on a GPU, run by its twin at tiny sizes in the interpreter: there the tiles shrunk so
    the tiny shapes still span several, with a partial last one."""
    if device == "cpu":
        use_small_tiles(monkeypatch)


# ELECTRA's small and base batches (b, seq_len, hidden) and vocabulary on a GPU; the twins' in the interpreter, with
# enough padding that slots repeat position 0.
ELECTRA_SHAPES = {"small": {"cpu": (2, 32, 8), "cuda": (128, 128, 256)},
                  "base": {"cpu": (2, 40, 12), "cuda": (64, 512, 768)}}
ELECTRA_VOCAB = {"cpu": 37, "cuda": 30522}


def masked_batch(device, shape):
    """Token ids of an ELECTRA_SHAPES batch on `device`, the first half of its rows padded from their middle, masked
    as a step masks them: (ids, attention_mask, positions, weights)."""
    b, seq_len, _ = ELECTRA_SHAPES[shape][device]
    ids = torch.randint(5, ELECTRA_VOCAB[device], (b, seq_len), device=device)
    am = torch.ones_like(ids)
    am[: b // 2, seq_len // 2:] = 0
    from electra_fast import ops

    _, pos, w = ops.mask_tokens(ids, am, mask_token_id=103, special_token_ids=(0, 1, 2, 3, 103))
    return ids, am, pos, w


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


# ---------------------------------------------------------------- the CUDA C++ backend's tests and their CPU twins

def cuda_seed(device="cuda"):
    return torch.randint(0, 2**63 - 1, (1,), device=device, dtype=torch.int64)  # as draw_seed: all 64 bits used


def by_device(device, gpu, cpu):
    """The sizes of a test on `device`: `gpu`'s on CUDA, `cpu`'s on its twin."""
    return gpu if device == "cuda" else cpu


def poison_cuda_allocator(nbytes, device):
    """Leave freed blocks of 0xFF bytes (NaN for floats, -1 for ints, True for bools) in both pools of the caching
    allocator (blocks up to 1 MiB, and larger ones), so an output element a kernel fails to write shows up
    instead of reading as a lucky zero. The kernels' outputs are allocated inside the ops, out of reach. The CPU
    has no caching allocator (and the reference writes every element it returns)."""
    if device != "cuda":
        return
    for size in (1 << 20, max(int(nbytes), 2 << 20)):
        torch.full((size,), 0xFF, dtype=torch.uint8, device="cuda")


def assert_close_to_fp64(got, want, dtype, what):
    """`got` (any dtype) against an fp64 oracle, to the precision of one rounding to `dtype` of an fp32 result."""
    rtol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    scale = want.abs().max().item() if want.numel() else 1.0
    subnormal_step = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps  # fp16 grads ~1e-8 land there
    # Computed in fp32, an element that nearly cancels keeps fp32's error of the largest terms, not a relative one:
    # softmax - onehot at a target of probability ~1 (V = 7) is off by ~eps32 * |logit| * scale.
    atol = max(rtol * 1e-2 * scale, 16 * torch.finfo(torch.float32).eps * scale, subnormal_step)
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol, msg=what)


def mlm_inputs(m, v, dtype, width=None, device="cuda"):
    """Logits [m, width] whose first v columns are the vocabulary; the padding holds NaN, which must never leak."""
    logits = torch.full((m, width or v), float("nan"), device=device, dtype=dtype)
    logits[:, :v] = (torch.randn(m, v, device=device) * 3).to(dtype)
    targets = half_at_argmax(logits[:, :v])  # `correct` exercised both ways (and its tie rule in 16-bit)
    weights = (torch.rand(m, device=device) > 0.1).float()
    return logits, targets, weights


def gumbel_draw(backend, logits, generator, temperature, v, disallow=None):
    """What the Gumbel sampler of `backend` draws from `logits[:, :v]` with `generator` as the op would take it:
    argmax(logits / T + g) with the backend's own noise, replayed (the CUDA kernel's from the seed it draws, the
    reference's from the uniforms it draws)."""
    from electra_fast.csrc import gumbel_sample as cu_gumbel
    from electra_fast.ops._backend import draw_seed, uniform
    from electra_fast.ops.gumbel_sample import disallow_ids, gumbel_scores

    m, width = logits.shape
    if backend == "cuda":
        seed = draw_seed(logits.device, generator)
        scores = logits[:, :v].float() / temperature + cu_gumbel.gumbel_noise(seed, m, width)[:, :v]
    else:
        scores = gumbel_scores(logits[:, :v], uniform((m, v), logits.device, generator), temperature)
    if disallow is not None:
        scores = disallow_ids(scores, disallow)
    return scores.argmax(1)


# ---------------------------------------------------------------- each public op with valid defaults (error tests)

def call_mlm(logits=None, targets=None, weights=None, **kw):
    from electra_fast import ops

    logits = torch.randn(3, 5) if logits is None else logits
    targets = torch.tensor([0, 4, 2]) if targets is None else targets
    return ops.mlm_loss_and_sample(logits, targets, torch.ones(3) if weights is None else weights, **kw)


def call_gumbel(logits=None, **kw):
    from electra_fast import ops

    return ops.gumbel_sample(torch.randn(3, 5) if logits is None else logits, **kw)


def call_lm_head(hidden=None, weight=None, bias=None, targets=None, weights=None, **kw):
    from electra_fast import ops

    return ops.lm_head_loss_and_sample(torch.randn(3, 4) if hidden is None else hidden,
                                       torch.randn(6, 4) if weight is None else weight,
                                       torch.randn(6) if bias is None else bias,
                                       torch.tensor([0, 5, 2]) if targets is None else targets,
                                       torch.ones(3) if weights is None else weights, **kw)



def documents(sentences, rng, longest: int) -> list:
    """`sentences` cut into consecutive documents of 1..`longest` sentences (lengths drawn from `rng`)."""
    docs, i = [], 0
    while i < len(sentences):
        n = rng.randint(1, longest)
        docs.append(sentences[i:i + n])
        i += n
    return docs


def document_text(docs) -> str:
    """Documents as `prepare` reads text: one sentence per line, a blank line after each document."""
    return "".join("".join(s + "\n" for s in d) + "\n" for d in docs)


def dataset_files(directory) -> dict:
    """Every file of a dataset (relative path -> bytes), the lock file aside."""
    out = {}
    for root, _, names in os.walk(directory):
        for name in names:
            if name != ".electra-fast.lock":
                path = os.path.join(root, name)
                with open(path, "rb") as f:
                    out[os.path.relpath(path, directory)] = f.read()
    return out
