"""Text -> packed pretraining examples in memory-mapped shards (reference `build_pretraining_dataset.py`).

Packing follows the reference `ExampleBuilder`: sentences of one document accumulate until they reach the target
length, then become `[CLS] A [SEP] B [SEP]` (10% of the time a single segment `[CLS] A [SEP]`), padded to
`seq_len`; 5% of the time the next target length is drawn uniformly from [5, seq_len] so short inputs are seen too.

The layout on disk and the two formats are in `shards`. `prepare(..., workers=N)` (what `electra-fast prepare`
runs, N = the cores by default) writes format 2: N processes tokenize and pack, each document with its own random
stream, and the bytes written are the same for every N; it can `resume` a stopped run (see `build`, which also
says how the worker processes and the tokenizer's threads share the cores). Without `workers`, `prepare` packs in
this process with one random stream over the whole input (format 1, what earlier versions wrote: the reference's
builder run over the same token ids reproduces it example for example).

Cores: N worker processes (started with `spawn`: `tokenizers` switches its threads off in a forked child) each
tokenize with `cores // N` threads, one thread (`TOKENIZERS_PARALLELISM=false`) at the default N = cores: on 2 cores
two single-threaded tokenizers did more than one `encode_batch` on two threads, whose threads scale sub-linearly,
and each worker packs its own chunks beside the other's tokenizing. This process reads the input and writes the
shards. With one worker (or one chunk of input) everything runs here, a thread tokenizing the next chunk while this
one packs. A script that calls `prepare(workers=N > 1)` needs the usual `if __name__ == "__main__":` guard, as any
code starting processes with `spawn` does.

Memory is bounded by the shards and the workers, not the corpus: the input streams through (a line at a time,
then chunks of about 1 MB of whole documents per worker, a few in flight), one shard is buffered, and shards are
memory-mapped on reading.

Atomic: one preparation at a time holds the directory (`errors.lock_directory`; another fails at once); it writes
into a hidden `.prepare-RUN/`, renames that to `shards-NAME/` when all input is packed, and only then switches
`index.json` (one rename) to it, and deletes the older data. A kill at any point leaves the previous dataset in
use, or none: never an index naming missing or half-written shards. Leftovers of a stopped run are deleted by the
next preparation (format 2 keeps them for `resume=True`), and a directory holding only such leftovers is reported
as unfinished, not read as text.
"""
from __future__ import annotations

import os
import random
from typing import Callable, Iterable, List, Optional

import numpy as np

from electra_fast.checks import check_int
from electra_fast.data.build import Progress, build, cores
from electra_fast.data.packing import CHUNK_BYTES, SHORT_TARGET_PROB, SINGLE_SEGMENT_PROB, ExampleBuilder
from electra_fast.data.shards import (DATA_PREFIX, FORMAT, FORMAT_V1, INDEX_FILE, TEMP_PREFIX, check_output,
                                      no_text_message, read_index, remove, run_id, save_npy, switch_in, unfinished,
                                      write_json)
from electra_fast.data.tokenizer import TOKENIZER_FILE, save_tokenizer, special_ids, vocab_fingerprint
from electra_fast.errors import InputError, lock_directory

__all__ = ["INDEX_FILE", "TEMP_PREFIX", "DATA_PREFIX", "FORMAT", "FORMAT_V1", "SINGLE_SEGMENT_PROB",
           "SHORT_TARGET_PROB", "ExampleBuilder", "ShardWriter", "write_json", "no_text_message", "unfinished",
           "check_output", "prepare", "read_index", "cores"]


class ShardWriter:
    """Format 1: buffers examples and writes a shard (ids + lengths) every `shard_size` examples, then the index."""

    def __init__(self, directory: str, seq_len: int, vocab_size: int, pad_id: int, shard_size: int, meta: dict):
        self.directory = directory
        self.dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
        self.seq_len, self.shard_size, self.pad_id = seq_len, shard_size, pad_id
        self.ids = np.full((shard_size, seq_len), pad_id, dtype=self.dtype)
        self.lens = np.zeros((shard_size, 2), dtype=np.int32)
        self.n = 0
        self.index = {"format": FORMAT_V1, "seq_len": seq_len, "dtype": np.dtype(self.dtype).name,
                      **meta, "num_examples": 0, "num_tokens": 0, "shards": [], "complete": False}

    def add(self, ids: List[int], len_a: int) -> None:
        self.ids[self.n, : len(ids)] = ids
        self.lens[self.n] = (len(ids), len_a)
        self.n += 1
        if self.n == self.shard_size:
            self.flush()

    def flush(self) -> None:
        if self.n == 0:
            return
        k = len(self.index["shards"])
        name = f"shard-{k:05d}"
        save_npy(os.path.join(self.directory, f"{name}-ids.npy"), self.ids[: self.n])
        save_npy(os.path.join(self.directory, f"{name}-len.npy"), self.lens[: self.n])
        self.index["shards"].append({"name": name, "num_examples": self.n})
        self.index["num_examples"] += self.n
        self.index["num_tokens"] += int(self.lens[: self.n, 0].sum())
        self.ids.fill(self.pad_id)
        self.n = 0


