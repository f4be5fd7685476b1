"""Text sources: the built-in corpus and streaming readers over user files, in the form packing reads: one sentence
per line, a blank line between documents.

Inputs, by name (`expand_inputs`, `input_kind`):
- text (`.gz`, `.bz2` and `.zst` too, decompressed as they stream; `.zst` needs the `zstandard` package): already
  in that form (the reference's `build_pretraining_dataset.py` input): one sentence per line, a blank line between
  documents.
- JSON Lines (`.jsonl`, `.ndjson`, `.json`, each also compressed as text is): one JSON object per line, its `text_field`
  one document. A line that is not a JSON object, lacks the field or holds a non-string there ends the run with an error
  naming the file and line (silently dropping records hides a wrong `--text-field`); blank lines are ignored.
- parquet files (`.parquet`, read with pyarrow) and Hugging Face `datasets` folders (`save_to_disk` output: a
  directory holding `dataset_info.json` / `state.json`, read with `datasets.load_from_disk`): each row's
  `text_field` is one document. They need the optional extra: pip install "electra-fast[datasets]".
- a Hugging Face dataset by name, or a local dataset folder or script path (`HubDataset`: `datasets.load_dataset(...,
  streaming=True)`), each row's `text_field` one document.
A path holding `*`, `?` or `[` that names no file is a pattern (`**` for any folders below), matched in sorted order.
A document of a record or row is split into sentences as the built-in corpus is (`document_to_lines`).

Everything streams (a line, or a batch of rows, at a time), so a corpus larger than RAM is fine. Text is read as
bytes and decoded line by line: a line that is not UTF-8 is skipped and counted instead of ending the run halfway.
"""
from __future__ import annotations

import bz2
import glob
import gzip
import io
import json
import os
import re
from typing import Callable, Iterator, List, Optional, Sequence

from electra_fast.errors import InputError

BUILTIN = "builtin"  # the `--data` value that names the built-in corpus
DEFAULT_TEXT_FIELD = "text"
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
DATASETS_MARKERS = ("dataset_info.json", "state.json")  # what `Dataset.save_to_disk` writes beside its arrow files
EXTRA_HINT = 'pip install "electra-fast[datasets]"'
COMPRESSED = (".gz", ".bz2", ".zst")
_ROW_BATCH = 1024

# A sentence ends at . ! or ? followed by white space and a capital, a quote or an opening bracket.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def builtin_documents() -> List[str]:
    """Python's own documentation topics (`pydoc_data.topics`, ~465k characters, shipped with CPython).

    Each topic is one document. Some distributions strip `pydoc_data`; the docstrings of a few standard modules
    stand in then, so the default run works on every Python.
    """
    try:
        from pydoc_data.topics import topics

        return [topics[k] for k in sorted(topics)]
    except ImportError:  # pragma: no cover - depends on the Python build
        import argparse
        import collections
        import inspect
        import json
        import pathlib
        import typing

        docs = []
        for module in (argparse, collections, inspect, json, pathlib, typing, os, re):
            for _, obj in sorted(vars(module).items()):
                doc = inspect.getdoc(obj)
                if doc and len(doc) > 200:
                    docs.append(doc)
        return docs


def document_to_lines(text: str) -> List[str]:
    """One document -> sentences, one per line: paragraphs are joined and split at sentence ends."""
    lines = []
    for paragraph in re.split(r"\n\s*\n", text):
        flat = " ".join(paragraph.split())
        if flat:
            lines.extend(s for s in _SENTENCE_END.split(flat) if s)
    return lines


def builtin_lines() -> Iterator[str]:
    """The built-in corpus in the input format: sentences one per line, a blank line after each document."""
    for doc in builtin_documents():
        yield from document_to_lines(doc)
        yield ""


def is_datasets_folder(path: str) -> bool:
    """True for a Hugging Face `datasets` `save_to_disk` directory (a `Dataset` or a `DatasetDict`)."""
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, m))
                                       for m in DATASETS_MARKERS + ("dataset_dict.json",))


def input_kind(path: str) -> str:
    """"datasets", "parquet", "jsonl" or "text" (`COMPRESSED` suffixes are decompressed for text and JSON Lines)."""
    if os.path.isdir(path):
        return "datasets"
    name = path.lower()
    name = name[: name.rindex(".")] if name.endswith(COMPRESSED) else name
    if name.endswith(".parquet"):
        return "parquet"
    return "jsonl" if name.endswith(JSONL_SUFFIXES) else "text"


