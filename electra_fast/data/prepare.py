"""Text -> packed pretraining examples in memory-mapped shards (reference `build_pretraining_dataset.py`).

Packing follows the reference `ExampleBuilder`: sentences of one document accumulate until they reach the target
length, then become `[CLS] A [SEP] B [SEP]` (10% of the time a single segment `[CLS] A [SEP]`), padded to
`seq_len`; 5% of the time the next target length is drawn uniformly from [5, seq_len] so short inputs are seen too.

On disk (a directory): `shard-RUN-NNNNN-ids.npy` (`[n, seq_len]` uint16, or int32 for vocabularies over 65535
tokens), `shard-RUN-NNNNN-len.npy` (`[n, 2]` int32: real length, length of `[CLS] A [SEP]`), the tokenizer and
`index.json`. Memory-mapped on reading, so the corpus never has to fit in RAM, neither here (input streams
through, one shard buffered) nor in training. Every file is written under a temporary name and renamed;
`index.partial.json` lists the finished shards after each one, and `index.json` appears in one rename at the
end, so a crash loses nothing already written and never leaves a half dataset that looks whole.
"""
from __future__ import annotations

import json
import os
import random
from typing import Iterable, List, Optional

import numpy as np

from electra_fast.data.tokenizer import save_tokenizer, special_ids, vocab_fingerprint
from electra_fast.errors import InputError, ensure_writable

INDEX_FILE = "index.json"
PARTIAL_INDEX_FILE = "index.partial.json"
FORMAT = "electra-fast-shards/1"
SINGLE_SEGMENT_PROB = 0.1
SHORT_TARGET_PROB = 0.05


class ExampleBuilder:
    """Packs tokenized sentences into examples, exactly as the reference `ExampleBuilder` (with its RNG calls)."""

    def __init__(self, max_length: int, cls_id: int, sep_id: int, rng: random.Random):
        if max_length < 5:
            raise InputError(f"--seq-len must be at least 5, got {max_length}")
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
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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

    def __init__(self, directory: str, seq_len: int, vocab_size: int, pad_id: int, shard_size: int, meta: dict,
                 prefix: str = "shard"):
        self.directory, self.prefix = directory, prefix
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
        name = f"{self.prefix}-{k:05d}"
        _save_npy(os.path.join(self.directory, f"{name}-ids.npy"), self.ids[: self.n])
        _save_npy(os.path.join(self.directory, f"{name}-len.npy"), self.lens[: self.n])
        self.index["shards"].append({"name": name, "num_examples": self.n})
        self.index["num_examples"] += self.n
        self.index["num_tokens"] += int(self.lens[: self.n, 0].sum())
        write_json(os.path.join(self.directory, PARTIAL_INDEX_FILE), self.index)
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


def prepare(lines: Iterable[str], output_dir: str, tok, *, seq_len: int = 128, seed: int = 12345,
            shard_size: Optional[int] = None, overwrite: bool = False, sources=None, extra_meta=None) -> dict:
    """Tokenize and pack `lines` into shards in `output_dir`; returns the index (also in `output_dir/index.json`).

    Progress goes to `index.partial.json` after every shard; `index.json` appears (or, with `overwrite`, is
    replaced) in one rename when all input is packed, so an existing dataset stays usable until then.
    """
    ids = special_ids(tok)
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise InputError(f"output {output_dir!r} is a file: pass a directory path")
    old_index = os.path.join(output_dir, INDEX_FILE)
    if os.path.exists(old_index) and not overwrite:
        raise InputError(f"{output_dir!r} already holds a prepared dataset: pass --overwrite to replace it "
                         "or choose another output directory")
    ensure_writable(output_dir, "output")

    run = _run_id()
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    tokenizer_file = f"tokenizer-{run}.json"
    with open(os.path.join(output_dir, tokenizer_file), "w", encoding="utf-8") as f:
        f.write(tok.to_str())
    meta = {"vocab_size": vocab_size, "vocab_hash": vocab_fingerprint(tok), "special_ids": ids,
            "tokenizer": tokenizer_file, "seed": seed, "sources": sources or [], **(extra_meta or {})}
    shard_size = shard_size or max(1, (64 << 20) // (2 * seq_len))  # ~64 MB of uint16 per shard
    writer = ShardWriter(output_dir, seq_len, vocab_size, ids["pad"], shard_size, meta, prefix=f"shard-{run}")
    builder = ExampleBuilder(seq_len, ids["cls"], ids["sep"], random.Random(seed))
    for token_ids in _encode_in_batches(tok, lines):
        example = builder.add_line(token_ids)
        if example is not None:
            writer.add(*example)
    example = builder.add_line(None)
    if example is not None:
        writer.add(*example)
    writer.flush()
    skipped = getattr(lines, "skipped", 0)
    writer.index["skipped_lines"] = skipped
    if writer.index["num_examples"] == 0:
        raise InputError(no_text_message(skipped))
    writer.index["complete"] = True
    save_tokenizer(tok, output_dir)  # tokenizer.json / vocab.txt for users; the index names its own copy
    write_json(old_index, writer.index)  # the switch to the new dataset: one rename
    keep = {tokenizer_file} | {f"{s['name']}-{k}.npy" for s in writer.index["shards"] for k in ("ids", "len")}
    for name in os.listdir(output_dir):  # what an older dataset or an interrupted run left behind
        if (name.startswith("shard-") or name.startswith("tokenizer-")) and name not in keep:
            os.remove(os.path.join(output_dir, name))
    partial = os.path.join(output_dir, PARTIAL_INDEX_FILE)
    if os.path.exists(partial):
        os.remove(partial)
    return writer.index


def read_index(directory: str) -> dict:
    """The index of a prepared dataset, checked; an `InputError` saying what to do if it is unusable."""
    path = os.path.join(directory, INDEX_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except FileNotFoundError:
        if os.path.exists(os.path.join(directory, PARTIAL_INDEX_FILE)):
            raise InputError(f"{directory!r} holds an unfinished preparation: re-run `electra-fast prepare` "
                             "to finish it") from None
        raise InputError(f"{directory!r} is not a prepared dataset (no {INDEX_FILE}): run `electra-fast prepare` "
                         "on your text files first, or pass the text files themselves") from None
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {path!r} ({e}): re-run `electra-fast prepare`") from None
    if index.get("format") != FORMAT:
        raise InputError(f"{path!r} is not an electra-fast dataset index (format {index.get('format')!r}, "
                         f"expected {FORMAT!r}): re-run `electra-fast prepare`")
    return index
