"""The slim models in Hugging Face `transformers`' ELECTRA format (docs/algorithm.md#transformers-checkpoints): the
config mapping, the weight names, one model to and from a directory.

This module does not import the models (`electra_fast.model.encoder` imports it for `save_pretrained` /
`from_pretrained`): functions take the model, or its class, as an argument; a model class names its transformers
architecture in `hf_architecture`.

Checkpoints are transformers' format: `config.json` (ElectraConfig fields) + `model.safetensors` with
`ElectraForPreTraining` (discriminator) or `ElectraForMaskedLM` (generator) parameter names, so
`ElectraForPreTraining.from_pretrained(dir)` / `ElectraForMaskedLM.from_pretrained(dir)` load what we write and we
load what their `save_pretrained` writes. Reading and writing files needs only safetensors; `transformers` (an
optional extra) is imported here only to fetch a hub id (`electra_fast.io.hf` converts transformers model objects).

The one structural difference: our attention uses one fused QKV Linear, transformers has separate
query/key/value Linears; they are concatenated (rows query, key, value) on load and split on save.
Each checkpoint carries its own copy of the shared embeddings, as the reference's do; with GDES the
discriminator's copy of each embedding parameter is `shared + delta` (its `embeddings_delta`), which is what it
reads, and loading it beside the generator's embeddings sets `delta = checkpoint - shared`.
The slim models pad their vocabulary tables to `config.padded_vocab_size` rows; checkpoints hold the logical
`vocab_size` rows only (export slices, import pads with zeros), so they are the same files either way.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import MISSING

import torch

from electra_fast.model.config import ElectraModelConfig

CONFIG_FIELDS = ("vocab_size", "embedding_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "intermediate_size", "max_position_embeddings", "type_vocab_size", "layer_norm_eps",
                 "hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range", "pad_token_id")
GENERATOR_ARCHITECTURE, DISCRIMINATOR_ARCHITECTURE = "ElectraForMaskedLM", "ElectraForPreTraining"
PREFIX = "electra."
# Buffers transformers may write that carry no weights.
IGNORED_SUFFIXES = ("position_ids", "token_type_ids")


def require_transformers():
    """Import transformers or say how to get it."""
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("this needs the optional dependency `transformers`: pip install 'electra-fast[hf]'") from e
    return transformers


# ----------------------------------------------------------------------------------------------- configs
def to_hf_config(config: ElectraModelConfig, architecture: str) -> dict:
    """Our config as the `config.json` dict of a transformers ELECTRA checkpoint."""
    d = {"architectures": [architecture], "model_type": "electra", "hidden_act": "gelu",
         "position_embedding_type": "absolute", "tie_word_embeddings": True}
    d.update({name: getattr(config, name) for name in CONFIG_FIELDS})
    return d


def from_hf_config(d: dict, **overrides) -> ElectraModelConfig:
    """An `ElectraConfig` dict (config.json or `ElectraConfig.to_dict()`) as our config; refuses what we lack.

    `overrides`: `ElectraModelConfig` fields that replace the checkpoint's (e.g. `pad_token_id`) or that
    transformers lacks (`pad_vocab_multiple`, the slim model's vocabulary padding; default 128).
    """
    act = d.get("hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"hidden_act must be 'gelu' (erf GELU, the only activation the slim model has), got {act!r}")
    pos = d.get("position_embedding_type", "absolute")
    if pos != "absolute":
        raise ValueError(f"position_embedding_type must be 'absolute', got {pos!r}")
    if d.get("is_decoder", False):
        raise ValueError("is_decoder must be False: ELECTRA pretraining uses bidirectional encoders")
    defaults = {f.name: f.default for f in dataclasses.fields(ElectraModelConfig) if f.default is not MISSING}
    if "embedding_size" not in d:  # transformers' default; checkpoints nearly always set it
        d = {**d, "embedding_size": 128}
    if d.get("pad_token_id") is None:
        d = {**d, "pad_token_id": 0}
    return ElectraModelConfig(**{**{f: d.get(f, defaults.get(f)) for f in CONFIG_FIELDS}, **overrides})


def architecture(model_or_class) -> str:
    """The transformers class a slim model (or model class) is written as: its `hf_architecture`."""
    arch = getattr(model_or_class, "hf_architecture", None)
    if arch not in (GENERATOR_ARCHITECTURE, DISCRIMINATOR_ARCHITECTURE):
        name = model_or_class.__name__ if isinstance(model_or_class, type) else type(model_or_class).__name__
        raise TypeError(f"the model (or cls) must be an electra_fast Generator or Discriminator, got {name}")
    return arch


def _is_generator(model) -> bool:
    return architecture(model) == GENERATOR_ARCHITECTURE


# ------------------------------------------------------------------------------------------ state dicts
def _pairs(model) -> list:
    """(our name, transformers name) for every parameter but the fused QKV."""
    e = "electra.embeddings."
    pairs = [("embeddings.word.weight", e + "word_embeddings.weight"),
             ("embeddings.position.weight", e + "position_embeddings.weight"),
             ("embeddings.token_type.weight", e + "token_type_embeddings.weight"),
             ("embeddings.norm.weight", e + "LayerNorm.weight"), ("embeddings.norm.bias", e + "LayerNorm.bias")]
    if model.embeddings_project is not None:
        pairs += [(f"embeddings_project.{p}", f"electra.embeddings_project.{p}") for p in ("weight", "bias")]
    for i in range(len(model.layers)):
        hf = f"electra.encoder.layer.{i}."
        for ours, theirs in (("attn_out", "attention.output.dense"), ("attn_norm", "attention.output.LayerNorm"),
                             ("ffn_in", "intermediate.dense"), ("ffn_out", "output.dense"),
                             ("ffn_norm", "output.LayerNorm")):
            pairs += [(f"layers.{i}.{ours}.{p}", f"{hf}{theirs}.{p}") for p in ("weight", "bias")]
    if _is_generator(model):
        pairs += [(f"head.dense.{p}", f"generator_predictions.dense.{p}") for p in ("weight", "bias")]
        pairs += [(f"head.norm.{p}", f"generator_predictions.LayerNorm.{p}") for p in ("weight", "bias")]
        pairs += [("head.bias", "generator_lm_head.bias")]
    else:
        pairs += [(f"head.dense.{p}", f"discriminator_predictions.dense.{p}") for p in ("weight", "bias")]
        pairs += [(f"head.out.{p}", f"discriminator_predictions.dense_prediction.{p}") for p in ("weight", "bias")]
    return pairs


def _effective_embeddings(model) -> dict:
    """The embedding parameters the model reads, by our name: `shared + delta` for a GDES discriminator; the word
    table's logical vocabulary only (the padded rows are left out)."""
    delta = getattr(model, "embeddings_delta", None)
    out = {f"embeddings.{name}": p if delta is None else p + delta.get_parameter(name)
           for name, p in model.embeddings.named_parameters()}
    out["embeddings.word.weight"] = out["embeddings.word.weight"][: model.config.vocab_size]
    return out


def hf_state_dict(model, *, include_tied: bool = False) -> dict:
    """Our weights under transformers' names (fresh contiguous tensors, safe to save).

    `include_tied` adds `generator_lm_head.weight` (= the word embeddings), which transformers' own files omit
    because it is tied, but `load_state_dict` on a transformers module expects.
    """
    ours = {**dict(model.named_parameters()), **_effective_embeddings(model)}
    out = {theirs: ours[name] for name, theirs in _pairs(model)}
    generator = _is_generator(model)
    if generator:
        out["generator_lm_head.bias"] = out["generator_lm_head.bias"][: model.config.vocab_size]
    if include_tied and generator:
        out["generator_lm_head.weight"] = out["electra.embeddings.word_embeddings.weight"]
    for i, layer in enumerate(model.layers):
        for p in ("weight", "bias"):
            q, k, v = getattr(layer.qkv, p).chunk(3, dim=0)
            for name, t in (("query", q), ("key", k), ("value", v)):
                out[f"electra.encoder.layer.{i}.attention.self.{name}.{p}"] = t
    # safetensors refuses tensors that share storage (the q/k/v views, the tied weight): copy each one.
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def _normalise(state: dict) -> dict:
    """Prefix bare `ElectraModel` names with `electra.`, drop buffers."""
    out = {}
    for k, v in state.items():
        if k.endswith(IGNORED_SUFFIXES):
            continue
        if not k.startswith(PREFIX) and k.split(".")[0] in ("embeddings", "embeddings_project", "encoder"):
            k = PREFIX + k
        out[k] = v
    return out


def load_hf_state_dict(model, state: dict, *,
                       tie_word_embeddings: bool = True) -> None:
    """Copy a transformers-named state dict into `model` in place.

    Embeddings the model does not own (shared with the other model) are not overwritten: a GDES discriminator
    takes `delta = checkpoint - shared` for each embedding parameter, any other model gets a warning where the
    checkpoint's copy differs from them. Embeddings the model owns take the checkpoint's values (a GDES delta
    restarts from zero). The checkpoint holds `vocab_size` rows; the padded rows of the word table, delta and bias
    are set to zero.
    """
    state = _normalise(state)
    wanted = _pairs(model) + [(None, f"electra.encoder.layer.{i}.attention.self.{n}.{p}")
               for i in range(len(model.layers)) for n in ("query", "key", "value") for p in ("weight", "bias")]
    missing = [theirs for _, theirs in wanted if theirs not in state]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} weight(s) a {type(model).__name__} needs, "
                         f"e.g. {missing[:4]} (is it the other model's checkpoint?)")
    known = {theirs for _, theirs in wanted} | {"generator_lm_head.weight"}
    unexpected = sorted(set(state) - known)
    if unexpected:
        warnings.warn(f"ignoring {len(unexpected)} checkpoint weight(s) the {type(model).__name__} does not use, "
                      f"e.g. {unexpected[:4]}")
    word = state["electra.embeddings.word_embeddings.weight"]
    lm = state.get("generator_lm_head.weight")
    generator = _is_generator(model)
    if generator and not tie_word_embeddings and lm is not None and not torch.equal(lm, word):
        raise ValueError("generator_lm_head.weight must equal the word embeddings (the slim generator ties them, as "
                         "ELECTRA does); this checkpoint has tie_word_embeddings=False and they differ")
    v = model.config.vocab_size
    if word.shape[0] != v:
        raise ValueError(f"electra.embeddings.word_embeddings.weight must have vocab_size={v} rows (the config's), "
                         f"got shape {tuple(word.shape)}")
    # The checkpoint's rows of the vocabulary tables; the padded ones are zeroed below.
    ours = {**dict(model.named_parameters()), "embeddings.word.weight": model.embeddings.word.weight[:v]}
    if generator:
        ours["head.bias"] = model.head.bias[:v]
    delta = getattr(model, "embeddings_delta", None)
    deltas = {} if delta is None else {f"embeddings.{n}": p for n, p in delta.named_parameters()}
    if delta is not None:
        deltas["embeddings.word.weight"] = delta.word.weight[:v]
    shared = not model._owns_embeddings
    with torch.no_grad():
        for name, theirs in _pairs(model):
            if not (shared and name.startswith("embeddings.")):
                ours[name].copy_(state[theirs])
                if name in deltas:
                    deltas[name].zero_()
            elif name in deltas:  # GDES: the checkpoint holds what the discriminator reads, shared + delta
                deltas[name].copy_(state[theirs].to(deltas[name]) - ours[name])
            else:
                _warn_if_differs(ours[name], state[theirs], theirs)
        if not shared:
            model.embeddings.word.weight[v:].zero_()
        if delta is not None:
            delta.word.weight[v:].zero_()
        if generator:
            model.head.bias[v:].zero_()
        for i, layer in enumerate(model.layers):
            for p in ("weight", "bias"):
                pre = f"electra.encoder.layer.{i}.attention.self."
                getattr(layer.qkv, p).copy_(torch.cat([state[f"{pre}{n}.{p}"] for n in ("query", "key", "value")]))


