"""The slim `Generator` / `Discriminator` (`electra_fast.model.encoder`) as the RTD step reads them."""
from __future__ import annotations

from electra_fast.model.encoder import Discriminator, Generator
from electra_fast.pretraining.families.base import Adapter, electra_config_dims


class SlimAdapter(Adapter):
    family = "slim"
    electra_dims = True

    def dims(self) -> dict:
        return electra_config_dims(self.model.config)

    def encode(self, input_ids, attention_mask, token_type_ids):
        return self.model.encode(input_ids, attention_mask, token_type_ids)

    def lm_head_parts(self, hidden):  # padded columns >= vocab_size: the MLM ops' vocab_size= skips them
        return self.model.lm_head_parts(hidden)

    def disc_head(self, hidden):
        return self.model.head_features(hidden), self.model.head.out

    def embedding_slots(self) -> dict:
        e = self.model.embeddings
        return {"word": (e, "word"), "position": (e, "position"), "token_type": (e, "token_type"), "norm": (e, "norm")}


def is_slim(model) -> bool:
    """Whether `model` is this library's `Generator` or `Discriminator`."""
    return isinstance(model, (Generator, Discriminator))


def slim_adapter_class(model, role: str):
    """`SlimAdapter` when `model` is the slim model of `role`, else None."""
    return SlimAdapter if isinstance(model, Generator if role == "generator" else Discriminator) else None


__all__ = ["SlimAdapter", "is_slim", "slim_adapter_class"]
