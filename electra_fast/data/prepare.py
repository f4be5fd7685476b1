"""Text -> packed pretraining examples in memory-mapped shards (reference `build_pretraining_dataset.py`).

Packing follows the reference `ExampleBuilder`: sentences of one document accumulate until they reach the target
length, then become `[CLS] A [SEP] B [SEP]` (10% of the time a single segment `[CLS] A [SEP]`), padded to
`seq_len`; 5% of the time the next target length is drawn uniformly from [5, seq_len] so short inputs are seen too.

The layout on disk and the two formats are in `shards`. `prepare` writes format 2: each document packs with its
own random stream (seeded by the seed and the document's number), so the bytes written are the same for every number
of `workers` (processes that tokenize and pack: 1, in this process, unless asked; `electra-fast prepare` runs one per
core), and a stopped run can `resume` (see `build`, which also says how the worker processes and the tokenizer's
threads share the cores). Format 1 (one random stream over the whole input, what earlier versions wrote) is still
read, no longer written.

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
use, or none: never an index naming missing or half-written shards. A stopped run's finished shards stay hidden
there for `resume=True`; the next preparation without it deletes them, and a directory holding only such leftovers
is reported as unfinished, not read as text.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

from electra_fast.checks import check_int
from electra_fast.data.build import Progress, build, cores
from electra_fast.data.packing import CHUNK_BYTES, SHORT_TARGET_PROB, SINGLE_SEGMENT_PROB, ExampleBuilder
from electra_fast.data.shards import (DATA_PREFIX, FORMAT, FORMAT_V1, INDEX_FILE, TEMP_PREFIX, check_output,
                                      no_text_message, read_index, unfinished, write_json)
from electra_fast.errors import InputError

__all__ = ["INDEX_FILE", "TEMP_PREFIX", "DATA_PREFIX", "FORMAT", "FORMAT_V1", "SINGLE_SEGMENT_PROB",
           "SHORT_TARGET_PROB", "ExampleBuilder", "write_json", "no_text_message", "unfinished",
           "check_output", "prepare", "read_index", "cores"]


def prepare(lines: Iterable[str], output_dir: str, tok, *, seq_len: int = 128, seed: int = 12345,
            shard_size: Optional[int] = None, overwrite: bool = False, sources=None, extra_meta=None,
            workers: Optional[int] = None, resume: bool = False, chunk_bytes: int = CHUNK_BYTES,
            on_shard: Optional[Callable[[int], None]] = None, progress: Optional[Progress] = None,
            word_segmenter: Optional[str] = None) -> dict:
    """Tokenize and pack `lines` into shards in `output_dir`; returns the index (also in `output_dir/index.json`).

    `index.json` appears (or, with `overwrite`, is replaced) in one rename when all input is packed, so an existing
    dataset stays usable until then (see the module docstring).

    `workers`: processes that tokenize and pack, the same bytes for every value; None (the default) or 1: in this
    process. A run stopped by an error, Ctrl-C or a kill keeps its finished shards, hidden; `resume=True` continues
    it (same `lines` and settings in `output_dir`), or starts one; without `resume` the next run deletes them.
    `chunk_bytes`: text per worker task; `on_shard(k)`: called after shard `k` is on disk and recorded. `progress`:
    a `build.Progress` whose `on_bytes` the reader of `lines` calls. `word_segmenter`: a `segment.SEGMENTERS`
    name; the shards then carry which tokens start a word (for text whose tokens do not say it, e.g. Chinese).
    """
    workers = 1 if workers is None else workers
    check_int(workers, "--workers", low=1, error=InputError)
    check_int(chunk_bytes, "chunk_bytes", low=1, error=InputError)
    if word_segmenter is not None:
        from electra_fast.data.segment import get_segmenter

        get_segmenter(word_segmenter)  # an unknown name or a missing package fails now, before any work
    return build(lines, output_dir, tok, seq_len=seq_len, seed=seed, shard_size=shard_size, overwrite=overwrite,
                 sources=sources, extra_meta=extra_meta, workers=workers, resume=resume, chunk_bytes=chunk_bytes,
                 on_shard=on_shard, progress=progress, word_segmenter=word_segmenter)