def _warn_if_differs(ours: torch.Tensor, theirs: torch.Tensor, name: str) -> None:
    if ours.shape != theirs.shape or not torch.allclose(ours, theirs.to(ours), rtol=0, atol=1e-6):
        warnings.warn(f"{name} in the checkpoint differs from the shared embeddings it was loaded beside; "
                      "the shared copy is kept")


# -------------------------------------------------------------------------------------------------- files
def save(model, directory: str) -> None:
    """Write `directory/config.json` + `directory/model.safetensors` loadable by transformers."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(to_hf_config(model.config, architecture(model)), f, indent=2, sort_keys=True)
    # transformers refuses safetensors files without format metadata.
    save_file(hf_state_dict(model), os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})


def read_checkpoint(directory: str) -> tuple:
    """`(config dict, state dict)` from a local transformers checkpoint directory (safetensors, sharded or
    not, or `pytorch_model.bin`)."""
    from safetensors.torch import load_file

    cfg_path = os.path.join(directory, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"path must be a checkpoint directory with a config.json, got {directory!r}")
    with open(cfg_path) as f:
        config = json.load(f)
    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(single):
        return config, load_file(single)
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(os.path.join(directory, shard)))
        return config, state
    binary = os.path.join(directory, "pytorch_model.bin")
    if os.path.isfile(binary):
        return config, torch.load(binary, map_location="cpu", weights_only=True)
    raise ValueError(f"no model.safetensors, model.safetensors.index.json or pytorch_model.bin in {directory!r}")


def load(cls, path: str, *, embeddings=None, gdes: bool = False, **overrides):
    """Build a `Generator` / `Discriminator` (`cls`) from a local checkpoint dir, or a hub id (needs transformers).

    `embeddings`: shared `ElectraEmbeddings` to build it around (see `load_hf_state_dict`); `overrides`:
    `ElectraModelConfig` fields, see `from_hf_config` (e.g. `pad_vocab_multiple=1`: no padding).
    """
    arch = architecture(cls)
    if gdes and arch != DISCRIMINATOR_ARCHITECTURE:
        raise ValueError("gdes=True applies to the Discriminator only (it holds the embedding delta)")
    if os.path.isdir(path):
        config, state = read_checkpoint(path)
    else:
        hf_model = getattr(require_transformers(), arch).from_pretrained(path)
        config, state = hf_model.config.to_dict(), hf_model.state_dict()
    return build(cls, config, state, embeddings=embeddings, gdes=gdes, **overrides)


def build(cls, config: dict, state: dict, *, embeddings=None, gdes: bool = False, **overrides):
    """A `cls` model from a transformers config dict and state dict (see `load`)."""
    cfg = from_hf_config(config, **overrides)
    model = cls(cfg, embeddings, gdes=gdes) if architecture(cls) == DISCRIMINATOR_ARCHITECTURE else cls(cfg, embeddings)
    load_hf_state_dict(model, state, tie_word_embeddings=config.get("tie_word_embeddings", True))
    return model


__all__ = ["CONFIG_FIELDS", "GENERATOR_ARCHITECTURE", "DISCRIMINATOR_ARCHITECTURE", "architecture", "to_hf_config",
           "from_hf_config", "hf_state_dict", "load_hf_state_dict", "save", "read_checkpoint", "load", "build",
           "require_transformers"]
