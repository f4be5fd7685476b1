"""One ELECTRA replaced-token-detection step (SPEC section 1) as a module and as a function.

mask_tokens -> generator encoder over the masked ids -> masked_gather at the N slots -> LM head at the slots only
-> mlm_loss_and_sample (loss, Gumbel-max samples) -> replace_tokens -> discriminator -> rtd_bce_loss;
total = mlm_weight * mlm_loss + disc_weight * disc_loss (1.0 and 50.0 by default).

Every shape is static and nothing reads tensor data on the host, so the step compiles with
`torch.compile(fullgraph=True)` and can be captured in a CUDA graph (`electra_fast.cuda_graph`). The only
data-dependent check (token ids within the vocabulary) syncs; it runs in eager mode when `validate=True` and is
skipped while compiling or capturing. Transformers' `ElectraForMaskedLM` / `ElectraForPreTraining` work in place
of the slim models: their encoders and head weights run with this library's masking, gather, loss and sampling.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from electra_fast.model import Discriminator, ElectraModelConfig, Generator, GENERATOR_FIELDS, PRESETS, \
    preset_configs
from electra_fast.ops import mask_tokens, masked_gather, mlm_loss_and_sample, replace_tokens, rtd_bce_loss
from electra_fast.ops._checks import INT_DTYPES, check_shape, check_tensor

SETTINGS_FILE = "electra_fast.json"  # pretrainer settings beside discriminator/ and generator/


@dataclass
class PretrainerOutput:
    """Loss and free metrics of one step, all 0-dim fp32 tensors (reading one on the host is the caller's sync).

    `gen_accuracy`: argmax of the generator == original token, at real slots. `disc_accuracy`, `replaced_frac`,
    `precision`, `recall`: over real tokens (attention_mask 1), "positive" = replaced.
    """
    loss: torch.Tensor
    mlm_loss: torch.Tensor
    disc_loss: torch.Tensor
    gen_accuracy: torch.Tensor
    disc_accuracy: torch.Tensor
    replaced_frac: torch.Tensor
    precision: torch.Tensor
    recall: torch.Tensor

    def to_dict(self) -> dict:
        """Python floats (one host sync for all of them)."""
        names = [f.name for f in fields(self)]
        values = torch.stack([getattr(self, n).detach().float() for n in names]).tolist()
        return dict(zip(names, values))


# ------------------------------------------------------------------ slim or transformers models, one interface
def _is_slim(model) -> bool:
    return isinstance(model, (Generator, Discriminator))


def _model_kind(model, role: str) -> None:
    want = {"generator": (Generator, "ElectraForMaskedLM"), "discriminator": (Discriminator, "ElectraForPreTraining")}
    cls, hf_name = want[role]
    if not (isinstance(model, cls) or type(model).__name__ == hf_name):
        raise TypeError(f"{role} must be an electra_fast {cls.__name__} or a transformers {hf_name}, "
                        f"got {type(model).__name__}")


def _dims(model) -> dict:
    """The fields both models must agree on, from a slim config or a transformers ElectraConfig."""
    cfg = model.config
    return {"vocab_size": cfg.vocab_size, "embedding_size": cfg.embedding_size,
            "max_position_embeddings": cfg.max_position_embeddings, "type_vocab_size": cfg.type_vocab_size}


def _encode(model, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
    if _is_slim(model):
        return model.encode(input_ids, attention_mask, token_type_ids)
    return model.electra(input_ids=input_ids, attention_mask=attention_mask,
                         token_type_ids=token_type_ids).last_hidden_state


def _lm_logits(generator, hidden: torch.Tensor) -> torch.Tensor:
    if _is_slim(generator):
        return generator.lm_logits(hidden)
    return generator.generator_lm_head(generator.generator_predictions(hidden))


def _disc_head(discriminator, hidden: torch.Tensor):
    """`(features, projection)`: the head's hidden layer output and its final dense(H -> 1) Linear."""
    if _is_slim(discriminator):
        return discriminator.head_features(hidden), discriminator.head.out
    head = discriminator.discriminator_predictions
    return head.activation(head.dense(hidden)), head.dense_prediction


def disc_head_loss(features: torch.Tensor, projection: nn.Linear, labels: torch.Tensor,
                   attention_mask: Optional[torch.Tensor]):
    """`(loss, logits [B, L])` of the discriminator's last projection and the RTD loss.

    The one place to swap in a fused projection + BCE op (`ops.rtd_head_loss(features, weight, bias, labels,
    attention_mask)`); the logits are only needed for the precision/recall metrics.
    """
    logits = F.linear(features, projection.weight, projection.bias).squeeze(-1)
    return rtd_bce_loss(logits, labels, attention_mask), logits


# ----------------------------------------------------------------------------------------------- validation
def check_models(generator, discriminator) -> None:
    """Generator and discriminator must share vocabulary, embedding size, positions and token types."""
    _model_kind(generator, "generator")
    _model_kind(discriminator, "discriminator")
    g, d = _dims(generator), _dims(discriminator)
    for name in g:
        if g[name] != d[name]:
            raise ValueError(f"generator and discriminator must have the same {name}: the discriminator has "
                             f"{d[name]}, the generator {g[name]}")


def check_inputs(input_ids, attention_mask, token_type_ids, *, vocab_size: int, max_positions: int,
                 type_vocab_size: int, validate: bool) -> None:
    """Shape checks always (free); value checks (one host sync) when `validate` and not compiling/capturing."""
    check_tensor(input_ids, "input_ids", ndim=2, dtypes=INT_DTYPES)
    if attention_mask is not None:
        check_tensor(attention_mask, "attention_mask", ndim=2)
        check_shape(attention_mask, "attention_mask", input_ids.shape, "same as input_ids")
    if token_type_ids is not None:
        check_tensor(token_type_ids, "token_type_ids", ndim=2, dtypes=INT_DTYPES)
        check_shape(token_type_ids, "token_type_ids", input_ids.shape, "same as input_ids")
    if input_ids.shape[1] > max_positions:
        raise ValueError(f"input_ids must have at most max_position_embeddings={max_positions} tokens per "
                         f"sequence, got shape {tuple(input_ids.shape)}")
    if not validate or torch.compiler.is_compiling() or (
            input_ids.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    for name, t, hi in (("input_ids", input_ids, vocab_size), ("token_type_ids", token_type_ids, type_vocab_size)):
        if t is None or t.numel() == 0:
            continue
        lo_v, hi_v = torch.stack([t.min(), t.max()]).tolist()
        if lo_v < 0 or hi_v >= hi:
            limit = "vocab_size" if name == "input_ids" else "type_vocab_size"
            raise ValueError(f"{name} must lie in [0, {limit}={hi}), got values in [{lo_v}, {hi_v}]")


def _check_token_id(value, name: str, vocab_size: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
        raise ValueError(f"{name} must be an int in [0, vocab_size={vocab_size}), got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------------- the step
def rtd_step(generator, discriminator, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
             token_type_ids: Optional[torch.Tensor] = None, *, mask_token_id: int,
             special_token_ids: Union[Sequence[int], torch.Tensor], mask_prob: float = 0.15,
             temperature: float = 1.0, disallow_correct: bool = False, mlm_weight: float = 1.0,
             disc_weight: float = 50.0, validate: bool = True,
             rng: Optional[torch.Generator] = None) -> PretrainerOutput:
    """One replaced-token-detection step for existing training loops; call `.loss.backward()` on the result.

    Args:
        generator: slim `Generator` or transformers `ElectraForMaskedLM`.
        discriminator: slim `Discriminator` or transformers `ElectraForPreTraining`.
        input_ids: `[B, L]` original token ids. attention_mask: `[B, L]` 1 = real token; None = all real
            (fastest: attention then needs no mask). token_type_ids: `[B, L]` or None (all 0).
        mask_token_id, special_token_ids: `[MASK]` and the ids never chosen for prediction ([CLS], [SEP], ...).
            Pass special ids as a device tensor to avoid a host-to-device copy per step (needed under CUDA graphs).
        mask_prob: fraction of real tokens predicted. temperature, disallow_correct: generator sampling.
        mlm_weight, disc_weight: total = mlm_weight * mlm_loss + disc_weight * disc_loss.
        validate: check token-id ranges on the host (one sync; skipped automatically while compiling/capturing).
        rng: torch.Generator for masking and sampling (default: torch's global RNG).
    """
    check_models(generator, discriminator)
    dims = _dims(discriminator)
    check_inputs(input_ids, attention_mask, token_type_ids, vocab_size=dims["vocab_size"],
                 max_positions=dims["max_position_embeddings"], type_vocab_size=dims["type_vocab_size"],
                 validate=validate)
    _check_token_id(mask_token_id, "mask_token_id", dims["vocab_size"])
    b, _ = input_ids.shape

    masked_ids, positions, weights = mask_tokens(input_ids, attention_mask, mask_prob=mask_prob,
                                                 mask_token_id=mask_token_id, special_token_ids=special_token_ids,
                                                 generator=rng)
    # Generator: encoder over all L tokens, LM head at the N slots only.
    slots = masked_gather(_encode(generator, masked_ids, attention_mask, token_type_ids), positions)
    logits = _lm_logits(generator, slots).reshape(b * positions.shape[1], -1)
    targets = input_ids.gather(1, positions).reshape(-1)
    w = weights.reshape(-1)
    mlm_loss, sampled, correct = mlm_loss_and_sample(logits, targets, w, temperature=temperature,
                                                     disallow_correct=disallow_correct, generator=rng)
    # Discriminator on the original ids with the samples scattered in (integers: no gradient to the generator).
    disc_ids, is_replaced = replace_tokens(input_ids, positions, weights, sampled)
    features, projection = _disc_head(discriminator, _encode(discriminator, disc_ids, attention_mask, token_type_ids))
    disc_loss, disc_logits = disc_head_loss(features, projection, is_replaced, attention_mask)

    with torch.no_grad():
        real = torch.ones_like(is_replaced) if attention_mask is None else attention_mask != 0
        count = real.sum().clamp(min=1).float()
        pred = disc_logits > 0
        hit = (pred & is_replaced & real).sum().float()
        metrics = dict(
            gen_accuracy=(correct.float() * w).sum() / w.sum().clamp(min=1.0),
            disc_accuracy=((pred == is_replaced) & real).sum().float() / count,
            replaced_frac=(is_replaced & real).sum().float() / count,
            precision=hit / (pred & real).sum().clamp(min=1).float(),
            recall=hit / (is_replaced & real).sum().clamp(min=1).float(),
        )
    return PretrainerOutput(loss=mlm_weight * mlm_loss + disc_weight * disc_loss, mlm_loss=mlm_loss,
                            disc_loss=disc_loss, **metrics)


# ---------------------------------------------------------------------------------------------------- module
_PRETRAINER_KWARGS = ("mask_prob", "temperature", "disallow_correct", "mlm_weight", "disc_weight", "validate")


class ElectraPretrainer(nn.Module):
    """Generator + discriminator + the RTD step. `forward` returns a `PretrainerOutput`.

    Build with `from_preset("small", vocab_size=...)`, from two models (slim or transformers), or
    `from_pretrained(dir)`. Compile the whole module with `torch.compile(model, fullgraph=True)` (the id-range
    check is skipped inside the compiled graph) or capture steps with `electra_fast.cuda_graph.CUDAGraphStep`.
    """

    def __init__(self, generator, discriminator, *, mask_token_id: int,
                 special_token_ids: Union[Sequence[int], torch.Tensor], mask_prob: float = 0.15,
                 temperature: float = 1.0, disallow_correct: bool = False, mlm_weight: float = 1.0,
                 disc_weight: float = 50.0, validate: bool = True):
        super().__init__()
        check_models(generator, discriminator)
        self.generator, self.discriminator = generator, discriminator
        self.vocab_size = _dims(discriminator)["vocab_size"]
        self.max_position_embeddings = _dims(discriminator)["max_position_embeddings"]
        self.mask_token_id = _check_token_id(mask_token_id, "mask_token_id", self.vocab_size)
        special = torch.as_tensor(special_token_ids, dtype=torch.long).reshape(-1)
        if special.numel() and (int(special.min()) < 0 or int(special.max()) >= self.vocab_size):
            raise ValueError(f"special_token_ids must lie in [0, vocab_size={self.vocab_size}), "
                             f"got {special.tolist()}")
        # A buffer follows the module to its device: no host-to-device copy per step (CUDA-graph safe).
        self.register_buffer("special_token_ids", special, persistent=False)
        if isinstance(mask_prob, bool) or not isinstance(mask_prob, (int, float)) or not 0 < mask_prob < 1:
            raise ValueError(f"mask_prob must be a number in (0, 1), got {mask_prob!r}")
        self.mask_prob, self.temperature, self.disallow_correct = float(mask_prob), temperature, disallow_correct
        self.mlm_weight, self.disc_weight, self.validate = mlm_weight, disc_weight, validate

    @property
    def gdes(self) -> bool:
        return getattr(self.discriminator, "word_delta", None) is not None

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, *,
                rng: Optional[torch.Generator] = None) -> PretrainerOutput:
        """One step's losses and metrics; see `rtd_step`."""
        return rtd_step(self.generator, self.discriminator, input_ids, attention_mask, token_type_ids,
                        mask_token_id=self.mask_token_id, special_token_ids=self.special_token_ids,
                        mask_prob=self.mask_prob, temperature=self.temperature,
                        disallow_correct=self.disallow_correct, mlm_weight=self.mlm_weight,
                        disc_weight=self.disc_weight, validate=self.validate, rng=rng)

    def settings(self) -> dict:
        """The constructor's keyword arguments (plus `gdes`), JSON-serialisable: what rebuilds this pretrainer
        around its two models (`save_pretrained` writes them to electra_fast.json)."""
        return {"mask_token_id": self.mask_token_id, "special_token_ids": self.special_token_ids.tolist(),
                "gdes": self.gdes, **{k: getattr(self, k) for k in _PRETRAINER_KWARGS if k != "validate"}}

    @classmethod
    def from_preset(cls, name: str, *, vocab_size: int = 30522, mask_token_id: int = 103, pad_token_id: int = 0,
                    special_token_ids: Sequence[int] = (0, 101, 102, 103), gdes: bool = False,
                    **overrides) -> "ElectraPretrainer":
        """Fresh generator + discriminator with shared embeddings, sized by `PRESETS[name]` (SPEC 2).

        `overrides`: `ElectraModelConfig` fields (the discriminator's; shared ones reach the generator),
        `generator_hidden_size` / `generator_num_attention_heads` / `generator_intermediate_size`, and the
        pretrainer's `mask_prob` (default: the preset's), `temperature`, `disallow_correct`, `mlm_weight`,
        `disc_weight`, `validate`.
        """
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
        kwargs = {k: overrides.pop(k) for k in _PRETRAINER_KWARGS if k in overrides}
        kwargs.setdefault("mask_prob", PRESETS[name]["mask_prob"])
        gen_overrides = {f: overrides.pop(f"generator_{f}") for f in GENERATOR_FIELDS if f"generator_{f}" in overrides}
        gen_cfg, disc_cfg = preset_configs(name, vocab_size=vocab_size, pad_token_id=pad_token_id,
                                           generator=gen_overrides, **overrides)
        return cls.from_configs(gen_cfg, disc_cfg, gdes=gdes, mask_token_id=mask_token_id,
                                special_token_ids=special_token_ids, **kwargs)

    @classmethod
    def from_configs(cls, generator_config: ElectraModelConfig, discriminator_config: ElectraModelConfig, *,
                     gdes: bool = False, **kwargs) -> "ElectraPretrainer":
        """Fresh slim models from two configs, the discriminator's embeddings shared with the generator."""
        discriminator = Discriminator(discriminator_config, gdes=gdes)
        generator = Generator(generator_config, discriminator.embeddings)
        return cls(generator, discriminator, **kwargs)

    def save_pretrained(self, directory: str) -> None:
        """`directory/discriminator/` and `directory/generator/` in transformers format, plus our settings."""
        os.makedirs(directory, exist_ok=True)
        self.discriminator.save_pretrained(os.path.join(directory, "discriminator"))
        self.generator.save_pretrained(os.path.join(directory, "generator"))
        with open(os.path.join(directory, SETTINGS_FILE), "w") as f:
            json.dump(self.settings(), f, indent=2)

    @classmethod
    def from_pretrained(cls, directory: str, **kwargs) -> "ElectraPretrainer":
        """Load `directory/{discriminator,generator}/` (ours, or two checkpoints written by transformers'
        `save_pretrained`) as slim models sharing one set of embeddings (the discriminator's; with GDES the
        generator's, and `word_delta` = the difference). `kwargs` override the saved settings
        (`mask_token_id`, `special_token_ids`, `gdes`, `mask_prob`, ...; defaults as `from_preset`)."""
        settings = {"mask_token_id": 103, "special_token_ids": (0, 101, 102, 103), "gdes": False}
        path = os.path.join(directory, SETTINGS_FILE)
        if os.path.isfile(path):
            with open(path) as f:
                settings.update(json.load(f))
        settings.update(kwargs)
        gdes = settings.pop("gdes")
        disc_dir, gen_dir = os.path.join(directory, "discriminator"), os.path.join(directory, "generator")
        if gdes:
            generator = Generator.from_pretrained(gen_dir)
            discriminator = Discriminator.from_pretrained(disc_dir, generator.embeddings, gdes=True)
        else:
            discriminator = Discriminator.from_pretrained(disc_dir)
            generator = Generator.from_pretrained(gen_dir, discriminator.embeddings)
        return cls(generator, discriminator, **settings)


def param_groups(model: nn.Module, weight_decay: float = 0.01) -> list:
    """AdamW parameter groups: decay on matrices (Linear weights, embeddings), none on LayerNorm and biases.

    The rule is "1-D parameters get no decay", which covers LayerNorm weights/biases, every Linear bias and the
    generator's output bias, for slim and transformers models alike. Shared parameters appear once.
    """
    decay, no_decay = [], []
    for p in model.parameters():  # yields each shared parameter once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


__all__ = ["ElectraPretrainer", "PretrainerOutput", "rtd_step", "param_groups", "check_models", "check_inputs",
           "disc_head_loss"]
