"""How the RTD step reads a generator and a discriminator, whatever they are: one adapter per model family.

`adapt(model, role)` returns an `Adapter`: `encode(input_ids, attention_mask, token_type_ids)` (final hidden states),
`lm_head_parts(hidden)` (generator: the LM head's transformed features, the decoder weight and bias, which the fused
`ops.lm_head_loss_and_sample` takes), `lm_logits(hidden)`, `disc_head(hidden)` (discriminator: the features and the
final dense(H -> 1) that the fused `ops.rtd_head_loss` takes), `dims()`, `embedding_slots()` (the modules that can be
shared) and `save_pretrained(directory)`. The step (`electra_fast.pretraining.pretrainer.rtd_step`) knows nothing else about
the models, so the masking, gather, fused LM head at the masked slots, sampling and fused discriminator head run the
same for every family:

- the slim `Generator` / `Discriminator` (`electra_fast.model.encoder`);
- transformers ELECTRA: `ElectraForMaskedLM` / `ElectraForPreTraining`;
- any transformers masked LM whose head is laid out as BERT's (`cls.predictions.{transform,decoder}`: BERT,
  DeBERTa-v2 with `legacy=True`, the default), RoBERTa's (`lm_head.{dense,layer_norm,decoder}`: RoBERTa, XLM-R,
  CamemBERT, ...) or DeBERTa-v2's `legacy=False` head (`lm_predictions.lm_head`, decoder = the word embeddings);
- as discriminator, any `*ForTokenClassification` with `num_labels=1` (its classifier is the RTD projection: the
  head is `classifier(dropout(hidden))`, the model's own forward) or a bare encoder (`AutoModel`: `BertModel`,
  `DebertaV2Model`, ...) wrapped in `RTDDiscriminator`, which adds ELECTRA's head dense(H -> H) -> gelu ->
  dense(H -> 1) (`ElectraPretrainer` wraps a bare encoder itself).

Embedding sharing for transformers models (`tie_embeddings`): the generator's modules among `word_embeddings`,
`position_embeddings`, `token_type_embeddings` and the embedding `LayerNorm` are replaced by the discriminator's
where both models have them with the same shapes (BERT, RoBERTa: all four, as ELECTRA; DeBERTa-v3 configs have no
absolute positions and no token types: word embeddings and LayerNorm). The word embeddings must be shareable, and
the generator's LM decoder stays tied to them. GDES (`tie_gdes`, DeBERTa-v3): the other way round, each of those
discriminator modules becomes a `GDESEmbedding` / `GDESLayerNorm` that reads `stopgrad(generator's) + delta`,
deltas zero-initialised, so the discriminator loss reaches no generator parameter.

Export (`save_pretrained`): each model in its own transformers class (GDES modules written as plain ones holding
`shared + delta`), so `AutoModel` / `AutoModelFor*` load them. An `RTDDiscriminator` writes its encoder as a plain
`save_pretrained` checkpoint (what `AutoModel.from_pretrained` and `AutoModelForSequenceClassification.from_pretrained`
load for fine-tuning) plus its head in `rtd_head.safetensors` beside it (read back by
`RTDDiscriminator.from_pretrained`); a `*ForTokenClassification` discriminator is saved as it is.
"""
from __future__ import annotations

import contextlib
import copy
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from electra_fast.model.encoder import Discriminator, Generator

HEAD_FILE = "rtd_head.safetensors"
EMBEDDING_ATTRS = {"word": "word_embeddings", "position": "position_embeddings",
                   "token_type": "token_type_embeddings", "norm": "LayerNorm"}


# ------------------------------------------------------------------------------------------- GDES modules
class GDESEmbedding(nn.Module):
    """An embedding table read as `stopgrad(shared.weight) + delta` (DeBERTa-v3's gradient-disentangled sharing).

    `shared` is the generator's `nn.Embedding` (registered here too, so the module moves with the model); `delta`
    starts at zero. Two lookups rather than one into `shared + delta`: no `[V, E]` sum per step.
    """

    def __init__(self, shared: nn.Embedding):
        super().__init__()
        self.shared = shared
        self.delta = nn.Parameter(torch.zeros_like(shared.weight))
        self.padding_idx = shared.padding_idx

    @property
    def weight(self) -> torch.Tensor:
        """The table the discriminator reads (for code that reads `.weight` directly)."""
        return self.shared.weight.detach() + self.delta

    @property
    def num_embeddings(self) -> int:
        return self.shared.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.shared.embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (F.embedding(ids, self.shared.weight.detach(), self.padding_idx)
                + F.embedding(ids, self.delta, self.padding_idx))

    def plain(self) -> nn.Embedding:
        """An `nn.Embedding` holding `shared + delta` (what an export writes)."""
        out = copy.deepcopy(self.shared)
        with torch.no_grad():
            out.weight.copy_(self.weight)
        return out


