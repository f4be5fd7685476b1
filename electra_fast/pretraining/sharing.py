"""Embedding sharing between a generator and a discriminator: the one place that ties them.

`tie_embeddings` (ELECTRA): the generator's modules among the word, position and token-type embeddings and the
embedding LayerNorm are replaced by the discriminator's where both models have them with the same shapes (slim and
transformers' ELECTRA: all four; BERT, RoBERTa: all four; DeBERTa-v3 configs have no absolute positions and no
token types: word embeddings and LayerNorm). The word embeddings must be shareable, and the generator's LM decoder
stays tied to them.

`tie_gdes` (DeBERTa-v3, transformers models): the other way round, each of those discriminator modules becomes a
GDES module (`electra_fast.model.gdes`) reading `stopgrad(generator's) + delta`, so the discriminator loss reaches
no generator parameter. Slim models build GDES themselves (`Discriminator(config, gdes=True)` beside the
generator's embeddings).
"""
from __future__ import annotations

from torch import nn

from electra_fast.model.gdes import gdes_module, has_gdes_modules
from electra_fast.pretraining.families import Adapter, check_pair, is_slim
from electra_fast.pretraining.families.base import EMBEDDING_ATTRS


def has_gdes(model: nn.Module) -> bool:
    """Whether `model` reads any embedding through GDES (a slim `Discriminator(..., gdes=True)` or `tie_gdes`)."""
    if is_slim(model):
        return bool(getattr(model, "gdes", False))
    return has_gdes_modules(model)


def _shapes(module) -> dict:
    return {n: tuple(t.shape) for n, t in module.state_dict().items()}


def _common_keys(gm: dict, dm: dict) -> list:
    return [k for k in gm if k in dm and _shapes(gm[k]) == _shapes(dm[k])
            and getattr(gm[k], "eps", None) == getattr(dm[k], "eps", None)]


def _shareable(g: Adapter, d: Adapter, what: str) -> list:
    """Keys of the embedding modules both models have with the same shapes; "word" must be one of them."""
    gm, dm = g.embedding_modules(), d.embedding_modules()
    if _shapes(gm["word"]) != _shapes(dm["word"]):
        raise ValueError(f"cannot {what} the word embeddings: the generator's have shapes {_shapes(gm['word'])}, "
                         f"the discriminator's {_shapes(dm['word'])} (or pass share_embeddings=False)")
    if gm["word"].padding_idx != dm["word"].padding_idx:
        raise ValueError(f"cannot {what} the word embeddings: generator and discriminator must have the same "
                         f"pad_token_id, the discriminator has {dm['word'].padding_idx}, the generator "
                         f"{gm['word'].padding_idx}")
    return _common_keys(gm, dm)


def _check_all_shareable(g: Adapter, d: Adapter) -> None:
    gc, dc = g.model.config, d.model.config
    for name in ("layer_norm_eps", "pad_token_id", "pad_vocab_multiple"):
        if getattr(gc, name, None) != getattr(dc, name, None):
            raise ValueError(f"cannot share the embeddings: generator and discriminator must have the same {name}, the "
                             f"discriminator has {getattr(dc, name, None)}, the generator {getattr(gc, name, None)} "
                             "(or pass share_embeddings=False)")
    gm, dm = g.embedding_modules(), d.embedding_modules()
    for key in gm:
        if _shapes(gm[key]) != _shapes(dm[key]):
            raise ValueError(f"cannot share the embeddings: the generator's {key} embedding parameters have shapes "
                             f"{_shapes(gm[key])}, the discriminator's {_shapes(dm[key])} "
                             "(or pass share_embeddings=False)")


def shared_keys(generator, discriminator) -> list:
    """The embedding modules the two models share (same module, or GDES-read by the discriminator)."""
    g, d = check_pair(generator, discriminator)
    gm, dm = g.embedding_modules(), d.embedding_modules()
    return [k for k in gm if k in dm and (dm[k] is gm[k] or getattr(dm[k], "shared", None) is gm[k])]


def embeddings_shared(generator, discriminator) -> bool:
    """Whether the generator uses the discriminator's embedding modules: for ELECTRA's models all four (word,
    position, token type, LayerNorm); for other transformers models the word embeddings (and whatever else of the
    four both have with the same shapes, which `tie_embeddings` shares too)."""
    return _embeddings_shared(*check_pair(generator, discriminator))


def _embeddings_shared(g: Adapter, d: Adapter) -> bool:
    gm, dm = g.embedding_modules(), d.embedding_modules()
    if g.family == "slim" or (g.electra_dims and d.electra_dims):
        return all(gm[k] is dm[k] for k in gm)
    return gm["word"] is dm["word"] and all(gm[k] is dm[k] for k in _common_keys(gm, dm))


def _retie(g: Adapter, old_word: nn.Module, new_word: nn.Module) -> None:
    out = g.model.get_output_embeddings() if hasattr(g.model, "get_output_embeddings") else None
    if isinstance(out, nn.Linear) and out.weight is old_word.weight:
        out.weight = new_word.weight


def tie_embeddings(generator, discriminator) -> list:
    """Tie the generator's embedding modules (word, position, token type, LayerNorm) to the discriminator's, in place,
    as ELECTRA does (docs/algorithm.md#embedding-sharing); the generator's LM head stays tied to the (now shared) word
    embeddings. Returns the keys shared.

    The generator's own embedding weights are dropped: build the optimizer afterwards. Slim and transformers'
    ELECTRA models: all four or an error naming the field or the shapes that differ. Other transformers models: the
    word embeddings (an error if they differ) and each of position, token type and LayerNorm that both models have
    with the same shapes (and eps).
    """
    g, d = check_pair(generator, discriminator)
    if g.electra_dims and d.electra_dims and _embeddings_shared(g, d):
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


def tie_gdes(generator, discriminator, *, keep: bool = False) -> list:
    """GDES for transformers models, in place: each embedding module both models have with the same shapes (the
    word embeddings at least) becomes, in the discriminator, a GDES module reading `stopgrad(generator's) + delta`.
    Returns the keys. Build the optimizer afterwards.

    The deltas start at zero (the discriminator starts from the generator's embeddings), or with `keep=True` at the
    discriminator's own embeddings minus the generator's, so it reads exactly what it did: a pair saved with GDES
    (each model's own copy, the discriminator's holding `shared + delta`) reloads as it was trained.
    Slim models build GDES themselves (`Discriminator(config, gdes=True)`)."""
    g, d = check_pair(generator, discriminator)
    if g.family == "slim":
        raise TypeError("tie_gdes is for transformers models; slim models: Discriminator(config, gdes=True) with the "
                        "generator's embeddings")
    if has_gdes(discriminator):
        return shared_keys(generator, discriminator)
    gm, dm = g.embedding_modules(), d.embedding_modules()
    if any(a is b for a, b in zip(gm.values(), dm.values())):
        raise ValueError("the models share embedding modules already: GDES needs the generator's and the "
                         "discriminator's own; pass models built apart")
    keys = _shareable(g, d, "GDES-share")
    ds = d.embedding_slots()
    for k in keys:
        module = gdes_module(gm[k])
        if keep:
            module.keep(dm[k])
        setattr(*ds[k], module)
    return keys


__all__ = ["has_gdes", "shared_keys", "embeddings_shared", "tie_embeddings", "tie_gdes"]
