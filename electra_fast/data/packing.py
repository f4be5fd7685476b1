"""Packing tokenized sentences into examples: the reference's `ExampleBuilder`, and documents packed one by one
(format 2) in chunks that worker processes tokenize and pack (this module is what a spawned worker imports: numpy
and `tokenizers`, nothing heavier).

A document is a run of non-blank lines (at most `MAX_DOC_LINES`; a longer run is cut into documents of that many,
so one chunk, and the memory of a worker, stays bounded by a file without blank lines). Document `d` packs with
its own random stream, seeded by `(seed, d)`, and starts as the reference starts after an example (5% of the time a
short target length): so its examples depend on nothing but its own text, the tokenizer, `seq_len` and `seed`.
"""
from __future__ import annotations

import hashlib
import os
import random
from typing import Iterable, Iterator, List, Optional, Tuple

import numpy as np

from electra_fast.checks import check_int
from electra_fast.errors import InputError

SINGLE_SEGMENT_PROB = 0.1
SHORT_TARGET_PROB = 0.05
MAX_DOC_LINES = 10_000
CHUNK_BYTES = 1 << 20  # text per task sent to a worker: big enough to amortise the hand-over, small enough to balance

Chunk = Tuple[int, List[str]]  # (number of its first document, its stripped lines, "" after each document)


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

    def start_document(self) -> None:
        """Forget any state and draw the first target length as the reference draws it after an example."""
        self._sentences, self._length = [], 0
        self._next_target()

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

    def _next_target(self) -> None:
        if self.rng.random() < SHORT_TARGET_PROB:
            self._target = self.rng.randint(5, self.max_length)
        else:
            self._target = self.max_length

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
        self._next_target()
        ids = [self.cls_id] + first + [self.sep_id]
        len_a = len(ids)
        if second:
            ids += second + [self.sep_id]
        return ids, len_a


def document_seed(seed: int, document: int) -> int:
    """The seed of document number `document`'s random stream: a hash, so neighbouring streams are unrelated."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/{document}".encode(), digest_size=8).digest(), "little")


def document_lines(lines: Iterable[str]) -> Iterator[str]:
    """`lines` stripped, with exactly one "" after each document (over-long ones cut) and none elsewhere."""
    in_doc, count = False, 0
    for raw in lines:
        line = raw.strip()
        if not line:
            if in_doc:
                yield ""
                in_doc = False
            continue
        if not in_doc:
            in_doc, count = True, 0
        elif count >= MAX_DOC_LINES:
            yield ""
            count = 0
        count += 1
        yield line
    if in_doc:
        yield ""


def chunk_documents(lines: Iterable[str], chunk_bytes: int = CHUNK_BYTES, start_doc: int = 0) -> Iterator[Chunk]:
    """Group `lines` into chunks of whole documents, about `chunk_bytes` characters each; documents before
    `start_doc` are read (and counted) but left out."""
    doc, chunk, size, first = 0, [], 0, start_doc
    for line in document_lines(lines):
        if doc >= start_doc:
            if not chunk:
                first = doc
            chunk.append(line)
            size += len(line)
        if not line:
            doc += 1
            if size >= chunk_bytes:
                yield first, chunk
                chunk, size = [], 0
    if chunk:
        yield first, chunk


# With a word segmenter, a token travels through `ExampleBuilder` as `id | STARTS << 32` when it starts a word:
# the builder only concatenates and cuts lists, so the bit stays with its token and costs no second list.
STARTS = 1 << 32


class DocumentPacker:
    """Tokenizes and packs chunks of documents (format 2): `pack(chunk)` -> `(ids [n, seq_len], lens [n, 2] int32,
    docs [n] int64, starts)`, the examples in order, padded, with the number of the document each came from;
    `starts` is None, or with `segmenter` (a `segment.SEGMENTERS` name) the word-start bits `[n, ceil(seq_len / 8)]`
    uint8 (`np.packbits` of `[n, seq_len]` bools, True for a word's first token, specials and padding)."""

    def __init__(self, tok, seq_len: int, seed: int, cls_id: int, sep_id: int, pad_id: int, dtype: str,
                 segmenter: Optional[str] = None):
        self.tok, self.seq_len, self.seed, self.pad_id = tok, seq_len, seed, pad_id
        self.dtype = np.dtype(dtype)
        self.rng = random.Random(0)
        self.segment = None
        if segmenter is not None:
            from electra_fast.data.segment import get_segmenter

            self.segment = get_segmenter(segmenter)
            cls_id, sep_id = cls_id | STARTS, sep_id | STARTS
        self.builder = ExampleBuilder(seq_len, cls_id, sep_id, self.rng)
        # The ids without the offsets and the per-token strings `encode_batch` also builds: the same ids, sooner.
        # A segmenter needs the offsets.
        self._encode = tok.encode_batch if segmenter else getattr(tok, "encode_batch_fast", tok.encode_batch)

    def _tokens(self, line: str, encoding) -> List[int]:
        from electra_fast.data.segment import token_starts

        starts = token_starts(self.segment(line), encoding.offsets)
        return [i | STARTS if s else i for i, s in zip(encoding.ids, starts)]

    def encode(self, chunk: Chunk) -> list:
        """The encodings of the chunk's non-blank lines (the Rust tokenizer: runs without the GIL)."""
        texts = [t for t in chunk[1] if t]
        return self._encode(texts, add_special_tokens=False) if texts else []

    def pack(self, chunk: Chunk, encodings: Optional[list] = None):
        first_doc, lines = chunk
        encoded = iter(self.encode(chunk) if encodings is None else encodings)
        examples, docs = [], []
        doc, started, builder = first_doc, False, self.builder
        for line in lines:
            if not started:
                self.rng.seed(document_seed(self.seed, doc))
                builder.start_document()
                started = True
            example = builder.add_line(None if not line else next(encoded).ids if self.segment is None
                                       else self._tokens(line, next(encoded)))
            if example is not None:
                examples.append(example)
                docs.append(doc)
            if not line:
                doc, started = doc + 1, False
        ids = np.full((len(examples), self.seq_len), self.pad_id, dtype=self.dtype)
        lens = np.empty((len(examples), 2), dtype=np.int32)
        if self.segment is None:
            for i, (example, len_a) in enumerate(examples):
                ids[i, : len(example)] = example
                lens[i] = (len(example), len_a)
            return ids, lens, np.asarray(docs, dtype=np.int64), None
        starts = np.ones((len(examples), self.seq_len), dtype=bool)  # padding: True
        for i, (example, len_a) in enumerate(examples):
            tagged = np.asarray(example, dtype=np.int64)
            ids[i, : len(example)] = tagged & (STARTS - 1)
            starts[i, : len(example)] = tagged >= STARTS
            lens[i] = (len(example), len_a)
        return ids, lens, np.asarray(docs, dtype=np.int64), np.packbits(starts, axis=1)


_worker: dict = {}


def init_worker(tokenizer_json: str, threads: int, packer_args: tuple) -> None:
    """Set up a worker process: its tokenizer's thread count (before the first encode starts its thread pool)
    and its packer."""
    if threads <= 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    else:
        os.environ["TOKENIZERS_PARALLELISM"] = "true"
        os.environ["RAYON_NUM_THREADS"] = str(threads)
    from tokenizers import Tokenizer

    _worker["packer"] = DocumentPacker(Tokenizer.from_str(tokenizer_json), *packer_args)


def pack_in_worker(chunk: Chunk):
    return _worker["packer"].pack(chunk)
