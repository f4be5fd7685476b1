"""Data pipeline: packing against the reference algorithm, shards on disk, crash safety, rank-split batches,
tokenizers against transformers' BERT tokenizer."""
import hashlib
import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("tokenizers")

from electra_fast.data import (BatchPlan, ExampleBuilder, LineReader, PretrainingData, builtin_lines,  # noqa: E402
                               load_tokenizer, open_training_data, prepare, prepare_text, read_index, save_tokenizer,
                               special_ids, train_tokenizer)
from electra_fast.errors import InputError, lock_directory  # noqa: E402
from helpers import ROOT  # noqa: E402

CLS, SEP = 2, 3


class ReferenceBuilder:
    """google-research/electra `build_pretraining_dataset.ExampleBuilder`, transcribed (token ids in, the same
    random calls on an explicit RNG, no TF): the oracle for our packing."""

    def __init__(self, max_length, rng):
        self._current_sentences, self._current_length = [], 0
        self._max_length = self._target_length = max_length
        self.random = rng

    def add_line(self, tokids):  # tokids None = blank line
        if tokids is None and self._current_length != 0:
            return self._create_example()
        tokids = tokids or []
        self._current_sentences.append(tokids)
        self._current_length += len(tokids)
        if self._current_length >= self._target_length:
            return self._create_example()
        return None

    def _create_example(self):
        if self.random.random() < 0.1:
            first_segment_target_length = 100000
        else:
            first_segment_target_length = (self._target_length - 3) // 2
        first_segment, second_segment = [], []
        for sentence in self._current_sentences:
            if (len(first_segment) == 0 or
                    len(first_segment) + len(sentence) < first_segment_target_length or
                    (len(second_segment) == 0 and
                     len(first_segment) < first_segment_target_length and
                     self.random.random() < 0.5)):
                first_segment += sentence
            else:
                second_segment += sentence
        first_segment = first_segment[:self._max_length - 2]
        second_segment = second_segment[:max(0, self._max_length - len(first_segment) - 3)]
        self._current_sentences, self._current_length = [], 0
        if self.random.random() < 0.05:
            self._target_length = self.random.randint(5, self._max_length)
        else:
            self._target_length = self._max_length
        input_ids = [CLS] + first_segment + [SEP]
        segment_ids = [0] * len(input_ids)
        if second_segment:
            input_ids += second_segment + [SEP]
            segment_ids += [1] * (len(second_segment) + 1)
        return input_ids, segment_ids


def random_documents(rng, n_docs, max_sentence=40):
    """Token-id sentences (ids >= 5) with a blank line (None) after each document; some sentences are long."""
    lines = []
    for _ in range(n_docs):
        for _ in range(rng.randint(1, 30)):
            n = rng.randint(1, max_sentence) if rng.random() > 0.05 else rng.randint(60, 200)
            lines.append([rng.randint(5, 999) for _ in range(n)])
        lines.append(None)
    return lines


@pytest.mark.parametrize("max_length", [5, 24, 128])
def test_packing_matches_reference_builder(max_length):
    seed = random.randrange(1 << 30)
    lines = random_documents(random.Random(seed), 300)
    ours, ref = ExampleBuilder(max_length, CLS, SEP, random.Random(seed)), ReferenceBuilder(max_length,
                                                                                           random.Random(seed))
    got, want = [], []
    for ids in lines + [None]:
        a, b = ours.add_line(ids), ref.add_line(ids)
        if a is not None:
            got.append(a)
        if b is not None:
            want.append(b)
    assert len(got) == len(want) > 50
    for (ids, len_a), (ref_ids, ref_segments) in zip(got, want):
        assert ids == ref_ids
        assert len(ids) <= max_length
        assert ref_segments == [0] * len_a + [1] * (len(ids) - len_a)


def test_packing_statistics():
    # 10% single-segment examples, 5% short targets: binomial checks at 5 sigma on many examples.
    rng = random.Random(random.randrange(1 << 30))
    builder = ExampleBuilder(64, CLS, SEP, rng)
    examples = []
    for _ in range(40000):
        ex = builder.add_line([rng.randint(5, 999) for _ in range(rng.randint(3, 8))])
        if ex is not None:
            examples.append(ex)
    n = len(examples)
    single = sum(len_a == len(ids) for ids, len_a in examples) / n
    short = sum(len(ids) < 48 for ids, _ in examples) / n  # a short target is U[5, 64]; < 48 needs one
    assert abs(single - 0.1) < 5 * (0.09 / n) ** 0.5
    p_short = 0.05 * (48 - 5 - 8) / 60  # target below 48 - max sentence length certainly gives < 48
    assert p_short - 5 * (p_short / n) ** 0.5 < short < 0.05 * 43 / 60 + 5 * (0.05 / n) ** 0.5


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(builtin_lines(), vocab_size=2000)


