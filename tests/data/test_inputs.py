"""Inputs of `prepare` (and of `pretrain --data`): each kind prepares exactly the examples of the same documents
as plain text; bad records are one-line errors naming file and line; output paths and argument errors answer
before torch is imported or a tokenizer trained; the documented `prepare` -> `pretrain` flow works with defaults."""
import gzip
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("tokenizers")

from electra_fast.cli import main  # noqa: E402
from electra_fast.data import sources  # noqa: E402
from electra_fast.data.corpus import EXTRA_HINT, LineReader  # noqa: E402
from electra_fast.errors import InputError  # noqa: E402

WORDS = [w for w in "the a of model token text data run layer batch step mask word shard field column record row "
         "document sentence vocabulary piece train loss rate quick brown fox jumps over lazy dog".split()]


def random_documents(rng, n_docs=40):
    """Documents as lists of paragraphs, each a list of sentences: capitalised, ending in . or ?, no inner stop."""
    docs = []
    for _ in range(n_docs):
        paragraphs = []
        for _ in range(rng.randint(1, 3)):
            sentences = []
            for _ in range(rng.randint(1, 6)):
                words = [rng.choice(WORDS) for _ in range(rng.randint(2, 18))]
                sentences.append(words[0].capitalize() + " " + " ".join(words[1:]) + rng.choice(".?"))
            paragraphs.append(sentences)
        docs.append(paragraphs)
    return docs


def as_record(doc, rng):
    """The document as one text: paragraphs split by a blank line, sentences by a space or a newline."""
    return "\n\n".join("".join(s + rng.choice([" ", "\n"]) for s in p).strip() for p in doc)


def write_plain(path, docs):
    """The reference input format: one sentence per line, a blank line after each document."""
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write("".join(s + "\n" for p in doc for s in p) + "\n")


def write_jsonl(path, rows, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n\n")  # blank lines between records are ignored


def prepared(directory):
    """(ids, lengths, index) of a prepared dataset, all shards concatenated."""
    with open(os.path.join(directory, "index.json")) as f:
        index = json.load(f)
    load = lambda suffix: np.concatenate([np.load(os.path.join(directory, f"{s['name']}-{suffix}.npy"))  # noqa: E731
                                          for s in index["shards"]])
    return load("ids"), load("len"), index


def run_cli(capsys, *argv):
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def make_input(kind, tmp_path, docs, rng):
    """The documents in the input `kind`, under the column/field "body"; returns the paths to pass."""
    rows = [{"id": i, "body": as_record(d, rng)} for i, d in enumerate(docs)]
    if kind in ("jsonl", "jsonl.gz"):
        path = tmp_path / f"corpus.{kind}"
        write_jsonl(path, rows, gzip.open if kind.endswith(".gz") else open)
        return [str(path)]
    if kind == "gz":
        write_plain(tmp_path / "plain.txt", docs)
        with open(tmp_path / "plain.txt", "rb") as f, gzip.open(tmp_path / "corpus.txt.gz", "wb") as g:
            g.write(f.read())
        return [str(tmp_path / "corpus.txt.gz")]
    if kind == "parquet":
        pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed (the `datasets` extra)")
        pq = pytest.importorskip("pyarrow.parquet")
        table = pa.table({"id": [r["id"] for r in rows], "body": [r["body"] for r in rows]})
        half = len(rows) // 2  # two files in a directory, several row groups each: read in order
        os.mkdir(tmp_path / "pq")
        pq.write_table(table.slice(0, half), tmp_path / "pq" / "part-0.parquet", row_group_size=7)
        pq.write_table(table.slice(half), tmp_path / "pq" / "part-1.parquet", row_group_size=7)
        return [str(tmp_path / "pq")]
    datasets = pytest.importorskip("datasets", reason="datasets is not installed (the `datasets` extra)")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    return [str(tmp_path / "hf")]


@pytest.mark.parametrize("kind", ["gz", "jsonl", "jsonl.gz", "parquet", "datasets"])
def test_each_input_kind_prepares_as_plain_text(kind, tmp_path, capsys):
    rng = random.Random(random.randrange(1 << 30))
    docs = random_documents(rng)
    write_plain(tmp_path / "oracle.txt", docs)
    inputs = make_input(kind, tmp_path, docs, rng)
    field = [] if kind == "gz" else ["--text-field", "body"]
    # What a tokenizer is trained on: the same sentences (WordPiece training itself is not deterministic: ids of
    # equally frequent pieces vary from run to run, so the packing is compared under one fixed tokenizer).
    text = lambda reader: [line.strip() for line in reader if line.strip()]  # noqa: E731
    assert text(sources.TextSource(inputs, "body").lines()) == text(LineReader([str(tmp_path / "oracle.txt")]))
    assert run_cli(capsys, "train-tokenizer", str(tmp_path / "oracle.txt"), "-o", str(tmp_path / "tok"),
                   "--vocab-size", "200")[0] == 0
    common = ["--tokenizer", str(tmp_path / "tok"), "--seed", str(rng.randrange(1000)), "--no-progress"]
    assert run_cli(capsys, "prepare", str(tmp_path / "oracle.txt"), "-o", str(tmp_path / "want"), *common)[0] == 0
    rc, out, err = run_cli(capsys, "prepare", *inputs, "-o", str(tmp_path / "got"), *field, *common)
    assert rc == 0, err
    want_ids, want_len, want_index = prepared(tmp_path / "want")
    got_ids, got_len, got_index = prepared(tmp_path / "got")
    assert got_index["seq_len"] == want_index["seq_len"] == 64  # the tiny preset's, as `pretrain` defaults to
    assert len(want_ids) > 10
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_array_equal(got_len, want_len)


def test_text_field_is_part_of_the_cache_key(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "Alpha beta.", "body": "Gamma delta."}])
    a, b = sources.TextSource([str(tmp_path / "a.jsonl")]), sources.TextSource([str(tmp_path / "a.jsonl")], "body")
    assert a.describe() != b.describe()
    assert [l for l in a.lines() if l] == ["Alpha beta."] and [l for l in b.lines() if l] == ["Gamma delta."]


