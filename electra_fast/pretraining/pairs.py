"""A generator and a discriminator as files: `directory/discriminator/` and `directory/generator/` (each a
transformers checkpoint of its own) plus the pretrainer's settings in `directory/electra_fast.json`. What
`ElectraPretrainer.save_pretrained` / `from_pretrained` write and read, and `electra-fast export` writes.

Each checkpoint carries its own copy of the shared embeddings (docs/algorithm.md#transformers-checkpoints), as the
reference's do; the settings file records that they are shared, so loading ties them again. With GDES the
discriminator's copy is what it reads, `shared + delta`: the slim `Discriminator` holds its delta
(`electra_fast.model.hf_format`), transformers models hold GDES modules, written as plain ones
(`electra_fast.model.gdes.plain_embeddings`) and wired again on loading with each delta = the discriminator's saved
embedding minus the generator's (`sharing.tie_gdes(keep=True)`). ELECTRA checkpoints load as the slim models; other
architectures (BERT, RoBERTa, DeBERTa-v2) in their own transformers classes (`load_pair`).
"""
from __future__ import annotations

import json
import os

from electra_fast.model.encoder import Discriminator, Generator
from electra_fast.model.gdes import plain_embeddings
from electra_fast.model.hf_format import require_transformers
from electra_fast.pretraining.families.rtd_head import HEAD_FILE, RTDDiscriminator
from electra_fast.pretraining.sharing import tie_gdes

SETTINGS_FILE = "electra_fast.json"  # pretrainer settings beside discriminator/ and generator/


def save_pair(generator, discriminator, directory: str, settings: dict) -> None:
    """Write each model in its own transformers class (GDES modules as plain ones holding `shared + delta`), so
    `AutoModel` / `AutoModelFor*` load them, and `settings` (JSON-serialisable) to `electra_fast.json`."""
    os.makedirs(directory, exist_ok=True)
    for name, model in (("discriminator", discriminator), ("generator", generator)):
        with plain_embeddings(model):
            model.save_pretrained(os.path.join(directory, name))
    with open(os.path.join(directory, SETTINGS_FILE), "w") as f:
        json.dump(settings, f, indent=2)


def read_settings(directory: str) -> dict:
    """The saved `electra_fast.json` ({} when there is none: two checkpoints written by transformers)."""
    path = os.path.join(directory, SETTINGS_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def is_adapter_export(directory: str) -> bool:
    """Whether `directory/discriminator` holds a transformers model that is not ELECTRA's (the slim models load
    ELECTRA checkpoints; `load_pair` loads the others)."""
    path = os.path.join(directory, "discriminator", "config.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return json.load(f).get("model_type") != "electra"


def load_pair(directory: str, *, gdes: bool = False, **kwargs) -> tuple:
    """`(generator, discriminator)` from a saved pair of transformers models other than ELECTRA: each in the class
    its `config.json` names (an `RTDDiscriminator` where `rtd_head.safetensors` is beside the encoder). `gdes=True`
    wires GDES again with each delta = the discriminator's saved embedding minus the generator's, so the pair reads
    exactly what was saved; otherwise `ElectraPretrainer` shares the embeddings (the two checkpoints hold equal
    copies). `kwargs` go to `from_pretrained`."""
    tf = require_transformers()

    def load(sub):
        path = os.path.join(directory, sub)
        if os.path.isfile(os.path.join(path, HEAD_FILE)):
            return RTDDiscriminator.from_pretrained(path, **kwargs)
        config = tf.AutoConfig.from_pretrained(path)
        names = getattr(config, "architectures", None) or []
        if not names or not hasattr(tf, names[0]):
            raise ValueError(f"{path}/config.json names no transformers class in `architectures`, got {names}")
        return getattr(tf, names[0]).from_pretrained(path, **kwargs)

    generator, discriminator = load("generator"), load("discriminator")
    if gdes:
        tie_gdes(generator, discriminator, keep=True)
    return generator, discriminator


def load_slim_pair(directory: str, *, gdes: bool = False, share_embeddings: bool = True, **overrides) -> tuple:
    """`(Generator, Discriminator)` from ELECTRA checkpoints (ours, or two written by transformers), sharing one
    set of embeddings: the discriminator's; with GDES the generator's, the discriminator's `embeddings_delta` = its
    checkpoint's embeddings minus them; none with `share_embeddings=False`. `overrides`: `ElectraModelConfig`
    fields for both (e.g. `pad_token_id`)."""
    disc_dir, gen_dir = os.path.join(directory, "discriminator"), os.path.join(directory, "generator")
    if gdes:
        generator = Generator.from_pretrained(gen_dir, **overrides)
        discriminator = Discriminator.from_pretrained(disc_dir, generator.embeddings, gdes=True, **overrides)
    else:
        discriminator = Discriminator.from_pretrained(disc_dir, **overrides)
        generator = Generator.from_pretrained(gen_dir, discriminator.embeddings if share_embeddings else None,
                                              **overrides)
    return generator, discriminator


__all__ = ["SETTINGS_FILE", "save_pair", "read_settings", "is_adapter_export", "load_pair", "load_slim_pair"]