def write_text(path, docs, bad_line=None):
    with open(path, "wb") as f:
        for i, doc in enumerate(docs):
            for sentence in doc:
                f.write(sentence.encode() + b"\n")
                if bad_line is not None and i == 1:
                    f.write(bad_line + b"\n")
                    bad_line = None
            f.write(b"\n")


SENTENCES = [line for line in builtin_lines() if line][:3000]


def docs_from(sentences, size=12):
    return [sentences[i:i + size] for i in range(0, len(sentences), size)]


def test_builtin_corpus_in_reference_format():
    lines = list(builtin_lines())
    assert lines[-1] == "" and len(lines) > 3000
    docs = sum(1 for l in lines if l == "")
    assert docs > 50
    assert all("\n" not in l for l in lines)
    assert sum(len(l) for l in lines) > 300_000


def test_special_tokens_and_transformers_agreement(tok, tmp_path):
    assert special_ids(tok) == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    save_tokenizer(tok, str(tmp_path))
    from_vocab = load_tokenizer(str(tmp_path / "vocab.txt"))
    transformers = pytest.importorskip("transformers")
    bert = transformers.BertTokenizer(str(tmp_path / "vocab.txt"), do_lower_case=True)
    for text in random.sample(SENTENCES, 50):
        want = bert(text, "Second segment here.")["input_ids"]
        assert tok.encode(text, "Second segment here.").ids == want
        assert from_vocab.encode(text, "Second segment here.").ids == want


