"""Reading prepared shards: random access through memory maps and a deterministic, rank-split batch order.

The order is a pure function of (seed, batch number): epoch `e` is a fresh permutation keyed by `(seed, e)`,
and global batch `k` is the `k`-th run of `global_batch` examples in it (the tail that does not fill a batch is
dropped). Resuming needs nothing but `k`: no sampler state to save, and nothing to replay. The permutation is a
seeded bijection evaluated at just the positions a rank reads (`order.ORDER`), so the plan's memory does not grow
with the dataset; `order=order.LEGACY_ORDER` gives the order earlier versions used (a whole numpy permutation per
epoch), which a run started by them must keep to resume on the same data (see `order`).

A global batch is cut into `world_size * accum_steps` equal chunks; micro-step `a` of rank `r` takes chunk
`a * world_size + r`. Ranks therefore never share an example, and a run on one process with `accum_steps *
world_size` micro-steps sees exactly the same chunks in the same roles, which is what makes a multi-GPU run
reproducible on one device (see `electra_fast.train.loop`, which seeds each chunk's randomness by its number).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List

import numpy as np
import torch

from electra_fast.checks import check_choice, check_int
from electra_fast.data.order import ORDER, ORDERS, epoch_order
from electra_fast.data.prepare import read_index
from electra_fast.data.shards import STARTS_SUFFIX
from electra_fast.data.tokenizer import load_tokenizer
from electra_fast.errors import InputError


class PretrainingData:
    """A prepared dataset (`electra-fast prepare` output): `len()` examples of `seq_len` tokens, memory-mapped."""

    def __init__(self, directory: str):
        self.directory = directory
        self.index = read_index(directory)
        self.seq_len = int(self.index["seq_len"])
        self.vocab_size = int(self.index["vocab_size"])
        # Which tokens start a word: only datasets prepared with a word segmenter carry it (see `shards`); `gather`
        # delivers them while this is True (a reader that has no use for them sets it False).
        self.word_starts = bool(self.index.get("word_starts", False))
        self._ids, self._lens, self._starts_bits, counts = [], [], [], []
        for shard in self.index["shards"]:
            ids = self._open(f"{shard['name']}-ids.npy")
            lens = self._open(f"{shard['name']}-len.npy")
            n = shard["num_examples"]
            bits = self._open(f"{shard['name']}-{STARTS_SUFFIX}.npy") if self.word_starts else None
            if (ids.shape != (n, self.seq_len) or lens.shape != (n, 2)
                    or (bits is not None and bits.shape != (n, (self.seq_len + 7) // 8))):
                raise InputError(f"shard {shard['name']} in {directory!r} has shape {ids.shape}, expected "
                                 f"({n}, {self.seq_len}): the dataset is damaged, re-run `electra-fast prepare`")
            self._ids.append(ids)
            self._lens.append(lens)
            self._starts_bits.append(bits)
            counts.append(n)
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def _open(self, name: str) -> np.ndarray:
        path = os.path.join(self.directory, name)
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read {path!r} ({e}): the dataset is damaged, re-run `electra-fast prepare`") \
                from None

    def __len__(self) -> int:
        return int(self._starts[-1])

    def tokenizer(self):
        """The tokenizer the data was prepared with."""
        return load_tokenizer(os.path.join(self.directory, self.index["tokenizer"]))

    def gather(self, indices: np.ndarray, omit_full_mask: bool = False) -> Dict[str, torch.Tensor]:
        """Examples `indices` (in that order) as int64 tensors `input_ids`, `attention_mask`, `token_type_ids`,
        and for a dataset prepared with a word segmenter `word_starts` (bool, True where a token starts a word, at
        `[CLS]`/`[SEP]` and at padding; False where it continues the word before it).

        `omit_full_mask=True` leaves `attention_mask` out when every row is full (no padding): known here from
        the lengths on the host, so the model can run attention without any mask (FlashAttention on a GPU) and
        the step never has to look at the mask on the device to find out.
        """
        indices = np.asarray(indices, dtype=np.int64)
        shard = np.searchsorted(self._starts, indices, side="right") - 1
        ids = np.empty((len(indices), self.seq_len), dtype=np.int64)
        lens = np.empty((len(indices), 2), dtype=np.int64)
        bits = np.empty((len(indices), (self.seq_len + 7) // 8), dtype=np.uint8) if self.word_starts else None
        for s in np.unique(shard):
            rows = np.nonzero(shard == s)[0]
            local = indices[rows] - self._starts[s]
            ids[rows] = self._ids[s][local]
            lens[rows] = self._lens[s][local]
            if bits is not None:
                bits[rows] = self._starts_bits[s][local]
        pos = np.arange(self.seq_len)
        real = pos[None, :] < lens[:, :1]
        segment_b = real & (pos[None, :] >= lens[:, 1:])
        batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(real.astype(np.int64)),
                 "token_type_ids": torch.from_numpy(segment_b.astype(np.int64))}
        if bits is not None:
            batch["word_starts"] = torch.from_numpy(np.unpackbits(bits, axis=1, count=self.seq_len).astype(bool))
        if omit_full_mask and bool((lens[:, 0] == self.seq_len).all()):
            del batch["attention_mask"]
        return batch


@dataclass
class MicroBatch:
    """One forward/backward's worth of examples on one rank; `chunk` numbers it within the global batch."""
    chunk: int
    indices: np.ndarray