def expand_inputs(paths: Sequence[str]) -> List[str]:
    """Inputs named by `paths`: files, and `datasets` folders kept whole; any other directory means every
    non-hidden file (and `datasets` folder) below it, in sorted order."""
    if not paths:
        raise InputError("no input given: pass text files or directories (one sentence per line, "
                         "blank line between documents)")
    files = []
    for p in _globbed(paths):
        if is_datasets_folder(p):
            files.append(p)
        elif os.path.isdir(p):
            for root, dirs, names in os.walk(p):
                dirs.sort()
                for d in [d for d in dirs if is_datasets_folder(os.path.join(root, d))]:
                    files.append(os.path.join(root, d))
                dirs[:] = [d for d in dirs if not d.startswith(".") and not is_datasets_folder(os.path.join(root, d))]
                files.extend(os.path.join(root, n) for n in sorted(names) if not n.startswith("."))
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise InputError(f"data path {p!r} does not exist: pass existing text files or directories")
    if not files:
        raise InputError(f"no files found under {list(paths)}: pass text files (one sentence per line)")
    return files


def _globbed(paths: Sequence[str]) -> List[str]:
    """`paths` with each pattern (a path that does not exist and holds `*`, `?` or `[`) replaced by its matches."""
    out = []
    for p in paths:
        if os.path.exists(p) or not glob.has_magic(p):
            out.append(p)
            continue
        matches = sorted(glob.glob(p, recursive=True))
        if not matches:
            raise InputError(f"input pattern {p!r} matches no file: check the pattern (quote it so that the shell "
                             "leaves it to electra-fast; ** matches any folders below)")
        out.extend(matches)
    return out


def input_size(path: str) -> int:
    """Bytes on disk of a file, or of all files in a `datasets` folder (the progress bar's unit)."""
    if not os.path.isdir(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(r, n)) for r, _, names in os.walk(path) for n in names)


def _import_optional(module: str, path: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise InputError(f"reading {path!r} needs the `{module.split('.')[0]}` package: {EXTRA_HINT}") from None


def _decompressed(f, path: str):
    """The decompressed byte stream of the open file `f` (itself, when `path` names no compression)."""
    name = path.lower()
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=f)
    if name.endswith(".bz2"):
        return bz2.BZ2File(f)
    if name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise InputError(f"reading {path!r} needs the `zstandard` package: pip install zstandard") from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(f))
    return f


def _document(value, path: str, where: str, field: str) -> List[str]:
    if not isinstance(value, str):
        raise InputError(f"{path!r} {where}: field {field!r} holds {type(value).__name__}, not text: pass "
                         "--text-field naming a text column")
    return document_to_lines(value)


