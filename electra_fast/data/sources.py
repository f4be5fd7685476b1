"""From what the user passes as `--data` / `--tokenizer` to a prepared dataset and its tokenizer.

`--data` is a prepared dataset directory (used as it is), text files or directories (prepared once into
`<output>/data`, reused while the files, the tokenizer and the sequence length stay the same), or nothing: the
built-in corpus. Without `--tokenizer`, a WordPiece tokenizer is trained on the text first (a second pass).
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Optional, Sequence

from electra_fast.data.corpus import BUILTIN, LineReader, builtin_lines, expand_inputs
from electra_fast.data.loader import PretrainingData
from electra_fast.data.prepare import INDEX_FILE, no_text_message, prepare
from electra_fast.data.tokenizer import load_tokenizer, train_tokenizer, vocab_fingerprint
from electra_fast.errors import InputError


def is_prepared(path: str) -> bool:
    return os.path.isfile(os.path.join(path, INDEX_FILE))


class TextSource:
    """User text files, or the built-in corpus when `data` is empty or `["builtin"]`; readable several times.

    `describe()` identifies the input (paths, sizes, modification times) so a prepared cache can be recognised.
    """

    def __init__(self, data: Optional[Sequence[str]]):
        self.files = None if not data or list(data) == [BUILTIN] else expand_inputs(data)

    def describe(self) -> list:
        if self.files is None:
            return [f"{BUILTIN}:python-{sys.version_info[0]}.{sys.version_info[1]}"]
        return [[os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns] for f in self.files]

    def lines(self, on_bytes=None):
        """A fresh iterator over the lines; for files, a `LineReader` (counts non-UTF-8 lines in `.skipped`)."""
        return builtin_lines() if self.files is None else LineReader(self.files, on_bytes)

    def total_bytes(self) -> Optional[int]:
        return None if self.files is None else sum(os.path.getsize(f) for f in self.files)


def tokenizer_for(source: TextSource, tokenizer: Optional[str], vocab_size: int, lowercase: bool = True):
    """The tokenizer at `tokenizer`, or one trained on `source`."""
    if tokenizer:
        return load_tokenizer(tokenizer, lowercase)
    reader = source.lines()
    try:
        return train_tokenizer(reader, vocab_size, lowercase)
    except InputError:
        if getattr(reader, "skipped", 0):
            raise InputError(no_text_message(reader.skipped)) from None
        raise


def prepare_text(data, output_dir: str, *, tokenizer: Optional[str] = None, seq_len: int = 128,
                 vocab_size: int = 30522, lowercase: bool = True, seed: int = 12345, overwrite: bool = False,
                 shard_size: Optional[int] = None, progress: bool = True, extra_meta: Optional[dict] = None) -> dict:
    """The `prepare` command: text (or the built-in corpus) -> a dataset in `output_dir`. Returns its index."""
    source = TextSource(data)
    tok = tokenizer_for(source, tokenizer, vocab_size, lowercase)
    bar = None
    if progress and source.files is not None:
        from tqdm.auto import tqdm

        bar = tqdm(total=source.total_bytes(), unit="B", unit_scale=True, desc="preparing", dynamic_ncols=True)
    try:
        return prepare(source.lines(on_bytes=bar.update if bar else None), output_dir, tok, seq_len=seq_len,
                       seed=seed, overwrite=overwrite, sources=source.describe(), shard_size=shard_size,
                       extra_meta=extra_meta)
    finally:
        if bar is not None:
            bar.close()


def open_training_data(data: Optional[Sequence[str]], cache_dir: str, *, tokenizer: Optional[str] = None,
                       seq_len: int = 128, vocab_size: int = 30522, seed: int = 12345, is_main: bool = True,
                       barrier: Callable[[], None] = lambda: None, progress: bool = True):
    """`(PretrainingData, tokenizer)` for training; text is prepared into `cache_dir` by the main process only."""
    if data and len(data) == 1 and is_prepared(data[0]):
        dataset = PretrainingData(data[0])
        if tokenizer and vocab_fingerprint(load_tokenizer(tokenizer)) != dataset.index["vocab_hash"]:
            raise InputError(f"--tokenizer {tokenizer!r} differs from the one {data[0]!r} was prepared with: "
                             "leave --tokenizer out, or re-run `electra-fast prepare` with it")
        if dataset.seq_len != seq_len:
            raise InputError(f"{data[0]!r} was prepared with --seq-len {dataset.seq_len}, not {seq_len}: pass "
                             f"--seq-len {dataset.seq_len} or re-run `electra-fast prepare --seq-len {seq_len}`")
        return dataset, dataset.tokenizer()

    source = TextSource(data)  # checks the paths on every rank before any rank waits
    if is_main:
        wanted = {"sources": source.describe(), "seq_len": seq_len, "seed": seed,
                  "tokenizer_source": f"trained:{vocab_size}" if not tokenizer else os.path.abspath(tokenizer)}
        if tokenizer:
            wanted["vocab_hash"] = vocab_fingerprint(load_tokenizer(tokenizer))
        try:
            cached = PretrainingData(cache_dir).index if is_prepared(cache_dir) else None
        except InputError:  # a damaged cache is rebuilt
            cached = None
        if cached is None or any(cached.get(k) != v for k, v in wanted.items()):
            prepare_text(data, cache_dir, tokenizer=tokenizer, seq_len=seq_len, vocab_size=vocab_size, seed=seed,
                         overwrite=True, progress=progress, extra_meta={"tokenizer_source": wanted["tokenizer_source"]})
    barrier()
    dataset = PretrainingData(cache_dir)
    return dataset, dataset.tokenizer()