def test_bad_json_lines_name_file_and_line(tmp_path, capsys):
    cases = [(b'{"text": "Fine."}\n{"text": "Broken"\n', r"line 2 is not JSON"),
             (b'{"text": "Fine."}\n\n["a list"]\n', r"line 3 holds a list, not a JSON object"),
             (b'{"body": "No text field."}\n', r"line 1 has no field 'text' \(it has \['body'\]\).*--text-field"),
             (b'{"text": null}\n', r"line 1: field 'text' holds NoneType, not text")]
    for i, (content, pattern) in enumerate(cases):
        path = tmp_path / f"bad{i}.jsonl"
        path.write_bytes(content)
        rc, _, err = run_cli(capsys, "prepare", str(path), "-o", str(tmp_path / f"out{i}"), "--no-progress")
        assert rc == 2 and len(err.strip().splitlines()) == 1, err
        assert str(path) in err
        assert __import__("re").search(pattern, err), err
        assert not os.path.exists(tmp_path / f"out{i}" / "index.json")


def test_non_utf8_lines_are_counted_in_every_line_format(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "First one. Second one."}\n\xff\xfe\n{"text": "Third."}\n')
    with gzip.open(tmp_path / "b.txt.gz", "wb") as f:
        f.write(b"Fourth.\ncaf\xe9\nFifth.\n")
    reader = LineReader([str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt.gz")])
    assert list(reader) == ["First one.", "Second one.", "", "Third.", "", "", "Fourth.\n", "Fifth.\n", ""]
    assert reader.skipped == 2


def test_unreadable_and_unusable_tables(tmp_path):
    (tmp_path / "fake.txt.gz").write_bytes(b"not gzip at all\n")
    with pytest.raises(InputError, match=r"cannot read .*fake.txt.gz"):
        list(LineReader([str(tmp_path / "fake.txt.gz")]))
    datasets = pytest.importorskip("datasets", reason="datasets is not installed (the `datasets` extra)")
    rows = datasets.Dataset.from_list([{"body": "Some text."}])
    rows.save_to_disk(str(tmp_path / "one"))
    with pytest.raises(InputError, match=r"has no column 'text' \(it has \['body'\]\)"):
        list(LineReader([str(tmp_path / "one")]))
    datasets.DatasetDict({"train": rows, "validation": rows}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(InputError, match=r"several splits \['train', 'validation'\].*dict/train"):
        list(LineReader([str(tmp_path / "dict")]))


def test_missing_optional_packages_say_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    os.mkdir(tmp_path / "hf")
    (tmp_path / "hf" / "state.json").write_text("{}")
    for module in ("datasets", "pyarrow", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, module, None)  # `import` now raises ImportError, installed or not
    for path in ("t.parquet", "hf"):
        with pytest.raises(InputError, match=EXTRA_HINT.replace("[", r"\[").replace("]", r"\]")):
            list(LineReader([str(tmp_path / path)]))


def test_output_is_checked_before_the_tokenizer_is_trained(tmp_path, monkeypatch):
    (tmp_path / "corpus.txt").write_text("Some text here.\n")
    (tmp_path / "file").write_text("x")
    trained = []
    monkeypatch.setattr(sources, "train_tokenizer", lambda *a, **k: trained.append(1))
    with pytest.raises(InputError, match="Not a directory"):
        sources.prepare_text([str(tmp_path / "corpus.txt")], str(tmp_path / "file" / "data"), progress=False)
    with pytest.raises(InputError, match="is a file"):
        sources.prepare_text([str(tmp_path / "corpus.txt")], str(tmp_path / "file"), progress=False)
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "index.json").write_text("{}")
    with pytest.raises(InputError, match="already holds a prepared dataset.*--overwrite"):
        sources.prepare_text([str(tmp_path / "corpus.txt")], str(tmp_path / "done"), progress=False)
    assert trained == []


def test_help_argument_errors_and_bad_output_do_not_import_torch(tmp_path):
    (tmp_path / "file").write_text("x")
    script = f"""
import contextlib, io, sys
from electra_fast.cli import main
codes = []
for argv in (["--help"], ["prepare", "--help"], ["prepare"], ["pretrain", "--steps", "x"],
             ["prepare", "-o", {str(tmp_path / 'file' / 'data')!r}], ["train-tokenizer", "-o", {str(tmp_path / 'file')!r}]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            codes.append(main(argv))
        except SystemExit as e:
            codes.append(e.code)
    if argv[-1].endswith(("data", "file")):
        assert "cannot write to --output" in err.getvalue(), err.getvalue()
print(codes, "torch" in sys.modules)
"""
    # (Not timed: that is for benchmarks. Without torch the answer takes well under a second.)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["[0,", "0,", "2,", "2,", "2,", "2]", "False"]


def test_vocab_size_shortfall_is_told(tmp_path, capsys):
    docs = random_documents(random.Random(random.randrange(1 << 30)), 20)
    write_plain(tmp_path / "corpus.txt", docs)
    rc, _, err = run_cli(capsys, "train-tokenizer", str(tmp_path / "corpus.txt"), "-o", str(tmp_path / "tok"),
                         "--vocab-size", "8000")
    assert rc == 0
    got = len((tmp_path / "tok" / "vocab.txt").read_text().splitlines())
    assert got < 8000
    assert err.strip().splitlines() == [line for line in err.strip().splitlines() if "--vocab-size 8000" in line]
    assert f"--vocab-size 8000, but the text yields only {got} tokens" in err
    rc, _, err = run_cli(capsys, "train-tokenizer", str(tmp_path / "corpus.txt"), "-o", str(tmp_path / "tok2"),
                         "--vocab-size", str(got))
    assert rc == 0 and "note" not in err  # as many as asked for: nothing to say


def test_documented_prepare_then_pretrain_flow_with_defaults(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_plain(tmp_path / "corpus.txt", random_documents(random.Random(random.randrange(1 << 30)), 60))
    rc, out, err = run_cli(capsys, "prepare", "corpus.txt", "-o", "data", "--no-progress")
    assert rc == 0, err
    rc, out, err = run_cli(capsys, "pretrain", "--data", "data", "--steps", "2", "--no-export", "--no-progress",
                           "--threads", "1")
    assert rc == 0, err
    assert "done: 2 steps" in out
