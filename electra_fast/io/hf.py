"""The slim models to and from transformers' ELECTRA model objects (`ElectraForMaskedLM` for the generator,
`ElectraForPreTraining` for the discriminator). The format itself (config mapping, weight names, directories) is
`electra_fast.model.hf_format`; this module picks the slim class a transformers model becomes."""
from __future__ import annotations

from typing import Optional

from electra_fast.model.encoder import Discriminator, ElectraEmbeddings, Generator
from electra_fast.model.hf_format import IGNORED_SUFFIXES, architecture, build, hf_state_dict, require_transformers, \
    to_hf_config

CLASSES = {cls.hf_architecture: cls for cls in (Generator, Discriminator)}


def to_transformers(model):
    """A transformers `ElectraForMaskedLM` (generator) or `ElectraForPreTraining` (discriminator) with our weights."""
    tf = require_transformers()
    arch = architecture(model)
    hf_model = getattr(tf, arch)(tf.ElectraConfig(**to_hf_config(model.config, arch)))
    result = hf_model.load_state_dict(hf_state_dict(model, include_tied=True), strict=False)
    bad = [k for k in result.missing_keys if not k.endswith(IGNORED_SUFFIXES)]
    if bad or result.unexpected_keys:
        raise RuntimeError(f"conversion mismatch: missing {bad}, unexpected {result.unexpected_keys}")
    return hf_model


def from_transformers(hf_model, *, embeddings: Optional[ElectraEmbeddings] = None, gdes: bool = False,
                      **overrides):
    """A slim `Generator` (from `ElectraForMaskedLM`) or `Discriminator` (from `ElectraForPreTraining`) on
    `hf_model`'s device; `overrides`: `ElectraModelConfig` fields, see `hf_format.from_hf_config`."""
    kind = type(hf_model).__name__
    cls = CLASSES.get(kind)
    if cls is None:
        raise TypeError(f"hf_model must be an ElectraForMaskedLM or ElectraForPreTraining, got {kind}")
    config = {**hf_model.config.to_dict(), "tie_word_embeddings": hf_model.config.tie_word_embeddings}
    model = build(cls, config, hf_model.state_dict(), embeddings=embeddings, gdes=gdes, **overrides)
    return model.to(next(hf_model.parameters()).device)


__all__ = ["to_transformers", "from_transformers", "CLASSES"]
