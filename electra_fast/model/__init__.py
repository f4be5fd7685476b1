"""The slim ELECTRA encoder: configuration and presets (`config`), embeddings, layers, generator and discriminator
(`encoder`), attention paths (`attention`), the heads (`heads`), GDES (`gdes`) and the transformers format of one
model (`hf_format`).

Knows nothing of pretraining or training: `electra_fast.pretraining` builds on it, `electra_fast.io` converts it to
and from transformers' model objects.
"""
from electra_fast.model.config import (GENERATOR_FIELDS, INITIALIZER_ALIASES, INITIALIZERS, PRESETS,
                                       ElectraModelConfig, preset_configs)
from electra_fast.model.encoder import Discriminator, ElectraEmbeddings, Generator, num_parameters
from electra_fast.model.gdes import GDESEmbedding, GDESLayerNorm
from electra_fast.model.heads import GeneratorHead, RTDHead

__all__ = ["GENERATOR_FIELDS", "INITIALIZERS", "INITIALIZER_ALIASES", "PRESETS", "Discriminator", "ElectraEmbeddings",
           "ElectraModelConfig", "Generator", "num_parameters", "preset_configs", "GDESEmbedding", "GDESLayerNorm",
           "GeneratorHead", "RTDHead"]
