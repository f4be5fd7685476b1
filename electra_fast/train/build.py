"""A run's model and optimizer: fresh from the preset, warm-started from transformers checkpoints (`--init-from`),
or rebuilt from a training checkpoint and restored to its state (`--resume`).

The model is built once with the settings the run needs and never changed afterwards: the kernel options of the
config (`TrainConfig.kernel_options`), and no token-id check in the step (`validate=False`; the loop checks the
first step's batches itself with `check_token_ids`, since later batches come from the same data and tokenizer and
checking each would cost a host sync per step).
"""
from __future__ import annotations

from typing import Optional

import torch

from electra_fast.data import vocab_fingerprint
from electra_fast.data.tokenizer import tokenizer_from_str
from electra_fast.errors import InputError
from electra_fast.io.checkpoint import set_rng_state
from electra_fast.options import KernelOptions
from electra_fast.pretraining.families import check_pair, pair_dims
from electra_fast.pretraining.pretrainer import ElectraPretrainer, param_groups
from electra_fast.pretraining.rtd_step import check_inputs
from electra_fast.pretraining.token_ids import word_start_table
from electra_fast.train.config import TrainConfig, canonical_masking, canonical_optimizer
from electra_fast.train.distributed import apply_fsdp, load_sharded, load_state_dicts
from electra_fast.train.export import model_from_spec
from electra_fast.train.optim import AdamWeightDecay
from electra_fast.train.warm_start import init_model


def _settings(options: Optional[KernelOptions], validate: bool) -> dict:
    """The pretrainer keyword arguments every way of building a run's model passes on."""
    return {"validate": validate, **({"options": options} if options is not None else {})}


def build_model(cfg: TrainConfig, tok, *, validate: bool = True,
                options: Optional[KernelOptions] = None) -> ElectraPretrainer:
    """A fresh model from the preset, sized to the tokenizer and masking with its ids; `cfg.model` overrides the
    preset's shapes. `validate`, `options`: as `ElectraPretrainer`'s."""
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    overrides = dict(cfg.model)
    if "vocab_size" in overrides and overrides.pop("vocab_size") != vocab_size:
        raise InputError(f"the model's vocab_size does not match the tokenizer's {vocab_size} tokens: drop "
                         "vocab_size from the model settings or pass the matching --tokenizer")
    overrides.update(_settings(options, validate))
    try:
        # The tokenizer's ids: never masked are [PAD] [CLS] [SEP] [MASK] ([UNK] stays a candidate, as in the
        # reference), [MASK] replaces, [PAD] is the embedding's padding row.
        if cfg.arch == "deberta-v3":
            return ElectraPretrainer.from_deberta_v3(cfg.preset, tokenizer=tok, gdes=cfg.gdes,
                                                     mask_prob=cfg.mask_prob, masking=cfg.masking, **overrides)
        return ElectraPretrainer.from_preset(cfg.preset, tokenizer=tok, gdes=cfg.gdes, mask_prob=cfg.mask_prob,
                                             masking=cfg.masking, **overrides)
    except (TypeError, ValueError) as e:
        raise InputError(f"invalid model settings: {e}") from None


def run_model(cfg: TrainConfig, resume: Optional[dict], tok) -> ElectraPretrainer:
    """The run's model on the CPU: fresh (`build_model`), warm-started (`cfg.init_from`) or with the checkpoint's
    structure (`resume`; its weights are loaded by `restore`)."""
    torch.manual_seed(cfg.seed)  # same seed on every rank: the same initial weights
    options = cfg.kernel_options()
    settings = _settings(options, validate=False)
    if resume is None and cfg.init_from:
        return init_model(cfg.init_from, cfg.preset, tok, mask_prob=cfg.mask_prob, gdes=cfg.gdes,
                          masking=cfg.masking, vocab_word_starts=word_start_table(cfg.masking, tok), **settings)
    if resume is None:
        return build_model(cfg, tok, **settings)  # from the preset with the tokenizer: its word starts too
    spec = resume["model_spec"]
    saved = dict(spec["settings"])
    # Whole-word masking looks word starts up in the run's vocabulary, which no checkpoint holds (restore checks
    # that the run keeps the checkpoint's masking).
    settings["vocab_word_starts"] = word_start_table(saved.get("masking", "distinct"), tok)
    if options.fused_lm_head is not None:  # the checkpoint's choice (its older keyword) only where this run has none
        saved.pop("fused_lm_head", None)
    model = model_from_spec({**spec, "settings": {**saved, **settings}})
    if vocab_fingerprint(tok) != vocab_fingerprint(tokenizer_from_str(resume["tokenizer"])):
        raise InputError(f"the data's tokenizer ({tok.get_vocab_size(with_added_tokens=True)} tokens) is not the "
                         f"one the checkpoint was trained with ({model.vocab_size} tokens): resume with the run's "
                         "own --data")
    return model