class BatchPlan:
    """Which examples each rank reads at each optimizer step (see the module docstring). `order`: `order.ORDER`
    (the default) or `order.LEGACY_ORDER` (a run started before it, resumed on its data order)."""

    def __init__(self, num_examples: int, global_batch: int, *, world_size: int = 1, rank: int = 0,
                 accum_steps: int = 1, seed: int = 0, order: str = ORDER):
        check_choice(order, "order", ORDERS, error=InputError)
        parts = world_size * accum_steps
        if global_batch % parts:
            raise InputError(f"--batch-size {global_batch} must be divisible by the number of processes times "
                             f"--grad-accum ({world_size} x {accum_steps} = {parts})")
        if num_examples < global_batch:
            raise InputError(f"the dataset has {num_examples} examples, fewer than one batch of {global_batch}: "
                             "use more data or a smaller --batch-size")
        check_int(rank, f"rank (of world_size={world_size})", low=0, high=world_size - 1)
        self.num_examples, self.global_batch = num_examples, global_batch
        self.world_size, self.rank, self.accum_steps, self.seed = world_size, rank, accum_steps, seed
        self.micro_batch = global_batch // parts
        # This rank's micro-batches within every global batch (the same numbers each step; they seed its RNG).
        self.chunks = [a * world_size + rank for a in range(accum_steps)]
        self.batches_per_epoch = num_examples // global_batch
        self.order = order
        self._epoch, self._perm = -1, None

    def permutation(self, epoch: int):
        """Epoch `epoch`'s order: `[positions]` -> examples (kept for the last epoch asked; not thread-safe)."""
        if epoch != self._epoch:
            self._perm = epoch_order(self.order, self.num_examples, self.seed, epoch)
            self._epoch = epoch
        return self._perm

    def global_indices(self, batch: int) -> np.ndarray:
        """All `global_batch` example indices of global batch number `batch` (every rank's part)."""
        epoch, k = divmod(batch, self.batches_per_epoch)
        return self.permutation(epoch)[np.arange(k * self.global_batch, (k + 1) * self.global_batch)]

    def micro_batches(self, batch: int) -> List[MicroBatch]:
        """This rank's `accum_steps` micro-batches of global batch number `batch` (only their positions are
        evaluated)."""
        epoch, k = divmod(batch, self.batches_per_epoch)
        perm, b, start = self.permutation(epoch), self.micro_batch, k * self.global_batch
        return [MicroBatch(c, perm[np.arange(start + c * b, start + (c + 1) * b)]) for c in self.chunks]