class LineReader:
    """Streams the inputs (see the module docstring) as lines; counts (and skips) lines that are not valid UTF-8
    in `.skipped`. Re-iterable: each `iter()` reads the inputs afresh.

    `on_bytes(n)` is called as input is consumed, `n` bytes on disk at a time (compressed bytes for `.gz`; rows
    of parquet and `datasets` inputs in proportion to their size), for a progress bar in bytes.
    `text_field`: the field of a JSON Lines record / column of a table that holds the document.
    """

    def __init__(self, files: Sequence[str], on_bytes: Optional[Callable[[int], None]] = None,
                 text_field: str = DEFAULT_TEXT_FIELD):
        self.files = list(files)
        self.skipped = 0
        self.on_bytes = on_bytes
        self.text_field = text_field

    def __iter__(self) -> Iterator[str]:
        self.skipped = 0
        for path in self.files:
            kind = input_kind(path)
            if kind == "text":
                yield from self._decoded(path)
            elif kind == "jsonl":
                yield from self._jsonl(path)
            else:
                yield from self._rows(path, kind)
            yield ""  # a file ends a document even without a trailing blank line

    def _decoded(self, path: str) -> Iterator[str]:
        """The UTF-8 lines of a text or `.gz` file (a byte-order mark dropped); others are counted in `skipped`."""
        try:
            f = open(path, "rb")
        except OSError as e:
            raise InputError(f"cannot read {path!r} ({e.strerror}): check the path and its permissions") from None
        with f:
            stream = _decompressed(f, path)
            first, done = True, 0
            try:
                for raw in stream:
                    if self.on_bytes is not None:
                        now = f.tell()
                        self.on_bytes(now - done)
                        done = now
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        self.skipped += 1
                        continue
                    if first:
                        line, first = line.lstrip("\ufeff"), False
                    yield line
            except (OSError, EOFError, ValueError) as e:  # not compressed as named, truncated, or a read error
                raise InputError(f"cannot read {path!r} ({e}): check the file") from None

    def _jsonl(self, path: str) -> Iterator[str]:
        field = self.text_field
        for number, line in enumerate(self._decoded(path), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise InputError(f"{path!r} line {number} is not JSON ({e}): JSON Lines hold one object per "
                                 "line") from None
            if not isinstance(record, dict):
                raise InputError(f"{path!r} line {number} holds a {type(record).__name__}, not a JSON object: JSON "
                                 "Lines hold one object per line")
            if field not in record:
                raise InputError(f"{path!r} line {number} has no field {field!r} (it has {sorted(record)}): pass "
                                 "--text-field naming the text")
            yield from _document(record[field], path, f"line {number}", field)
            yield ""

    def _rows(self, path: str, kind: str) -> Iterator[str]:
        """Documents of a parquet file or a `datasets` folder, streamed `_ROW_BATCH` rows at a time."""
        field = self.text_field
        if kind == "parquet":
            pq = _import_optional("pyarrow.parquet", path)
            table = pq.ParquetFile(path)
            columns, num_rows = table.schema_arrow.names, table.metadata.num_rows
        else:
            datasets = _import_optional("datasets", path)
            try:
                table = datasets.load_from_disk(path)
            except (OSError, ValueError) as e:  # a damaged folder (FileNotFoundError is an OSError)
                raise InputError(f"cannot read the datasets folder {path!r} ({e}): pass a save_to_disk folder") \
                    from None
            if isinstance(table, datasets.DatasetDict):
                raise InputError(f"{path!r} holds several splits {sorted(table)}: pass one split's folder, e.g. "
                                 f"{os.path.join(path, sorted(table)[0])!r}")
            columns, num_rows = table.column_names, table.num_rows
        if field not in columns:
            raise InputError(f"{path!r} has no column {field!r} (it has {columns}): pass --text-field naming the "
                             "text")
        if kind == "parquet":
            batches = (b.column(0).to_pylist() for b in table.iter_batches(batch_size=_ROW_BATCH, columns=[field]))
        else:
            batches = (b[field] for b in table.select_columns([field]).iter(batch_size=_ROW_BATCH))
        size, row, done = input_size(path), 0, 0
        for values in batches:
            for value in values:
                row += 1
                yield from _document(value, path, f"row {row}", field)
                yield ""
            if self.on_bytes is not None:  # cumulative, so rounding never drifts from the total
                now = size * row // max(num_rows, 1)
                self.on_bytes(now - done)
                done = now


class HubDataset:
    """A Hugging Face dataset streamed by `datasets.load_dataset(name, config, split=split, streaming=True)`:
    a hub name (online), or a local dataset folder or loading script path (the same code path, offline). Each
    row's `text_field` is one document. Lines as `LineReader` gives them; `on_bytes(n)` counts the text's UTF-8
    bytes (its size on disk is unknown before the end: no total, no ETA)."""

    skipped = 0  # rows are already text

    def __init__(self, name: str, config: Optional[str] = None, split: str = "train",
                 text_field: str = DEFAULT_TEXT_FIELD, on_bytes: Optional[Callable[[int], None]] = None):
        self.name, self.config, self.split, self.text_field, self.on_bytes = name, config, split, text_field, on_bytes

    def describe(self) -> list:
        where = ([os.path.abspath(self.name), input_size(self.name)] if os.path.exists(self.name)
                 else [f"hf:{self.name}"])
        return [where + [self.config, self.split], {"text_field": self.text_field}]

    def open(self):
        """The streaming dataset; an `InputError` naming the options if it cannot be opened."""
        datasets = _import_optional("datasets", f"--hf-dataset {self.name}")
        try:
            stream = datasets.load_dataset(self.name, self.config, split=self.split, streaming=True)
        except Exception as e:  # offline, no such dataset / config / split: its message says which
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise InputError(f"cannot open --hf-dataset {self.name!r} (--hf-config {self.config!r}, --hf-split "
                             f"{self.split!r}): {first}") from None
        columns = getattr(stream, "column_names", None)
        if columns is not None and self.text_field not in columns:
            raise InputError(f"--hf-dataset {self.name!r} has no column {self.text_field!r} (it has {columns}): "
                             "pass --text-field naming the text")
        return stream

    def __iter__(self) -> Iterator[str]:
        where = f"--hf-dataset {self.name}"
        for row, record in enumerate(self.open(), 1):
            if self.text_field not in record:
                raise InputError(f"{where!r} row {row} has no column {self.text_field!r} (it has "
                                 f"{sorted(record)}): pass --text-field naming the text")
            value = record[self.text_field]
            yield from _document(value, where, f"row {row}", self.text_field)
            yield ""
            if self.on_bytes is not None:
                self.on_bytes(len(value.encode("utf-8")))
