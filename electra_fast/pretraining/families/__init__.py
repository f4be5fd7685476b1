"""How the RTD step reads a generator and a discriminator, whatever they are: one adapter per model family.

`adapt(model, role)` returns an `Adapter` (`families.base`); the step (`electra_fast.pretraining.rtd_step`) knows
nothing else about the models, so the masking, gather, fused LM head at the masked slots, sampling and fused
discriminator head run the same for every family:

- the slim `Generator` / `Discriminator` (`families.slim`);
- transformers ELECTRA: `ElectraForMaskedLM` / `ElectraForPreTraining` (`families.electra`);
- any transformers masked LM whose head is laid out as BERT's, RoBERTa's or DeBERTa-v2's (`families.masked_lm`);
- as discriminator, any `*ForTokenClassification` with `num_labels=1` (`families.token_classification`) or a bare
  encoder (`AutoModel`: `BertModel`, `DebertaV2Model`, ...) wrapped in `RTDDiscriminator`, which adds ELECTRA's
  head dense(H -> H) -> gelu -> dense(H -> 1) (`families.rtd_head`; `ElectraPretrainer` wraps a bare encoder
  itself).
"""
from __future__ import annotations

from electra_fast.checks import check_choice
from electra_fast.pretraining.families.base import Adapter, has_submodule, is_transformers
from electra_fast.pretraining.families.electra import ElectraHFAdapter
from electra_fast.pretraining.families.masked_lm import MLM_HEADS
from electra_fast.pretraining.families.rtd_head import RTDAdapter, RTDDiscriminator, as_discriminator, \
    is_bare_encoder
from electra_fast.pretraining.families.slim import is_slim, slim_adapter_class
from electra_fast.pretraining.families.token_classification import TokenClassificationAdapter

# Generators by the submodule that marks their LM head, probed in this order.
_GENERATORS = MLM_HEADS + (ElectraHFAdapter,)


def _generator_class(model):
    name = type(model).__name__
    if is_transformers(model):
        for cls in _GENERATORS:
            if has_submodule(model, cls.mlm_head):
                return cls
        raise TypeError(f"generator {name}: no MLM head found; expected a transformers masked LM with "
                        f"one of {[c.mlm_head for c in _GENERATORS]} (BERT, RoBERTa, DeBERTa-v2, ELECTRA), or an "
                        "electra_fast Generator")
    raise TypeError(f"generator must be an electra_fast Generator or a transformers masked LM (BertForMaskedLM, "
                    f"RobertaForMaskedLM, DebertaV2ForMaskedLM, ElectraForMaskedLM, ...), got {name}")


def _discriminator_class(model):
    name = type(model).__name__
    if isinstance(model, RTDDiscriminator):
        return RTDAdapter
    if is_transformers(model):
        if has_submodule(model, ElectraHFAdapter.rtd_head):
            return ElectraHFAdapter
        if TokenClassificationAdapter.accepts(model):
            TokenClassificationAdapter.check(model)
            return TokenClassificationAdapter
        if is_bare_encoder(model):
            raise TypeError(f"discriminator {name} is a bare encoder without an RTD head: wrap it as "
                            "electra_fast.pretraining.families.RTDDiscriminator(model) (ElectraPretrainer does this "
                            "itself)")
    raise TypeError(f"discriminator must be an electra_fast Discriminator, a transformers ElectraForPreTraining, a "
                    "*ForTokenClassification with num_labels=1, or an RTDDiscriminator around a transformers encoder "
                    f"(AutoModel), got {name}")


def adapt(model, role: str) -> Adapter:
    """The adapter through which the RTD step reads `model` as `role` ("generator" or "discriminator"); a
    `TypeError` naming what is missing for a model it cannot wire."""
    check_choice(role, "role", ("generator", "discriminator"))
    cls = slim_adapter_class(model, role) or (_generator_class if role == "generator" else _discriminator_class)(model)
    return cls(model, role)


def check_pair(generator, discriminator) -> tuple:
    """`(generator adapter, discriminator adapter)`; the two must share the vocabulary (and, for ELECTRA's own
    models, embedding size, positions and token types) and be of the same kind (both slim or both transformers)."""
    g, d = adapt(generator, "generator"), adapt(discriminator, "discriminator")
    gd, dd = g.dims(), d.dims()
    names = tuple(gd) if g.electra_dims and d.electra_dims else ("vocab_size",)
    for name in names:
        if gd[name] != dd[name]:
            raise ValueError(f"generator and discriminator must have the same {name}: the discriminator has "
                             f"{dd[name]}, the generator {gd[name]}")
    if is_slim(generator) != is_slim(discriminator):
        raise TypeError("generator and discriminator must both be electra_fast models or both transformers models, "
                        f"got {type(generator).__name__} and {type(discriminator).__name__}")
    return g, d


def pair_dims(generator: Adapter, discriminator: Adapter) -> dict:
    """The limits a batch must fit for both models (their adapters, from `check_pair`): the vocabulary, the fewer
    positions and token types."""
    g, d = generator.dims(), discriminator.dims()
    return {"vocab_size": d["vocab_size"], "embedding_size": d["embedding_size"],
            **{k: min(g[k], d[k]) for k in ("max_position_embeddings", "type_vocab_size")}}


__all__ = ["Adapter", "adapt", "check_pair", "pair_dims", "as_discriminator", "is_bare_encoder", "is_slim",
           "RTDDiscriminator"]
