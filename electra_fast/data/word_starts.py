"""Word boundaries for whole-word masking (docs/algorithm.md#whole-word-masking): which tokens begin a word.

Two sources, both "True where a token begins a word":

- the vocabulary (`word_starts_from_vocab`): a `[V]` table the step indexes with the token ids on the device
  (`table[input_ids]`, no host work per batch). Subword vocabularies mark word boundaries in the token's text:
  WordPiece marks continuations (`##ing`), SentencePiece marks word starts (`▁the`), byte-level BPE marks the
  space before a word (`Ġthe`). Special and added tokens are words of their own.
- the tokenizer's own word split (`word_starts_from_word_ids`), from a fast tokenizer's `word_ids()`: exact for any
  pre-tokenizer, and the way to carry a segmenter's words (text given as pre-split words, `is_split_into_words=True`)
  into the batches, e.g. for Chinese, whose vocabularies mark no word boundary.

This module imports torch only where it returns a tensor: the workers of `prepare` may use the list helpers.
"""
from __future__ import annotations

import warnings
from typing import List, Optional, Sequence

WORDPIECE_PREFIX = "##"  # continuation marker (BERT's WordPiece)
SENTENCEPIECE_MARK = "\u2581"  # "▁": word-start marker (SentencePiece, tokenizers' Metaspace)
BYTE_LEVEL_MARK = "\u0120"  # "Ġ": the space before a word (GPT-2 / RoBERTa byte-level BPE)


def word_starts_from_word_ids(word_ids: Sequence[Optional[int]]) -> List[bool]:
    """`[L]` flags from a fast tokenizer's `encoding.word_ids()`: True where the word index changes, and at tokens
    of no word (None: [CLS], [SEP], other special tokens), which are words of their own."""
    starts, prev = [], None
    for w in word_ids:
        starts.append(w is None or w != prev)  # the first token's word differs from "no word" too
        prev = w
    return starts


def _vocabulary(tokenizer) -> tuple:
    """`(size, {token: id}, ids of special/added tokens, the WordPiece continuation prefix or None)`."""
    from electra_fast.data.tokenizer import open_tokenizer

    tok = open_tokenizer(tokenizer)
    backend = getattr(tok, "backend_tokenizer", None)  # a transformers fast tokenizer wraps a tokenizers.Tokenizer
    if hasattr(tok, "all_special_ids"):  # transformers, fast or slow
        vocab = dict(tok.get_vocab())
        special = set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}))
        size = max(len(tok), max(vocab.values(), default=-1) + 1)
        model = backend.model if backend is not None else None
        prefix = getattr(model, "continuing_subword_prefix", None) if type(model).__name__ == "WordPiece" else None
        if model is None and hasattr(tok, "wordpiece_tokenizer"):  # slow BertTokenizer
            prefix = WORDPIECE_PREFIX
        return size, vocab, special, prefix
    if not hasattr(tok, "get_added_tokens_decoder"):
        raise TypeError("tokenizer must be a tokenizers.Tokenizer, a transformers tokenizer or a path (tokenizer.json, "
                        f"vocab.txt, or a directory holding one), got {type(tok).__name__}")
    vocab = tok.get_vocab(with_added_tokens=True)
    size = max(tok.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)
    model = tok.model
    prefix = model.continuing_subword_prefix if type(model).__name__ == "WordPiece" else None
    # Added tokens are cut out of the text before the model runs: each is a word of its own.
    return size, vocab, set(tok.get_added_tokens_decoder()), prefix


def vocab_word_starts(tokenizer) -> List[bool]:
    """`word_starts_from_vocab` as a list of bools (no torch)."""
    size, vocab, special, prefix = _vocabulary(tokenizer)
    continuation = prefix is not None  # a WordPiece model names its continuation prefix
    if prefix is None:  # else the marker most of the vocabulary carries
        ordinary = [t for t, i in vocab.items() if i not in special]
        counts = {m: sum(t.startswith(m) for t in ordinary)
                  for m in (WORDPIECE_PREFIX, SENTENCEPIECE_MARK, BYTE_LEVEL_MARK)}
        mark = max(counts, key=counts.get)
        prefix, continuation = (mark, mark == WORDPIECE_PREFIX) if counts[mark] else (None, False)
    starts = [True] * size  # ids without a token and special ids: words of their own
    if prefix is None:
        warnings.warn(f"the vocabulary ({size} tokens) marks no word boundary (no WordPiece '{WORDPIECE_PREFIX}', "
                      f"SentencePiece '{SENTENCEPIECE_MARK}' or byte-level '{BYTE_LEVEL_MARK}' tokens): every token "
                      "is its own word, so whole-word masking masks single tokens. Mark words at prepare time (a "
                      "segmenter, e.g. for Chinese) and pass them as word_starts per batch", stacklevel=3)
        return starts
    for token, i in vocab.items():
        if i not in special:
            starts[i] = not token.startswith(prefix) if continuation else token.startswith(prefix)
    return starts


def word_starts_from_vocab(tokenizer):
    """`[V]` bool tensor: True where token id `v` begins a word, for whole-word masking (`masking="whole_word"`:
    the step reads `table[input_ids]`).

    `tokenizer`: a `tokenizers.Tokenizer`, a transformers tokenizer (fast or slow), or a path (tokenizer.json,
    vocab.txt, or a directory holding one). Word boundaries come from the vocabulary's markers: WordPiece's
    continuation prefix (`##`, or the model's own), SentencePiece's `▁` and byte-level BPE's `Ġ` before a word.
    Special and added tokens, and ids the vocabulary leaves unused, are True (words of their own). A vocabulary with
    no marker at all makes every token its own word, with a warning saying so.

    Byte-level BPE: punctuation glued to a word (`hello,`) counts as part of it, and the first word of a text
    encoded without a leading space follows the special token before it; `word_starts_from_word_ids` splits as the
    tokenizer does.
    """
    import torch

    return torch.tensor(vocab_word_starts(tokenizer), dtype=torch.bool)


__all__ = ["word_starts_from_vocab", "word_starts_from_word_ids", "vocab_word_starts", "WORDPIECE_PREFIX",
           "SENTENCEPIECE_MARK", "BYTE_LEVEL_MARK"]
