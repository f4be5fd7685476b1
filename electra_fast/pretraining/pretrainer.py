"""One ELECTRA replaced-token-detection step (SPEC section 1) as a module and as a function.

mask_tokens -> generator encoder over the masked ids -> masked_gather at the N slots -> LM head at the slots only
-> mlm_loss_and_sample (loss, samples; fused with the head's projection for slim generators) -> replace_tokens
-> discriminator -> rtd_head_loss (projection + BCE + metric counts);
total = mlm_weight * mlm_loss + disc_weight * disc_loss (1.0 and 50.0 by default).

Every shape is static and nothing reads tensor data on the host, so the step compiles with
`torch.compile(fullgraph=True)` and can be captured in a CUDA graph (`electra_fast.train.cuda_graph`). The only
data-dependent check (token ids within the vocabulary) syncs; it runs in eager mode when `validate=True` and is
skipped while compiling or capturing. Transformers models work in place of the slim models (`ElectraForMaskedLM` /
`ElectraForPreTraining`, and BERT, RoBERTa, DeBERTa-v2 masked LMs and encoders through `electra_fast.pretraining.adapters`):
their encoders and head weights run with this library's masking, gather, loss and sampling.
`ElectraPretrainer` makes the two models share their embeddings as ELECTRA does, whichever way they were built.
The token ids that masking needs ([MASK] and the ids never masked) come from the tokenizer or the caller, never
from a default: BERT's ids are ordinary tokens of any other vocabulary.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from electra_fast.pretraining import adapters
from electra_fast.pretraining.adapters import check_pair
from electra_fast.model.encoder import Discriminator, ElectraModelConfig, Generator, GENERATOR_FIELDS, PRESETS, \
    preset_configs
from electra_fast.ops import lm_head_loss_and_sample, mask_tokens, masked_gather, mlm_loss_and_sample, \
    replace_tokens, rtd_head_loss
from electra_fast.ops._checks import INT_DTYPES, check_shape, check_tensor

SETTINGS_FILE = "electra_fast.json"  # pretrainer settings beside discriminator/ and generator/
MASKINGS = ("distinct", "reference")  # positions without replacement (ours), or drawn as the reference draws


@dataclass
class PretrainerOutput:
    """Loss and free metrics of one step, all 0-dim fp32 tensors (reading one on the host is the caller's sync).

    `gen_accuracy`: argmax of the generator == original token, at real slots. `disc_accuracy`, `replaced_frac`,
    `precision`, `recall`: over real tokens (attention_mask 1), "positive" = replaced.

    Also read like transformers' `ModelOutput`, which `transformers.Trainer` expects from a model: `out["loss"]`,
    `out[0]` (the loss; fields by position), `out[1:]`, `keys()`, `values()`, `items()`, `to_tuple()`, `"loss" in
    out`. It is no `dict` (Trainer then takes the loss as `out[0]`), so helpers that rebuild mappings, such as
    accelerate's, pass it through whole.
    """
    loss: torch.Tensor
    mlm_loss: torch.Tensor
    disc_loss: torch.Tensor
    gen_accuracy: torch.Tensor
    disc_accuracy: torch.Tensor
    replaced_frac: torch.Tensor
    precision: torch.Tensor
    recall: torch.Tensor

    def keys(self) -> tuple:
        return tuple(f.name for f in fields(self))

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self))

    values = to_tuple

    def items(self) -> tuple:
        return tuple(zip(self.keys(), self.to_tuple()))

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(f"PretrainerOutput has no field {key!r}; its fields are {list(self.keys())}")
            return getattr(self, key)
        return self.to_tuple()[key]

    def __contains__(self, key) -> bool:
        return key in self.keys()

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(fields(self))

    def to_dict(self) -> dict:
        """Python floats (one host sync for all of them)."""
        values = torch.stack([v.detach().float() for v in self.values()]).tolist()
        return dict(zip(self.keys(), values))


# ------------------------------------------------------------------ every model through one interface
# `electra_fast.pretraining.adapters.adapt(model, role)` is the one place that knows model families (slim, transformers'
# ELECTRA, BERT / RoBERTa / DeBERTa-v2 masked LMs, *ForTokenClassification, RTDDiscriminator).
def _is_slim(model) -> bool:
    return isinstance(model, (Generator, Discriminator))


def disc_head_loss(features: torch.Tensor, projection: nn.Linear, labels: torch.Tensor,
                   attention_mask: Optional[torch.Tensor]):
    """`(loss, counts)` of the discriminator's last projection and the RTD loss, fused (`ops.rtd_head_loss`): no
    `[B, L]` logits are kept; `counts` `[5]` (`ops.rtd_head.COUNTS`: real tokens, correct, predicted positives,
    replaced, true positives) give the accuracy, precision and recall metrics."""
    loss, _, counts = rtd_head_loss(features, projection.weight, projection.bias, labels, attention_mask,
                                    with_counts=True)
    return loss, counts


# ----------------------------------------------------------------------------------------------- validation
def check_models(generator, discriminator) -> None:
    """Each model must be one the step can read (`adapters.adapt`) and the two must share the vocabulary (ELECTRA's
    own models also embedding size, positions and token types)."""
    check_pair(generator, discriminator)


def embeddings_shared(generator, discriminator) -> bool:
    """Whether the generator uses the discriminator's embedding modules (`adapters.embeddings_shared`)."""
    return adapters.embeddings_shared(generator, discriminator)


def tie_embeddings(generator, discriminator) -> None:
    """Tie the generator's embedding modules (word, position, token type, LayerNorm) to the discriminator's, in place,
    as ELECTRA does (SPEC 1); the generator's LM head stays tied to the (now shared) word embeddings.

    The generator's own embedding weights are dropped: build the optimizer afterwards. Refuses models whose
    embeddings cannot be shared, naming the field that differs. Other transformers encoders share what both have
    with the same shapes, the word embeddings at least (`adapters.tie_embeddings`).
    """
    adapters.tie_embeddings(generator, discriminator)


def check_inputs(input_ids, attention_mask, token_type_ids, *, vocab_size: int, max_positions: int,
                 type_vocab_size: int, validate: bool) -> None:
    """Shape checks always (free); value checks (one host sync) when `validate` and not compiling/capturing."""
    check_tensor(input_ids, "input_ids", ndim=2, dtypes=INT_DTYPES)
    if attention_mask is not None:
        check_tensor(attention_mask, "attention_mask", ndim=2)
        check_shape(attention_mask, "attention_mask", input_ids.shape, "same as input_ids")
    if token_type_ids is not None:
        check_tensor(token_type_ids, "token_type_ids", ndim=2, dtypes=INT_DTYPES)
        check_shape(token_type_ids, "token_type_ids", input_ids.shape, "same as input_ids")
    if input_ids.shape[1] > max_positions:
        raise ValueError(f"input_ids must have at most max_position_embeddings={max_positions} tokens per "
                         f"sequence, got shape {tuple(input_ids.shape)}")
    if not validate or torch.compiler.is_compiling() or (
            input_ids.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    for name, t, hi in (("input_ids", input_ids, vocab_size), ("token_type_ids", token_type_ids, type_vocab_size)):
        if t is None or t.numel() == 0:
            continue
        lo_v, hi_v = torch.stack([t.min(), t.max()]).tolist()
        if lo_v < 0 or hi_v >= hi:
            limit = "vocab_size" if name == "input_ids" else "type_vocab_size"
            raise ValueError(f"{name} must lie in [0, {limit}={hi}), got values in [{lo_v}, {hi_v}]")


def _check_masking(masking) -> str:
    if masking not in MASKINGS:
        raise ValueError(f"masking must be one of {MASKINGS}, got {masking!r}")
    return masking


def _check_token_id(value, name: str, vocab_size: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
        raise ValueError(f"{name} must be an int in [0, vocab_size={vocab_size}), got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------------- the step
def _generate(generator, discriminator, input_ids, attention_mask, token_type_ids, *, mask_token_id,
              special_token_ids, mask_prob, temperature, disallow_correct, validate, rng, fused_lm_head,
              masking="distinct"):
    """The step up to the discriminator (checks, masking, generator loss and samples, replacement), shared by
    `rtd_step` and `ElectraPretrainer.scores`:
    `(gen, disc, mlm_loss, correct [N], weights [N], disc_ids, is_replaced)`."""
    gen, disc = check_pair(generator, discriminator)
    dims = adapters.pair_dims(gen, disc)
    check_inputs(input_ids, attention_mask, token_type_ids, vocab_size=dims["vocab_size"],
                 max_positions=dims["max_position_embeddings"], type_vocab_size=dims["type_vocab_size"],
                 validate=validate)
    _check_token_id(mask_token_id, "mask_token_id", dims["vocab_size"])
    _check_masking(masking)
    b, _ = input_ids.shape

    masked_ids, positions, weights = mask_tokens(input_ids, attention_mask, mask_prob=mask_prob,
                                                 mask_token_id=mask_token_id, special_token_ids=special_token_ids,
                                                 replacement=masking == "reference", generator=rng)
    # Generator: encoder over all L tokens, LM head at the N slots only.
    slots = masked_gather(gen.encode(masked_ids, attention_mask, token_type_ids), positions)
    targets = input_ids.gather(1, positions).reshape(-1)
    w = weights.reshape(-1)
    sample_kw = dict(temperature=temperature, disallow_correct=disallow_correct, generator=rng,
                     vocab_size=dims["vocab_size"])
    if gen.fused_lm_head if fused_lm_head is None else fused_lm_head:  # the [M, W] logits never exist whole
        features, weight, bias = gen.lm_head_parts(slots.flatten(0, 1))
        mlm_loss, sampled, correct = lm_head_loss_and_sample(features, weight, bias, targets, w, **sample_kw)
    else:
        logits = gen.lm_logits(slots).reshape(b * positions.shape[1], -1)
        mlm_loss, sampled, correct = mlm_loss_and_sample(logits, targets, w, **sample_kw)
    # Discriminator on the original ids with the samples scattered in (integers: no gradient to the generator).
    disc_ids, is_replaced = replace_tokens(input_ids, positions, weights, sampled,
                                           duplicates="mean" if masking == "reference" else "add")
    return gen, disc, mlm_loss, correct, w, disc_ids, is_replaced


def rtd_step(generator, discriminator, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
             token_type_ids: Optional[torch.Tensor] = None, *, mask_token_id: int,
             special_token_ids: Union[Sequence[int], torch.Tensor], mask_prob: float = 0.15,
             temperature: float = 1.0, disallow_correct: bool = False, mlm_weight: float = 1.0,
             disc_weight: float = 50.0, validate: bool = True, rng: Optional[torch.Generator] = None,
             fused_lm_head: Optional[bool] = None, masking: str = "distinct") -> PretrainerOutput:
    """One replaced-token-detection step for existing training loops; call `.loss.backward()` on the result.

    The models are used as they are: tie their embeddings once with `tie_embeddings(generator, discriminator)`
    (`ElectraPretrainer` does) to train what ELECTRA trains.

    Args:
        generator: slim `Generator` or a transformers masked LM (`ElectraForMaskedLM`, `BertForMaskedLM`,
            `RobertaForMaskedLM`, `DebertaV2ForMaskedLM`, ...; see `electra_fast.pretraining.adapters`).
        discriminator: slim `Discriminator`, transformers `ElectraForPreTraining`, a `*ForTokenClassification`
            with `num_labels=1`, or `adapters.RTDDiscriminator` (a transformers encoder + ELECTRA's head).
        input_ids: `[B, L]` original token ids. attention_mask: `[B, L]` 1 = real token; None = all real
            (fastest: attention then needs no mask). token_type_ids: `[B, L]` or None (all 0).
        mask_token_id, special_token_ids: `[MASK]` and the ids never chosen for prediction ([CLS], [SEP], ...).
            Pass special ids as a device tensor to avoid a host-to-device copy per step (needed under CUDA graphs).
        mask_prob: fraction of real tokens predicted. temperature, disallow_correct: generator sampling.
        mlm_weight, disc_weight: total = mlm_weight * mlm_loss + disc_weight * disc_loss.
        validate: check token-id ranges on the host (one sync; skipped automatically while compiling/capturing).
        rng: torch.Generator for masking and sampling (default: torch's global RNG).
        fused_lm_head: LM head + loss + sample as one chunked op (`ops.lm_head_loss_and_sample`: the `[M, W]`
            logits never exist whole; same loss and samples). None: on, except for transformers' ElectraForMaskedLM.
        masking: "distinct" (default): K_b distinct positions per row. "reference": the reference's draw, K_b
            positions with replacement, a position drawn for several slots taking the floor of the mean of their
            samples (`scatter_update`); its replacement runs the PyTorch reference op.
    """
    gen, disc, mlm_loss, correct, w, disc_ids, is_replaced = _generate(
        generator, discriminator, input_ids, attention_mask, token_type_ids, mask_token_id=mask_token_id,
        special_token_ids=special_token_ids, mask_prob=mask_prob, temperature=temperature,
        disallow_correct=disallow_correct, validate=validate, rng=rng, fused_lm_head=fused_lm_head,
        masking=masking)
    features, projection = disc.disc_head(disc.encode(disc_ids, attention_mask, token_type_ids))
    disc_loss, counts = disc_head_loss(features, projection, is_replaced, attention_mask)

    with torch.no_grad():
        real, right, predicted, replaced, hit = counts.float().unbind()
        count = real.clamp(min=1)
        metrics = dict(
            gen_accuracy=(correct.float() * w).sum() / w.sum().clamp(min=1.0),
            disc_accuracy=right / count,
            replaced_frac=replaced / count,
            precision=hit / predicted.clamp(min=1),
            recall=hit / replaced.clamp(min=1),
        )
    return PretrainerOutput(loss=mlm_weight * mlm_loss + disc_weight * disc_loss, mlm_loss=mlm_loss,
                            disc_loss=disc_loss, **metrics)


# ---------------------------------------------------------------------------------------------------- module
_PRETRAINER_KWARGS = ("mask_prob", "masking", "temperature", "disallow_correct", "mlm_weight", "disc_weight",
                      "fused_lm_head", "validate")
_ID_KWARGS = ("mask_token_id", "special_token_ids", "pad_token_id")


def tokenizer_ids(tokenizer) -> dict:
    """`{"vocab_size", "mask_token_id", "special_token_ids", "pad_token_id"}` from a tokenizer.

    `tokenizer`: a `tokenizers.Tokenizer` or a path (tokenizer.json, vocab.txt, or a directory holding one, as
    `electra_fast.data.save_tokenizer` writes) with BERT's special tokens, whose ids never masked are [PAD], [CLS],
    [SEP] and [MASK] ([UNK] stays maskable, as in the reference); or a transformers tokenizer, whose special tokens
    other than its unknown token are never masked.
    """
    from electra_fast.data.tokenizer import load_tokenizer, special_ids

    if isinstance(tokenizer, (str, os.PathLike)):
        path = os.fspath(tokenizer)
        try:
            tokenizer = load_tokenizer(path)
        except ValueError:  # not BERT's special tokens: transformers' tokenizer_config.json names them by role
            if not os.path.isfile(os.path.join(path, "tokenizer_config.json")):
                raise
            from electra_fast.io.hf import require_transformers

            tokenizer = require_transformers().AutoTokenizer.from_pretrained(path)
    if hasattr(tokenizer, "all_special_ids"):  # transformers
        missing = [name for name in ("mask_token_id", "pad_token_id") if getattr(tokenizer, name, None) is None]
        if missing:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no {' or '.join(missing)}: ELECTRA needs a "
                             "mask and a padding token; pass mask_token_id=, special_token_ids=, pad_token_id=")
        return {"vocab_size": len(tokenizer), "mask_token_id": tokenizer.mask_token_id,
                "special_token_ids": sorted(set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}),
                "pad_token_id": tokenizer.pad_token_id}
    if not hasattr(tokenizer, "token_to_id"):
        raise TypeError("tokenizer must be a tokenizers.Tokenizer, a transformers tokenizer or a path, got "
                        f"{type(tokenizer).__name__}")
    ids = special_ids(tokenizer)
    return {"vocab_size": tokenizer.get_vocab_size(with_added_tokens=True), "mask_token_id": ids["mask"],
            "special_token_ids": [ids[k] for k in ("pad", "cls", "sep", "mask")], "pad_token_id": ids["pad"]}


def _require_ids(ids: dict, names=_ID_KWARGS) -> None:
    missing = [n for n in names if ids.get(n) is None]
    if missing:
        raise ValueError(
            f"{', '.join(missing)} must be given: no default fits every vocabulary (BERT's ids are ordinary tokens "
            "of others). Pass tokenizer= (a tokenizers.Tokenizer, a transformers tokenizer, or the path of a "
            "tokenizer.json / vocab.txt / directory holding one), or the ids: mask_token_id=<id of [MASK]>, "
            "special_token_ids=<ids never masked: [PAD], [CLS], [SEP], [MASK]>, pad_token_id=<id of [PAD]> "
            "(for BERT's uncased vocabulary: mask_token_id=103, special_token_ids=[0, 101, 102, 103], pad_token_id=0)")


def resolve_ids(tokenizer, mask_token_id, special_token_ids, pad_token_id) -> tuple:
    """`(ids, tokenizer_vocab)`: the token ids from `tokenizer` (if any), overridden by those given; all required."""
    ids = tokenizer_ids(tokenizer) if tokenizer is not None else {}
    tokenizer_vocab = ids.pop("vocab_size", None)
    given = {"mask_token_id": mask_token_id, "special_token_ids": special_token_ids, "pad_token_id": pad_token_id}
    ids.update({k: v for k, v in given.items() if v is not None})
    _require_ids(ids)
    return ids, tokenizer_vocab


def _check_tokenizer_fits(tokenizer_vocab: Optional[int], vocab_size: int) -> None:
    if tokenizer_vocab is not None and tokenizer_vocab > vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer_vocab} tokens, more than the model's vocab_size={vocab_size}: "
                         "pass the model's own tokenizer (or a larger vocab_size)")


