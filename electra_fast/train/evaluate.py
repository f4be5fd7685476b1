"""Evaluation while pretraining: the held-out split and its metrics.

The held-out rows are fixed for a run: the last rows of the prepared data (automatic: 1% of it, between one and
`MAX_EVAL_BATCHES` global batches, excluded from training) or another dataset (`--eval-data`). Every evaluation
scores the same tokens with the same masks and generator samples: each eval batch draws them from its own
torch.Generator seeded from (seed, batch number), with the model in eval mode (no dropout), so two evaluations of one
model agree exactly and successive ones differ only by what training changed.

Metrics (replaced = positive, over every real token): the discriminator's ROC-AUC and average precision, precision,
recall, F1 and accuracy at probability 0.5 (logit 0), and the accuracy of labelling every token "original" (1 - the
replaced fraction) with the lift over it; the generator's MLM loss and accuracy over the masked slots.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from electra_fast.errors import InputError
from electra_fast.train.metrics import average_precision, roc_auc, threshold_metrics

HOLDOUT_FRACTION = 0.01
MAX_EVAL_BATCHES = 10
_EVAL_STREAM = 0xE7A1  # keeps eval seeds apart from the training chunks' (seed, step, chunk)


def holdout_rows(num_examples: int, global_batch: int, micro_batch: int) -> int:
    """How many of the last rows the automatic split holds out: 1% of the data, but at least one global batch
    (and up to 4 of them, as far as 5% of a small dataset allows: a few thousand tokens for a steady estimate) and
    at most `MAX_EVAL_BATCHES`; a multiple of `micro_batch`; 0 when the rest would not fill one global batch."""
    least = max(global_batch, min(4 * global_batch, num_examples // 20))
    rows = min(max(int(num_examples * HOLDOUT_FRACTION), least), MAX_EVAL_BATCHES * global_batch)
    rows -= rows % micro_batch
    return rows if num_examples - rows >= global_batch else 0


def heldout(cfg, dataset, cache_dir: str, micro_batch: int, **open_kw) -> tuple:
    """`(eval dataset, its row indices, training rows)`: rows `[0, training rows)` of `dataset` are trained on.

    `cfg.eval_data` (a prepared directory or text, tokenized with the training data's tokenizer into `cache_dir`):
    its first rows, at most `MAX_EVAL_BATCHES` global batches; else the last rows of `dataset` (`holdout_rows`).
    `open_kw`: `data.open_training_data`'s process arguments. No split (None, None, all rows) when
    `cfg.eval_interval` is 0 or the data is too small to spare one batch (told on stderr).
    """
    if not cfg.eval_interval:
        return None, None, len(dataset)
    if cfg.eval_data:
        from electra_fast.data import open_training_data

        tokenizer = os.path.join(dataset.directory, dataset.index["tokenizer"])
        data, _ = open_training_data(cfg.eval_data, cache_dir, tokenizer=tokenizer, seq_len=cfg.seq_len,
                                     seed=cfg.seed, **open_kw)
        rows = min(len(data), MAX_EVAL_BATCHES * cfg.batch_size)
        rows -= rows % micro_batch
        if not rows:
            raise InputError(f"--eval-data has {len(data)} examples, fewer than one batch of {micro_batch}: "
                             "pass more text or a smaller --batch-size")
        return data, np.arange(rows), len(dataset)
    rows = holdout_rows(len(dataset), cfg.batch_size, micro_batch)
    if not rows:
        if open_kw.get("is_main", True):
                print(f"electra-fast: warning: {len(dataset)} examples are too few to hold out a batch of "
                  f"{cfg.batch_size} for evaluation: no evaluation (pass --eval-data, or more data)", file=sys.stderr)
        return None, None, len(dataset)
    return dataset, np.arange(len(dataset) - rows, len(dataset)), len(dataset) - rows


def eval_seed(seed: int, batch: int) -> int:
    """The seed of eval batch `batch`'s masks and samples."""
    return int(np.random.SeedSequence([seed, batch, 0, _EVAL_STREAM]).generate_state(1, np.uint64)[0])


@torch.no_grad()
def evaluate(model, dataset, indices: np.ndarray, batch_size: int, seed: int, device: torch.device,
             amp_dtype: Optional[torch.dtype] = None) -> dict:
    """Metrics of `model` (an `ElectraPretrainer`) on `dataset` rows `indices`, in batches of `batch_size` (a
    trailing partial batch is dropped: static shapes). Leaves the model in the mode it found it in."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    mlm_sum, slots, gen_right = 0.0, 0.0, 0.0
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    try:
        for k in range(len(indices) // batch_size):
            batch = {n: t.to(device) for n, t in dataset.gather(indices[k * batch_size:(k + 1) * batch_size]).items()}
            rng = torch.Generator(device).manual_seed(eval_seed(seed, k))
            with amp:
                out = model.scores(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], rng=rng,
                                   word_starts=batch.get("word_starts"))
            real = batch["attention_mask"].bool()
            logits.append(out["disc_logits"][real].float().cpu())
            labels.append(out["is_replaced"][real].cpu())
            n = float(out["gen_weights"].sum())
            mlm_sum += float(out["mlm_loss"]) * n
            slots += n
            gen_right += float((out["gen_correct"].float() * out["gen_weights"]).sum())
    finally:
        model.train(was_training)
    if not logits:
        raise ValueError(f"no full eval batch of {batch_size} rows in {len(indices)} held-out rows")
    scores, labels = torch.cat(logits), torch.cat(labels)
    at_half = threshold_metrics(scores > 0, labels)
    baseline = 1.0 - float(labels.float().mean())
    return {"eval_tokens": labels.numel(), "disc_auc": roc_auc(scores, labels),
            "disc_ap": average_precision(scores, labels), "disc_precision": at_half["precision"],
            "disc_recall": at_half["recall"], "disc_f1": at_half["f1"], "disc_accuracy": at_half["accuracy"],
            "baseline_accuracy": baseline, "accuracy_lift": at_half["accuracy"] - baseline,
            "replaced_frac": 1.0 - baseline,
            "disc_loss": float(F.binary_cross_entropy_with_logits(scores, labels.float())),
            "mlm_loss": mlm_sum / max(slots, 1.0), "gen_accuracy": gen_right / max(slots, 1.0)}


def summary_line(record: dict) -> str:
    """One sentence for the end of a run: what the discriminator learned, against the all-original baseline."""
    return (f"held-out evaluation ({record['eval_tokens']} tokens): discriminator ROC-AUC {record['disc_auc']:.3f}, "
            f"average precision {record['disc_ap']:.3f} (chance {record['replaced_frac']:.3f}), "
            f"F1 {record['disc_f1']:.3f}; accuracy {record['disc_accuracy']:.4f} vs {record['baseline_accuracy']:.4f} "
            f"labelling every token original ({record['accuracy_lift']:+.4f}); "
            f"generator MLM loss {record['mlm_loss']:.3f}, accuracy {record['gen_accuracy']:.3f}")


__all__ = ["evaluate", "heldout", "holdout_rows", "eval_seed", "summary_line", "HOLDOUT_FRACTION", "MAX_EVAL_BATCHES"]
