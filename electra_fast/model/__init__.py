"""The slim ELECTRA encoder: configuration and presets, embeddings, attention, layers, generator and discriminator.

Knows nothing of pretraining, files or training: `electra_fast.pretraining` builds on it, `electra_fast.io` converts
it to and from `transformers`.
"""
from electra_fast.model.encoder import (GENERATOR_FIELDS, INITIALIZERS, PRESETS, Discriminator, ElectraEmbeddings,
                                        ElectraModelConfig, Generator, num_parameters, preset_configs)

__all__ = ["GENERATOR_FIELDS", "INITIALIZERS", "PRESETS", "Discriminator", "ElectraEmbeddings", "ElectraModelConfig",
           "Generator", "num_parameters", "preset_configs"]
