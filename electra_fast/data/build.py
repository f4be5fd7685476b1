"""Format-2 preparation: worker processes tokenize and pack chunks of whole documents; this process reads the
input, hands the chunks out, and writes the examples back in input order into shards. Resumable.

Cores: with `workers` = N > 1, N processes are started with `spawn` (never `fork`: `tokenizers` turns its own threads
off in a forked child, and a forked child of a process that already used them may hang) and each tokenizes with
`max(1, cores // N)` threads (`RAYON_NUM_THREADS`; one thread is `TOKENIZERS_PARALLELISM=false`). With N = the cores
(the default) that is one single-threaded tokenizer per core, which beats one `encode_batch` spread over the same
cores: its threads scale sub-linearly (about 1.4x on 2 cores, measured here), whole processes nearly linearly, and the
packing (Python) runs beside the tokenizing instead of after it. This process only reads and writes, a few percent of
a core. N = 1, or an input of one chunk, packs here, the tokenizer using all its threads in a second thread (it
releases the GIL) on the next chunk while this one packs.

The output does not depend on N: each document packs with its own random stream (see `packing`), chunks are
handed back in order, and the shard folder is named after a hash of its contents (so `index.json` is the same too).

Resuming: the hidden `.prepare-RUN/` folder holds `progress.json`, rewritten after each shard is on disk: the shards
so far, and where the next example comes from (a document number, and how many of its examples are written).
A run that stops (an error, Ctrl-C, a kill) leaves that folder; `resume=True` continues it when the inputs and
settings are the same (reading the input again up to that document, without tokenizing it), and the result is the
bytes an uninterrupted run gives. A run without `resume` deletes it. Nothing in it is visible to a reader: the
folder is renamed into place and `index.json` switched (one rename) only when all input is packed.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import multiprocessing
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from electra_fast.data.packing import CHUNK_BYTES, Chunk, DocumentPacker, chunk_documents, init_worker, pack_in_worker
from electra_fast.data.shards import (DATA_PREFIX, FORMAT, STARTS_SUFFIX, TEMP_PREFIX, check_output, no_text_message,
                                      remove, run_id, save_npy, switch_in, write_json)
from electra_fast.data.tokenizer import TOKENIZER_FILE, save_tokenizer, special_ids, vocab_fingerprint
from electra_fast.errors import InputError, lock_directory

PROGRESS_FILE = "progress.json"


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


def _read_progress(folder: str) -> Optional[dict]:
    try:
        with open(os.path.join(folder, PROGRESS_FILE), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _unfinished_runs(output_dir: str):
    """`(folder, progress)` of the preparations left in `output_dir` with at least one shard, newest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        folder = os.path.join(output_dir, name)
        if name.startswith(TEMP_PREFIX) and os.path.isdir(folder):
            progress = _read_progress(folder)
            if progress is not None and progress.get("shards"):
                found.append((os.path.getmtime(os.path.join(folder, PROGRESS_FILE)), folder, progress))
    return [(folder, progress) for _, folder, progress in sorted(found, reverse=True)]


def _tidy(folder: str, progress: dict) -> None:
    """Delete what a killed run left half-done in `folder`: a progress file not yet renamed into place, and shard
    files written after the last one recorded (a resumed run writes them again; none may reach the dataset)."""
    recorded = len(progress["shards"])
    for name in os.listdir(folder):
        if ".tmp-" in name or (name.startswith("shard-") and int(name[6:11]) >= recorded):
            remove(os.path.join(folder, name))


def unfinished_tokenizer(output_dir: str) -> Optional[str]:
    """The tokenizer of the newest resumable preparation in `output_dir`, or None."""
    runs = _unfinished_runs(output_dir)
    return os.path.join(runs[0][0], TOKENIZER_FILE) if runs else None


def _resumable(output_dir: str, settings: dict):
    """`(folder, progress)` of the unfinished preparation to continue, or None; an error if the only ones there
    were made with other settings."""
    runs = _unfinished_runs(output_dir)
    for folder, progress in runs:
        if progress.get("settings") == settings:
            return folder, progress
    if runs:
        other = runs[0][1].get("settings") or {}
        differ = sorted(k for k in set(settings) | set(other) if settings.get(k) != other.get(k))
        raise InputError(f"--resume: the unfinished preparation in {output_dir!r} was made with other inputs or "
                         f"settings ({', '.join(differ)} differ): pass the same ones, or run without --resume to "
                         "start over")
    return None


class Progress:
    """Input consumed, for a progress bar: `on_bytes(n)` is the reader's callback (bytes read); the bar (tqdm, or
    anything with `n` and `update`) moves only as far as the examples of what was read are written, so its rate
    and time left are the preparation's, not the reader's, which runs ahead by the chunks in flight."""

    def __init__(self, bar):
        self.read, self.bar = 0, bar

    def on_bytes(self, n: int) -> None:
        self.read += n

    def packed(self, upto: int) -> None:
        if upto > self.bar.n:
            self.bar.update(upto - self.bar.n)


