"""Text sources: the built-in corpus and streaming line readers over user files.

The input format is the reference's (`build_pretraining_dataset.py`): one sentence per line, a blank line between
documents. Files are read as bytes and decoded line by line, so a corpus larger than RAM streams and a line that
is not UTF-8 is skipped and counted instead of ending the run halfway.
"""
from __future__ import annotations

import os
import re
from typing import Iterator, List, Sequence

from electra_fast.errors import InputError

BUILTIN = "builtin"  # the `--data` value that names the built-in corpus

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


def expand_inputs(paths: Sequence[str]) -> List[str]:
    """Files named by `paths` (a directory means every non-hidden file below it, in sorted order)."""
    if not paths:
        raise InputError("no input given: pass text files or directories (one sentence per line, "
                         "blank line between documents)")
    files = []
    for p in paths:
        if os.path.isdir(p):
            for root, dirs, names in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                files.extend(os.path.join(root, n) for n in sorted(names) if not n.startswith("."))
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise InputError(f"data path {p!r} does not exist: pass existing text files or directories")
    if not files:
        raise InputError(f"no files found under {list(paths)}: pass text files (one sentence per line)")
    return files


class LineReader:
    """Streams decoded lines from files; counts (and skips) lines that are not valid UTF-8.

    `on_bytes(n)` is called with the size of each raw line, for a progress bar in bytes.
    """

    def __init__(self, files: Sequence[str], on_bytes=None):
        self.files = list(files)
        self.skipped = 0
        self.on_bytes = on_bytes

    def __iter__(self) -> Iterator[str]:
        self.skipped = 0
        for path in self.files:
            try:
                f = open(path, "rb")
            except OSError as e:
                raise InputError(f"cannot read {path!r} ({e.strerror}): check the path and its permissions") from None
            with f:
                first = True
                for raw in f:
                    if self.on_bytes is not None:
                        self.on_bytes(len(raw))
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        self.skipped += 1
                        continue
                    if first:
                        line, first = line.lstrip("\ufeff"), False
                    yield line
            yield ""  # a file ends a document even without a trailing blank line
