"""One ELECTRA replaced-token-detection step (docs/algorithm.md), as a function over two models.

mask_tokens -> generator encoder over the masked ids -> masked_gather at the N slots -> LM head at the slots only
-> mlm_loss_and_sample (loss, samples; fused with the head's projection for slim generators) -> replace_tokens
-> discriminator -> rtd_head_loss (projection + BCE + metric counts);
total = mlm_weight * mlm_loss + disc_weight * disc_loss (1.0 and 50.0 by default).

Every shape is static and nothing reads tensor data on the host, so the step compiles with
`torch.compile(fullgraph=True)` and can be captured in a CUDA graph (`electra_fast.train.cuda_graph`). The only
data-dependent check (token ids within the vocabulary) syncs; it runs in eager mode when `validate=True` and is
skipped while compiling or capturing. Transformers models work in place of the slim models (`ElectraForMaskedLM` /
`ElectraForPreTraining`, and BERT, RoBERTa, DeBERTa-v2 masked LMs and encoders through
`electra_fast.pretraining.families`): their encoders and head weights run with this library's masking, gather,
loss and sampling. Every op runs on `KernelOptions.backend`, the generator's samples are drawn by
`KernelOptions.sampler` (`electra_fast.options`).

`rtd_step` adapts the two models on each call (for loops of one's own); `step` and `generate` take the adapters
(`families.check_pair`), which `ElectraPretrainer` builds once.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Sequence, Union

import torch

from electra_fast.checks import check_choice
from electra_fast.ops import lm_head_loss_and_sample, mask_tokens, masked_gather, mlm_loss_and_sample, \
    replace_tokens, rtd_head_loss
from electra_fast.ops._checks import INT_DTYPES, check_shape, check_tensor
from electra_fast.options import KernelOptions
from electra_fast.pretraining.families import Adapter, check_pair, pair_dims

# Where the slots go: K_b distinct positions per row (ours), drawn with replacement as the reference draws them, or
# whole words (docs/algorithm.md#whole-word-masking).
MASKINGS = ("distinct", "with_replacement", "whole_word")
# "reference": the older name, still read from saved settings; "whole-word": the CLI's spelling.
MASKING_ALIASES = {"reference": "with_replacement", "whole-word": "whole_word"}
# The step's settings (`rtd_step`'s keyword arguments), which `ElectraPretrainer` holds and saves (but `validate`).
STEP_KWARGS = ("mask_prob", "masking", "temperature", "disallow_correct", "mlm_weight", "disc_weight",
               "fused_lm_head", "validate")


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


# ----------------------------------------------------------------------------------------------- validation
def check_masking(masking) -> str:
    """`masking` by its name (the older "reference" is "with_replacement", "whole-word" is "whole_word")."""
    return check_choice(masking, "masking", MASKINGS, aliases=MASKING_ALIASES)


def check_word_starts(word_starts: Optional[torch.Tensor], masking: str):
    """The `[B, L]` word starts whole-word masking needs (None for the other maskings, which ignore them)."""
    if masking != "whole_word":
        return None
    if word_starts is None:
        raise ValueError("masking='whole_word' needs word_starts, a [B, L] bool tensor True where a token begins a "
                         "word: pass word_starts= with the batch (ElectraDataCollator(..., word_starts=True), or "
                         "electra_fast.word_starts_from_vocab(tokenizer)[input_ids]), or give ElectraPretrainer the "
                         "vocabulary's word starts to look them up from the ids (from_preset / from_pretrained with "
                         "tokenizer=, vocab_word_starts=, or set_vocab_word_starts(tokenizer)); got None")
    return word_starts  # its shape, dtype and device: mask_tokens checks them


def check_token_id(value, name: str, vocab_size: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
        raise ValueError(f"{name} must be an int in [0, vocab_size={vocab_size}), got {value!r}")
    return value


def kernel_options(options: Optional[KernelOptions], fused_lm_head: Optional[bool] = None) -> KernelOptions:
    """`options` (None: the defaults) with `fused_lm_head` in it when given (the older keyword wins)."""
    if options is None:
        options = KernelOptions()
    elif not isinstance(options, KernelOptions):
        raise TypeError(f"options must be an electra_fast.options.KernelOptions or None, got {type(options).__name__}")
    return options if fused_lm_head is None else options.replace(fused_lm_head=fused_lm_head)


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


# ---------------------------------------------------------------------------------------------------- the step
def disc_head_loss(features: torch.Tensor, projection, labels: torch.Tensor, attention_mask: Optional[torch.Tensor],
                   backend: Optional[str] = None):
    """`(loss, counts)` of the discriminator's last projection and the RTD loss, fused (`ops.rtd_head_loss`): no
    `[B, L]` logits are kept; `counts` `[5]` (`ops.rtd_head.COUNTS`: real tokens, correct, predicted positives,
    replaced, true positives) give the accuracy, precision and recall metrics."""
    loss, _, counts = rtd_head_loss(features, projection.weight, projection.bias, labels, attention_mask,
                                    with_counts=True, backend=backend)
    return loss, counts


def generate(gen: Adapter, disc: Adapter, input_ids, attention_mask, token_type_ids, *, mask_token_id,
             special_token_ids, mask_prob, temperature, disallow_correct, validate, rng, options: KernelOptions,
             masking="distinct", dims: Optional[dict] = None, word_starts: Optional[torch.Tensor] = None):
    """The step up to the discriminator (checks, masking, generator loss and samples, replacement), shared by
    `step` and `ElectraPretrainer.scores`: `(mlm_loss, correct [N], weights [N], disc_ids, is_replaced)`.
    `dims`: `families.pair_dims(gen, disc)` (computed when None). `word_starts`: `[B, L]`, read by
    `masking="whole_word"` only."""
    dims = pair_dims(gen, disc) if dims is None else dims
    check_inputs(input_ids, attention_mask, token_type_ids, vocab_size=dims["vocab_size"],
                 max_positions=dims["max_position_embeddings"], type_vocab_size=dims["type_vocab_size"],
                 validate=validate)
    check_token_id(mask_token_id, "mask_token_id", dims["vocab_size"])
    masking = check_masking(masking)
    with_replacement = masking == "with_replacement"
    backend = options.backend
    b, _ = input_ids.shape

    masked_ids, positions, weights = mask_tokens(input_ids, attention_mask, mask_prob=mask_prob,
                                                 mask_token_id=mask_token_id, special_token_ids=special_token_ids,
                                                 replacement=with_replacement, generator=rng, backend=backend,
                                                 word_starts=check_word_starts(word_starts, masking))
    # Generator: encoder over all L tokens, LM head at the N slots only.
    slots = masked_gather(gen.encode(masked_ids, attention_mask, token_type_ids), positions, backend=backend)
    targets = input_ids.gather(1, positions).reshape(-1)
    w = weights.reshape(-1)
    sample_kw = dict(temperature=temperature, disallow_correct=disallow_correct, generator=rng,
                     vocab_size=dims["vocab_size"], backend=backend, sampler=options.sampler)
    if gen.fused_lm_head if options.fused_lm_head is None else options.fused_lm_head:  # no [M, W] logits whole
        features, weight, bias = gen.lm_head_parts(slots.flatten(0, 1))
        mlm_loss, sampled, correct = lm_head_loss_and_sample(features, weight, bias, targets, w, **sample_kw)
    else:
        logits = gen.lm_logits(slots).reshape(b * positions.shape[1], -1)
        mlm_loss, sampled, correct = mlm_loss_and_sample(logits, targets, w, **sample_kw)
    # Discriminator on the original ids with the samples scattered in (integers: no gradient to the generator).
    # Duplicate positions (with replacement) take the mean of their samples, which only the PyTorch reference
    # computes: a backend chosen for the step applies to the other ops.
    disc_ids, is_replaced = replace_tokens(input_ids, positions, weights, sampled,
                                           duplicates="mean" if with_replacement else "add",
                                           backend=None if with_replacement else backend)
    return mlm_loss, correct, w, disc_ids, is_replaced


def step(gen: Adapter, disc: Adapter, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
         token_type_ids: Optional[torch.Tensor] = None, *, mlm_weight: float = 1.0, disc_weight: float = 50.0,
         options: KernelOptions, **kwargs) -> PretrainerOutput:
    """`rtd_step` on two adapters (`families.check_pair`); `kwargs`: `generate`'s."""
    mlm_loss, correct, w, disc_ids, is_replaced = generate(gen, disc, input_ids, attention_mask, token_type_ids,
                                                           options=options, **kwargs)
    features, projection = disc.disc_head(disc.encode(disc_ids, attention_mask, token_type_ids))
    disc_loss, counts = disc_head_loss(features, projection, is_replaced, attention_mask, options.backend)

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


