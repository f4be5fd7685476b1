"""Masking for replaced-token detection (docs/algorithm.md#masking; reference `pretrain/pretrain_helpers.py::mask`).

Static shapes are the point: `positions [B, N]` and `weights [B, N]` with N fixed by the sequence length, so no
boolean indexing and no host sync. Slots past a row's real count are padding (position 0, weight 0).
The real count is the reference's, `K_b = max(1, min(N, round(num_tokens_b * mask_prob)))` rounded half to even in
float32 (in float64, rows of 190/350/390 tokens at L=512 would get one slot fewer than the reference gives).
By default positions are drawn uniformly among candidates without replacement, as the top-K of i.i.d. uniform
scores, and the real ones are sorted ascending for memory locality. `replacement=True` is the reference's draw:
K_b i.i.d. uniform candidates per row (duplicates possible), in draw order. With `word_starts`, whole words are
drawn (docs/algorithm.md#whole-word-masking): the candidate words in a uniformly random order, each taken while it
fits in what is left of K_b, as BERT's create_pretraining_data.py walks them.
"""
from __future__ import annotations

import struct
from typing import Optional, Sequence, Union

import torch

from electra_fast.checks import check_int, check_number
from electra_fast.ops._backend import draw_seed, resolve, uniform
from electra_fast.ops._checks import INT_DTYPES, check_same_device, check_shape, check_tensor
from electra_fast.ops._contract import MASK_REPLACE_PROB


def num_slots(seq_len: int, mask_prob: float) -> int:
    """The static number of prediction slots per sequence: int((mask_prob + 0.005) * L), at least 1, at most L."""
    return max(1, min(seq_len, int((mask_prob + 0.005) * seq_len)))


