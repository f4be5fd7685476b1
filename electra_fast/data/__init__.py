"""Data for ELECTRA pretraining: text sources, WordPiece tokenizers, packing into memory-mapped shards, and a
deterministic rank-split batch order.

    text files / built-in corpus --(corpus)--> lines --(tokenizer, prepare)--> shards + index.json
    shards --(loader.PretrainingData, loader.BatchPlan)--> input_ids / attention_mask / token_type_ids [B, L]
    tokenized rows (transformers.Trainer, accelerate, a DataLoader) --(collator.ElectraDataCollator)--> the same
"""
from electra_fast.data.collator import ElectraDataCollator
from electra_fast.data.corpus import BUILTIN, LineReader, builtin_lines, expand_inputs
from electra_fast.data.loader import BatchPlan, MicroBatch, PretrainingData
from electra_fast.data.prepare import ExampleBuilder, prepare, read_index
from electra_fast.data.sources import open_training_data, prepare_text
from electra_fast.data.tokenizer import load_tokenizer, save_tokenizer, special_ids, train_tokenizer, vocab_fingerprint

__all__ = ["BUILTIN", "LineReader", "builtin_lines", "expand_inputs", "BatchPlan", "MicroBatch", "PretrainingData",
           "ExampleBuilder", "prepare", "read_index", "open_training_data", "prepare_text", "load_tokenizer",
           "save_tokenizer", "special_ids", "train_tokenizer", "vocab_fingerprint", "ElectraDataCollator"]