def _tokenizer_beside(directory: str) -> Optional[str]:
    """A tokenizer saved with a checkpoint pair: in `directory`, or in its generator/ or discriminator/."""
    for sub in ("", "generator", "discriminator"):
        for name in ("tokenizer.json", "vocab.txt"):
            if os.path.isfile(os.path.join(directory, sub, name)):
                return os.path.join(directory, sub)
    return None


def _shared_names(module: nn.Module) -> dict:
    """Second names of shared tensors -> their first name (e.g. the generator's view of the shared embeddings)."""
    first, aliases = {}, {}
    for name, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
        if id(t) in first:
            aliases[name] = first[id(t)]
        else:
            first[id(t)] = name
    return aliases


def _drop_shared_names(module, state_dict, prefix, local_metadata):
    # A shared tensor is saved once, under its first name: safetensors (transformers.Trainer's checkpoints) refuses
    # two names for one storage, and a file should not hold the shared embeddings twice.
    for alias in _shared_names(module):
        state_dict.pop(prefix + alias, None)
    return state_dict


def _restore_shared_names(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                          error_msgs):
    # Loading fills each second name from the first (and accepts files that still hold both).
    for alias, name in _shared_names(module).items():
        if prefix + name in state_dict:
            state_dict[prefix + alias] = state_dict[prefix + name]


