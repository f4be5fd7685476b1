"""A transformers `*ForTokenClassification` with `num_labels=1` as the discriminator: its classifier is the RTD
projection, the head `classifier(dropout(hidden))` is the model's own forward."""
from __future__ import annotations

from torch import nn

from electra_fast.pretraining.families.base import TransformersAdapter


class TokenClassificationAdapter(TransformersAdapter):
    """`*ForTokenClassification` with `num_labels=1`: RTD logit = `classifier(dropout(hidden))`, as its forward."""
    family = "token-classification"

    @staticmethod
    def accepts(model) -> bool:
        return type(model).__name__.endswith("ForTokenClassification")

    @staticmethod
    def check(model) -> None:
        """The head must be one logit per token: a `classifier` Linear to 1 after a `dropout`."""
        name = type(model).__name__
        classifier = getattr(model, "classifier", None)
        if not isinstance(classifier, nn.Linear) or not hasattr(model, "dropout"):
            raise TypeError(f"discriminator {name}: expected a `classifier` nn.Linear after a `dropout`, "
                            f"got classifier={type(classifier).__name__}")
        if classifier.out_features != 1:
            raise ValueError(f"discriminator {name} must have num_labels=1 (one replaced-token logit per "
                             f"token), got num_labels={classifier.out_features}")

    def disc_head(self, hidden):
        return self.model.dropout(hidden), self.model.classifier


__all__ = ["TokenClassificationAdapter"]