def as_float32(x: float) -> float:
    """`x` rounded to the nearest float32 (what TensorFlow makes of the Python float `mask_prob`)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def real_slots(num_tokens: torch.Tensor, mask_prob: float, n: int) -> torch.Tensor:
    """The reference's `K_b = max(1, min(N, round(num_tokens * mask_prob)))`, all in float32, round half to even.

    Both factors are float32 values, so their product is the correctly rounded float32 product whatever precision
    a backend multiplies in."""
    return torch.round(num_tokens.float() * as_float32(mask_prob)).long().clamp(1, n)


def whole_words(candidate, word_starts, scores, k, n: int):
    """The tokens of the whole words the walk takes, `[B, L]` bool (docs/algorithm.md#whole-word-masking).

    The walk (candidate words in increasing score order, each taken when its length fits in the capacity left,
    skipped otherwise) takes the same words as n rounds of "take the lowest-score candidate word that fits": a word
    the walk skips did not fit at its turn, and the capacity only shrinks. Each taken word uses at least one of the
    K_b <= n slots, so n rounds take them all; a round with nothing that fits changes nothing."""
    seq_len = candidate.shape[1]
    col = torch.arange(seq_len, device=candidate.device)
    # Continuation pieces before a row's first start form a word at column 0; a non-candidate (special token,
    # padding) is a word of its own, so the token after one begins a word whatever word_starts says there.
    after_bad = torch.nn.functional.pad(~candidate[:, :-1], (1, 0), value=False)
    starts = word_starts | (col == 0) | ~candidate | after_bad
    word = starts.long().cumsum(1) - 1  # word id of every token; word-level tensors below are indexed by it
    length = torch.zeros_like(word).scatter_add_(1, word, torch.ones_like(word))
    bad = torch.zeros_like(word).scatter_add_(1, word, (~candidate).long())
    # A word's score is its start column's (one nonzero term per word: the sum is exact).
    key = torch.zeros_like(scores).scatter_add_(1, word, torch.where(starts, scores, 0.0))
    fits_at_all = (length > 0) & (bad == 0)
    taken = torch.zeros_like(fits_at_all)
    left = k.clone()
    for _ in range(n):
        eligible = fits_at_all & ~taken & (length <= left[:, None])
        best = torch.where(eligible, key, 2.0).argmin(1, keepdim=True)  # scores < 1; ties: the first word
        accept = eligible.gather(1, best)
        taken = taken.scatter(1, best, accept | taken.gather(1, best))
        left = left - torch.where(accept, length.gather(1, best), 0).squeeze(1)
    return taken.gather(1, word)


def mask_tokens_reference(input_ids, attention_mask, special_ids, scores, keep_draw, mask_prob: float,
                          mask_token_id: int, replacement: bool = False, word_starts=None):
    """Plain PyTorch masking. Uniform draws in [0, 1): `keep_draw [B, N]` decides [MASK] per slot; `scores` are
    `[B, L]` candidate scores (without replacement; with `word_starts` a word's score is its start column's) or
    `[B, N]` slot draws (with replacement)."""
    n = keep_draw.shape[1]
    real = attention_mask != 0
    candidate = real & ~torch.isin(input_ids, special_ids)
    n_cands = candidate.sum(1)
    k = real_slots(real.sum(1), mask_prob, n)
    slot = torch.arange(n, device=input_ids.device)
    if word_starts is not None:
        chosen = whole_words(candidate, word_starts, scores, k, n)
        seq_len = input_ids.shape[1]
        col = torch.arange(seq_len, device=input_ids.device)
        # The chosen columns ascending, then the rest (keyed past L); the fill (<= K_b <= N) are the real slots.
        ordered = torch.where(chosen, col, seq_len + col).sort(dim=1).values[:, :n]
        valid = slot < chosen.sum(1, keepdim=True)
        positions = torch.where(valid, ordered, 0)
    elif replacement:
        # As the reference: K_b draws even from fewer candidates; none from a row without any (the reference's
        # sampling distribution is 0/0 there).
        valid = (slot < k[:, None]) & (n_cands[:, None] > 0)
        # The r-th candidate of the row, r uniform in [0, C): the first column whose candidate count exceeds r.
        rank = (scores.double() * n_cands[:, None]).long().clamp(max=(n_cands[:, None] - 1).clamp(min=0))
        drawn = torch.searchsorted(candidate.long().cumsum(1), rank, right=True)
        positions = torch.where(valid, drawn, 0)
    else:
        valid = slot < torch.minimum(k, n_cands)[:, None]
        top = torch.where(candidate, scores, -1.0).topk(n, dim=1).indices
        # Sort real positions ascending, padding last (keyed past L), then point padding slots at position 0.
        key = torch.where(valid, top, input_ids.shape[1] + slot)
        positions = torch.where(valid, key.sort(dim=1).values, 0)
    to_mask = valid & (keep_draw < MASK_REPLACE_PROB)
    # scatter_add: padding slots (position 0) add 0; a position drawn twice is [MASK] if either slot says so.
    hit = torch.zeros_like(input_ids).scatter_add_(1, positions, to_mask.to(input_ids.dtype)) > 0
    masked_ids = torch.where(hit, torch.full_like(input_ids, mask_token_id), input_ids)
    return masked_ids, positions, valid.float()


@torch.library.custom_op("electra_fast::mask_tokens", mutates_args=())
def _mask_tokens_op(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: torch.Tensor,
                    scores: torch.Tensor, keep_draw: torch.Tensor, mask_prob: float, mask_token_id: int,
                    replacement: bool, word_starts: Optional[torch.Tensor] = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return mask_tokens_reference(input_ids, attention_mask, special_ids, scores, keep_draw, mask_prob, mask_token_id,
                                 replacement, word_starts)


@_mask_tokens_op.register_fake
def _(input_ids, attention_mask, special_ids, scores, keep_draw, mask_prob, mask_token_id, replacement,
      word_starts=None):
    b, n = keep_draw.shape
    return (torch.empty_like(input_ids), input_ids.new_empty((b, n), dtype=torch.int64),
            input_ids.new_empty((b, n), dtype=torch.float32))


def mask_tokens(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *, mask_prob: float = 0.15,
                mask_token_id: int, special_token_ids: Union[Sequence[int], torch.Tensor],
                max_predictions: Optional[int] = None, replacement: bool = False,
                generator: Optional[torch.Generator] = None, backend: Optional[str] = None,
                word_starts: Optional[torch.Tensor] = None):
    """Choose the positions to predict and mask them.

    Args:
        input_ids: `[B, L]` int64/int32 token ids.
        attention_mask: `[B, L]`, nonzero = real token (default: all real).
        mask_prob: fraction of real tokens to predict, in (0, 1). 0.15 for small/base, 0.25 for large.
        mask_token_id: id of `[MASK]`.
        special_token_ids: ids never chosen (`[CLS]`, `[SEP]`, `[MASK]`, `[PAD]`, ...).
        max_predictions: slots per row N; default `int((mask_prob + 0.005) * L)`.
        replacement: False (default): K_b distinct positions. True: the reference's draw, K_b positions drawn
            independently (with replacement: a position may fill several slots), in draw order.
        generator: torch RNG for the draws (default: the global one, so `torch.manual_seed` applies).
        word_starts: optional `[B, L]` bool, True where a token begins a word (a continuation piece False): whole-word
            masking (docs/algorithm.md#whole-word-masking). A word is a start and the False tokens after it (pieces
            before a row's first start form a word at column 0); a non-candidate (special token, padding) is always
            a word of its own, and the token after it begins one, whatever `word_starts` says there. The candidate
            words are walked in a uniformly random order, each taken while its length fits in what is left of K_b,
            skipped otherwise. Needs `replacement=False`.

    Returns:
        `(masked_ids [B, L], positions [B, N] int64, weights [B, N] float32)`. Row b has K_b =
        `max(1, min(N, round(sum(mask_b) * mask_prob)))` real slots (weight 1) first, the product rounded in float32
        as the reference does; without replacement at most as many as the row has candidates, with replacement none
        in a row without candidates. Then padding slots (position 0, weight 0). Without replacement the real slots
        are sorted by position. Each real slot becomes `[MASK]` with probability 0.85, otherwise keeps its token.
        With `word_starts` the real slots are the chosen words' tokens, sorted by position: as many as the walk
        fills, at most K_b.
    """
    check_tensor(input_ids, "input_ids", ndim=2, dtypes=INT_DTYPES)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    check_tensor(attention_mask, "attention_mask", ndim=2)
    check_shape(attention_mask, "attention_mask", input_ids.shape, "same as input_ids")
    check_same_device({"input_ids": input_ids, "attention_mask": attention_mask})
    mask_prob = check_number(mask_prob, "mask_prob", low=0, high=1, low_open=True, high_open=True)
    check_int(mask_token_id, "mask_token_id", low=0, error=TypeError)
    if not isinstance(replacement, bool):
        raise TypeError(f"replacement must be a bool, got {replacement!r}")
    if word_starts is not None:
        check_tensor(word_starts, "word_starts", ndim=2, dtypes=(torch.bool,))
        check_shape(word_starts, "word_starts", input_ids.shape, "same as input_ids")
        check_same_device({"input_ids": input_ids, "word_starts": word_starts})
        if replacement:
            raise ValueError("replacement must be False with word_starts (whole words are drawn without "
                             "replacement), got replacement=True")
    b, seq_len = input_ids.shape
    if seq_len == 0:
        raise ValueError(f"input_ids must have a non-empty sequence dimension, got shape {tuple(input_ids.shape)}")
    n = num_slots(seq_len, mask_prob) if max_predictions is None else \
        check_int(max_predictions, "max_predictions", low=1, high=seq_len)
    device = input_ids.device
    if isinstance(special_token_ids, torch.Tensor):
        special = special_token_ids.to(device=device, dtype=input_ids.dtype).reshape(-1)
    else:
        special = torch.tensor(list(special_token_ids), dtype=input_ids.dtype, device=device)
    _, kernel = resolve("mask_tokens", backend, device)
    if kernel is not None:
        return kernel(input_ids.contiguous(), attention_mask.contiguous(), special, draw_seed(device, generator),
                      float(mask_prob), mask_token_id, n, replacement,
                      None if word_starts is None else word_starts.contiguous())
    scores = uniform((b, n if replacement else seq_len), device, generator)
    keep_draw = uniform((b, n), device, generator)
    return _mask_tokens_op(input_ids, attention_mask, special, scores, keep_draw, float(mask_prob), mask_token_id,
                           replacement, word_starts)
