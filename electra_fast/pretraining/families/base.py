"""The step's view of one model (`Adapter`) and what every transformers family shares (`TransformersAdapter`).

An adapter gives `encode(input_ids, attention_mask, token_type_ids)` (final hidden states), `lm_head_parts(hidden)`
(generator: the LM head's transformed features, the decoder weight and bias, which the fused
`ops.lm_head_loss_and_sample` takes), `lm_logits(hidden)`, `disc_head(hidden)` (discriminator: the features and the
final dense(H -> 1) that the fused `ops.rtd_head_loss` takes), `dims()` and `embedding_slots()` (the modules that
can be shared). The RTD step knows nothing else about the models.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The embedding modules two models can share, by key: the slim `ElectraEmbeddings`' attribute names are the keys,
# transformers' (`base_model.embeddings.*`) the values.
EMBEDDING_ATTRS = {"word": "word_embeddings", "position": "position_embeddings",
                   "token_type": "token_type_embeddings", "norm": "LayerNorm"}


class Adapter:
    """The step's view of one model. `role`: "generator" or "discriminator". Subclasses implement what applies."""
    family = "?"
    electra_dims = False  # slim and transformers' ELECTRA: the pair must agree on all of `dims()`
    fused_lm_head = True  # what `KernelOptions.fused_lm_head=None` means for this generator

    def __init__(self, model, role: str):
        self.model, self.role = model, role

    def dims(self) -> dict:
        """`vocab_size`, `embedding_size` (word-embedding width), `max_position_embeddings` (longest sequence),
        `type_vocab_size` (at least 1: token type 0 always exists)."""
        raise NotImplementedError

    def encode(self, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        raise NotImplementedError

    def lm_head_parts(self, hidden: torch.Tensor):
        """`(features, weight, bias)`: the LM logits are `F.linear(features, weight, bias)`."""
        raise NotImplementedError

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(*self.lm_head_parts(hidden))

    def disc_head(self, hidden: torch.Tensor):
        """`(features, projection)`: the input of the final dense(H -> 1) and that Linear."""
        raise NotImplementedError

    def embedding_slots(self) -> dict:
        """`{key: (parent module, attribute)}` for the shareable embedding modules that exist ("word" always)."""
        raise NotImplementedError

    def embedding_modules(self) -> dict:
        """`{key: module}` of `embedding_slots()`."""
        return {k: getattr(parent, attr) for k, (parent, attr) in self.embedding_slots().items()}


def electra_config_dims(c) -> dict:
    """`Adapter.dims()` from ELECTRA's config fields (the same names in the slim config and `ElectraConfig`)."""
    return {"vocab_size": c.vocab_size, "embedding_size": c.embedding_size,
            "max_position_embeddings": c.max_position_embeddings, "type_vocab_size": c.type_vocab_size}


def is_transformers(model) -> bool:
    """Whether `model` looks like a transformers `PreTrainedModel`."""
    return hasattr(model, "config") and hasattr(model, "base_model") and hasattr(model, "save_pretrained")


def has_submodule(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


class TransformersAdapter(Adapter):
    """Any transformers model: the encoder is `model.base_model`, the embeddings `base_model.embeddings`."""
    family = "transformers"

    def __init__(self, model, role):
        super().__init__(model, role)
        self.encoder = self.encoder_of(model)
        emb = getattr(self.encoder, "embeddings", None)
        if emb is None or getattr(emb, "word_embeddings", None) is None:
            raise TypeError(f"{role} {type(model).__name__}: cannot wire its embeddings, expected "
                            f"{type(self.encoder).__name__}.embeddings.word_embeddings (the layout of BERT, RoBERTa, "
                            "DeBERTa-v2, ELECTRA)")
        self.embeddings = emb

    @staticmethod
    def encoder_of(model) -> nn.Module:
        return model.base_model

    def dims(self) -> dict:
        c, e = self.model.config, self.embeddings
        max_pos = c.max_position_embeddings
        pos = getattr(e, "position_embeddings", None)
        if isinstance(pos, nn.Embedding) and pos.padding_idx is not None:  # RoBERTa: positions start at pad + 1
            max_pos -= pos.padding_idx + 1
        return {"vocab_size": c.vocab_size, "embedding_size": e.word_embeddings.embedding_dim,
                "max_position_embeddings": max_pos, "type_vocab_size": max(1, getattr(c, "type_vocab_size", 0) or 0)}

    def encode(self, input_ids, attention_mask, token_type_ids):
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)[0]

    def embedding_slots(self) -> dict:
        return {k: (self.embeddings, a) for k, a in EMBEDDING_ATTRS.items()
                if getattr(self.embeddings, a, None) is not None}


__all__ = ["Adapter", "TransformersAdapter", "EMBEDDING_ATTRS", "electra_config_dims", "is_transformers",
           "has_submodule"]