def build_optimizer(cfg: TrainConfig, model, device: torch.device, capturable: bool) -> torch.optim.Optimizer:
    """AdamW (fused, reads the step's skip flag) or the reference's AdamWeightDecay, with a device-tensor LR that
    `TrainStep` writes the schedule into in place (a captured step follows it; no host read per step)."""
    lr = torch.tensor(cfg.lr, device=device)
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "electra_adam":
        return AdamWeightDecay(groups, lr=lr, betas=cfg.adam_betas, eps=cfg.adam_eps)
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.adam_betas, eps=cfg.adam_eps, fused=True, capturable=capturable)


def place(cfg: TrainConfig, model, device: torch.device, capturable: bool) -> torch.optim.Optimizer:
    """Move the model to `device` (sharded with `cfg.fsdp`) and build its optimizer."""
    model.to(device)
    if cfg.fsdp:
        apply_fsdp(model)
    return build_optimizer(cfg, model, device, capturable)


def check_resume(cfg: TrainConfig, resume: dict) -> None:
    """The settings a resumed run must keep: the batch size, the optimizer and the masking (an older spelling in
    the checkpoint names the same choice as its new name)."""
    if resume["data"]["batch_size"] != cfg.batch_size:
        raise InputError(f"--batch-size {cfg.batch_size} differs from the checkpoint's "
                         f"{resume['data']['batch_size']}: resume with the same batch size")
    for option, default, canonical in (("optimizer", "adamw", canonical_optimizer),
                                       ("masking", "distinct", canonical_masking)):
        saved, given = canonical(resume["config"].get(option, default)), getattr(cfg, option)
        if saved != given:
            raise InputError(f"--{option} {given} differs from the checkpoint's {saved}: resume with "
                             f"--{option} {saved}")


def restore(cfg: TrainConfig, resume: dict, model, optimizer) -> None:
    """Load the checkpoint's weights, optimizer state and RNG states, keeping this run's LR tensors."""
    check_resume(cfg, resume)
    settings = [{k: g[k] for k in ("lr", "capturable", "fused") if k in g} for g in optimizer.param_groups]
    if "sharded" in resume:  # an FSDP run's checkpoint: each process reads its own shard
        load_sharded(model, optimizer, resume)
    else:
        load_state_dicts(model, optimizer, resume["model"], resume["optimizer"], cfg.fsdp)
    for group, own in zip(optimizer.param_groups, settings):
        group.update(own)  # load_state_dict puts the saved values (a copy of the LR tensor) in their place
    set_rng_state(resume["rng"])


def check_token_ids(model, batch: dict) -> None:
    """Range-check a batch's token ids against the model (one host sync): what the step skips."""
    dims = pair_dims(*check_pair(model.generator, model.discriminator))
    check_inputs(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"),
                 vocab_size=dims["vocab_size"], max_positions=dims["max_position_embeddings"],
                 type_vocab_size=dims["type_vocab_size"], validate=True)


class WithoutSegments:
    """A dataset whose batches carry token type 0 everywhere, for models without token-type embeddings
    (DeBERTa-v3: `type_vocab_size=0`), which the step's input check would refuse segment B's ids for."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getattr__(self, name):
        return getattr(self.dataset, name)

    def __len__(self) -> int:
        return len(self.dataset)

    def gather(self, indices, **kwargs) -> dict:
        batch = self.dataset.gather(indices, **kwargs)
        batch["token_type_ids"] = torch.zeros_like(batch["token_type_ids"])
        return batch


def has_token_types(model) -> bool:
    return getattr(model.discriminator.config, "type_vocab_size", 1) > 0


__all__ = ["build_model", "run_model", "build_optimizer", "place", "check_resume", "restore", "check_token_ids",
           "WithoutSegments", "has_token_types"]
