"""Batches of tokenized rows for the loops people already have: `transformers.Trainer`, `accelerate`, a plain
`torch.utils.data.DataLoader`.

The collator only pads (and, asked to, marks where words begin, for whole-word masking). Masking, the generator's
samples and the discriminator's labels are made inside `ElectraPretrainer`'s step, on the device, with static
shapes and no host sync; so a batch carries the original ids and no `labels`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Dict, List, Optional

import torch

from electra_fast.checks import check_int
from electra_fast.data.tokenizer import tokenizer_ids
from electra_fast.data.word_starts import word_starts_from_word_ids

_FIELDS = ("input_ids", "attention_mask", "token_type_ids")


class ElectraDataCollator:
    """Pads tokenized rows into `input_ids`, `attention_mask` and `token_type_ids`, int64 `[B, L]` tensors.

    Unlike transformers' `DataCollatorForLanguageModeling`, it does not mask tokens and makes no `labels`:
    `ElectraPretrainer` masks inside its step (fresh masks every step, static shapes, no host sync), so the
    collator hands it the original ids.

    Args:
        tokenizer: where the [PAD] id comes from: a `tokenizers.Tokenizer`, a transformers tokenizer, or a
            tokenizer.json / vocab.txt / directory (see `electra_fast.data.tokenizer.tokenizer_ids`). Only the id is
            kept.
        pad_token_id: the id padding gets; wins over the tokenizer's. One of the two is needed: there is no default.
        pad_to_multiple_of: L is the longest row rounded up to a multiple of this (8 suits tensor cores and bounds
            how many shapes `torch.compile` sees); None: the longest row.
        max_length: pad every batch to exactly this L (one shape for the whole run: one compiled graph, CUDA-graph
            capture); longer rows are an error (truncate while tokenizing). Overrides `pad_to_multiple_of`.
        word_starts: also emit `word_starts`, `[B, L]` bool, True where a token begins a word, for
            `masking="whole_word"` (`ElectraPretrainer.forward(..., word_starts=)`): from each example's `word_ids`
            (what a fast tokenizer's `encoding.word_ids()` returns: None for special tokens, which become words of
            their own) or its own `word_starts`. Padding is True (its own word, never chosen). Without this
            option the pretrainer looks word starts up from the vocabulary instead (`word_starts_from_vocab`);
            word ids follow the tokenizer's own word split, and a segmenter's words given as pre-split text
            (`is_split_into_words=True`, e.g. for Chinese).

    Each example is a mapping with `input_ids` (a list, 1-D tensor or array of ids) and optionally
    `attention_mask` (else all 1) and `token_type_ids` (else all 0) of the same length (and, with `word_starts`,
    `word_ids` or `word_starts`); other keys are ignored.
    """

    def __init__(self, tokenizer=None, *, pad_token_id: Optional[int] = None, pad_to_multiple_of: Optional[int] = 8,
                 max_length: Optional[int] = None, word_starts: bool = False):
        if pad_token_id is None:
            if tokenizer is None:
                raise ValueError("ElectraDataCollator needs tokenizer= or pad_token_id= (the id of [PAD]), got "
                                 "neither")
            pad_token_id = tokenizer_ids(tokenizer)["pad_token_id"]
        self.pad_token_id = check_int(pad_token_id, "pad_token_id", low=0)
        self.pad_to_multiple_of = check_int(pad_to_multiple_of, "pad_to_multiple_of", low=1, allow_none=True)
        self.max_length = check_int(max_length, "max_length", low=1, allow_none=True)
        if not isinstance(word_starts, bool):
            raise TypeError(f"word_starts must be a bool, got {word_starts!r}")
        self.word_starts = word_starts

    def _length(self, longest: int) -> int:
        if self.max_length is not None:
            return self.max_length
        m = self.pad_to_multiple_of or 1
        return max(-(-longest // m) * m, m)

    def __call__(self, examples: List[Mapping]) -> Dict[str, torch.Tensor]:
        if len(examples) == 0:
            raise ValueError("ElectraDataCollator got an empty list of examples: a batch needs at least one row")
        rows = []
        for i, ex in enumerate(examples):
            if not isinstance(ex, Mapping) or "input_ids" not in ex:
                what = f"keys {sorted(ex)}" if isinstance(ex, Mapping) else type(ex).__name__
                raise ValueError(f"example {i} must be a mapping with 'input_ids' (and optionally 'attention_mask', "
                                 f"'token_type_ids'), got {what}")
            row = {k: torch.as_tensor(ex[k], dtype=torch.long) for k in _FIELDS if ex.get(k) is not None}
            n = row["input_ids"].numel()
            for k, t in row.items():
                if t.dim() != 1 or t.numel() != n:
                    raise ValueError(f"example {i}: {k} must be 1-D with as many entries as input_ids ({n}), got "
                                     f"shape {tuple(t.shape)}")
            if self.max_length is not None and n > self.max_length:
                raise ValueError(f"example {i} has {n} tokens, more than max_length={self.max_length}: truncate "
                                 "while tokenizing (truncation=True, max_length=...) or raise max_length")
            if self.word_starts:
                row["word_starts"] = self._row_word_starts(ex, i, n)
            rows.append(row)
        b, length = len(rows), self._length(max(r["input_ids"].numel() for r in rows))
        batch = {"input_ids": torch.full((b, length), self.pad_token_id, dtype=torch.long),
                 "attention_mask": torch.zeros(b, length, dtype=torch.long),
                 "token_type_ids": torch.zeros(b, length, dtype=torch.long)}
        if self.word_starts:
            batch["word_starts"] = torch.ones(b, length, dtype=torch.bool)
        for i, row in enumerate(rows):
            n = row["input_ids"].numel()
            batch["attention_mask"][i, :n] = 1  # replaced by the example's own mask where it has one
            for k, t in row.items():
                batch[k][i, :n] = t
        return batch

    @staticmethod
    def _row_word_starts(ex: Mapping, i: int, n: int) -> torch.Tensor:
        if ex.get("word_starts") is not None:
            starts = torch.as_tensor(ex["word_starts"], dtype=torch.bool)
        elif ex.get("word_ids") is not None:
            starts = torch.tensor(word_starts_from_word_ids(list(ex["word_ids"])), dtype=torch.bool)
        else:
            raise ValueError(f"example {i} has neither 'word_ids' nor 'word_starts', which word_starts=True needs: "
                             "add enc.word_ids() of a fast tokenizer's encoding to each row (or leave word_starts "
                             "out: ElectraPretrainer then looks word starts up from the vocabulary)")
        if starts.dim() != 1 or starts.numel() != n:
            raise ValueError(f"example {i}: word_ids / word_starts must be 1-D with as many entries as input_ids "
                             f"({n}), got shape {tuple(starts.shape)}")
        return starts


__all__ = ["ElectraDataCollator"]
