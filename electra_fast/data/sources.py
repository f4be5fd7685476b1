"""From what the user passes as `--data` / `--tokenizer` to a prepared dataset and its tokenizer.

`--data` is a prepared dataset directory (used as it is), inputs (text, compressed text, JSON Lines, parquet,
`datasets` folders, patterns naming them: see `corpus`; prepared once into `<output>/data`, reused while the inputs,
the tokenizer and the sequence length stay the same), or nothing: the built-in corpus. `prepare_text` (the `prepare`
command) also reads a Hugging Face dataset by name (`corpus.HubDataset`). Without `--tokenizer`, a tokenizer is
trained on the text first (a second pass): WordPiece (ELECTRA, BERT), or Unigram with `trainer="unigram"`
(DeBERTa-v3).
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Optional, Sequence

from electra_fast.data.build import Progress, unfinished_tokenizer
from electra_fast.data.corpus import (BUILTIN, DEFAULT_TEXT_FIELD, HubDataset, LineReader, builtin_lines,
                                      expand_inputs, input_kind, input_size)
from electra_fast.data.prepare import INDEX_FILE, check_output, cores, no_text_message, prepare, unfinished
from electra_fast.data.tokenizer import load_tokenizer, train_tokenizer, train_unigram_tokenizer, vocab_fingerprint
from electra_fast.errors import InputError


def is_prepared(path: str) -> bool:
    return os.path.isfile(os.path.join(path, INDEX_FILE))


class TextSource:
    """User inputs (see `corpus`), or the built-in corpus when `data` is empty or `["builtin"]`; readable several
    times. `text_field`: the JSON Lines field / table column holding the documents.

    `describe()` identifies the input (paths, sizes, modification times, and the text field where it matters) so a
    prepared cache can be recognised. `hub`: a `corpus.HubDataset` to read instead of `data`.
    """

    def __init__(self, data: Optional[Sequence[str]], text_field: str = DEFAULT_TEXT_FIELD,
                 hub: Optional[HubDataset] = None):
        if hub is not None and data:
            raise InputError(f"pass either input paths ({list(data)}) or --hf-dataset {hub.name!r}, not both")
        self.hub = hub
        self.files = None if hub is not None or not data or list(data) == [BUILTIN] else expand_inputs(data)
        self.text_field = text_field

    def describe(self) -> list:
        if self.hub is not None:
            return self.hub.describe()
        if self.files is None:
            return [f"{BUILTIN}:python-{sys.version_info[0]}.{sys.version_info[1]}"]
        described = [[os.path.abspath(f), input_size(f), _mtime(f)] for f in self.files]
        if any(input_kind(f) != "text" for f in self.files):
            described.append({"text_field": self.text_field})
        return described

    def lines(self, on_bytes=None):
        """A fresh iterator over the lines; for files, a `LineReader` (counts non-UTF-8 lines in `.skipped`)."""
        if self.hub is not None:
            self.hub.on_bytes = on_bytes
            return self.hub
        return builtin_lines() if self.files is None else LineReader(self.files, on_bytes, self.text_field)

    def total_bytes(self) -> Optional[int]:
        return None if self.files is None else sum(input_size(f) for f in self.files)

    def streams(self) -> bool:
        """True for inputs whose progress is counted in bytes (files, a hub dataset), not the built-in corpus."""
        return self.files is not None or self.hub is not None


def _mtime(path: str) -> int:
    if not os.path.isdir(path):
        return os.stat(path).st_mtime_ns
    return max((os.stat(os.path.join(r, n)).st_mtime_ns for r, _, names in os.walk(path) for n in names), default=0)


def vocab_shortfall(tok, vocab_size: int) -> Optional[str]:
    """A one-line notice when a tokenizer trained for `vocab_size` tokens came out smaller (a small corpus has
    fewer pieces seen at least twice), else None."""
    got = tok.get_vocab_size(with_added_tokens=True)
    if got >= vocab_size:
        return None
    return (f"electra-fast: note: --vocab-size {vocab_size}, but the text yields only {got} tokens (pieces seen at "
            f"least twice): the tokenizer has {got}; more text gives more")


TRAINERS = {"wordpiece": train_tokenizer, "unigram": train_unigram_tokenizer}


def tokenizer_for(source: TextSource, tokenizer: Optional[str], vocab_size: int, lowercase: bool = True,
                  trainer: str = "wordpiece"):
    """The tokenizer at `tokenizer`, or one trained on `source` by `TRAINERS[trainer]` (a notice on stderr if it
    has fewer than `vocab_size` tokens)."""
    if tokenizer:
        return load_tokenizer(tokenizer, lowercase)
    return train_on(source.lines(), vocab_size, lowercase, trainer)


def train_on(reader, vocab_size: int, lowercase: bool = True, trainer: str = "wordpiece"):
    """A `TRAINERS[trainer]` tokenizer trained on a `TextSource.lines()` reader: a notice on stderr if it has
    fewer than `vocab_size` tokens; an error naming the skipped lines if none held text."""
    try:
        tok = TRAINERS[trainer](reader, vocab_size, lowercase)
    except InputError:
        if getattr(reader, "skipped", 0):
            raise InputError(no_text_message(reader.skipped)) from None
        raise
    notice = vocab_shortfall(tok, vocab_size)
    if notice:
        print(notice, file=sys.stderr)
    return tok


def prepare_text(data, output_dir: str, *, tokenizer: Optional[str] = None, seq_len: int = 128,
                 vocab_size: int = 30522, lowercase: bool = True, seed: int = 12345, overwrite: bool = False,
                 shard_size: Optional[int] = None, progress: bool = True, extra_meta: Optional[dict] = None,
                 text_field: str = DEFAULT_TEXT_FIELD, trainer: str = "wordpiece", workers: Optional[int] = None,
                 resume: bool = False, hub: Optional[HubDataset] = None, word_segmenter: Optional[str] = None) -> dict:
    """The `prepare` command: inputs (or the built-in corpus, or `hub`) -> a dataset in `output_dir` (format 2,
    packed by `workers` processes, default: the cores; see `prepare.prepare`). Returns its index.

    The inputs and `output_dir` are checked before the tokenizer is trained, so a bad path fails at once.
    `resume=True` continues a stopped preparation in `output_dir`, with the tokenizer it started with.
    `word_segmenter`: store which tokens start a word, by that segmenter (`segment.SEGMENTERS`).
    """
    source = TextSource(data, text_field, hub)
    check_output(output_dir, overwrite)
    if word_segmenter is not None:
        from electra_fast.data.segment import get_segmenter

        get_segmenter(word_segmenter)  # an unknown name or a missing package: before a tokenizer is trained
    started = unfinished_tokenizer(output_dir) if resume and not tokenizer else None
    tok = load_tokenizer(started) if started else tokenizer_for(source, tokenizer, vocab_size, lowercase, trainer)
    bar = counter = None
    if progress and source.streams():
        from tqdm.auto import tqdm

        # Bytes of input packed, with the rate and, for files (whose total is known), the time left.
        bar = tqdm(total=source.total_bytes(), unit="B", unit_scale=True, desc="preparing", dynamic_ncols=True)
        counter = Progress(bar)
    try:
        return prepare(source.lines(on_bytes=counter.on_bytes if counter else None), output_dir, tok,
                       seq_len=seq_len, seed=seed, overwrite=overwrite, sources=source.describe(),
                       shard_size=shard_size, extra_meta=extra_meta, workers=cores() if workers is None else workers,
                       resume=resume, progress=counter, word_segmenter=word_segmenter)
    finally:
        if bar is not None:
            bar.close()


def open_training_data(data: Optional[Sequence[str]], cache_dir: str, *, tokenizer: Optional[str] = None,
                       seq_len: int = 128, vocab_size: int = 30522, seed: int = 12345, is_main: bool = True,
                       barrier: Callable[[], None] = lambda: None, progress: bool = True,
                       text_field: str = DEFAULT_TEXT_FIELD, trainer: str = "wordpiece"):
    """`(PretrainingData, tokenizer)` for training; text is prepared into `cache_dir` by the main process only.
    `trainer`: the kind of tokenizer trained on text when none is given (`TRAINERS`)."""
    from electra_fast.data.loader import PretrainingData  # torch: not for `prepare`, whose start it would slow

    if data and len(data) == 1 and (is_prepared(data[0]) or unfinished(data[0])):
        dataset = PretrainingData(data[0])  # an unfinished one is an error, not text to read
        if tokenizer and vocab_fingerprint(load_tokenizer(tokenizer)) != dataset.index["vocab_hash"]:
            raise InputError(f"--tokenizer {tokenizer!r} differs from the one {data[0]!r} was prepared with: "
                             "leave --tokenizer out, or re-run `electra-fast prepare` with it")
        if dataset.seq_len != seq_len:
            raise InputError(f"{data[0]!r} was prepared with --seq-len {dataset.seq_len}, not {seq_len}: pass "
                             f"--seq-len {dataset.seq_len} or re-run `electra-fast prepare --seq-len {seq_len}`")
        return dataset, dataset.tokenizer()

    source = TextSource(data, text_field)  # checks the paths on every rank before any rank waits
    if is_main:
        wanted = {"sources": source.describe(), "seq_len": seq_len, "seed": seed,
                  "tokenizer_source": os.path.abspath(tokenizer) if tokenizer else
                  f"trained:{vocab_size}" if trainer == "wordpiece" else f"trained-{trainer}:{vocab_size}"}
        if tokenizer:
            wanted["vocab_hash"] = vocab_fingerprint(load_tokenizer(tokenizer))
        try:
            cached = PretrainingData(cache_dir).index if is_prepared(cache_dir) else None
        except InputError:  # a damaged cache is rebuilt
            cached = None
        if cached is None or any(cached.get(k) != v for k, v in wanted.items()):
            prepare_text(data, cache_dir, tokenizer=tokenizer, seq_len=seq_len, vocab_size=vocab_size, seed=seed,
                         overwrite=True, progress=progress, text_field=text_field, trainer=trainer,
                         lowercase=trainer == "wordpiece",  # BERT's WordPiece is uncased, DeBERTa-v3's Unigram cased
                         extra_meta={"tokenizer_source": wanted["tokenizer_source"]})
    barrier()
    dataset = PretrainingData(cache_dir)
    return dataset, dataset.tokenizer()
