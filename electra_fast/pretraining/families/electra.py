"""transformers' own ELECTRA: `ElectraForMaskedLM` (generator) and `ElectraForPreTraining` (discriminator)."""
from __future__ import annotations

from electra_fast.pretraining.families.base import TransformersAdapter, electra_config_dims


class ElectraHFAdapter(TransformersAdapter):
    """transformers' `ElectraForMaskedLM` / `ElectraForPreTraining` (its LM head unfused by default, as before)."""
    family = "electra"
    electra_dims = True
    fused_lm_head = False
    mlm_head = "generator_predictions"  # the submodule that marks the generator
    rtd_head = "discriminator_predictions"  # and the discriminator

    def dims(self) -> dict:
        return electra_config_dims(self.model.config)

    def lm_head_parts(self, hidden):
        out = self.model.generator_lm_head
        return self.model.generator_predictions(hidden), out.weight, out.bias

    def disc_head(self, hidden):
        head = self.model.discriminator_predictions
        return head.activation(head.dense(hidden)), head.dense_prediction


__all__ = ["ElectraHFAdapter"]