def rtd_step(generator, discriminator, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
             token_type_ids: Optional[torch.Tensor] = None, *, mask_token_id: int,
             special_token_ids: Union[Sequence[int], torch.Tensor], mask_prob: float = 0.15,
             temperature: float = 1.0, disallow_correct: bool = False, mlm_weight: float = 1.0,
             disc_weight: float = 50.0, validate: bool = True, rng: Optional[torch.Generator] = None,
             fused_lm_head: Optional[bool] = None, masking: str = "distinct",
             options: Optional[KernelOptions] = None, word_starts: Optional[torch.Tensor] = None) -> PretrainerOutput:
    """One replaced-token-detection step for existing training loops; call `.loss.backward()` on the result.

    The models are used as they are: tie their embeddings once with `tie_embeddings(generator, discriminator)`
    (`ElectraPretrainer` does) to train what ELECTRA trains.

    Args:
        generator: slim `Generator` or a transformers masked LM (`ElectraForMaskedLM`, `BertForMaskedLM`,
            `RobertaForMaskedLM`, `DebertaV2ForMaskedLM`, ...; see `electra_fast.pretraining.families`).
        discriminator: slim `Discriminator`, transformers `ElectraForPreTraining`, a `*ForTokenClassification`
            with `num_labels=1`, or `families.RTDDiscriminator` (a transformers encoder + ELECTRA's head).
        input_ids: `[B, L]` original token ids. attention_mask: `[B, L]` 1 = real token; None = all real
            (fastest: attention then needs no mask). token_type_ids: `[B, L]` or None (all 0).
        mask_token_id, special_token_ids: `[MASK]` and the ids never chosen for prediction ([CLS], [SEP], ...).
            Pass special ids as a device tensor to avoid a host-to-device copy per step (needed under CUDA graphs).
        mask_prob: fraction of real tokens predicted. temperature, disallow_correct: generator sampling.
        mlm_weight, disc_weight: total = mlm_weight * mlm_loss + disc_weight * disc_loss.
        validate: check token-id ranges on the host (one sync; skipped automatically while compiling/capturing).
        rng: torch.Generator for masking and sampling (default: torch's global RNG).
        fused_lm_head: LM head + loss + sample as one chunked op (`ops.lm_head_loss_and_sample`: the `[M, W]`
            logits never exist whole; same loss and samples); sets `options.fused_lm_head`. None: the options',
            whose default is on, except for transformers' ElectraForMaskedLM.
        masking: "distinct" (default): K_b distinct positions per row. "with_replacement" (older name
            "reference"): the reference's draw, K_b positions with replacement, a position drawn for several slots
            taking the floor of the mean of their samples (`scatter_update`); its replacement runs the PyTorch
            reference op. "whole_word" (or "whole-word"): whole words, as BERT's whole-word masking chooses them
            (docs/algorithm.md#whole-word-masking); needs `word_starts`.
        options: `KernelOptions`: the ops' backend and the sampler (None: the defaults). The slim encoders take
            their attention path from their own config's options.
        word_starts: `[B, L]` bool, True where a token begins a word (`masking="whole_word"` only; ignored
            otherwise): from the batch (`ElectraDataCollator(..., word_starts=True)`), or looked up from the ids with
            `electra_fast.word_starts_from_vocab(tokenizer).to(device)[input_ids]`.
    """
    gen, disc = check_pair(generator, discriminator)
    return step(gen, disc, input_ids, attention_mask, token_type_ids, mlm_weight=mlm_weight, disc_weight=disc_weight,
                options=kernel_options(options, fused_lm_head), mask_token_id=mask_token_id,
                special_token_ids=special_token_ids, mask_prob=mask_prob, temperature=temperature,
                disallow_correct=disallow_correct, validate=validate, rng=rng, masking=masking,
                word_starts=word_starts)


__all__ = ["rtd_step", "step", "generate", "PretrainerOutput", "MASKINGS", "MASKING_ALIASES", "STEP_KWARGS",
           "check_masking", "check_word_starts", "check_inputs", "check_token_id", "disc_head_loss", "kernel_options"]
