"""The on-disk form of a prepared dataset, shared by the writers (`prepare`, `build`) and the reader (`loader`).

A dataset directory holds `index.json`, the tokenizer (`tokenizer.json`, `vocab.txt`) and `shards-NAME/` with
`shard-NNNNN-ids.npy` (`[n, seq_len]` uint16, or int32 for vocabularies over 65535 tokens), `shard-NNNNN-len.npy`
(`[n, 2]` int32: real length, length of `[CLS] A [SEP]`) and the tokenizer the index names. Both formats share
this layout and load alike; they differ in how the packing drew its random numbers:
- `electra-fast-shards/1`: one random stream over the whole input, in one process (the reference's way; what earlier
  versions wrote: still read, no longer written).
- `electra-fast-shards/2`: a stream per document, seeded by (seed, document number), so documents pack
  independently (in any number of processes, with the same bytes) and a run can resume at any document.

Optional in format 2: `shard-NNNNN-wst.npy` (`[n, ceil(seq_len / 8)]` uint8, `np.packbits` of `[n, seq_len]` bools,
the first bit the most significant), which tokens start a word, present when the index says `"word_starts": true`
(written only by `prepare --word-segmenter`, see `segment`); datasets without it load as before.

A preparation writes into a hidden `.prepare-RUN/` and makes it visible by renaming it, then switching
`index.json` in one rename: a reader never sees a shard before the index names it.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np

from electra_fast.errors import InputError, ensure_writable

INDEX_FILE = "index.json"
TEMP_PREFIX, DATA_PREFIX = ".prepare-", "shards-"
FORMAT_V1 = "electra-fast-shards/1"
FORMAT = "electra-fast-shards/2"
FORMATS = (FORMAT_V1, FORMAT)
STARTS_SUFFIX = "wst"  # shard-NNNNN-wst.npy: the word-start bits


def save_npy(path: str, array: np.ndarray) -> None:
    """`np.save`, flushed to disk before returning (a shard is recorded as done only after this)."""
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


def no_text_message(skipped_lines: int) -> str:
    if skipped_lines:
        return (f"the data holds no text ({skipped_lines} lines were not UTF-8 and were skipped): convert the files "
                "to UTF-8, e.g. iconv -f latin1 -t utf-8")
    return "the data holds no text: pass text files with one sentence per line"


def run_id() -> str:
    return f"{os.getpid():x}{int.from_bytes(os.urandom(3), 'little'):06x}"


def unfinished(directory: str) -> bool:
    """True if `directory` has no `index.json` but what a killed (or running) preparation leaves there."""
    return (os.path.isdir(directory) and not os.path.exists(os.path.join(directory, INDEX_FILE))
            and any(n.startswith((TEMP_PREFIX, DATA_PREFIX)) for n in os.listdir(directory)))


def remove(path: str) -> None:
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


def switch_in(output_dir: str, tmp: str, final: str, index: dict, tok) -> None:
    """Make the finished `tmp` folder the dataset: rename it to `final`, then switch `index.json` to it (one
    rename), then delete older data. `final` may already be the dataset in use when it holds the same bytes."""
    from electra_fast.data.tokenizer import save_tokenizer

    target = os.path.join(output_dir, final)
    if os.path.isdir(target):  # a content-named folder already there holds exactly these shards
        remove(tmp)
    else:
        os.rename(tmp, target)
    save_tokenizer(tok, output_dir)  # tokenizer.json / vocab.txt for users
    write_json(os.path.join(output_dir, INDEX_FILE), index)  # the switch to the new dataset: one rename
    for name in os.listdir(output_dir):  # an older dataset (this layout, or the flat one before it)
        if name != final and name.startswith((DATA_PREFIX, "shard-", "tokenizer-")):
            remove(os.path.join(output_dir, name))


def read_index(directory: str) -> dict:
    """The index of a prepared dataset, checked; an `InputError` saying what to do if it is unusable."""
    path = os.path.join(directory, INDEX_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except FileNotFoundError:
        if unfinished(directory):
            raise InputError(f"{directory!r} holds an unfinished preparation (interrupted, or still running): wait "
                             "for it, re-run `electra-fast prepare`, or continue it with `electra-fast prepare "
                             "--resume`") from None
        raise InputError(f"{directory!r} is not a prepared dataset (no {INDEX_FILE}): run `electra-fast prepare` "
                         "on your text files first, or pass the text files themselves") from None
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {path!r} ({e}): re-run `electra-fast prepare`") from None
    if index.get("format") not in FORMATS:
        raise InputError(f"{path!r} is not an electra-fast dataset index (format {index.get('format')!r}, "
                         f"expected one of {list(FORMATS)}): re-run `electra-fast prepare`")
    return index
