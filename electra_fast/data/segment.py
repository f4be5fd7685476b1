"""Word segmenters for `prepare --word-segmenter NAME`: which tokens start a word, for text whose tokens carry no
word marker (WordPiece's `##` and SentencePiece's `▁` say it in the token itself, so those need nothing stored).

A segmenter maps a line to its words (character spans; white space belongs to none); a token starts a word when
it is the line's first, or when its first character lies in another word than the previous token's first character
(or in none). Tokens are located in the line by the tokenizer's offsets (characters of the original line). The
packed shards then carry one bit per token (`shards`), True for a word's first token, for `[CLS]`/`[SEP]`, and for
padding: False only marks a token that continues the word before it.

- "whitespace": a word is a run of non-space characters (so "word," is one word: punctuation joins it).
- "chars": every non-space character is a word of its own (Chinese, Japanese text taken a character at a time).
- "jieba": Chinese words by `jieba.tokenize`, dictionary only (the `jieba` package, not installed with electra-fast).
"""
from __future__ import annotations

import re
from bisect import bisect_right
from typing import Callable, List, Sequence, Tuple

from electra_fast.data.word_starts import word_starts_from_word_ids
from electra_fast.errors import InputError

SEGMENTERS = ("whitespace", "chars", "jieba")
Words = Tuple[List[int], List[int]]  # the words' first characters, and the characters just past them, in order

_RUN, _CHAR = re.compile(r"\S+"), re.compile(r"\S")


def _spans(pattern) -> Callable[[str], Words]:
    def words(line: str) -> Words:
        found = [m.span() for m in pattern.finditer(line)]  # the scan in C: a per-character loop here cost 5x
        return [a for a, _ in found], [b for _, b in found]
    return words


def _jieba_segmenter() -> Callable[[str], Words]:
    try:
        import jieba
    except ImportError:
        raise InputError("--word-segmenter jieba needs the `jieba` package: pip install jieba (or pass "
                         f"--word-segmenter one of {SEGMENTERS[:2]})") from None
    jieba.setLogLevel(60)  # its dictionary-loading chatter on stderr, once per worker

    def words(line: str) -> Words:
        starts, ends = [], []
        for word, a, b in jieba.tokenize(line, HMM=False):  # HMM off: a dictionary-only, stable cut
            if not word.isspace():
                starts.append(a)
                ends.append(b)
        return starts, ends

    return words


def get_segmenter(name: str) -> Callable[[str], Words]:
    """The segmenter called `name` (`SEGMENTERS`): line -> its words' `(starts, ends)` character offsets. An
    `InputError` naming `--word-segmenter` for an unknown name or a missing package."""
    if name not in SEGMENTERS:
        raise InputError(f"--word-segmenter must be one of {SEGMENTERS}, got {name!r}")
    if name == "jieba":
        return _jieba_segmenter()
    return _spans(_RUN if name == "whitespace" else _CHAR)


def token_starts(words: Words, offsets: Sequence) -> List[bool]:
    """Per token (its `(start, end)` character offsets in the line), True if it starts a word (see the module
    docstring): its first character lies in white space, or in another word than the previous token's."""
    starts, ends = words
    word_ids = []
    for start, _ in offsets:
        i = bisect_right(starts, start) - 1
        word_ids.append(i if i >= 0 and start < ends[i] else None)  # None: white space, a word of its own
    return word_starts_from_word_ids(word_ids)
