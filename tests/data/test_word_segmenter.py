"""`prepare --word-segmenter`: the segmenters' words, the per-token word-start bits through packing, the shards and
the loader (oracle: each word tokenized alone, packed by the reference builder per document, seeded as format 2
documents), the same bytes for 1 and 2 workers, datasets without bits unchanged, and the errors naming the option."""
import hashlib
import os
import random
import re
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("tokenizers")

from electra_fast.cli import main  # noqa: E402
from electra_fast.data import PretrainingData, builtin_lines, prepare, save_tokenizer, train_tokenizer  # noqa: E402
from electra_fast.data.corpus import LineReader  # noqa: E402
from electra_fast.data.segment import get_segmenter, token_starts  # noqa: E402
from electra_fast.data.tokenizer import special_ids  # noqa: E402
from electra_fast.errors import InputError  # noqa: E402
from helpers import document_text, documents  # noqa: E402

SENTENCES = [line for line in builtin_lines() if line][:700]
SEQ_LEN, SEED = 24, 5


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(iter(SENTENCES), vocab_size=400)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    docs = documents(SENTENCES, random.Random(2), 12)
    path = tmp_path_factory.mktemp("seg") / "corpus.txt"
    path.write_text(document_text(docs), encoding="utf-8")
    return str(path), docs


def per_character(line, word_of):
    """Oracle: a character loop giving each character its word's number (-1 for white space); `word_of(inside)`
    says whether a non-space character begins a new word (`inside`: the character before it is not a space)."""
    out, number, inside = [], -1, False
    for ch in line:
        if ch.isspace():
            out.append(-1)
            inside = False
        else:
            number += word_of(inside)
            inside = True
            out.append(number)
    return out


def numbered(line, words):
    starts, ends = words
    out = [-1] * len(line)
    for number, (a, b) in enumerate(zip(starts, ends)):
        out[a:b] = [number] * (b - a)
    return out


def test_segmenters_words():
    for line in ["  ab c,d   \u00e9f\tg\u3000\u4e2d\u6587 ", "x", "", "   "]:
        assert numbered(line, get_segmenter("whitespace")(line)) == per_character(line, lambda inside: not inside)
        assert numbered(line, get_segmenter("chars")(line)) == per_character(line, lambda inside: 1)


def whitespace_oracle(tok, line):
    """(ids, starts) of a line, each white-space word tokenized alone: its first token starts a word, the rest
    do not."""
    ids, starts = [], []
    for word in line.split():
        pieces = tok.encode(word, add_special_tokens=False).ids
        ids += pieces
        starts += [True] + [False] * (len(pieces) - 1)
    return ids, starts


def test_token_starts_match_words_tokenized_alone(tok):
    seg = get_segmenter("whitespace")
    some_false = 0
    for line in SENTENCES[:200]:
        enc = tok.encode(line, add_special_tokens=False)
        ids, want = whitespace_oracle(tok, line)
        assert enc.ids == ids  # BERT's pre-tokenizer splits at white space too: the same tokens
        got = token_starts(seg(line), enc.offsets)
        assert got == want, line
        some_false += want.count(False)
    assert some_false > 100
    # chars: every token begins at a character of its own, so every token starts a word.
    enc = tok.encode(SENTENCES[0], add_special_tokens=False)
    assert all(token_starts(get_segmenter("chars")(SENTENCES[0]), enc.offsets))


