"""`prepare` in format 2: the same bytes for every number of workers, a stopped run resumed to the bytes of an
uninterrupted one, inputs by pattern, compressed (.bz2, .zst when `zstandard` is installed) and as a streamed
Hugging Face dataset (a local one: the hub is out of reach in CI), format-1 datasets still loading, and the
options' errors naming the option."""
import bz2
import json
import os
import random

import numpy as np
import pytest

pytest.importorskip("tokenizers")

from electra_fast.cli import main  # noqa: E402
from electra_fast.data import PretrainingData, builtin_lines, prepare, read_index, save_tokenizer  # noqa: E402
from electra_fast.data import train_tokenizer  # noqa: E402
from electra_fast.data.corpus import LineReader, document_to_lines  # noqa: E402
from electra_fast.data.shards import FORMAT, FORMAT_V1  # noqa: E402
from electra_fast.errors import InputError  # noqa: E402
from helpers import dataset_files, document_text, documents  # noqa: E402

SENTENCES = [line for line in builtin_lines() if line][:2400]
SEQ_LEN, SHARD, CHUNK = 32, 37, 6000  # shards end inside documents; ~10 chunks: the workers share the input


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(iter(SENTENCES), vocab_size=600)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Documents of 1-30 sentences, one sentence per line, a blank line after each; as one file."""
    docs = documents(SENTENCES, random.Random(5), 30)
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(document_text(docs), encoding="utf-8")
    return str(path), docs


def run(corpus_path, out, tok, **kw):
    return prepare(LineReader([corpus_path]), str(out), tok, seq_len=SEQ_LEN, seed=3, shard_size=SHARD,
                   chunk_bytes=CHUNK, sources=[corpus_path], **kw)


@pytest.fixture(scope="module")
def reference(corpus, tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "data"
    index = run(corpus[0], out, tok, workers=1)
    return str(out), index


def test_workers_write_the_same_bytes(corpus, tok, reference, tmp_path):
    ref_dir, ref_index = reference
    assert ref_index["format"] == FORMAT and len(ref_index["shards"]) > 5
    run(corpus[0], tmp_path / "two", tok, workers=2)
    want, got = dataset_files(ref_dir), dataset_files(tmp_path / "two")
    assert sorted(got) == sorted(want) and "index.json" in got
    for name in want:
        assert got[name] == want[name], name
    data = PretrainingData(ref_dir)
    assert len(data) == ref_index["num_examples"]
    # Every example is a packed [CLS] A [SEP] (B [SEP]) of the corpus's tokens, within seq_len.
    batch = data.gather(np.arange(len(data)))
    lengths = batch["attention_mask"].sum(1)
    assert int(lengths.max()) <= SEQ_LEN and int(lengths.sum()) == ref_index["num_tokens"]
    assert (batch["input_ids"][:, 0] == 2).all()


def test_documents_pack_independently(corpus, tok, tmp_path):
    # The examples of the input's second half do not depend on the first half being there: each document's random
    # stream is keyed by its number, not drawn after the documents before it.
    path, docs = corpus
    half = len(docs) // 2
    tail = "".join("".join(s + "\n" for s in d) + "\n" for d in docs[half:])
    whole = prepare(LineReader([path]), str(tmp_path / "whole"), tok, seq_len=SEQ_LEN, seed=3, workers=1,
                    chunk_bytes=10 ** 9)
    # The first half's documents replaced by documents of no tokens (a control character): the same numbers.
    lines = ["\x01\n", "\n"] * half + tail.splitlines(keepends=True)
    part = prepare(iter(lines), str(tmp_path / "part"), tok, seq_len=SEQ_LEN, seed=3, workers=2, chunk_bytes=CHUNK)
    ids = lambda d, i: np.concatenate([np.load(os.path.join(d, s["name"] + "-ids.npy")) for s in i["shards"]])  # noqa
    got, want = ids(tmp_path / "part", part), ids(tmp_path / "whole", whole)
    assert len(got) < len(want) and (want[-len(got):] == got).all()


class Stop(Exception):
    pass


def stop_after(k):
    def hook(shard):
        if shard == k:
            raise Stop
    return hook


def test_resume_after_a_stop_gives_the_uninterrupted_bytes(corpus, tok, reference, tmp_path):
    out = tmp_path / "data"
    with pytest.raises(Stop):
        run(corpus[0], out, tok, workers=1, on_shard=stop_after(3))
    # The finished shards are kept, hidden: no index, no visible shards, and readers are told what happened.
    (tmp,) = [n for n in os.listdir(out) if n.startswith(".prepare-")]
    assert not [n for n in os.listdir(out) if n.startswith("shards-") or n == "index.json"]
    progress = json.loads((out / tmp / "progress.json").read_text())
    assert len(progress["shards"]) == 4 and progress["skip_examples"] > 0  # it stopped inside a document
    with pytest.raises(InputError, match="unfinished preparation.*--resume"):
        PretrainingData(str(out))
    # Other settings: refused, naming what differs.
    with pytest.raises(InputError, match=r"--resume: .* \(seed differ\).*without --resume"):
        prepare(LineReader([corpus[0]]), str(out), tok, seq_len=SEQ_LEN, seed=4, shard_size=SHARD,
                sources=[corpus[0]], workers=1, resume=True)
    resumed = []
    index = run(corpus[0], out, tok, workers=2, resume=True, on_shard=resumed.append)
    assert resumed[0] == 4  # it went on after the kept shards, not from the start
    want, got = dataset_files(reference[0]), dataset_files(out)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], name
    assert index == reference[1]
    # Without --resume a stopped run's shards are deleted and it starts over.
    with pytest.raises(Stop):
        run(corpus[0], tmp_path / "again", tok, workers=1, on_shard=stop_after(0))
    seen = []
    run(corpus[0], tmp_path / "again", tok, workers=1, on_shard=seen.append)
    assert seen[0] == 0 and not [n for n in os.listdir(tmp_path / "again") if n.startswith(".prepare-")]


def test_format_1_datasets_still_load(tok, tmp_path):
    """A dataset as earlier versions wrote it (format 1, no longer written), laid out by hand: it loads."""
    from electra_fast.data.tokenizer import special_ids, vocab_fingerprint

    out, rng = tmp_path / "v1", np.random.default_rng(0)
    (out / "shards-0a1b2c").mkdir(parents=True)
    save_tokenizer(tok, str(out / "shards-0a1b2c"))
    save_tokenizer(tok, str(out))
    ids = special_ids(tok)
    shards, total, tokens = [], 0, 0
    for k, n in enumerate((SHARD, 5)):
        lens = np.stack([rng.integers(8, SEQ_LEN + 1, n), rng.integers(3, 8, n)], axis=1).astype(np.int32)
        rows = np.full((n, SEQ_LEN), ids["pad"], dtype=np.uint16)
        for row, (length, len_a) in zip(rows, lens):
            row[:length] = rng.integers(5, tok.get_vocab_size(), length)
            row[[0, len_a - 1, length - 1]] = ids["cls"], ids["sep"], ids["sep"]
        np.save(out / "shards-0a1b2c" / f"shard-{k:05d}-ids.npy", rows)
        np.save(out / "shards-0a1b2c" / f"shard-{k:05d}-len.npy", lens)
        shards.append({"name": f"shards-0a1b2c/shard-{k:05d}", "num_examples": n})
        total, tokens = total + n, tokens + int(lens[:, 0].sum())
        if k == 0:
            first = (rows, lens)
    index = {"format": FORMAT_V1, "seq_len": SEQ_LEN, "dtype": "uint16",
             "vocab_size": tok.get_vocab_size(with_added_tokens=True), "vocab_hash": vocab_fingerprint(tok),
             "special_ids": ids, "tokenizer": "shards-0a1b2c/tokenizer.json", "seed": 3, "sources": [],
             "num_examples": total, "num_tokens": tokens, "shards": shards, "complete": True, "skipped_lines": 0}
    (out / "index.json").write_text(json.dumps(index), encoding="utf-8")
    assert read_index(str(out))["format"] == FORMAT_V1
    data = PretrainingData(str(out))
    assert len(data) == total == SHARD + 5
    batch = data.gather(np.arange(3))
    assert batch["input_ids"].shape == (3, SEQ_LEN)
    rows, lens = first
    np.testing.assert_array_equal(batch["input_ids"].numpy(), rows[:3].astype(np.int64))
    for row in range(3):
        length, len_a = lens[row]
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (SEQ_LEN - length)
        assert batch["token_type_ids"][row].tolist() == [0] * len_a + [1] * (length - len_a) + [0] * (SEQ_LEN - length)
    assert data.tokenizer().get_vocab() == tok.get_vocab()


def cli(capsys, *argv):
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.err


def arrays(directory):
    index = read_index(str(directory))
    load = lambda part: np.concatenate([np.load(os.path.join(directory, f"{s['name']}-{part}.npy"))  # noqa: E731
                                        for s in index["shards"]])
    return load("ids"), load("len")


def same_examples(a, b):
    (ids_a, len_a), (ids_b, len_b) = arrays(a), arrays(b)
    np.testing.assert_array_equal(ids_a, ids_b)
    np.testing.assert_array_equal(len_a, len_b)
    assert len(ids_a) > 20


def test_patterns_and_compressed_inputs(corpus, tok, tmp_path, capsys):
    path, docs = corpus
    save_tokenizer(tok, str(tmp_path / "tok"))
    common = ["--tokenizer", str(tmp_path / "tok"), "--seq-len", str(SEQ_LEN), "--no-progress", "--workers", "2"]
    assert cli(capsys, "prepare", path, "-o", str(tmp_path / "want"), *common)[0] == 0
    text = lambda ds: "".join("".join(s + "\n" for s in d) + "\n" for d in ds).encode()  # noqa: E731
    half = len(docs) // 2
    (tmp_path / "in").mkdir()
    with bz2.open(tmp_path / "in" / "part-0.txt.bz2", "wb") as f:
        f.write(text(docs[:half]))
    parts = [tmp_path / "in" / "part-1.txt.bz2"]
    with bz2.open(parts[0], "wb") as f:
        f.write(text(docs[half:]))
    rc, err = cli(capsys, "prepare", str(tmp_path / "in" / "part-*.txt.bz2"), "-o", str(tmp_path / "bz2"), *common)
    assert rc == 0, err
    same_examples(tmp_path / "want", tmp_path / "bz2")


def test_zst_inputs(corpus, tok, tmp_path, capsys):
    zstandard = pytest.importorskip("zstandard", reason="zstandard is not installed: .zst inputs untested")
    path, docs = corpus
    save_tokenizer(tok, str(tmp_path / "tok"))
    common = ["--tokenizer", str(tmp_path / "tok"), "--seq-len", str(SEQ_LEN), "--no-progress"]
    assert cli(capsys, "prepare", path, "-o", str(tmp_path / "want"), *common)[0] == 0
    text = "".join("".join(s + "\n" for s in d) + "\n" for d in docs).encode()
    (tmp_path / "zst").mkdir()
    (tmp_path / "zst" / "corpus.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(text))
    rc, err = cli(capsys, "prepare", str(tmp_path / "zst" / "*.zst"), "-o", str(tmp_path / "zst_out"), *common)
    assert rc == 0, err
    same_examples(tmp_path / "want", tmp_path / "zst_out")


def test_hf_dataset_streams_a_local_dataset(corpus, tok, tmp_path, capsys):
    pytest.importorskip("datasets", reason="datasets is not installed (the `datasets` extra)")
    _, docs = corpus
    save_tokenizer(tok, str(tmp_path / "tok"))
    common = ["--tokenizer", str(tmp_path / "tok"), "--seq-len", str(SEQ_LEN), "--no-progress"]
    # A record is one document, split into sentences as records of every input kind are.
    path = tmp_path / "plain.txt"
    path.write_text("".join("".join(s + "\n" for s in document_to_lines(" ".join(d))) + "\n" for d in docs))
    assert cli(capsys, "prepare", str(path), "-o", str(tmp_path / "want"), *common)[0] == 0
    (tmp_path / "hub").mkdir()
    with open(tmp_path / "hub" / "train.jsonl", "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"body": " ".join(d), "id": 1}) + "\n")
    rc, err = cli(capsys, "prepare", "--hf-dataset", str(tmp_path / "hub"), "--hf-split", "train", "--text-field",
                  "body", "-o", str(tmp_path / "got"), *common)
    assert rc == 0, err
    same_examples(tmp_path / "want", tmp_path / "got")
    rc, err = cli(capsys, "prepare", "--hf-dataset", str(tmp_path / "hub"), "-o", str(tmp_path / "x"), *common)
    assert rc == 2 and "no column 'text'" in err and "--text-field" in err
    rc, err = cli(capsys, "prepare", "--hf-dataset", str(tmp_path / "hub"), "--hf-split", "nope", "-o",
                  str(tmp_path / "x"), *common)
    assert rc == 2 and "--hf-split 'nope'" in err and len(err.strip().splitlines()) == 1


def test_option_errors_name_the_option(corpus, tmp_path, capsys):
    out = ["-o", str(tmp_path / "out"), "--no-progress"]
    for argv, pattern in [(["--workers", "0"], "--workers must be a positive int.*got 0"),
                          ([str(tmp_path / "nothing-*.txt")], r"input pattern .*nothing-\*\.txt' matches no file"),
                          (["--hf-split", "test"], "--hf-config and --hf-split need --hf-dataset"),
                          ([corpus[0], "--hf-dataset", "x"], "either input paths .* or --hf-dataset 'x'")]:
        rc, err = cli(capsys, "prepare", *argv, *out)
        assert rc == 2 and len(err.strip().splitlines()) == 1, err
        assert __import__("re").search(pattern, err), err
    assert not os.path.exists(tmp_path / "out")