class ShardSink:
    """Collects examples in order and writes a shard every `shard_size` of them, then records the progress."""

    def __init__(self, folder: str, seq_len: int, dtype, pad_id: int, shard_size: int, progress: dict,
                 on_shard: Optional[Callable[[int], None]] = None, word_starts: bool = False):
        self.folder, self.shard_size, self.pad_id = folder, shard_size, pad_id
        self.ids = np.full((shard_size, seq_len), pad_id, dtype=dtype)
        self.lens = np.zeros((shard_size, 2), dtype=np.int32)
        self.starts = np.zeros((shard_size, (seq_len + 7) // 8), dtype=np.uint8) if word_starts else None
        self.docs = np.zeros(shard_size, dtype=np.int64)
        self.n, self.progress, self.on_shard = 0, progress, on_shard

    def add(self, ids: np.ndarray, lens: np.ndarray, docs: np.ndarray, starts: Optional[np.ndarray] = None) -> None:
        start = 0
        while start < len(ids):
            take = min(len(ids) - start, self.shard_size - self.n)
            self.ids[self.n:self.n + take] = ids[start:start + take]
            if self.starts is not None:
                self.starts[self.n:self.n + take] = starts[start:start + take]
            self.lens[self.n:self.n + take] = lens[start:start + take]
            self.docs[self.n:self.n + take] = docs[start:start + take]
            self.n += take
            start += take
            if self.n == self.shard_size:
                self.flush()

    def flush(self) -> None:
        n, p = self.n, self.progress
        if n == 0:
            return
        k = len(p["shards"])
        name = f"shard-{k:05d}"
        ids, lens = self.ids[:n], self.lens[:n]
        save_npy(os.path.join(self.folder, f"{name}-ids.npy"), ids)
        save_npy(os.path.join(self.folder, f"{name}-len.npy"), lens)
        digest = hashlib.sha256(ids.tobytes())
        digest.update(lens.tobytes())
        if self.starts is not None:  # the word-start bits (see `shards`)
            save_npy(os.path.join(self.folder, f"{name}-{STARTS_SUFFIX}.npy"), self.starts[:n])
            digest.update(self.starts[:n].tobytes())
        last = int(self.docs[n - 1])
        written = int(np.count_nonzero(self.docs[:n] == last))
        if p["next_doc"] == last:  # the previous shard ended inside the same document
            written += p["skip_examples"]
        p["shards"].append({"name": name, "num_examples": n, "sha256": digest.hexdigest()})
        p["num_examples"] += n
        p["num_tokens"] += int(lens[:, 0].sum())
        p["next_doc"], p["skip_examples"] = last, written
        write_json(os.path.join(self.folder, PROGRESS_FILE), p)
        self.ids.fill(self.pad_id)
        self.n = 0
        if self.on_shard is not None:
            self.on_shard(k)


def _packed(chunks: Iterator[Chunk], workers: int, tok, packer_args: tuple) -> Iterator[tuple]:
    """The packed examples of `chunks`, in order, from `workers` processes (this one when there is one chunk)."""
    first = next(chunks, None)
    second = next(chunks, None) if first is not None and workers > 1 else None
    if second is None:  # here: a thread tokenizes the next chunk (without the GIL) while this one packs
        packer = DocumentPacker(tok, *packer_args)
        with ThreadPoolExecutor(1) as tokenizing:
            pending = deque()
            for chunk in itertools.chain([first] if first is not None else [], chunks):
                pending.append((chunk, tokenizing.submit(packer.encode, chunk)))
                if len(pending) > 1:
                    done, encodings = pending.popleft()
                    yield packer.pack(done, encodings.result())
            while pending:
                done, encodings = pending.popleft()
                yield packer.pack(done, encodings.result())
        return
    threads = max(1, cores() // workers)
    pool = multiprocessing.get_context("spawn").Pool(workers, initializer=init_worker,
                                                     initargs=(tok.to_str(), threads, packer_args))
    try:
        window = 2 * workers  # chunks in flight: enough to keep every worker busy, and the memory bounded
        pending = deque(pool.apply_async(pack_in_worker, (c,)) for c in (first, second))
        for chunk in chunks:
            if len(pending) >= window:
                yield pending.popleft().get()
            pending.append(pool.apply_async(pack_in_worker, (chunk,)))
        while pending:
            yield pending.popleft().get()
        pool.close()
        pool.join()
    finally:
        pool.terminate()


def build(lines: Iterable[str], output_dir: str, tok, *, seq_len: int, seed: int, shard_size: Optional[int],
          overwrite: bool, sources, extra_meta, workers: int, resume: bool, chunk_bytes: int = CHUNK_BYTES,
          on_shard: Optional[Callable[[int], None]] = None, progress: Optional[Progress] = None,
          word_segmenter: Optional[str] = None) -> dict:
    """Prepare format 2 (see the module docstring); `prepare.prepare` documents the arguments."""
    ids = special_ids(tok)
    check_output(output_dir, overwrite)
    lock = lock_directory(output_dir, "output", "another preparation")
    tmp, done = None, False
    try:
        check_output(output_dir, overwrite)  # again under the lock: another preparation may have finished since
        vocab_size = tok.get_vocab_size(with_added_tokens=True)
        dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
        shard_size = shard_size or max(1, (64 << 20) // (2 * seq_len))  # ~64 MB of uint16 per shard
        settings = {"format": FORMAT, "seq_len": seq_len, "seed": seed, "shard_size": shard_size,
                    "vocab_hash": vocab_fingerprint(tok), "sources": sources or [], "extra_meta": extra_meta or {}}
        if word_segmenter is not None:  # only then: a run stopped before segmenters existed still resumes
            settings["word_segmenter"] = word_segmenter
        found = _resumable(output_dir, settings) if resume else None
        tmp, state = found or (os.path.join(output_dir, TEMP_PREFIX + run_id()), None)
        for name in os.listdir(output_dir):  # what other stopped preparations left (none runs: we hold the lock)
            if name.startswith(TEMP_PREFIX) and os.path.join(output_dir, name) != tmp:
                remove(os.path.join(output_dir, name))
        if state is not None:
            _tidy(tmp, state)
        else:
            os.mkdir(tmp)
            save_tokenizer(tok, tmp)  # the index names this copy: the data and its tokenizer go together
            state = {"settings": settings, "shards": [], "num_examples": 0, "num_tokens": 0, "next_doc": 0,
                        "skip_examples": 0}
        sink = ShardSink(tmp, seq_len, dtype, ids["pad"], shard_size, state, on_shard, word_segmenter is not None)
        start_doc, skip = state["next_doc"], state["skip_examples"]
        packer_args = (seq_len, seed, ids["cls"], ids["sep"], ids["pad"], np.dtype(dtype).name, word_segmenter)
        read_upto = deque()  # input bytes read when each chunk in flight was complete

        def chunks():
            for chunk in chunk_documents(lines, chunk_bytes, start_doc):
                read_upto.append(progress.read if progress is not None else 0)
                yield chunk

        blocks = _packed(chunks(), workers, tok, packer_args)
        with contextlib.closing(blocks):
            for block_ids, block_lens, block_docs, block_starts in blocks:
                upto = read_upto.popleft()
                if skip:  # the examples of the resumed document that earlier shards hold
                    drop = min(skip, int(np.count_nonzero(block_docs == start_doc)))
                    block_ids, block_lens, block_docs = block_ids[drop:], block_lens[drop:], block_docs[drop:]
                    block_starts = None if block_starts is None else block_starts[drop:]
                    skip -= drop
                sink.add(block_ids, block_lens, block_docs, block_starts)
                if progress is not None:
                    progress.packed(upto)
        sink.flush()
        skipped = getattr(lines, "skipped", 0)
        if state["num_examples"] == 0:
            raise InputError(no_text_message(skipped))
        with open(os.path.join(tmp, TOKENIZER_FILE), "rb") as f:
            tokenizer_digest = hashlib.sha256(f.read()).hexdigest()
        name = hashlib.sha256(json.dumps([s["sha256"] for s in state["shards"]] + [tokenizer_digest])
                              .encode()).hexdigest()[:16]
        final = DATA_PREFIX + name
        index = {"format": FORMAT, "seq_len": seq_len, "dtype": np.dtype(dtype).name, "vocab_size": vocab_size,
                 "vocab_hash": settings["vocab_hash"], "special_ids": ids, "tokenizer": f"{final}/{TOKENIZER_FILE}",
                 "seed": seed, "sources": sources or [], **(extra_meta or {}),
                 **({"word_segmenter": word_segmenter, "word_starts": True} if word_segmenter else {}),
                 "num_examples": state["num_examples"], "num_tokens": state["num_tokens"],
                 "shards": [{"name": f"{final}/{s['name']}", "num_examples": s["num_examples"]}
                            for s in state["shards"]],
                 "complete": True, "skipped_lines": skipped}
        os.remove(os.path.join(tmp, PROGRESS_FILE))
        switch_in(output_dir, tmp, final, index, tok)
        done = True
        return index
    finally:
        # A stopped run keeps what it finished for `resume`; one that finished nothing leaves nothing behind.
        if tmp is not None and not done and not (_read_progress(tmp) or {}).get("shards"):
            remove(tmp)
        lock.close()
