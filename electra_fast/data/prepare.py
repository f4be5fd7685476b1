"""Text -> packed pretraining examples in memory-mapped shards (reference `build_pretraining_dataset.py`).

Packing follows the reference `ExampleBuilder`: sentences of one document accumulate until they reach the target
length, then become `[CLS] A [SEP] B [SEP]` (10% of the time a single segment `[CLS] A [SEP]`), padded to
`seq_len`; 5% of the time the next target length is drawn uniformly from [5, seq_len] so short inputs are seen too.

On disk (a directory): `index.json`, the tokenizer (`tokenizer.json`, `vocab.txt`) and `shards-RUN/` holding
`shard-NNNNN-ids.npy` (`[n, seq_len]` uint16, or int32 for vocabularies over 65535 tokens), `shard-NNNNN-len.npy`
(`[n, 2]` int32: real length, length of `[CLS] A [SEP]`) and the tokenizer the index names. Memory-mapped on
reading, so the corpus never has to fit in RAM, neither here (input streams through, one shard buffered) nor in
training.

Atomic: one preparation at a time holds the directory (`errors.lock_directory`; another fails at once); it writes
into a hidden `.prepare-RUN/`, renames that to `shards-RUN/` when all input is packed, and only then switches
`index.json` (one rename) to it, and deletes the older data. A kill at any point leaves the previous dataset in
use, or none: never an index naming missing or half-written shards. Leftovers of a killed run are deleted by the
next preparation, and a directory holding only such leftovers is reported as unfinished, not read as text.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from typing import Iterable, List, Optional

import numpy as np

from electra_fast.checks import check_int
from electra_fast.data.tokenizer import TOKENIZER_FILE, save_tokenizer, special_ids, vocab_fingerprint
from electra_fast.errors import InputError, ensure_writable, lock_directory

INDEX_FILE = "index.json"
TEMP_PREFIX, DATA_PREFIX = ".prepare-", "shards-"
FORMAT = "electra-fast-shards/1"
SINGLE_SEGMENT_PROB = 0.1
SHORT_TARGET_PROB = 0.05


class ExampleBuilder:
    """Packs tokenized sentences into examples, exactly as the reference `ExampleBuilder` (with its RNG calls)."""

    def __init__(self, max_length: int, cls_id: int, sep_id: int, rng: random.Random):
        check_int(max_length, "--seq-len", low=5, error=InputError)
        self.max_length = max_length
        self.cls_id, self.sep_id = cls_id, sep_id
        self.rng = rng
        self._sentences: List[List[int]] = []
        self._length = 0
        self._target = max_length

    def add_line(self, ids: Optional[List[int]]):
        """Add one tokenized sentence; `None` (a blank line) ends the document. -> an example or None.

        An example is `(ids, len_a)`: `[CLS] A [SEP] (B [SEP])` unpadded, and the length of `[CLS] A [SEP]`.
        """
        if ids is None:
            return self._create_example() if self._length else None
        if not ids:  # a line with no tokens (e.g. only control characters) neither adds nor ends anything
            return None
        self._sentences.append(ids)
        self._length += len(ids)
        return self._create_example() if self._length >= self._target else None

    def _create_example(self):
        if self.rng.random() < SINGLE_SEGMENT_PROB:
            first_target = 100000
        else:
            first_target = (self._target - 3) // 2  # -3: [CLS] and two [SEP] still to come
        first, second = [], []
        for s in self._sentences:
            # A sentence joins A if A is empty, if it fits, or half the time when it would overflow A
            # (while B is still empty): the reference's rule, so segment lengths vary like its data.
            if (not first or len(first) + len(s) < first_target
                    or (not second and len(first) < first_target and self.rng.random() < 0.5)):
                first += s
            else:
                second += s
        first = first[: self.max_length - 2]
        second = second[: max(0, self.max_length - len(first) - 3)]
        self._sentences, self._length = [], 0
        if self.rng.random() < SHORT_TARGET_PROB:
            self._target = self.rng.randint(5, self.max_length)
        else:
            self._target = self.max_length
        ids = [self.cls_id] + first + [self.sep_id]
        len_a = len(ids)
        if second:
            ids += second + [self.sep_id]
        return ids, len_a


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # inside the preparation's own directory: nobody reads it before the switch
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())


def write_json(path: str, obj) -> None:
    """Atomically write `obj` as JSON."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ShardWriter:
    """Buffers examples and writes a shard (ids + lengths) every `shard_size` examples, then the index."""

    def __init__(self, directory: str, seq_len: int, vocab_size: int, pad_id: int, shard_size: int, meta: dict):
        self.directory = directory
        self.dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
        self.seq_len, self.shard_size, self.pad_id = seq_len, shard_size, pad_id
        self.ids = np.full((shard_size, seq_len), pad_id, dtype=self.dtype)
        self.lens = np.zeros((shard_size, 2), dtype=np.int32)
        self.n = 0
        self.index = {"format": FORMAT, "seq_len": seq_len, "dtype": np.dtype(self.dtype).name,
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
        _save_npy(os.path.join(self.directory, f"{name}-ids.npy"), self.ids[: self.n])
        _save_npy(os.path.join(self.directory, f"{name}-len.npy"), self.lens[: self.n])
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


def no_text_message(skipped_lines: int) -> str:
    if skipped_lines:
        return (f"the data holds no text ({skipped_lines} lines were not UTF-8 and were skipped): convert the files "
                "to UTF-8, e.g. iconv -f latin1 -t utf-8")
    return "the data holds no text: pass text files with one sentence per line"


def _run_id() -> str:
    return f"{os.getpid():x}{int.from_bytes(os.urandom(3), 'little'):06x}"


def unfinished(directory: str) -> bool:
    """True if `directory` has no `index.json` but what a killed (or running) preparation leaves there."""
    return (os.path.isdir(directory) and not os.path.exists(os.path.join(directory, INDEX_FILE))
            and any(n.startswith((TEMP_PREFIX, DATA_PREFIX)) for n in os.listdir(directory)))


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.remove(path)


def check_output(output_dir: str, overwrite: bool) -> None:
    """Fail now, before any long work, if `output_dir` cannot receive a dataset (created if needed)."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise InputError(f"output {output_dir!r} is a file: pass a directory path")
    if os.path.exists(os.path.join(output_dir, INDEX_FILE)) and not overwrite:
        raise InputError(f"{output_dir!r} already holds a prepared dataset: pass --overwrite to replace it "
                         "or choose another output directory")
    ensure_writable(output_dir, "output")


def prepare(lines: Iterable[str], output_dir: str, tok, *, seq_len: int = 128, seed: int = 12345,
            shard_size: Optional[int] = None, overwrite: bool = False, sources=None, extra_meta=None) -> dict:
    """Tokenize and pack `lines` into shards in `output_dir`; returns the index (also in `output_dir/index.json`).

    `index.json` appears (or, with `overwrite`, is replaced) in one rename when all input is packed, so an existing
    dataset stays usable until then (see the module docstring).
    """
    ids = special_ids(tok)
    check_output(output_dir, overwrite)
    lock = lock_directory(output_dir, "output", "another preparation")
    run = _run_id()
    tmp, final = os.path.join(output_dir, TEMP_PREFIX + run), DATA_PREFIX + run
    index_path = os.path.join(output_dir, INDEX_FILE)
    try:
        check_output(output_dir, overwrite)  # again under the lock: another preparation may have finished since
        for name in os.listdir(output_dir):  # what a killed preparation left (none runs: we hold the lock)
            if name.startswith(TEMP_PREFIX):
                _remove(os.path.join(output_dir, name))
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
        os.rename(tmp, os.path.join(output_dir, final))
        save_tokenizer(tok, output_dir)  # tokenizer.json / vocab.txt for users
        write_json(index_path, index)  # the switch to the new dataset: one rename
        for name in os.listdir(output_dir):  # an older dataset (this layout, or the flat one before it)
            if name != final and name.startswith((DATA_PREFIX, "shard-", "tokenizer-")):
                _remove(os.path.join(output_dir, name))
        return index
    finally:
        _remove(tmp)  # an error or Ctrl-C (after the switch it is gone already); a kill leaves it to the next run
        lock.close()


def read_index(directory: str) -> dict:
    """The index of a prepared dataset, checked; an `InputError` saying what to do if it is unusable."""
    path = os.path.join(directory, INDEX_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except FileNotFoundError:
        if unfinished(directory):
            raise InputError(f"{directory!r} holds an unfinished preparation (interrupted, or still running): wait "
                             "for it, or re-run `electra-fast prepare`") from None
        raise InputError(f"{directory!r} is not a prepared dataset (no {INDEX_FILE}): run `electra-fast prepare` "
                         "on your text files first, or pass the text files themselves") from None
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {path!r} ({e}): re-run `electra-fast prepare`") from None
    if index.get("format") != FORMAT:
        raise InputError(f"{path!r} is not an electra-fast dataset index (format {index.get('format')!r}, "
                         f"expected {FORMAT!r}): re-run `electra-fast prepare`")
    return index