def _encode_in_batches(tok, lines: Iterable[str], batch_lines: int = 2048):
    """Yield token ids per line (None for a blank line); the Rust tokenizer encodes a batch in parallel."""
    batch = []

    def run(batch):
        texts = [t for t in batch if t]
        encoded = iter(tok.encode_batch(texts, add_special_tokens=False)) if texts else iter(())
        for t in batch:
            yield next(encoded).ids if t else None

    for line in lines:
        batch.append(line.strip())
        if len(batch) == batch_lines:
            yield from run(batch)
            batch = []
    yield from run(batch)


def prepare(lines: Iterable[str], output_dir: str, tok, *, seq_len: int = 128, seed: int = 12345,
            shard_size: Optional[int] = None, overwrite: bool = False, sources=None, extra_meta=None,
            workers: Optional[int] = None, resume: bool = False, chunk_bytes: int = CHUNK_BYTES,
            on_shard: Optional[Callable[[int], None]] = None, progress: Optional[Progress] = None) -> dict:
    """Tokenize and pack `lines` into shards in `output_dir`; returns the index (also in `output_dir/index.json`).

    `index.json` appears (or, with `overwrite`, is replaced) in one rename when all input is packed, so an existing
    dataset stays usable until then (see the module docstring).

    `workers`: processes that tokenize and pack (format 2, the same bytes for every value); None: format 1, in this
    process. `resume=True` (format 2; `workers` defaults to the cores then) continues a stopped preparation of the
    same `lines` and settings in `output_dir`, or starts one. `chunk_bytes`: text per worker task;
    `on_shard(k)`: called after shard `k` (format 2) is on disk and recorded. `progress`: a `build.Progress` whose
    `on_bytes` the reader of `lines` calls (format 2).
    """
    if workers is not None or resume:
        workers = cores() if workers is None else workers
        check_int(workers, "--workers", low=1, error=InputError)
        check_int(chunk_bytes, "chunk_bytes", low=1, error=InputError)
        return build(lines, output_dir, tok, seq_len=seq_len, seed=seed, shard_size=shard_size, overwrite=overwrite,
                     sources=sources, extra_meta=extra_meta, workers=workers, resume=resume, chunk_bytes=chunk_bytes,
                     on_shard=on_shard, progress=progress)
    ids = special_ids(tok)
    check_output(output_dir, overwrite)
    lock = lock_directory(output_dir, "output", "another preparation")
    run = run_id()
    tmp, final = os.path.join(output_dir, TEMP_PREFIX + run), DATA_PREFIX + run
    try:
        check_output(output_dir, overwrite)  # again under the lock: another preparation may have finished since
        for name in os.listdir(output_dir):  # what a killed preparation left (none runs: we hold the lock)
            if name.startswith(TEMP_PREFIX):
                remove(os.path.join(output_dir, name))
        os.mkdir(tmp)
        save_tokenizer(tok, tmp)  # the index names this copy: the data and its tokenizer go together
        meta = {"vocab_size": tok.get_vocab_size(with_added_tokens=True), "vocab_hash": vocab_fingerprint(tok),
                "special_ids": ids, "tokenizer": f"{final}/{TOKENIZER_FILE}", "seed": seed, "sources": sources or [],
                **(extra_meta or {})}
        shard_size = shard_size or max(1, (64 << 20) // (2 * seq_len))  # ~64 MB of uint16 per shard
        writer = ShardWriter(tmp, seq_len, meta["vocab_size"], ids["pad"], shard_size, meta)
        builder = ExampleBuilder(seq_len, ids["cls"], ids["sep"], random.Random(seed))
        for token_ids in _encode_in_batches(tok, lines):
            example = builder.add_line(token_ids)
            if example is not None:
                writer.add(*example)
        example = builder.add_line(None)
        if example is not None:
            writer.add(*example)
        writer.flush()
        index = writer.index
        index["skipped_lines"] = getattr(lines, "skipped", 0)
        if index["num_examples"] == 0:
            raise InputError(no_text_message(index["skipped_lines"]))
        index["complete"] = True
        for shard in index["shards"]:
            shard["name"] = f"{final}/{shard['name']}"
        switch_in(output_dir, tmp, final, index, tok)
        return index
    finally:
        remove(tmp)  # an error or Ctrl-C (after the switch it is gone already); a kill leaves it to the next run
        lock.close()
