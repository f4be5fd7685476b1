"""Data for ELECTRA pretraining: text sources, WordPiece tokenizers, packing into memory-mapped shards, and a
deterministic rank-split batch order.

    text files / built-in corpus --(corpus)--> lines --(tokenizer, prepare)--> shards + index.json
    shards --(loader.PretrainingData, loader.BatchPlan)--> input_ids / attention_mask / token_type_ids [B, L]
                                                            (/ word_starts, from `prepare --word-segmenter`)
    tokenized rows (transformers.Trainer, accelerate, a DataLoader) --(collator.ElectraDataCollator)--> the same

The names below import on first use (the worker processes of `prepare` need no torch), but for `prepare`'s own,
bound now so the name means the function, not its module.
"""
import importlib as _importlib

from electra_fast.data.prepare import ExampleBuilder, prepare, read_index

_PUBLIC = {
    "ElectraDataCollator": "collator",
    **dict.fromkeys(("BUILTIN", "LineReader", "builtin_lines", "expand_inputs"), "corpus"),
    **dict.fromkeys(("BatchPlan", "MicroBatch", "PretrainingData"), "loader"),
    **dict.fromkeys(("open_training_data", "prepare_text"), "sources"),
    **dict.fromkeys(("load_tokenizer", "save_tokenizer", "special_ids", "train_tokenizer", "vocab_fingerprint"),
                    "tokenizer"),
}

__all__ = ["ExampleBuilder", "prepare", "read_index", *_PUBLIC]


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'electra_fast.data' has no attribute {name!r}")
    return getattr(_importlib.import_module(f"electra_fast.data.{_PUBLIC[name]}"), name)


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