def test_prepare_roundtrip_shards_and_bad_utf8(tok, tmp_path):
    docs = docs_from(SENTENCES[:600])
    src = tmp_path / "corpus.txt"
    write_text(src, docs, bad_line=b"caf\xe9 \xff not utf-8")
    out = tmp_path / "data"
    reader = LineReader([str(src)])
    index = prepare(reader, str(out), tok, seq_len=48, seed=7, shard_size=13)
    assert index["skipped_lines"] == 1 and reader.skipped == 1
    assert index["complete"] and index["dtype"] == "uint16" and index["format"] == "electra-fast-shards/2"
    assert len(index["shards"]) == -(-index["num_examples"] // 13) > 3

    # Oracle: the reference builder run on in-memory token ids of the same sentences, one document at a time, each
    # with its own stream seeded by (seed, document number) as format 2 keys it, the examples in input order.
    expected = []
    for d, doc in enumerate(docs):
        key = int.from_bytes(hashlib.blake2b(f"7/{d}".encode(), digest_size=8).digest(), "little")
        builder = ExampleBuilder(48, CLS, SEP, random.Random(key))
        builder.start_document()
        for s in doc + [None]:
            ex = builder.add_line(None if s is None else tok.encode(s, add_special_tokens=False).ids)
            if ex is not None:
                expected.append(ex)
        ex = builder.add_line(None)
        assert ex is None  # the document ended with its blank line
    data = PretrainingData(str(out))
    assert len(data) == len(expected) == index["num_examples"]
    order = np.random.permutation(len(data))  # crosses shard boundaries in random order
    batch = data.gather(order)
    for row, i in enumerate(order):
        ids, len_a = expected[i]
        n = len(ids)
        assert batch["input_ids"][row, :n].tolist() == ids
        assert batch["input_ids"][row, n:].eq(0).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (48 - n)
        assert batch["token_type_ids"][row].tolist() == [0] * len_a + [1] * (n - len_a) + [0] * (48 - n)
    assert batch["input_ids"].dtype == torch.int64
    assert index["num_tokens"] == sum(len(ids) for ids, _ in expected)


class Crash(Exception):
    pass


def temp_dirs(out):
    return [n for n in os.listdir(out) if n.startswith(".prepare-")]


def crashing_lines(lines, after, out_dir, seen):
    for i, line in enumerate(lines):
        if i == after:
            # Streaming: shards are already on disk (in the preparation's own directory) before the input is used up.
            (tmp,) = temp_dirs(out_dir)
            seen.append(len([n for n in os.listdir(os.path.join(out_dir, tmp)) if n.endswith("-ids.npy")]))
            raise Crash
        yield line


LINES = [l for d in docs_from(SENTENCES) for l in d + [""]]
CHUNK = 4000  # characters of text a chunk: many chunks, so shards are written long before line 2500

KILLED_PREPARE = """
import os, signal, sys
from electra_fast.data import load_tokenizer, prepare
lines = open(sys.argv[1], encoding="utf-8").read().split("\\n")
def dying():
    for i, line in enumerate(lines):
        if i == 2500:
            os.kill(os.getpid(), signal.SIGKILL)
        yield line
prepare(dying(), sys.argv[2], load_tokenizer(sys.argv[3]), seq_len=32, shard_size=5, overwrite=True,
        chunk_bytes=int(sys.argv[4]))
"""


def killed_prepare(tok, out, tmp_path):
    """Run a preparation into `out` in another process and SIGKILL it halfway (shards written, input left)."""
    (tmp_path / "lines.txt").write_text("\n".join(LINES), encoding="utf-8")
    save_tokenizer(tok, str(tmp_path / "tok"))
    proc = subprocess.run([sys.executable, "-c", KILLED_PREPARE, str(tmp_path / "lines.txt"), out,
                           str(tmp_path / "tok"), str(CHUNK)], env={**os.environ, "PYTHONPATH": ROOT},
                          capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    (tmp,) = temp_dirs(out)
    assert any(n.endswith("-ids.npy") for n in os.listdir(os.path.join(out, tmp)))  # it was killed mid-way


def test_interrupted_prepare_keeps_existing_dataset(tok, tmp_path):
    out = str(tmp_path / "data")
    first = prepare(iter(LINES[:300]), out, tok, seq_len=32, shard_size=5)
    with pytest.raises(InputError, match="--overwrite"):
        prepare(iter(LINES), out, tok, seq_len=32)
    seen = []
    with pytest.raises(Crash):
        prepare(crashing_lines(LINES, 2500, out, seen), out, tok, seq_len=32, shard_size=5, overwrite=True,
                chunk_bytes=CHUNK)
    assert seen and seen[0] >= 1
    (kept,) = temp_dirs(out)  # an error keeps the finished shards, hidden, for a resume
    assert any(n.endswith("-ids.npy") for n in os.listdir(os.path.join(out, kept)))
    killed_prepare(tok, out, tmp_path)
    # The old dataset is still the one in use, and intact, after an exception and after a SIGKILL.
    assert read_index(out)["num_examples"] == first["num_examples"]
    assert len(PretrainingData(out)) == first["num_examples"]
    # A finished overwrite switches to the new data and removes the older files and the killed run's leftovers.
    new = prepare(iter(LINES), out, tok, seq_len=32, shard_size=500, overwrite=True)
    assert read_index(out)["num_examples"] == new["num_examples"] > first["num_examples"]
    (shards,) = [n for n in os.listdir(out) if n.startswith("shards-")]
    assert sorted(n for n in os.listdir(os.path.join(out, shards)) if n.endswith(".npy")) == sorted(
        f"shard-{k:05d}-{part}.npy" for k in range(len(new["shards"])) for part in ("ids", "len"))
    assert not temp_dirs(out)
    assert len(PretrainingData(out)) == new["num_examples"]


def test_killed_prepare_is_not_a_dataset(tok, tmp_path):
    out = str(tmp_path / "data")
    with pytest.raises(InputError, match="not a prepared dataset"):
        read_index(str(tmp_path))
    killed_prepare(tok, out, tmp_path)
    assert not os.path.exists(os.path.join(out, "index.json"))
    with pytest.raises(InputError, match="unfinished preparation"):
        PretrainingData(out)
    # `pretrain --data <dir>` neither trains on the leftovers nor reads the shards as text.
    with pytest.raises(InputError, match="unfinished preparation"):
        open_training_data([out], str(tmp_path / "cache"), seq_len=32, progress=False)
    index = prepare(iter(LINES[:400]), out, tok, seq_len=32)
    assert not temp_dirs(out) and len(PretrainingData(out)) == index["num_examples"]


def test_concurrent_prepare_fails_at_once(tok, tmp_path):
    out = str(tmp_path / "data")
    held = lock_directory(out, "output", "another preparation")  # as a preparation in another process holds it
    try:
        with pytest.raises(InputError, match=r"output .* is in use by another preparation \(pid \d+\): wait for it"):
            prepare(iter(LINES[:300]), out, tok, seq_len=32)
    finally:
        held.close()
    assert os.listdir(out) == [".electra-fast.lock"]  # the refused preparation wrote nothing
    prepare(iter(LINES[:300]), out, tok, seq_len=32)  # free again once the holder is gone


def test_empty_and_missing_inputs(tok, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"\n\n\xff\xfe\n")
    with pytest.raises(InputError, match=r"no text \(1 lines were not UTF-8.*iconv"):
        prepare_text([str(empty)], str(tmp_path / "out"), progress=False)  # while training a tokenizer
    (tmp_path / "blank.txt").write_bytes(b"\n \n\t\n")
    with pytest.raises(InputError, match="no text to train a tokenizer"):
        prepare_text([str(tmp_path / "blank.txt")], str(tmp_path / "out"), progress=False)
    save_tokenizer(tok, str(tmp_path / "tok"))
    with pytest.raises(InputError, match="no text.*1 lines were not UTF-8"):
        prepare_text([str(empty)], str(tmp_path / "out"), tokenizer=str(tmp_path / "tok"), progress=False)
    assert not os.path.exists(tmp_path / "out" / "index.json")
    with pytest.raises(InputError, match="does not exist"):
        prepare_text([str(tmp_path / "nope.txt")], str(tmp_path / "out"), progress=False)


@pytest.mark.parametrize("order", ["feistel-1", "permutation-0"])
@pytest.mark.parametrize("world,accum", [(1, 1), (2, 1), (2, 2), (4, 2)])
def test_batch_plan_splits_ranks_without_overlap(world, accum, order):
    n, global_batch, seed = 103, 16, random.randrange(1 << 30)
    plans = [BatchPlan(n, global_batch, world_size=world, rank=r, accum_steps=accum, seed=seed, order=order)
             for r in range(world)]
    single = BatchPlan(n, global_batch, accum_steps=world * accum, seed=seed, order=order)
    per_epoch = n // global_batch
    seen_epoch = []
    for batch in range(3 * per_epoch):
        parts = [mb for p in plans for mb in p.micro_batches(batch)]
        idx = np.concatenate([mb.indices for mb in parts])
        assert len(idx) == len(set(idx.tolist())) == global_batch  # no overlap, nothing missing
        assert sorted(idx.tolist()) == sorted(plans[0].global_indices(batch).tolist())
        # The same chunk number holds the same examples however the batch is split.
        by_chunk = {mb.chunk: mb.indices.tolist() for mb in parts}
        assert by_chunk == {mb.chunk: mb.indices.tolist() for mb in single.micro_batches(batch)}
        seen_epoch.extend(idx.tolist())
        if (batch + 1) % per_epoch == 0:  # within an epoch no example repeats
            assert len(set(seen_epoch)) == len(seen_epoch) == per_epoch * global_batch
            seen_epoch = []
    # Deterministic in (seed, batch), a different order each epoch.
    again = BatchPlan(n, global_batch, world_size=world, rank=0, accum_steps=accum, seed=seed, order=order)
    assert np.array_equal(again.global_indices(per_epoch + 2), plans[0].global_indices(per_epoch + 2))
    assert not np.array_equal(plans[0].global_indices(0), plans[0].global_indices(per_epoch))


def test_batch_plan_errors():
    with pytest.raises(InputError, match="divisible"):
        BatchPlan(100, 10, world_size=4)
    with pytest.raises(InputError, match="fewer than one batch"):
        BatchPlan(5, 8)
    with pytest.raises(InputError, match=r"order must be one of \('feistel-1', 'permutation-0'\), got 'random'"):
        BatchPlan(100, 10, order="random")


def test_loader_omits_the_mask_of_full_batches(dataset):
    from electra_fast.data import PretrainingData

    data = PretrainingData(dataset)
    every = data.gather(np.arange(len(data)))
    full = every["attention_mask"].all(1).numpy()
    assert full.any() and not full.all()  # packed data: mostly full rows, some short ones
    rows_full, rows_padded = np.nonzero(full)[0][:4], np.nonzero(~full)[0][:1]
    batch = data.gather(rows_full, omit_full_mask=True)
    assert "attention_mask" not in batch
    torch.testing.assert_close(batch["input_ids"], every["input_ids"][rows_full])
    mixed = np.concatenate([rows_full, rows_padded])
    batch = data.gather(mixed, omit_full_mask=True)
    torch.testing.assert_close(batch["attention_mask"], every["attention_mask"][mixed])
    assert "attention_mask" in data.gather(rows_full)  # the default keeps it