class GDESLayerNorm(nn.Module):
    """A LayerNorm whose weight and bias are `stopgrad(shared's) + delta` (zero-initialised deltas)."""

    def __init__(self, shared: nn.LayerNorm):
        super().__init__()
        self.shared = shared
        self.delta_weight = nn.Parameter(torch.zeros_like(shared.weight))
        self.delta_bias = nn.Parameter(torch.zeros_like(shared.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.shared
        return F.layer_norm(x, s.normalized_shape, s.weight.detach() + self.delta_weight,
                            s.bias.detach() + self.delta_bias, s.eps)

    def plain(self) -> nn.LayerNorm:
        out = copy.deepcopy(self.shared)
        with torch.no_grad():
            out.weight.add_(self.delta_weight)
            out.bias.add_(self.delta_bias)
        return out


_GDES_TYPES = (GDESEmbedding, GDESLayerNorm)


def has_gdes(model: nn.Module) -> bool:
    """Whether `model` reads any embedding through GDES (a slim `Discriminator(..., gdes=True)` or `tie_gdes`)."""
    if isinstance(model, (Generator, Discriminator)):
        return bool(getattr(model, "gdes", False))
    return any(isinstance(m, _GDES_TYPES) for m in model.modules())


@contextlib.contextmanager
def plain_embeddings(model: nn.Module):
    """Within the block, each GDES module of `model` is a plain module holding `shared + delta` (for export)."""
    swapped = []
    for name, m in list(model.named_modules()):
        if isinstance(m, _GDES_TYPES):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, attr, m.plain())
            swapped.append((parent, attr, m))
    try:
        yield model
    finally:
        for parent, attr, m in swapped:
            setattr(parent, attr, m)


# --------------------------------------------------------------------------------- bare encoder + RTD head
class RTDHead(nn.Module):
    """ELECTRA's discriminator head: dense(H -> H) -> gelu -> dense(H -> 1)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size, 1)

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(hidden))


class RTDDiscriminator(nn.Module):
    """A transformers encoder (`AutoModel`: `BertModel`, `RobertaModel`, `DebertaV2Model`, ...) + ELECTRA's RTD head.

    `save_pretrained(dir)` writes the encoder as transformers does (`AutoModel.from_pretrained(dir)` and
    `AutoModelForSequenceClassification.from_pretrained(dir)` load it for fine-tuning) and the head beside it in
    `rtd_head.safetensors`; `RTDDiscriminator.from_pretrained(dir)` loads both.
    """

    def __init__(self, encoder: nn.Module, head: Optional[RTDHead] = None):
        super().__init__()
        _require_encoder(encoder, "encoder")
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
        return self.head.out(self.head.features(hidden)).squeeze(-1)

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

        from electra_fast.io.hf import require_transformers

        model = cls(require_transformers().AutoModel.from_pretrained(directory, **kwargs))
        path = os.path.join(directory, HEAD_FILE)
        if os.path.isfile(path):
            model.head.load_state_dict(load_file(path))
        return model


def _is_transformers(model) -> bool:
    return hasattr(model, "config") and hasattr(model, "base_model") and hasattr(model, "save_pretrained")


def _require_encoder(model, name: str) -> None:
    if not _is_transformers(model):
        raise TypeError(f"{name} must be a transformers PreTrainedModel (with config, base_model, save_pretrained), "
                        f"got {type(model).__name__}")
    if model.base_model is not model:
        raise TypeError(f"{name} must be a bare encoder (AutoModel, e.g. BertModel), got {type(model).__name__} "
                        "(a model with a head: pass it as it is, not inside RTDDiscriminator)")


def is_bare_encoder(model) -> bool:
    """A transformers base model (`AutoModel`) without a head: `ElectraPretrainer` wraps it in `RTDDiscriminator`."""
    return _is_transformers(model) and model.base_model is model


# ------------------------------------------------------------------------------------------------- adapters
class Adapter:
    """The step's view of one model. `role`: "generator" or "discriminator". Subclasses implement what applies."""
    family = "?"
    electra_dims = False  # slim and transformers' ELECTRA: the pair must agree on all of `dims()`
    fused_lm_head = True  # default of rtd_step's `fused_lm_head`

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

    def save_pretrained(self, directory: str) -> None:
        self.model.save_pretrained(directory)


def _electra_config_dims(c) -> dict:
    # ELECTRA's config fields, the same names in the slim config and transformers' ElectraConfig
    return {"vocab_size": c.vocab_size, "embedding_size": c.embedding_size,
            "max_position_embeddings": c.max_position_embeddings, "type_vocab_size": c.type_vocab_size}


class SlimAdapter(Adapter):
    family = "slim"
    electra_dims = True

    def dims(self) -> dict:
        return _electra_config_dims(self.model.config)

    def encode(self, input_ids, attention_mask, token_type_ids):
        return self.model.encode(input_ids, attention_mask, token_type_ids)

    def lm_head_parts(self, hidden):  # padded columns >= vocab_size: the MLM ops' vocab_size= skips them
        return self.model.lm_head_parts(hidden)

    def disc_head(self, hidden):
        return self.model.head_features(hidden), self.model.head.out

    def embedding_slots(self) -> dict:
        e = self.model.embeddings
        return {"word": (e, "word"), "position": (e, "position"), "token_type": (e, "token_type"), "norm": (e, "norm")}


class TransformersAdapter(Adapter):
    """Any transformers model: the encoder is `model.base_model`, the embeddings `base_model.embeddings`."""
    family = "transformers"

    def __init__(self, model, role):
        super().__init__(model, role)
        self.encoder = model.encoder if isinstance(model, RTDDiscriminator) else model.base_model
        emb = getattr(self.encoder, "embeddings", None)
        if emb is None or getattr(emb, "word_embeddings", None) is None:
            raise TypeError(f"{role} {type(model).__name__}: cannot wire its embeddings, expected "
                            f"{type(self.encoder).__name__}.embeddings.word_embeddings (the layout of BERT, RoBERTa, "
                            "DeBERTa-v2, ELECTRA)")
        self.embeddings = emb

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

    def save_pretrained(self, directory):
        with plain_embeddings(self.model):
            self.model.save_pretrained(directory)


class ElectraHFAdapter(TransformersAdapter):
    """transformers' `ElectraForMaskedLM` / `ElectraForPreTraining` (unfused LM head by default, as before)."""
    family = "electra"
    electra_dims = True
    fused_lm_head = False

    def dims(self) -> dict:
        return _electra_config_dims(self.model.config)

    def lm_head_parts(self, hidden):
        out = self.model.generator_lm_head
        return self.model.generator_predictions(hidden), out.weight, out.bias

    def disc_head(self, hidden):
        head = self.model.discriminator_predictions
        return head.activation(head.dense(hidden)), head.dense_prediction


class BertHeadAdapter(TransformersAdapter):
    """`cls.predictions.{transform, decoder}`: BERT, DeBERTa-v2 (legacy head), and others laid out so."""
    family = "bert-head"

    def lm_head_parts(self, hidden):
        p = self.model.cls.predictions
        return p.transform(hidden), p.decoder.weight, p.decoder.bias


class RobertaHeadAdapter(TransformersAdapter):
    """`lm_head.{dense, layer_norm, decoder}` with GELU: RoBERTa, XLM-R, CamemBERT, ..."""
    family = "roberta-head"

    def lm_head_parts(self, hidden):
        h = self.model.lm_head
        return h.layer_norm(F.gelu(h.dense(hidden))), h.decoder.weight, h.decoder.bias


class DebertaHeadAdapter(TransformersAdapter):
    """DeBERTa-v2 `legacy=False`: `lm_predictions.lm_head.{dense, transform_act_fn, LayerNorm, bias}` and the word
    embeddings as decoder."""
    family = "deberta-head"

    def lm_head_parts(self, hidden):
        h = self.model.lm_predictions.lm_head
        return (h.LayerNorm(h.transform_act_fn(h.dense(hidden))), self.embeddings.word_embeddings.weight, h.bias)


class TokenClassificationAdapter(TransformersAdapter):
    """`*ForTokenClassification` with `num_labels=1`: RTD logit = `classifier(dropout(hidden))`, as its forward."""
    family = "token-classification"

    def disc_head(self, hidden):
        return self.model.dropout(hidden), self.model.classifier


class RTDAdapter(TransformersAdapter):
    family = "rtd-head"

    def disc_head(self, hidden):
        return self.model.head.features(hidden), self.model.head.out

    def save_pretrained(self, directory):
        self.model.save_pretrained(directory)


_MLM_HEADS = (("cls.predictions.transform", BertHeadAdapter), ("lm_head.layer_norm", RobertaHeadAdapter),
              ("lm_predictions.lm_head", DebertaHeadAdapter), ("generator_predictions", ElectraHFAdapter))


def _has(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def _adapter_class(model, role: str):
    if role not in ("generator", "discriminator"):
        raise ValueError(f"role must be 'generator' or 'discriminator', got {role!r}")
    name = type(model).__name__
    if role == "generator":
        if isinstance(model, Generator):
            return SlimAdapter
        if _is_transformers(model):
            for path, cls in _MLM_HEADS:
                if _has(model, path):
                    return cls
            raise TypeError(f"generator {name}: no MLM head found; expected a transformers masked LM with "
                            f"one of {[p for p, _ in _MLM_HEADS]} (BERT, RoBERTa, DeBERTa-v2, ELECTRA), or an "
                            "electra_fast Generator")
        raise TypeError(f"generator must be an electra_fast Generator or a transformers masked LM (BertForMaskedLM, "
                        f"RobertaForMaskedLM, DebertaV2ForMaskedLM, ElectraForMaskedLM, ...), got {name}")
    if isinstance(model, Discriminator):
        return SlimAdapter
    if isinstance(model, RTDDiscriminator):
        return RTDAdapter
    if _is_transformers(model):
        if _has(model, "discriminator_predictions"):
            return ElectraHFAdapter
        if name.endswith("ForTokenClassification"):
            classifier = getattr(model, "classifier", None)
            if not isinstance(classifier, nn.Linear) or not hasattr(model, "dropout"):
                raise TypeError(f"discriminator {name}: expected a `classifier` nn.Linear after a `dropout`, "
                                f"got classifier={type(classifier).__name__}")
            if classifier.out_features != 1:
                raise ValueError(f"discriminator {name} must have num_labels=1 (one replaced-token logit per "
                                 f"token), got num_labels={classifier.out_features}")
            return TokenClassificationAdapter
        if model.base_model is model:
            raise TypeError(f"discriminator {name} is a bare encoder without an RTD head: wrap it as "
                            "electra_fast.pretraining.adapters.RTDDiscriminator(model) (ElectraPretrainer does this itself)")
    raise TypeError(f"discriminator must be an electra_fast Discriminator, a transformers ElectraForPreTraining, a "
                    "*ForTokenClassification with num_labels=1, or an RTDDiscriminator around a transformers encoder "
                    f"(AutoModel), got {name}")


def adapt(model, role: str) -> Adapter:
    """The adapter through which the RTD step reads `model` as `role` ("generator" or "discriminator"); a
    `TypeError` naming what is missing for a model it cannot wire."""
    return _adapter_class(model, role)(model, role)


def as_discriminator(model):
    """`model`, or `RTDDiscriminator(model)` for a bare transformers encoder (`AutoModel`)."""
    return RTDDiscriminator(model) if is_bare_encoder(model) else model


# ----------------------------------------------------------------------------------------- pair of models
def check_pair(generator, discriminator) -> tuple:
    """`(generator adapter, discriminator adapter)`; the two must share the vocabulary (and, for ELECTRA's own
    models, embedding size, positions and token types)."""
    g, d = adapt(generator, "generator"), adapt(discriminator, "discriminator")
    gd, dd = g.dims(), d.dims()
    names = tuple(gd) if g.electra_dims and d.electra_dims else ("vocab_size",)
    for name in names:
        if gd[name] != dd[name]:
            raise ValueError(f"generator and discriminator must have the same {name}: the discriminator has "
                             f"{dd[name]}, the generator {gd[name]}")
    if (g.family == "slim") != (d.family == "slim"):
        raise TypeError("generator and discriminator must both be electra_fast models or both transformers models, "
                        f"got {type(generator).__name__} and {type(discriminator).__name__}")
    return g, d


def pair_dims(generator: Adapter, discriminator: Adapter) -> dict:
    """The limits a batch must fit for both models (their adapters, from `check_pair`): the vocabulary, the fewer
    positions and token types."""
    g, d = generator.dims(), discriminator.dims()
    return {"vocab_size": d["vocab_size"], "embedding_size": d["embedding_size"],
            **{k: min(g[k], d[k]) for k in ("max_position_embeddings", "type_vocab_size")}}


def _slots(adapter) -> dict:
    return {k: getattr(parent, attr) for k, (parent, attr) in adapter.embedding_slots().items()}


def _shapes(module) -> dict:
    return {n: tuple(t.shape) for n, t in module.state_dict().items()}


def _shareable(g: Adapter, d: Adapter, what: str) -> list:
    """Keys of the embedding modules both models have with the same shapes; "word" must be one of them."""
    gm, dm = _slots(g), _slots(d)
    if _shapes(gm["word"]) != _shapes(dm["word"]):
        raise ValueError(f"cannot {what} the word embeddings: the generator's have shapes {_shapes(gm['word'])}, "
                         f"the discriminator's {_shapes(dm['word'])} (or pass share_embeddings=False)")
    if gm["word"].padding_idx != dm["word"].padding_idx:
        raise ValueError(f"cannot {what} the word embeddings: generator and discriminator must have the same "
                         f"pad_token_id, the discriminator has {dm['word'].padding_idx}, the generator "
                         f"{gm['word'].padding_idx}")
    return _common_keys(gm, dm)


def _common_keys(gm: dict, dm: dict) -> list:
    return [k for k in gm if k in dm and _shapes(gm[k]) == _shapes(dm[k])
            and getattr(gm[k], "eps", None) == getattr(dm[k], "eps", None)]


def shared_keys(generator, discriminator) -> list:
    """The embedding modules the two models share (same module, or GDES-read by the discriminator)."""
    g, d = check_pair(generator, discriminator)
    gm, dm = _slots(g), _slots(d)
    return [k for k in gm if k in dm and (dm[k] is gm[k] or getattr(dm[k], "shared", None) is gm[k])]


def embeddings_shared(generator, discriminator) -> bool:
    """Whether the generator uses the discriminator's embedding modules: for ELECTRA's models all four (word,
    position, token type, LayerNorm); for other transformers models the word embeddings (and whatever else of the
    four both have with the same shapes, which `tie_embeddings` shares too)."""
    g, d = check_pair(generator, discriminator)
    gm, dm = _slots(g), _slots(d)
    if g.family == "slim" or (g.electra_dims and d.electra_dims):
        return all(gm[k] is dm[k] for k in gm)
    return gm["word"] is dm["word"] and all(gm[k] is dm[k] for k in _common_keys(gm, dm))


def _retie(g: Adapter, old_word: nn.Module, new_word: nn.Module) -> None:
    out = g.model.get_output_embeddings() if hasattr(g.model, "get_output_embeddings") else None
    if isinstance(out, nn.Linear) and out.weight is old_word.weight:
        out.weight = new_word.weight


def tie_embeddings(generator, discriminator) -> list:
    """Share the embedding modules, in place, as ELECTRA does: the generator's are replaced by the discriminator's
    (its LM decoder stays tied to the word embeddings). Returns the keys shared. Build the optimizer afterwards.

    Slim and transformers' ELECTRA models: all four or an error naming the shapes that differ. Other transformers
    models: the word embeddings (an error if they differ) and each of position, token type and LayerNorm that both
    models have with the same shapes (and eps)."""
    g, d = check_pair(generator, discriminator)
    if g.electra_dims and d.electra_dims and embeddings_shared(generator, discriminator):
        return list(EMBEDDING_ATTRS)
    if g.family == "slim":
        _check_all_shareable(g, d)
        if generator.embeddings is not discriminator.embeddings:
            generator.embeddings, generator._owns_embeddings = discriminator.embeddings, False
        return list(EMBEDDING_ATTRS)
    if has_gdes(discriminator):
        raise ValueError("the discriminator reads its embeddings through GDES already: build the pretrainer with "
                         "gdes=True, or pass models without GDES modules")
    if g.electra_dims and d.electra_dims:
        _check_all_shareable(g, d)
    keys = _shareable(g, d, "share")
    gs, ds = g.embedding_slots(), d.embedding_slots()
    for k in keys:
        parent, attr = gs[k]
        old, new = getattr(parent, attr), getattr(*ds[k])
        if old is not new:
            setattr(parent, attr, new)
            if k == "word":
                _retie(g, old, new)
    return keys


def _check_all_shareable(g: Adapter, d: Adapter) -> None:
    gc, dc = g.model.config, d.model.config
    for name in ("layer_norm_eps", "pad_token_id", "pad_vocab_multiple"):
        if getattr(gc, name, None) != getattr(dc, name, None):
            raise ValueError(f"cannot share the embeddings: generator and discriminator must have the same {name}, the "
                             f"discriminator has {getattr(dc, name, None)}, the generator {getattr(gc, name, None)} "
                             "(or pass share_embeddings=False)")
    gm, dm = _slots(g), _slots(d)
    for key in gm:
        if _shapes(gm[key]) != _shapes(dm[key]):
            raise ValueError(f"cannot share the embeddings: the generator's {key} embedding parameters have shapes "
                             f"{_shapes(gm[key])}, the discriminator's {_shapes(dm[key])} "
                             "(or pass share_embeddings=False)")


def tie_gdes(generator, discriminator) -> list:
    """GDES for transformers models, in place: each embedding module both models have with the same shapes (the
    word embeddings at least) becomes, in the discriminator, a GDES module reading `stopgrad(generator's) + delta`
    (deltas zero: the discriminator starts from the generator's embeddings). Returns the keys. Build the optimizer
    afterwards. Slim models build GDES themselves (`Discriminator(config, gdes=True)`)."""
    g, d = check_pair(generator, discriminator)
    if g.family == "slim":
        raise TypeError("tie_gdes is for transformers models; slim models: Discriminator(config, gdes=True) with the "
                        "generator's embeddings")
    if has_gdes(discriminator):
        return shared_keys(generator, discriminator)
    if any(a is b for a, b in zip(_slots(g).values(), _slots(d).values())):
        raise ValueError("the models share embedding modules already: GDES needs the generator's and the "
                         "discriminator's own; pass models built apart")
    keys = _shareable(g, d, "GDES-share")
    gs, ds = g.embedding_slots(), d.embedding_slots()
    for k in keys:
        shared = getattr(*gs[k])
        setattr(*ds[k], GDESLayerNorm(shared) if isinstance(shared, nn.LayerNorm) else GDESEmbedding(shared))
    return keys


# ------------------------------------------------------------------------------------------------ reload
def is_adapter_export(directory: str) -> bool:
    """Whether `directory/discriminator` holds a transformers model that is not ELECTRA's (the slim models load
    ELECTRA checkpoints; `load_pair` loads the others)."""
    import json

    path = os.path.join(directory, "discriminator", "config.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return json.load(f).get("model_type") != "electra"


def load_pair(directory: str, *, gdes: bool = False, **kwargs) -> tuple:
    """`(generator, discriminator)` from `ElectraPretrainer.save_pretrained(directory)` of transformers models other
    than ELECTRA: each in the class its `config.json` names (an `RTDDiscriminator` where `rtd_head.safetensors` is
    beside the encoder). `gdes=True` wires GDES again with each delta = the discriminator's saved embedding minus
    the generator's, so the pair reads exactly what was saved; otherwise `ElectraPretrainer` shares the
    embeddings (the two checkpoints hold equal copies). `kwargs` go to `from_pretrained`."""
    from electra_fast.io.hf import require_transformers

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
        saved = _slots(adapt(discriminator, "discriminator"))
        keys = tie_gdes(generator, discriminator)
        now = _slots(adapt(discriminator, "discriminator"))
        with torch.no_grad():
            for k in keys:
                m, old = now[k], saved[k]
                if isinstance(m, GDESEmbedding):
                    m.delta.copy_(old.weight - m.shared.weight)
                else:
                    m.delta_weight.copy_(old.weight - m.shared.weight)
                    m.delta_bias.copy_(old.bias - m.shared.bias)
    return generator, discriminator


# ----------------------------------------------------------------------------------------- DeBERTa-v3 recipe
# DeBERTa-v3 paper (He et al. 2021, arXiv 2111.09543) sizes; the generator has half the discriminator's depth and
# its width. "tiny" is ours, for tests. Vocabulary: the tokenizer's (the paper's is a 128k SentencePiece model).
DEBERTA_V3_PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "xsmall": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536),
    "small": dict(hidden_size=768, num_hidden_layers=6, num_attention_heads=12, intermediate_size=3072),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}
# What every released DeBERTa-v3 config.json sets: relative attention (c2p + p2c, log buckets), no absolute
# positions, no token types.
DEBERTA_V3_CONFIG = dict(relative_attention=True, position_biased_input=False, pos_att_type=["p2c", "c2p"],
                         max_relative_positions=-1, position_buckets=256, norm_rel_ebd="layer_norm", share_att_key=True,
                         type_vocab_size=0, layer_norm_eps=1e-7, hidden_act="gelu", max_position_embeddings=512,
                         hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, initializer_range=0.02)


def deberta_v3_models(preset: str, *, vocab_size: int, pad_token_id: int, generator_layers: Optional[int] = None,
                      **overrides) -> tuple:
    """`(DebertaV2ForMaskedLM generator, RTDDiscriminator(DebertaV2Model))`, fresh, sized by
    `DEBERTA_V3_PRESETS[preset]`; `overrides`: `DebertaV2Config` fields for both; `generator_layers` defaults to
    half the discriminator's depth."""
    if preset not in DEBERTA_V3_PRESETS:
        raise ValueError(f"preset must be one of {sorted(DEBERTA_V3_PRESETS)}, got {preset!r}")
    from electra_fast.io.hf import require_transformers

    tf = require_transformers()
    fields = {**DEBERTA_V3_CONFIG, **DEBERTA_V3_PRESETS[preset], **overrides}
    disc_cfg = tf.DebertaV2Config(vocab_size=vocab_size, pad_token_id=pad_token_id, **fields)
    layers = max(1, fields["num_hidden_layers"] // 2) if generator_layers is None else generator_layers
    gen_cfg = tf.DebertaV2Config(vocab_size=vocab_size, pad_token_id=pad_token_id,
                                 **{**fields, "num_hidden_layers": layers})
    return tf.DebertaV2ForMaskedLM(gen_cfg), RTDDiscriminator(tf.DebertaV2Model(disc_cfg))


def deberta_v3_pretrainer(preset: str, *, tokenizer=None, vocab_size: Optional[int] = None,
                          mask_token_id: Optional[int] = None, special_token_ids=None,
                          pad_token_id: Optional[int] = None, gdes: bool = True, generator_layers: Optional[int] = None,
                          **kwargs):
    """An `ElectraPretrainer` for the DeBERTa-v3 recipe: `deberta_v3_models(preset)`, GDES on, RTD weight 50,
    mask_prob 0.15. Token ids from `tokenizer` or given (as `ElectraPretrainer.from_preset`); `kwargs`: the
    pretrainer's (`mask_prob`, `disc_weight`, ...) and `DebertaV2Config` fields."""
    from electra_fast.pretraining.pretrainer import _PRETRAINER_KWARGS, ElectraPretrainer, _check_tokenizer_fits, resolve_ids

    ids, tokenizer_vocab = resolve_ids(tokenizer, mask_token_id, special_token_ids, pad_token_id)
    if vocab_size is None:
        if tokenizer_vocab is None:
            raise ValueError("vocab_size must be given when no tokenizer is")
        vocab_size = tokenizer_vocab
    _check_tokenizer_fits(tokenizer_vocab, vocab_size)
    settings = {k: kwargs.pop(k) for k in _PRETRAINER_KWARGS if k in kwargs}
    generator, discriminator = deberta_v3_models(preset, vocab_size=vocab_size, pad_token_id=ids["pad_token_id"],
                                                 generator_layers=generator_layers, **kwargs)
    return ElectraPretrainer(generator, discriminator, mask_token_id=ids["mask_token_id"],
                             special_token_ids=ids["special_token_ids"], gdes=gdes,
                             **{"mask_prob": 0.15, "disc_weight": 50.0, **settings})


__all__ = ["adapt", "Adapter", "RTDDiscriminator", "RTDHead", "GDESEmbedding", "GDESLayerNorm", "as_discriminator",
           "has_gdes", "plain_embeddings", "tie_embeddings", "tie_gdes", "embeddings_shared", "shared_keys",
           "pair_dims", "check_pair", "DEBERTA_V3_PRESETS", "DEBERTA_V3_CONFIG", "deberta_v3_models",
           "deberta_v3_pretrainer", "load_pair", "is_adapter_export"]
