"""`ElectraPretrainer`: a generator, a discriminator and the RTD step (`electra_fast.pretraining.rtd_step`) as one
module, with its adapters (`electra_fast.pretraining.families`) built once; `param_groups` for its optimizer.

`ElectraPretrainer` makes the two models share their embeddings as ELECTRA does (`sharing`), whichever way they
were built. The token ids that masking needs ([MASK] and the ids never masked) come from the tokenizer or the
caller, never from a default (`token_ids`). Saving and loading a pair is `pairs`.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from electra_fast.checks import check_choice, check_number
from electra_fast.model.config import GENERATOR_FIELDS, PRESETS, ElectraModelConfig, preset_configs
from electra_fast.model.encoder import Discriminator, Generator
from electra_fast.options import KernelOptions
from electra_fast.pretraining import pairs
from electra_fast.pretraining.deberta_v3 import deberta_v3_recipe
from electra_fast.pretraining.families import as_discriminator, check_pair, is_slim, pair_dims
from electra_fast.pretraining.rtd_step import STEP_KWARGS, PretrainerOutput, check_masking, check_token_id, \
    generate, kernel_options, rtd_step, step
from electra_fast.pretraining.sharing import embeddings_shared, has_gdes, tie_embeddings, tie_gdes
from electra_fast.pretraining.token_ids import check_tokenizer_fits, require_ids, resolve_ids, tokenizer_beside, \
    tokenizer_ids, word_start_table


def _shared_names(module: nn.Module) -> dict:
    """Second names of shared tensors -> their first name (e.g. the generator's view of the shared embeddings)."""
    first, aliases = {}, {}
    for name, t in [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]:
        if id(t) in first:
            aliases[name] = first[id(t)]
        else:
            first[id(t)] = name
    return aliases


def _drop_shared_names(module, state_dict, prefix, local_metadata):
    # A shared tensor is saved once, under its first name: safetensors (transformers.Trainer's checkpoints) refuses
    # two names for one storage, and a file should not hold the shared embeddings twice.
    for alias in _shared_names(module):
        state_dict.pop(prefix + alias, None)
    return state_dict


def _restore_shared_names(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                          error_msgs):
    # Loading fills each second name from the first (and accepts files that still hold both).
    for alias, name in _shared_names(module).items():
        if prefix + name in state_dict:
            state_dict[prefix + alias] = state_dict[prefix + name]


class ElectraPretrainer(nn.Module):
    """Generator + discriminator + the RTD step. `forward` returns a `PretrainerOutput`.

    Build with `from_preset("small", tokenizer=...)`, from two models (slim or transformers), or
    `from_pretrained(dir)`. Compile the whole module with `torch.compile(model, fullgraph=True)` (the id-range
    check is skipped inside the compiled graph) or capture steps with `electra_fast.train.cuda_graph.CUDAGraphStep`.

    Two models passed in are made to share their embeddings (word, position, token type and the embedding
    LayerNorm: the generator's modules are replaced by the discriminator's, in place, and its LM head stays tied to
    the shared word table), as ELECTRA does; build the optimizer afterwards. `share_embeddings=False` keeps them
    apart. `gdes=None` takes GDES from the models (a slim `Discriminator(..., gdes=True)` holds the embedding deltas);
    `gdes=True` checks for it with slim models, and wires it into transformers models (`sharing.tie_gdes`).
    `options` (`KernelOptions`): the ops' backend, the sampler, the fused LM head, and the slim encoders' attention
    path (setting `options` sets the slim models' config options too); None: the slim discriminator config's
    options, else the defaults. The other keyword arguments are `rtd_step`'s (`fused_lm_head` sets
    `options.fused_lm_head`; `masking="with_replacement"`: the reference's draw with replacement).

    `masking="whole_word"` (docs/algorithm.md#whole-word-masking) chooses whole words; it reads word starts `[B, L]`
    given with the batch (`forward(..., word_starts=)`) or else looked up on the device from `vocab_word_starts`, a
    `[V]` bool table (True where token id v begins a word: `electra_fast.word_starts_from_vocab(tokenizer)`;
    `from_preset`, `from_deberta_v3` and `from_pretrained` build it from `tokenizer=`). It is a non-persistent
    buffer: it follows the module's device, and no checkpoint holds it.

    Any transformers masked LM (BERT, RoBERTa, DeBERTa-v2, ELECTRA) works as the generator, and as the
    discriminator `ElectraForPreTraining`, a `*ForTokenClassification` with `num_labels=1`, or a bare encoder
    (`AutoModel`), which gets ELECTRA's RTD head (`families.RTDDiscriminator`); they share the embedding modules both
    have with the same shapes (see `electra_fast.pretraining.sharing`). `from_deberta_v3` builds DeBERTa-v3's.
    """

    def __init__(self, generator, discriminator, *, mask_token_id: int,
                 special_token_ids: Union[Sequence[int], torch.Tensor], share_embeddings: bool = True,
                 gdes: Optional[bool] = None, mask_prob: float = 0.15, temperature: float = 1.0,
                 disallow_correct: bool = False, mlm_weight: float = 1.0, disc_weight: float = 50.0,
                 fused_lm_head: Optional[bool] = None, validate: bool = True, masking: str = "distinct",
                 options: Optional[KernelOptions] = None, vocab_word_starts=None):
        super().__init__()
        discriminator = as_discriminator(discriminator)  # a bare AutoModel gets ELECTRA's RTD head
        pair = check_pair(generator, discriminator)  # the step's view of the two models, kept (see `_pair`)
        has_delta = has_gdes(discriminator)
        if gdes and not has_delta and not is_slim(discriminator):  # transformers models: GDES modules wired here
            tie_gdes(generator, discriminator)
            has_delta = True
        if gdes is not None and bool(gdes) != has_delta:
            raise ValueError(f"gdes={gdes} but the discriminator was built with gdes={has_delta}: build it with "
                             f"Discriminator(config, gdes={bool(gdes)}) or leave gdes out")
        if share_embeddings:
            if not has_delta or is_slim(discriminator):  # GDES modules in transformers models share already
                tie_embeddings(generator, discriminator)
        elif embeddings_shared(generator, discriminator) or has_delta:
            raise ValueError("share_embeddings=False but the models already share their embeddings (GDES shares them "
                             "too): build them with separate embeddings, or leave share_embeddings out")
        self.generator, self.discriminator = generator, discriminator
        self.share_embeddings = bool(share_embeddings)
        # Adapters read the models' modules when called, so sharing wired above leaves them valid.
        self._adapters, self._dims = pair, pair_dims(*pair)
        self.vocab_size, self.max_position_embeddings = self._dims["vocab_size"], self._dims["max_position_embeddings"]
        self.mask_token_id = check_token_id(mask_token_id, "mask_token_id", self.vocab_size)
        special = torch.as_tensor(special_token_ids, dtype=torch.long).reshape(-1)
        if special.numel() and (int(special.min()) < 0 or int(special.max()) >= self.vocab_size):
            raise ValueError(f"special_token_ids must lie in [0, vocab_size={self.vocab_size}), "
                             f"got {special.tolist()}")
        # A buffer follows the module to its device: no host-to-device copy per step (CUDA-graph safe).
        self.register_buffer("special_token_ids", special, persistent=False)
        self.mask_prob = check_number(mask_prob, "mask_prob", low=0, high=1, low_open=True, high_open=True)
        self.temperature, self.disallow_correct = temperature, disallow_correct
        self.mlm_weight, self.disc_weight, self.validate = mlm_weight, disc_weight, validate
        self.masking = check_masking(masking)
        self.register_buffer("vocab_word_starts", self._word_start_table(vocab_word_starts), persistent=False)
        if options is None:
            self._options = kernel_options(discriminator.config.options if is_slim(discriminator) else None,
                                           fused_lm_head)
        else:
            self.options = kernel_options(options, fused_lm_head)
        self._register_state_dict_hook(_drop_shared_names)
        self._register_load_state_dict_pre_hook(_restore_shared_names, with_module=True)

    @property
    def gdes(self) -> bool:
        """Whether the discriminator reads `stopgrad(shared embeddings) + its embeddings_delta` (GDES)."""
        return has_gdes(self.discriminator)

    @property
    def options(self) -> KernelOptions:
        """How the step's kernels run (`electra_fast.options.KernelOptions`); never saved with the model."""
        return self._options

    @options.setter
    def options(self, value: KernelOptions) -> None:
        self._options = kernel_options(value)
        for model in (self.generator, self.discriminator):  # the slim encoders read their attention path there
            if is_slim(model):
                model.config = model.config.replace(options=self._options)

    @property
    def fused_lm_head(self) -> Optional[bool]:
        """`options.fused_lm_head`: the generator's head, loss and sample as one op (None: the model's default)."""
        return self._options.fused_lm_head

    @fused_lm_head.setter
    def fused_lm_head(self, value: Optional[bool]) -> None:
        self._options = self._options.replace(fused_lm_head=value)

    def _word_start_table(self, table) -> Optional[torch.Tensor]:
        """`table` as a `[vocab_size]` bool tensor; ids past a shorter tokenizer's are words of their own."""
        if table is None:
            return None
        table = torch.as_tensor(table)
        if table.dim() != 1 or table.dtype != torch.bool or table.numel() > self.vocab_size:
            raise ValueError(f"vocab_word_starts must be a 1-D bool tensor of at most vocab_size={self.vocab_size} "
                             f"entries (electra_fast.word_starts_from_vocab(tokenizer)), got dtype {table.dtype} "
                             f"and shape {tuple(table.shape)}")
        return torch.cat([table, table.new_ones(self.vocab_size - table.numel())])

    def set_vocab_word_starts(self, tokenizer_or_table) -> None:
        """Set the `[V]` word-start lookup of whole-word masking: a tokenizer (anything `word_starts_from_vocab`
        takes) or the table itself; None removes it."""
        table = tokenizer_or_table
        if table is not None and not isinstance(table, (torch.Tensor, list, tuple)):
            table = word_start_table("whole_word", table)
        device = self.special_token_ids.device
        self.vocab_word_starts = None if table is None else self._word_start_table(table).to(device)

    def _word_starts(self, input_ids: torch.Tensor, word_starts: Optional[torch.Tensor],
                     masking: str) -> Optional[torch.Tensor]:
        """The batch's word starts for whole-word masking: given, else looked up from the ids (on the device)."""
        if masking != "whole_word" or word_starts is not None or self.vocab_word_starts is None:
            return word_starts
        # Where a special token or padding meets a word (byte-level BPE's first word has no "Ġ"; a row cut inside a
        # word starts with a continuation), mask_tokens itself begins a word.
        return self.vocab_word_starts[input_ids]

    def _pair(self) -> tuple:
        """The adapters built with the pretrainer; built again only if a model was replaced since."""
        g, d = self._adapters
        if g.model is not self.generator or d.model is not self.discriminator:  # a model was replaced
            self._adapters = check_pair(self.generator, self.discriminator)
            self._dims = pair_dims(*self._adapters)
        return self._adapters

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, *, word_starts: Optional[torch.Tensor] = None,
                rng: Optional[torch.Generator] = None, return_loss: bool = True) -> PretrainerOutput:
        """One step's losses and metrics; see `rtd_step`. `word_starts` `[B, L]` (whole-word masking only): the
        batch's own word boundaries, which win over the `vocab_word_starts` lookup.

        `return_loss` is for `transformers.Trainer`, which computes an evaluation loss only for models whose
        `forward` has `return_loss=True` (and no `labels`): the loss is always computed, so False is an error.
        """
        if return_loss is not True:
            raise ValueError(f"return_loss must be True (ElectraPretrainer always computes its loss), got "
                             f"{return_loss!r}")
        gen, disc = self._pair()
        return step(gen, disc, input_ids, attention_mask, token_type_ids, mlm_weight=self.mlm_weight,
                    disc_weight=self.disc_weight, rng=rng, **self._step_kwargs(input_ids, word_starts))

    def _step_kwargs(self, input_ids: torch.Tensor, word_starts: Optional[torch.Tensor] = None) -> dict:
        masking = self.masking
        return dict(mask_token_id=self.mask_token_id, special_token_ids=self.special_token_ids,
                    mask_prob=self.mask_prob, temperature=self.temperature, disallow_correct=self.disallow_correct,
                    options=self._options, validate=self.validate, masking=masking, dims=self._dims,
                    word_starts=self._word_starts(input_ids, word_starts, masking))

    def scores(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
               token_type_ids: Optional[torch.Tensor] = None, *, rng: Optional[torch.Generator] = None,
               word_starts: Optional[torch.Tensor] = None) -> dict:
        """The step's per-token outputs for evaluation (the training step keeps no `[B, L]` logits): masking and
        sampling as `forward` (pass `rng` for fixed ones), then `{"disc_logits" [B, L] fp32, "is_replaced" [B, L]
        bool, "mlm_loss" 0-dim (mean over the masked slots), "gen_correct" [N] bool, "gen_weights" [N] (1 = a real
        slot)}`. Call it under `torch.no_grad()` and `eval()` for scores without dropout."""
        gen, disc = self._pair()
        mlm_loss, correct, w, disc_ids, is_replaced = generate(gen, disc, input_ids, attention_mask, token_type_ids,
                                                               rng=rng,
                                                               **self._step_kwargs(input_ids, word_starts))
        features, projection = disc.disc_head(disc.encode(disc_ids, attention_mask, token_type_ids))
        logits = F.linear(features, projection.weight, projection.bias).squeeze(-1).float()
        return {"disc_logits": logits, "is_replaced": is_replaced.bool(), "mlm_loss": mlm_loss.float(),
                "gen_correct": correct.bool(), "gen_weights": w}

    def settings(self) -> dict:
        """The constructor's keyword arguments (plus `gdes`), JSON-serialisable: what rebuilds this pretrainer
        around its two models (`save_pretrained` writes them to electra_fast.json). Not `options` (nor
        `fused_lm_head`, one of them): how the kernels run is no part of a saved model; settings saved with
        `fused_lm_head` by an older version still load."""
        return {"mask_token_id": self.mask_token_id, "special_token_ids": self.special_token_ids.tolist(),
                "share_embeddings": self.share_embeddings, "gdes": self.gdes,
                **{k: getattr(self, k) for k in STEP_KWARGS if k not in ("validate", "fused_lm_head")}}

    @classmethod
    def from_preset(cls, name: str, *, tokenizer=None, vocab_size: Optional[int] = None,
                    mask_token_id: Optional[int] = None, special_token_ids: Optional[Sequence[int]] = None,
                    pad_token_id: Optional[int] = None, gdes: bool = False, **overrides) -> "ElectraPretrainer":
        """Fresh generator + discriminator with shared embeddings, sized by `PRESETS[name]`
        (docs/algorithm.md#model-sizes).

        Token ids: from `tokenizer` (see `tokenizer_ids`: a `tokenizers.Tokenizer`, a transformers tokenizer or a
        path), which also sets `vocab_size`; or given explicitly (`mask_token_id`, `special_token_ids`,
        `pad_token_id`: all three, explicit ones win over the tokenizer's). There are no default ids.
        `vocab_size` defaults to the tokenizer's size, else 30522.
        `overrides`: `ElectraModelConfig` fields (the discriminator's; shared ones reach the generator),
        `generator_hidden_size` / `generator_num_attention_heads` / `generator_intermediate_size`, and the
        pretrainer's `mask_prob` (default: the preset's), `masking`, `temperature`, `disallow_correct`,
        `mlm_weight`, `disc_weight`, `fused_lm_head`, `validate`, `share_embeddings`, `options`,
        `vocab_word_starts` (default with `masking="whole_word"`: `word_starts_from_vocab(tokenizer)`).
        """
        check_choice(name, "preset", sorted(PRESETS))
        ids, tokenizer_vocab = resolve_ids(tokenizer, mask_token_id, special_token_ids, pad_token_id)
        if vocab_size is None:
            vocab_size = 30522 if tokenizer_vocab is None else tokenizer_vocab
        check_tokenizer_fits(tokenizer_vocab, vocab_size)
        kwargs = {k: overrides.pop(k) for k in STEP_KWARGS + ("share_embeddings", "options", "vocab_word_starts")
                  if k in overrides}
        kwargs.setdefault("mask_prob", PRESETS[name]["mask_prob"])
        kwargs["vocab_word_starts"] = word_start_table(kwargs.get("masking", "distinct"), tokenizer,
                                                       kwargs.get("vocab_word_starts"))
        gen_overrides = {f: overrides.pop(f"generator_{f}") for f in GENERATOR_FIELDS if f"generator_{f}" in overrides}
        gen_cfg, disc_cfg = preset_configs(name, vocab_size=vocab_size, pad_token_id=ids["pad_token_id"],
                                           generator=gen_overrides, **overrides)
        return cls.from_configs(gen_cfg, disc_cfg, gdes=gdes, mask_token_id=ids["mask_token_id"],
                                special_token_ids=ids["special_token_ids"], **kwargs)

    @classmethod
    def from_deberta_v3(cls, preset: str, **kwargs) -> "ElectraPretrainer":
        """DeBERTa-v3's recipe: `DebertaV2ForMaskedLM` generator of half the depth + `DebertaV2Model` discriminator
        with ELECTRA's RTD head, GDES, RTD weight 50, sized by `deberta_v3.DEBERTA_V3_PRESETS[preset]`; `kwargs` as
        `deberta_v3.deberta_v3_recipe` (tokenizer= or the ids, vocab_size, pretrainer settings, config fields)."""
        generator, discriminator, settings = deberta_v3_recipe(preset, **kwargs)
        return cls(generator, discriminator, **settings)

    @classmethod
    def from_configs(cls, generator_config: ElectraModelConfig, discriminator_config: ElectraModelConfig, *,
                     gdes: bool = False, share_embeddings: bool = True, **kwargs) -> "ElectraPretrainer":
        """Fresh slim models from two configs, the discriminator's embeddings shared with the generator (unless
        `share_embeddings=False`: each model its own)."""
        discriminator = Discriminator(discriminator_config, gdes=gdes)
        generator = Generator(generator_config, discriminator.embeddings if share_embeddings else None)
        return cls(generator, discriminator, share_embeddings=share_embeddings, **kwargs)

    def save_pretrained(self, directory: str) -> None:
        """`directory/discriminator/` and `directory/generator/` in transformers format, plus our settings
        (`electra_fast.pretraining.pairs`).

        Each checkpoint carries its own copy of the shared embeddings (docs/algorithm.md#transformers-checkpoints); the
        settings file records that they are shared, so `from_pretrained` ties them again."""
        pairs.save_pair(self.generator, self.discriminator, directory, self.settings())

    @classmethod
    def from_pretrained(cls, directory: str, *, tokenizer=None, **kwargs) -> "ElectraPretrainer":
        """Load `directory/{discriminator,generator}/` (ours, or two checkpoints written by transformers'
        `save_pretrained`). ELECTRA checkpoints become slim models sharing one set of embeddings (the
        discriminator's; with GDES the generator's, and the discriminator's `embeddings_delta` = its checkpoint's
        embeddings minus them; none with `share_embeddings=False` in the settings); other architectures (BERT,
        RoBERTa, DeBERTa-v2: see `pairs.is_adapter_export`) load in their own transformers classes
        (`pairs.load_pair`).

        Settings, later ones winning: the saved `electra_fast.json` (ours), else a tokenizer saved beside the
        checkpoints (`directory`, `directory/generator` or `directory/discriminator`) for the ids; then
        `tokenizer` (see `tokenizer_ids`; its [PAD] id replaces the checkpoints' `pad_token_id`); then `kwargs`
        (`mask_token_id`, `special_token_ids`, `pad_token_id`, `gdes`, `share_embeddings`, `mask_prob`, `options`,
        ...). Ids that none of them name are an error, never BERT's by default. With `masking="whole_word"` (saved or
        given) the word-start lookup comes from `tokenizer`, else the tokenizer saved beside the checkpoints (else
        none: pass `word_starts` with each batch, or `vocab_word_starts=`).
        """
        settings = {"gdes": False, "share_embeddings": True, **pairs.read_settings(directory)}
        ids = {}
        if tokenizer is not None:
            ids = tokenizer_ids(tokenizer)
        elif not {"mask_token_id", "special_token_ids"} <= set(settings) | set(kwargs):
            beside = tokenizer_beside(directory)
            if beside is not None:
                ids = tokenizer_ids(beside)
                del ids["pad_token_id"]  # the checkpoints' config.json names theirs
        tokenizer_vocab = ids.pop("vocab_size", None)
        settings.update(ids)
        settings.update(kwargs)
        require_ids(settings, ("mask_token_id", "special_token_ids"))
        if settings.get("vocab_word_starts") is None and check_masking(settings.get("masking", "distinct")) == \
                "whole_word":
            beside = tokenizer if tokenizer is not None else tokenizer_beside(directory)
            settings["vocab_word_starts"] = word_start_table("whole_word", beside)
        pad = settings.pop("pad_token_id", None)
        overrides = {} if pad is None else {"pad_token_id": pad}
        gdes = settings.pop("gdes")
        if pairs.is_adapter_export(directory):  # BERT, RoBERTa, DeBERTa-v2...: each in its own class
            model = cls(*pairs.load_pair(directory, gdes=gdes, **overrides), gdes=gdes, **settings)
            check_tokenizer_fits(tokenizer_vocab, model.vocab_size)
            return model
        generator, discriminator = pairs.load_slim_pair(directory, gdes=gdes,
                                                        share_embeddings=settings["share_embeddings"], **overrides)
        check_tokenizer_fits(tokenizer_vocab, discriminator.config.vocab_size)
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


# rtd_step, PretrainerOutput, tie_embeddings, embeddings_shared and tokenizer_ids are the pretrainer's API too.
__all__ = ["ElectraPretrainer", "param_groups", "PretrainerOutput", "rtd_step", "tie_embeddings", "embeddings_shared",
           "tokenizer_ids"]
