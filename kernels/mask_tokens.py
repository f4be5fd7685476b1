"""Masking for RTD in one launch: positions, weights and masked ids (docs/algorithm.md#masking).

Design. A program holds ROWS whole rows in registers (BLOCK_L = next power of two >= L; L <= 512 in ELECTRA;
several short rows per program so each thread keeps 8 elements) and reads the ids, the attention mask and the
special ids once. The real-slot count is the reference's `K_b = max(1, min(N, round(num_tokens * mask_prob)))` in
float32 with round half to even (torch.round, tf.round). Randomness is Philox keyed by a seed read from a device
tensor (`draw_seed`), counters `row * L + column` or `row * N + slot`, so draws follow `torch.manual_seed` and
CUDA-graph replays draw fresh ones.
- Without replacement (default): each candidate gets a random 63-bit key, 63 - log2(BLOCK_L) Philox bits above its
  column index (distinct keys, so exactly K_b win; a tie of the random parts, which the column would break, has
  probability ~L^2 / 2^55 per row); non-candidates get INT64_MAX. The K_b-th smallest key is found bit by bit from
  the top (63 counting passes over registers: no sort network, no shared-memory traffic beyond the row sums); the
  winners, the keys up to it, are a uniform K_b-subset of the candidates. A winner's slot is the running count of
  winners, so positions come out ascending, as in the torch reference.
- With replacement (the reference's draw): slot j < K_b takes the r-th candidate, r = floor(C * u32 / 2^32) from
  one Philox word (multiply-shift: bias below C / 2^32). The output row is the lookup table: each candidate's
  column is stored at its rank, the slots read their draw back after a barrier, then the row is overwritten with
  the masked ids. No loop over slots; positions stay in draw order, as the reference's.
- Whole words (WHOLE_WORD, docs/algorithm.md#whole-word-masking): words begin where word_starts says, at column 0,
  at every non-candidate and after one (so a special token or padding is a word of its own, and a word is a
  candidate when its start is). A word lives at its start column, keyed by that column's key as above. Word ids are
  the running count of starts; the last token of each word (the next column starts one: the rule read one column
  on) writes its column to a scratch entry at [row, word id], which gives each start its word's length.
  Then rounds of "take the smallest-key candidate word that fits in the capacity left" (two row reductions each)
  while any row of the program has one: the same words as the walk in key order that skips a word that does not
  fit. The starts write taken-or-not to the scratch, every token reads its word's; slots as without replacement.
Each real slot becomes [MASK] with probability 0.85 (a 24-bit uniform from another Philox word, as torch.rand).
Every output element is written: the whole row of ids, and every slot (padding: position 0, weight 0).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from electra_fast.ops._contract import MASK_REPLACE_PROB

from ._common import loadable, pow2
from .mlm_loss_and_sample import _uniform

ROW_TILE = 2048    # rows per program * BLOCK_L: several short rows share a program
# Whole words hold more per element (keys, lengths, scratch addresses): 4 elements a thread keeps them in registers.
WHOLE_WORD_ROW_TILE = 1024
NUM_WARPS = 8      # 8 row elements per thread


@triton.jit
def _round_half_even(x):
    """Non-negative fp32 -> int32, ties to even (floor and the exact fraction: no libdevice needed)."""
    down = tl.floor(x)
    frac = x - down
    r = down.to(tl.int32)
    return r + ((frac > 0.5) | ((frac == 0.5) & (r % 2 == 1))).to(tl.int32)


@triton.jit
def _candidates(ids_ptr, mask_ptr, special_ptr, offs, valid, S):
    """Real tokens that are not special ids (False outside `valid`)."""
    ids = tl.load(ids_ptr + offs, mask=valid, other=0)
    real = tl.load(mask_ptr + offs, mask=valid, other=0) != 0
    special = ids != ids  # all False, the shape of offs
    for i in range(S):  # a handful of ids: scalar loads, no [.., S] tile
        special |= ids == tl.load(special_ptr + i)
    return real & (special == 0)


@triton.jit
def _word_start(starts_ptr, ids_ptr, mask_ptr, special_ptr, offs, in_row, col2, cand, S):
    """Where words begin: word_starts, column 0, every non-candidate and the token after one (a special token or
    padding is always a word of its own: docs/contracts.md)."""
    after = in_row & (col2 > 0)
    after_bad = after & (_candidates(ids_ptr, mask_ptr, special_ptr, offs - 1, after, S) == 0)
    return (tl.load(starts_ptr + offs, mask=in_row, other=0) != 0) | (col2 == 0) | (cand == 0) | after_bad


@triton.jit
def _mask_tokens_kernel(ids_ptr, mask_ptr, special_ptr, seed_ptr, out_ptr, positions_ptr, weights_ptr, starts_ptr,
                        B, L, N, S, mask_prob, mask_token_id, ROWS: tl.constexpr, BLOCK_L: tl.constexpr,
                        LOG2_BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr,
                        KEEP_BELOW: tl.constexpr, REPLACEMENT: tl.constexpr, WHOLE_WORD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    col = tl.arange(0, BLOCK_L)
    offs = row[:, None] * L + col[None, :]
    in_row = (row[:, None] < B) & (col[None, :] < L)
    real = tl.load(mask_ptr + offs, mask=in_row, other=0) != 0
    cand = _candidates(ids_ptr, mask_ptr, special_ptr, offs, in_row, S)
    n_cands = tl.sum(cand.to(tl.int32), 1)
    k = _round_half_even(tl.sum(real.to(tl.int32), 1).to(tl.float32) * mask_prob)
    k = tl.minimum(tl.maximum(k, 1), N)
    seed = tl.load(seed_ptr)
    slot = tl.arange(0, BLOCK_N)
    slot_ok = (row[:, None] < B) & (slot[None, :] < N)
    at = row[:, None] * N + slot[None, :]
    if REPLACEMENT:
        k = tl.where(n_cands > 0, k, 0)  # no candidate, nothing to draw (the reference divides 0 by 0 there)
        # The output row doubles as scratch: the c-th candidate's column goes to [row, c], where the draws read it.
        rank = tl.cumsum(cand.to(tl.int32), 1) - 1
        tl.store(out_ptr + row[:, None] * L + rank, tl.broadcast_to(col[None, :], [ROWS, BLOCK_L]), mask=cand)
        tl.debug_barrier()  # other threads' stores become visible (bar.sync orders global memory in the CTA)
        r_pos, r_keep, _, _ = tl.randint4x(seed, row[:, None] * N + slot[None, :])
        r = ((r_pos.to(tl.int64) & 0xFFFFFFFF) * n_cands[:, None]) >> 32
        drawn = slot[None, :] < k[:, None]
        pos = tl.load(out_ptr + row[:, None] * L + r, mask=drawn, other=0).to(tl.int64)
        tl.store(positions_ptr + at, pos, mask=slot_ok)
        tl.store(weights_ptr + at, drawn.to(tl.float32), mask=slot_ok)
        to_mask = drawn & (_uniform(r_keep) < KEEP_BELOW)
        tl.debug_barrier()  # every draw has read the scratch before the ids overwrite it
        tl.store(out_ptr + offs, tl.load(ids_ptr + offs, mask=in_row, other=0), mask=in_row)
        tl.debug_barrier()
        # A position drawn by several slots is [MASK] if any of them says so, as the reference's scatter.
        tl.store(out_ptr + row[:, None] * L + pos, tl.full([ROWS, BLOCK_N], mask_token_id, out_ptr.dtype.element_ty),
                 mask=to_mask)
    elif WHOLE_WORD:
        col2 = tl.broadcast_to(col[None, :], [ROWS, BLOCK_L])
        start = _word_start(starts_ptr, ids_ptr, mask_ptr, special_ptr, offs, in_row, col2, cand, S)
        # A word ends where the next column starts one (the same rule, one column on).
        nxt = in_row & (col2 + 1 < L)
        last = (nxt == 0) | (cand == 0) | (tl.load(starts_ptr + offs + 1, mask=nxt, other=0) != 0) | \
            (_candidates(ids_ptr, mask_ptr, special_ptr, offs + 1, nxt, S) == 0)
        # Scans other than sums would be simpler but run element by element in the interpreter (the CPU tests), so
        # word-level values go through scratch: the output row, at [row, word id] (written whole below), gets each
        # word's end column, which its start reads back.
        scratch = out_ptr + row[:, None] * L + tl.cumsum(start.to(tl.int32), 1) - 1
        tl.store(scratch, col2.to(out_ptr.dtype.element_ty), mask=in_row & last)
        tl.debug_barrier()  # other threads' stores become visible (bar.sync orders global memory in the CTA)
        length = tl.load(scratch, mask=in_row & start, other=0).to(tl.int32) - col2 + 1
        # A non-candidate is a word of its own, so a word is a candidate when its start is.
        word = in_row & start & cand
        r_hi, r_lo, _, _ = tl.randint4x(seed, offs)
        bits = ((r_hi.to(tl.int64) & 0x7FFFFFFF) << 32) | (r_lo.to(tl.int64) & 0xFFFFFFFF)
        # Only words still open keep their key (MAX otherwise); a taken word's length turns negative, its mark.
        left = k
        key = tl.where(word & (length <= left[:, None]), ((bits >> LOG2_BLOCK_L) << LOG2_BLOCK_L) | col2,
                       0x7FFFFFFFFFFFFFFF)
        best = tl.min(key, 1)
        # Rounds of "take the smallest-key word that fits" while any row of the program has one (keys are distinct:
        # `best` names one column per row).
        while tl.min(best, 0) < 0x7FFFFFFFFFFFFFFF:
            take = (key == best[:, None]) & (best < 0x7FFFFFFFFFFFFFFF)[:, None]
            left -= tl.sum(tl.where(take, length, 0), 1)
            length = tl.where(take, -length, length)
            key = tl.where(take | (length > left[:, None]), 0x7FFFFFFFFFFFFFFF, key)
            best = tl.min(key, 1)
        tl.debug_barrier()  # every thread has read the scratch before it is rewritten
        # Reloaded rather than held through the rounds (registers).
        start = _word_start(starts_ptr, ids_ptr, mask_ptr, special_ptr, offs, in_row, col2, cand, S)
        scratch = out_ptr + row[:, None] * L + tl.cumsum(start.to(tl.int32), 1) - 1
        tl.store(scratch, (length < 0).to(out_ptr.dtype.element_ty), mask=in_row & start)
        tl.debug_barrier()
        chosen = tl.load(scratch, mask=in_row, other=0) != 0
        tl.debug_barrier()  # read before the masked ids overwrite it
        _, _, r_keep, _ = tl.randint4x(seed, offs)
        keep = _uniform(r_keep) < KEEP_BELOW
        k = tl.sum(chosen.to(tl.int32), 1)
        slot_of = tl.cumsum(chosen.to(tl.int32), 1) - 1
        tl.store(positions_ptr + row[:, None] * N + slot_of, col2.to(tl.int64), mask=chosen)
        real_slot = slot[None, :] < k[:, None]
        tl.store(positions_ptr + at, tl.zeros([ROWS, BLOCK_N], tl.int64), mask=slot_ok & ~real_slot)
        tl.store(weights_ptr + at, real_slot.to(tl.float32), mask=slot_ok)
        ids = tl.load(ids_ptr + offs, mask=in_row, other=0)
        tl.store(out_ptr + offs, tl.where(chosen & keep, mask_token_id, ids).to(out_ptr.dtype.element_ty),
                 mask=in_row)
    else:
        k = tl.minimum(k, n_cands)
        r_hi, r_lo, r_keep, _ = tl.randint4x(seed, offs)
        keep = _uniform(r_keep) < KEEP_BELOW
        bits = ((r_hi.to(tl.int64) & 0x7FFFFFFF) << 32) | (r_lo.to(tl.int64) & 0xFFFFFFFF)
        key = tl.where(cand, ((bits >> LOG2_BLOCK_L) << LOG2_BLOCK_L) | col[None, :], 0x7FFFFFFFFFFFFFFF)
        # The K_b-th smallest key, bit by bit from the top: the largest value with fewer than K_b keys below it.
        kth = tl.zeros([ROWS], tl.int64)
        for i in range(63):
            trial = kth + (tl.full([ROWS], 1, tl.int64) << (62 - i))
            kth = tl.where(tl.sum((key < trial[:, None]).to(tl.int32), 1) < k, trial, kth)
        chosen = key <= tl.where(k > 0, kth, -1)[:, None]
        # The winners' running count is their slot: positions ascending. Then the padding slots.
        slot_of = tl.cumsum(chosen.to(tl.int32), 1) - 1
        tl.store(positions_ptr + row[:, None] * N + slot_of, tl.broadcast_to(col[None, :], [ROWS, BLOCK_L]),
                 mask=chosen)
        real_slot = slot[None, :] < k[:, None]
        tl.store(positions_ptr + at, tl.zeros([ROWS, BLOCK_N], tl.int64), mask=slot_ok & ~real_slot)
        tl.store(weights_ptr + at, real_slot.to(tl.float32), mask=slot_ok)
        # The ids reloaded (from L1/L2) rather than held in registers through the selection.
        ids = tl.load(ids_ptr + offs, mask=in_row, other=0)
        tl.store(out_ptr + offs, tl.where(chosen & keep, mask_token_id, ids).to(out_ptr.dtype.element_ty),
                 mask=in_row)


@torch.library.custom_op("electra_fast::mask_tokens_triton", mutates_args=())
def _mask_tokens_op(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: torch.Tensor,
                    seed: torch.Tensor, mask_prob: float, mask_token_id: int, n: int,
                    replacement: bool, word_starts: Optional[torch.Tensor] = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, seq_len = input_ids.shape
    masked = torch.empty_like(input_ids)
    positions = input_ids.new_empty((b, n), dtype=torch.int64)
    weights = input_ids.new_empty((b, n), dtype=torch.float32)
    if b:
        block_l = pow2(seq_len)
        tile = ROW_TILE if word_starts is None else WHOLE_WORD_ROW_TILE
        rows = pow2(tile // block_l, hi=pow2(b))
        # An empty tensor may have a null pointer; with S = 0 the kernel reads none of it.
        specials = special_ids if special_ids.numel() else input_ids
        starts = input_ids if word_starts is None else loadable(word_starts)  # unread without WHOLE_WORD
        _mask_tokens_kernel[(triton.cdiv(b, rows),)](
            input_ids, loadable(attention_mask), specials, seed, masked, positions, weights, starts, b, seq_len, n,
            special_ids.numel(), mask_prob, mask_token_id, ROWS=rows, BLOCK_L=block_l,
            LOG2_BLOCK_L=block_l.bit_length() - 1, BLOCK_N=pow2(n),
            KEEP_BELOW=MASK_REPLACE_PROB,
            REPLACEMENT=replacement, WHOLE_WORD=word_starts is not None, num_warps=NUM_WARPS)
    return masked, positions, weights


@_mask_tokens_op.register_fake
def _(input_ids, attention_mask, special_ids, seed, mask_prob, mask_token_id, n, replacement, word_starts=None):
    b = input_ids.shape[0]
    return (torch.empty_like(input_ids), input_ids.new_empty((b, n), dtype=torch.int64),
            input_ids.new_empty((b, n), dtype=torch.float32))


def mask_tokens(input_ids, attention_mask, special_ids, seed, mask_prob: float, mask_token_id: int, n: int,
                replacement: bool, word_starts: Optional[torch.Tensor] = None):
    """Backend entry (see electra_fast.ops.mask_tokens): contiguous int ids and attention mask (any dtype, nonzero
    = real) [B, L], special ids [S] in the ids' dtype, a 1-element int64 seed tensor, N slots per row, and for
    whole-word masking contiguous bool `word_starts [B, L]` (with replacement False).
    Returns (masked_ids like input_ids, positions [B, N] int64, weights [B, N] fp32)."""
    return _mask_tokens_op(input_ids, attention_mask, special_ids, seed, float(mask_prob), int(mask_token_id),
                           int(n), bool(replacement), word_starts)
