"""A bare transformers encoder (`AutoModel`: `BertModel`, `DebertaV2Model`, ...) with ELECTRA's RTD head
(`electra_fast.model.heads.RTDHead`) as the discriminator: `RTDDiscriminator`, and its adapter.

`save_pretrained(dir)` writes the encoder as transformers does (what `AutoModel.from_pretrained` and
`AutoModelForSequenceClassification.from_pretrained` load for fine-tuning; GDES modules as plain ones holding
`shared + delta`) plus the head in `rtd_head.safetensors` beside it, which `RTDDiscriminator.from_pretrained` reads
back.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from electra_fast.model.gdes import plain_embeddings
from electra_fast.model.heads import RTDHead
from electra_fast.model.hf_format import require_transformers
from electra_fast.pretraining.families.base import TransformersAdapter, is_transformers

HEAD_FILE = "rtd_head.safetensors"


def is_bare_encoder(model) -> bool:
    """A transformers base model (`AutoModel`) without a head: `ElectraPretrainer` wraps it in `RTDDiscriminator`."""
    return is_transformers(model) and model.base_model is model


class RTDDiscriminator(nn.Module):
    """A transformers encoder (`AutoModel`: `BertModel`, `RobertaModel`, `DebertaV2Model`, ...) + ELECTRA's RTD head.

    `save_pretrained(dir)` writes the encoder as transformers does (`AutoModel.from_pretrained(dir)` and
    `AutoModelForSequenceClassification.from_pretrained(dir)` load it for fine-tuning) and the head beside it in
    `rtd_head.safetensors`; `RTDDiscriminator.from_pretrained(dir)` loads both.
    """

    def __init__(self, encoder: nn.Module, head: Optional[RTDHead] = None):
        super().__init__()
        if not is_transformers(encoder):
            raise TypeError("encoder must be a transformers PreTrainedModel (with config, base_model, "
                            f"save_pretrained), got {type(encoder).__name__}")
        if not is_bare_encoder(encoder):
            raise TypeError(f"encoder must be a bare encoder (AutoModel, e.g. BertModel), got {type(encoder).__name__} "
                            "(a model with a head: pass it as it is, not inside RTDDiscriminator)")
        self.encoder = encoder
        self.config = encoder.config
        self.head = RTDHead(encoder.config.hidden_size) if head is None else head
        if head is None:
            std = getattr(encoder.config, "initializer_range", 0.02)
            for lin in (self.head.dense, self.head.out):
                nn.init.normal_(lin.weight, std=std)
                nn.init.zeros_(lin.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Replaced-token logits `[B, L]`."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)[0]
        return self.head(hidden)

    def save_pretrained(self, directory: str) -> None:
        from safetensors.torch import save_file

        with plain_embeddings(self.encoder):
            self.encoder.save_pretrained(directory)
        save_file({k: v.detach().contiguous() for k, v in self.head.state_dict().items()},
                  os.path.join(directory, HEAD_FILE))

    @classmethod
    def from_pretrained(cls, directory: str, **kwargs) -> "RTDDiscriminator":
        """The encoder via `AutoModel.from_pretrained(directory, **kwargs)`; the head from `rtd_head.safetensors`
        if there is one (else freshly initialised)."""
        from safetensors.torch import load_file

        model = cls(require_transformers().AutoModel.from_pretrained(directory, **kwargs))
        path = os.path.join(directory, HEAD_FILE)
        if os.path.isfile(path):
            model.head.load_state_dict(load_file(path))
        return model


def as_discriminator(model):
    """`model`, or `RTDDiscriminator(model)` for a bare transformers encoder (`AutoModel`)."""
    return RTDDiscriminator(model) if is_bare_encoder(model) else model


class RTDAdapter(TransformersAdapter):
    family = "rtd-head"

    @staticmethod
    def encoder_of(model) -> nn.Module:
        return model.encoder

    def disc_head(self, hidden):
        return self.model.head.features(hidden), self.model.head.out


__all__ = ["RTDDiscriminator", "RTDAdapter", "HEAD_FILE", "as_discriminator", "is_bare_encoder"]