def test_word_starts_round_trip_and_workers(corpus, tok, tmp_path):
    path, docs = corpus
    common = dict(seq_len=SEQ_LEN, seed=SEED, shard_size=29, chunk_bytes=3000, sources=[path],
                  word_segmenter="whitespace")
    index = prepare(LineReader([path]), str(tmp_path / "one"), tok, workers=1, **common)
    prepare(LineReader([path]), str(tmp_path / "two"), tok, workers=2, **common)
    assert index["word_starts"] is True and index["word_segmenter"] == "whitespace" and len(index["shards"]) > 3
    for root, _, names in os.walk(tmp_path / "one"):
        for name in names:
            if name != ".electra-fast.lock":
                rel = os.path.relpath(os.path.join(root, name), tmp_path / "one")
                assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes(), rel
    assert any(n.endswith("-wst.npy") for n in os.listdir(tmp_path / "one" / index["shards"][0]["name"].split("/")[0]))

    # Oracle: the reference builder on (id, starts-a-word) pairs, [CLS]/[SEP] pairs with True, per document seeded
    # by (seed, document number) as format 2 documents are.
    ids = special_ids(tok)
    from electra_fast.data import ExampleBuilder

    expected = []
    for d, doc in enumerate(docs):
        key = int.from_bytes(hashlib.blake2b(f"{SEED}/{d}".encode(), digest_size=8).digest(), "little")
        builder = ExampleBuilder(SEQ_LEN, (ids["cls"], True), (ids["sep"], True), random.Random(key))
        builder.start_document()
        for s in doc + [None]:
            ex = builder.add_line(None if s is None else list(zip(*whitespace_oracle(tok, s))))
            if ex is not None:
                expected.append(ex[0])
    data = PretrainingData(str(tmp_path / "one"))
    assert len(data) == len(expected) == index["num_examples"]
    order = np.random.default_rng(0).permutation(len(data))
    batch = data.gather(order)
    assert batch["word_starts"].dtype == torch.bool and batch["word_starts"].shape == (len(data), SEQ_LEN)
    for row, i in enumerate(order):
        pairs = expected[i]
        n = len(pairs)
        assert batch["input_ids"][row, :n].tolist() == [p[0] for p in pairs]
        assert batch["word_starts"][row, :n].tolist() == [p[1] for p in pairs]
        assert batch["word_starts"][row, n:].all()  # padding: True
    assert not batch["word_starts"].all()

    # Without a segmenter: no bits stored, none delivered.
    plain = prepare(LineReader([path]), str(tmp_path / "plain"), tok, seq_len=SEQ_LEN, seed=SEED, workers=1)
    assert "word_starts" not in plain and "word_starts" not in PretrainingData(str(tmp_path / "plain")).gather([0])
    shard_dir = tmp_path / "plain" / plain["shards"][0]["name"].split("/")[0]
    assert not [n for n in os.listdir(shard_dir) if n.endswith("-wst.npy")]


class FakeJieba:
    """Stands in for `jieba` (not installed here): a line's words are runs of up to 2 non-space characters, and
    white space, given as `jieba.tokenize` gives them: (word, start, end)."""

    @staticmethod
    def setLogLevel(level):
        pass

    @staticmethod
    def tokenize(line, HMM=True):
        for m in re.finditer(r"\s+|\S{1,2}", line):
            yield m.group(), m.start(), m.end()


def test_jieba_words_mark_tokens(tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "jieba", FakeJieba)
    line = "\u4e2d\u6587\u5206\u8bcd \u6d4b\u8bd5\u4e00"  # BERT's normaliser makes each CJK character a token
    enc = tok.encode(line, add_special_tokens=False)
    assert len(enc.ids) == 7
    # Words: 2 + 2 characters, a space, 2 + 1: each word's first token starts it.
    assert token_starts(get_segmenter("jieba")(line), enc.offsets) == [True, False, True, False, True, False, True]


def test_segmenter_errors_name_the_option(corpus, tok, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "jieba", None)  # as if not installed: the import fails
    with pytest.raises(InputError, match=r"--word-segmenter jieba needs the `jieba` package: pip install jieba"):
        prepare(LineReader([corpus[0]]), str(tmp_path / "j"), tok, seq_len=SEQ_LEN, word_segmenter="jieba")
    save_tokenizer(tok, str(tmp_path / "tok"))
    rc = main(["prepare", corpus[0], "-o", str(tmp_path / "x"), "--tokenizer", str(tmp_path / "tok"), "--no-progress",
               "--word-segmenter", "spaces"])
    err = capsys.readouterr().err
    assert rc == 2 and re.search(r"--word-segmenter must be one of \('whitespace', 'chars', 'jieba'\), got 'spaces'",
                                 err), err
    assert not os.path.exists(tmp_path / "x" / "index.json")