class ElectraPretrainer(nn.Module):
    """Generator + discriminator + the RTD step. `forward` returns a `PretrainerOutput`.

    Build with `from_preset("small", tokenizer=...)`, from two models (slim or transformers), or
    `from_pretrained(dir)`. Compile the whole module with `torch.compile(model, fullgraph=True)` (the id-range
    check is skipped inside the compiled graph) or capture steps with `electra_fast.train.cuda_graph.CUDAGraphStep`.

    Two models passed in are made to share their embeddings (word, position, token type and the embedding
    LayerNorm: the generator's modules are replaced by the discriminator's, in place, and its LM head stays tied to
    the shared word table), as ELECTRA does; build the optimizer afterwards. `share_embeddings=False` keeps them
    apart. `gdes=None` takes GDES from the models (a slim `Discriminator(..., gdes=True)` holds the embedding deltas);
    `gdes=True` checks for it with slim models, and wires it into transformers models (`adapters.tie_gdes`).
    The other keyword arguments are `rtd_step`'s (`masking="reference"`: the reference's draw with replacement).

    Any transformers masked LM (BERT, RoBERTa, DeBERTa-v2, ELECTRA) works as the generator, and as the
    discriminator `ElectraForPreTraining`, a `*ForTokenClassification` with `num_labels=1`, or a bare encoder
    (`AutoModel`), which gets ELECTRA's RTD head (`adapters.RTDDiscriminator`); they share the embedding modules both
    have with the same shapes (see `electra_fast.pretraining.adapters`). `adapters.deberta_v3_pretrainer` builds DeBERTa-v3's.
    """

    def __init__(self, generator, discriminator, *, mask_token_id: int,
                 special_token_ids: Union[Sequence[int], torch.Tensor], share_embeddings: bool = True,
                 gdes: Optional[bool] = None, mask_prob: float = 0.15, temperature: float = 1.0,
                 disallow_correct: bool = False, mlm_weight: float = 1.0, disc_weight: float = 50.0,
                 fused_lm_head: Optional[bool] = None, validate: bool = True, masking: str = "distinct"):
        super().__init__()
        discriminator = adapters.as_discriminator(discriminator)  # a bare AutoModel gets ELECTRA's RTD head
        check_models(generator, discriminator)
        has_delta = adapters.has_gdes(discriminator)
        if gdes and not has_delta and not _is_slim(discriminator):  # transformers models: GDES modules wired here
            adapters.tie_gdes(generator, discriminator)
            has_delta = True
        if gdes is not None and bool(gdes) != has_delta:
            raise ValueError(f"gdes={gdes} but the discriminator was built with gdes={has_delta}: build it with "
                             f"Discriminator(config, gdes={bool(gdes)}) or leave gdes out")
        if share_embeddings:
            if not has_delta or _is_slim(discriminator):  # GDES modules in transformers models share already
                tie_embeddings(generator, discriminator)
        elif embeddings_shared(generator, discriminator) or has_delta:
            raise ValueError("share_embeddings=False but the models already share their embeddings (GDES shares them "
                             "too): build them with separate embeddings, or leave share_embeddings out")
        self.generator, self.discriminator = generator, discriminator
        self.share_embeddings = bool(share_embeddings)
        dims = adapters.pair_dims(*check_pair(generator, discriminator))
        self.vocab_size, self.max_position_embeddings = dims["vocab_size"], dims["max_position_embeddings"]
        self.mask_token_id = _check_token_id(mask_token_id, "mask_token_id", self.vocab_size)
        special = torch.as_tensor(special_token_ids, dtype=torch.long).reshape(-1)
        if special.numel() and (int(special.min()) < 0 or int(special.max()) >= self.vocab_size):
            raise ValueError(f"special_token_ids must lie in [0, vocab_size={self.vocab_size}), "
                             f"got {special.tolist()}")
        # A buffer follows the module to its device: no host-to-device copy per step (CUDA-graph safe).
        self.register_buffer("special_token_ids", special, persistent=False)
        if isinstance(mask_prob, bool) or not isinstance(mask_prob, (int, float)) or not 0 < mask_prob < 1:
            raise ValueError(f"mask_prob must be a number in (0, 1), got {mask_prob!r}")
        self.mask_prob, self.temperature, self.disallow_correct = float(mask_prob), temperature, disallow_correct
        self.mlm_weight, self.disc_weight, self.validate = mlm_weight, disc_weight, validate
        self.fused_lm_head, self.masking = fused_lm_head, _check_masking(masking)
        self._register_state_dict_hook(_drop_shared_names)
        self._register_load_state_dict_pre_hook(_restore_shared_names, with_module=True)

    @property
    def gdes(self) -> bool:
        """Whether the discriminator reads `stopgrad(shared embeddings) + its embeddings_delta` (GDES)."""
        return adapters.has_gdes(self.discriminator)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, *, rng: Optional[torch.Generator] = None,
                return_loss: bool = True) -> PretrainerOutput:
        """One step's losses and metrics; see `rtd_step`.

        `return_loss` is for `transformers.Trainer`, which computes an evaluation loss only for models whose
        `forward` has `return_loss=True` (and no `labels`): the loss is always computed, so False is an error.
        """
        if return_loss is not True:
            raise ValueError(f"return_loss must be True (ElectraPretrainer always computes its loss), got "
                             f"{return_loss!r}")
        return rtd_step(self.generator, self.discriminator, input_ids, attention_mask, token_type_ids,
                        mlm_weight=self.mlm_weight, disc_weight=self.disc_weight, rng=rng, **self._step_kwargs())

    def _step_kwargs(self) -> dict:
        return dict(mask_token_id=self.mask_token_id, special_token_ids=self.special_token_ids,
                    mask_prob=self.mask_prob, temperature=self.temperature, disallow_correct=self.disallow_correct,
                    fused_lm_head=self.fused_lm_head, validate=self.validate, masking=self.masking)

    def scores(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
               token_type_ids: Optional[torch.Tensor] = None, *, rng: Optional[torch.Generator] = None) -> dict:
        """The step's per-token outputs for evaluation (the training step keeps no `[B, L]` logits): masking and
        sampling as `forward` (pass `rng` for fixed ones), then `{"disc_logits" [B, L] fp32, "is_replaced" [B, L]
        bool, "mlm_loss" 0-dim (mean over the masked slots), "gen_correct" [N] bool, "gen_weights" [N] (1 = a real
        slot)}`. Call it under `torch.no_grad()` and `eval()` for scores without dropout."""
        _, disc, mlm_loss, correct, w, disc_ids, is_replaced = _generate(
            self.generator, self.discriminator, input_ids, attention_mask, token_type_ids, rng=rng,
            **self._step_kwargs())
        features, projection = disc.disc_head(disc.encode(disc_ids, attention_mask, token_type_ids))
        logits = F.linear(features, projection.weight, projection.bias).squeeze(-1).float()
        return {"disc_logits": logits, "is_replaced": is_replaced.bool(), "mlm_loss": mlm_loss.float(),
                "gen_correct": correct.bool(), "gen_weights": w}

    def settings(self) -> dict:
        """The constructor's keyword arguments (plus `gdes`), JSON-serialisable: what rebuilds this pretrainer
        around its two models (`save_pretrained` writes them to electra_fast.json)."""
        return {"mask_token_id": self.mask_token_id, "special_token_ids": self.special_token_ids.tolist(),
                "share_embeddings": self.share_embeddings, "gdes": self.gdes,
                **{k: getattr(self, k) for k in _PRETRAINER_KWARGS if k != "validate"}}

    @classmethod
    def from_preset(cls, name: str, *, tokenizer=None, vocab_size: Optional[int] = None,
                    mask_token_id: Optional[int] = None, special_token_ids: Optional[Sequence[int]] = None,
                    pad_token_id: Optional[int] = None, gdes: bool = False, **overrides) -> "ElectraPretrainer":
        """Fresh generator + discriminator with shared embeddings, sized by `PRESETS[name]` (SPEC 2).

        Token ids: from `tokenizer` (see `tokenizer_ids`: a `tokenizers.Tokenizer`, a transformers tokenizer or a
        path), which also sets `vocab_size`; or given explicitly (`mask_token_id`, `special_token_ids`,
        `pad_token_id`: all three, explicit ones win over the tokenizer's). There are no default ids.
        `vocab_size` defaults to the tokenizer's size, else 30522.
        `overrides`: `ElectraModelConfig` fields (the discriminator's; shared ones reach the generator),
        `generator_hidden_size` / `generator_num_attention_heads` / `generator_intermediate_size`, and the
        pretrainer's `mask_prob` (default: the preset's), `temperature`, `disallow_correct`, `mlm_weight`,
        `disc_weight`, `validate`, `share_embeddings`.
        """
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
        ids, tokenizer_vocab = resolve_ids(tokenizer, mask_token_id, special_token_ids, pad_token_id)
        if vocab_size is None:
            vocab_size = 30522 if tokenizer_vocab is None else tokenizer_vocab
        _check_tokenizer_fits(tokenizer_vocab, vocab_size)
        kwargs = {k: overrides.pop(k) for k in _PRETRAINER_KWARGS + ("share_embeddings",) if k in overrides}
        kwargs.setdefault("mask_prob", PRESETS[name]["mask_prob"])
        gen_overrides = {f: overrides.pop(f"generator_{f}") for f in GENERATOR_FIELDS if f"generator_{f}" in overrides}
        gen_cfg, disc_cfg = preset_configs(name, vocab_size=vocab_size, pad_token_id=ids["pad_token_id"],
                                           generator=gen_overrides, **overrides)
        return cls.from_configs(gen_cfg, disc_cfg, gdes=gdes, mask_token_id=ids["mask_token_id"],
                                special_token_ids=ids["special_token_ids"], **kwargs)

    @classmethod
    def from_deberta_v3(cls, preset: str, **kwargs) -> "ElectraPretrainer":
        """DeBERTa-v3's recipe: `DebertaV2ForMaskedLM` generator of half the depth + `DebertaV2Model` discriminator
        with ELECTRA's RTD head, GDES, RTD weight 50, sized by `adapters.DEBERTA_V3_PRESETS[preset]`; `kwargs` as
        `adapters.deberta_v3_pretrainer` (tokenizer= or the ids, vocab_size, pretrainer settings, config fields)."""
        return adapters.deberta_v3_pretrainer(preset, **kwargs)

    @classmethod
    def from_configs(cls, generator_config: ElectraModelConfig, discriminator_config: ElectraModelConfig, *,
                     gdes: bool = False, share_embeddings: bool = True, **kwargs) -> "ElectraPretrainer":
        """Fresh slim models from two configs, the discriminator's embeddings shared with the generator (unless
        `share_embeddings=False`: each model its own)."""
        discriminator = Discriminator(discriminator_config, gdes=gdes)
        generator = Generator(generator_config, discriminator.embeddings if share_embeddings else None)
        return cls(generator, discriminator, share_embeddings=share_embeddings, **kwargs)

    def save_pretrained(self, directory: str) -> None:
        """`directory/discriminator/` and `directory/generator/` in transformers format, plus our settings.

        Each checkpoint carries its own copy of the shared embeddings (SPEC 3); the settings file records that
        they are shared, so `from_pretrained` ties them again."""
        os.makedirs(directory, exist_ok=True)
        gen, disc = check_pair(self.generator, self.discriminator)  # each in its own class (GDES: shared + delta)
        disc.save_pretrained(os.path.join(directory, "discriminator"))
        gen.save_pretrained(os.path.join(directory, "generator"))
        with open(os.path.join(directory, SETTINGS_FILE), "w") as f:
            json.dump(self.settings(), f, indent=2)

    @classmethod
    def from_pretrained(cls, directory: str, *, tokenizer=None, **kwargs) -> "ElectraPretrainer":
        """Load `directory/{discriminator,generator}/` (ours, or two checkpoints written by transformers'
        `save_pretrained`). ELECTRA checkpoints become slim models sharing one set of embeddings (the
        discriminator's; with GDES the generator's, and the discriminator's `embeddings_delta` = its checkpoint's
        embeddings minus them; none with `share_embeddings=False` in the settings); other architectures (BERT, RoBERTa, DeBERTa-v2: see
        `adapters.is_adapter_export`) load in their own transformers classes through `adapters.load_pair`.

        Settings, later ones winning: the saved `electra_fast.json` (ours), else a tokenizer saved beside the
        checkpoints (`directory`, `directory/generator` or `directory/discriminator`) for the ids; then
        `tokenizer` (see `tokenizer_ids`; its [PAD] id replaces the checkpoints' `pad_token_id`); then `kwargs`
        (`mask_token_id`, `special_token_ids`, `pad_token_id`, `gdes`, `share_embeddings`, `mask_prob`, ...).
        Ids that none of them name are an error, never BERT's by default.
        """
        settings = {"gdes": False, "share_embeddings": True}
        path = os.path.join(directory, SETTINGS_FILE)
        if os.path.isfile(path):
            with open(path) as f:
                settings.update(json.load(f))
        ids = {}
        if tokenizer is not None:
            ids = tokenizer_ids(tokenizer)
        elif not {"mask_token_id", "special_token_ids"} <= set(settings) | set(kwargs):
            beside = _tokenizer_beside(directory)
            if beside is not None:
                ids = tokenizer_ids(beside)
                del ids["pad_token_id"]  # the checkpoints' config.json names theirs
        tokenizer_vocab = ids.pop("vocab_size", None)
        settings.update(ids)
        settings.update(kwargs)
        _require_ids(settings, ("mask_token_id", "special_token_ids"))
        pad = settings.pop("pad_token_id", None)
        overrides = {} if pad is None else {"pad_token_id": pad}
        gdes, share = settings.pop("gdes"), settings["share_embeddings"]
        if adapters.is_adapter_export(directory):  # BERT, RoBERTa, DeBERTa-v2...: each in its own class
            model = cls(*adapters.load_pair(directory, gdes=gdes, **overrides), gdes=gdes, **settings)
            _check_tokenizer_fits(tokenizer_vocab, model.vocab_size)
            return model
        disc_dir, gen_dir = os.path.join(directory, "discriminator"), os.path.join(directory, "generator")
        if gdes:
            generator = Generator.from_pretrained(gen_dir, **overrides)
            discriminator = Discriminator.from_pretrained(disc_dir, generator.embeddings, gdes=True, **overrides)
        else:
            discriminator = Discriminator.from_pretrained(disc_dir, **overrides)
            generator = Generator.from_pretrained(gen_dir, discriminator.embeddings if share else None, **overrides)
        _check_tokenizer_fits(tokenizer_vocab, discriminator.config.vocab_size)
        return cls(generator, discriminator, **settings)


def param_groups(model: nn.Module, weight_decay: float = 0.01) -> list:
    """AdamW parameter groups: decay on matrices (Linear weights, embeddings), none on LayerNorm and biases.

    The rule is "1-D parameters get no decay", which covers LayerNorm weights/biases, every Linear bias and the
    generator's output bias, for slim and transformers models alike. Shared parameters appear once.
    """
    decay, no_decay = [], []
    for p in model.parameters():  # yields each shared parameter once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


__all__ = ["ElectraPretrainer", "PretrainerOutput", "rtd_step", "param_groups", "check_models", "check_inputs",
           "disc_head_loss", "tie_embeddings", "embeddings_shared", "tokenizer_ids"]
