"""What a pretraining run is: `TrainConfig` (every option of `electra-fast pretrain`), its defaults and checks.

Values are named for what they do; the older spellings are still accepted and mapped where a config is resolved
(`TrainConfig.resolved`), before a resumed run compares them with its checkpoint's, so a checkpoint saved with an
older spelling resumes: `optimizer="reference"` is "electra_adam", `masking="reference"` is "with_replacement",
`model={"initializer": "reference"}` is "truncated_normal".
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import List, Optional

from electra_fast.checks import check_choice, check_int, check_number
from electra_fast.data import BUILTIN
from electra_fast.errors import InputError
from electra_fast.model.config import INITIALIZER_ALIASES, INITIALIZERS, PRESETS
from electra_fast.options import ATTENTION, BACKENDS, SAMPLERS, KernelOptions
from electra_fast.pretraining.deberta_v3 import DEBERTA_V3_PRESETS
from electra_fast.pretraining.rtd_step import MASKING_ALIASES, MASKINGS

# Reference training lengths (`configure_pretraining.py`); `tiny` is a demo that finishes in a minute or two on a CPU.
DEFAULT_STEPS = {"tiny": 1000, "small": 1_000_000, "base": 766_000, "large": 400_000}
DEFAULT_WARMUP = 10_000
# torch's AdamW, or the reference's AdamWeightDecay (`electra_fast.train.optim`: no bias correction).
OPTIMIZERS = ("adamw", "electra_adam")
OPTIMIZER_ALIASES = {"reference": "electra_adam"}
ARCHS = ("electra", "deberta-v3")
# The ELECTRA preset whose schedule (steps, batch, sequence length, LR) a DeBERTa-v3 size trains with by default.
DEBERTA_V3_SCHEDULE = {"tiny": "tiny", "xsmall": "small", "small": "small", "base": "base"}
# How the kernels run (`electra_fast.options.KernelOptions`): never part of the run's saved settings, so a run may
# resume with another backend, and never in a model's config.
KERNEL_FIELDS = ("backend", "sampler", "attention", "fused_lm_head")


def default_output_dir(arch: str, preset: str) -> str:
    return os.path.join("runs", preset if arch == "electra" else f"{arch}-{preset}")


def canonical_optimizer(name: str) -> str:
    """`name` checked, an older spelling mapped to its new name."""
    return check_choice(name, "--optimizer", OPTIMIZERS, aliases=OPTIMIZER_ALIASES, error=InputError)


def canonical_masking(name: str) -> str:
    """`name` checked, an older spelling mapped to its new name."""
    return check_choice(name, "--masking", MASKINGS, aliases=MASKING_ALIASES, error=InputError)


@dataclass
class TrainConfig:
    """Everything a run needs; `None` means "the preset's value" (or, for bf16/compile, "yes on a GPU"; for
    cuda_graph, "yes on a GPU in a single process").

    `model`: `ElectraModelConfig` overrides for the discriminator (shared fields reach the generator) and
    `generator_hidden_size` / `generator_num_attention_heads` / `generator_intermediate_size`.
    `batch_size` is the global batch per optimizer step (all processes and accumulation steps together).
    `arch="deberta-v3"`: `ElectraPretrainer.from_deberta_v3(preset)` (`model`: `DebertaV2Config` fields), GDES on by
    default, mask_prob 0.15, a Unigram tokenizer trained on text; the schedule of `DEBERTA_V3_SCHEDULE[preset]`.
    `backend`, `sampler`, `attention`, `fused_lm_head`: `kernel_options()`, how the kernels run; None: the default
    (`ELECTRA_FAST_BACKEND` / `ELECTRA_FAST_SAMPLER` where set). Not saved with the run: a resume may change them.
    """
    preset: str = "tiny"
    arch: str = "electra"
    model: dict = field(default_factory=dict)
    gdes: Optional[bool] = None  # default: on for deberta-v3, off for electra
    mask_prob: Optional[float] = None
    masking: str = "distinct"  # or "with_replacement" (drawn with replacement, as the reference), or "whole_word"
    data: Optional[List[str]] = None  # None: the built-in corpus
    tokenizer: Optional[str] = None
    init_from: Optional[str] = None  # transformers checkpoints to continue from (electra_fast.io.warm_start)
    vocab_size: int = 30522  # for a tokenizer trained on the data
    output_dir: Optional[str] = None  # default runs/<preset> (deberta-v3: runs/deberta-v3-<preset>)
    steps: Optional[int] = None
    batch_size: Optional[int] = None
    seq_len: Optional[int] = None
    lr: Optional[float] = None
    warmup_steps: Optional[int] = None  # default: 10000, or 10% of the steps if that is fewer
    weight_decay: float = 0.01
    adam_betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-6
    max_grad_norm: float = 1.0
    grad_accum: int = 1
    optimizer: str = "adamw"  # or "electra_adam": electra_fast.train.optim.AdamWeightDecay (no bias correction)
    bf16: Optional[bool] = None
    fp16: bool = False  # fp16 autocast with a dynamic loss scale (GPUs without bf16)
    compile: Optional[bool] = None
    cuda_graph: Optional[bool] = None  # capture the whole step (electra_fast.train.cuda_graph.CUDAGraphStep)
    fsdp: bool = False
    seed: int = 1234
    log_interval: int = 10
    eval_interval: int = 500  # steps between held-out evaluations (and one at the end); 0: none
    eval_data: Optional[List[str]] = None  # None: hold out the last rows of the data (electra_fast.train.evaluate)
    save_interval: int = 1000
    keep_checkpoints: int = 3
    save_every_minutes: Optional[float] = None  # also save when this long passed since the last (rank 0's clock)
    on_save_error: str = "warn"  # a failed intermediate save (full disk): "warn" and go on, or "stop" (an error)
    # On SIGTERM / SIGUSR1: finish the step, checkpoint, exit with this code (electra_fast.train.preemption).
    requeue_exit_code: int = 0
    signal_check_interval: int = 10  # steps between the processes' agreement on a stop or a timed save
    tensorboard: bool = False
    wandb: Optional[str] = None  # a Weights & Biases project to log to as well
    progress: bool = True
    device: Optional[str] = None
    threads: Optional[int] = None  # torch intra-op threads; default torch's (1 for the tiny preset on a CPU)
    export: bool = True  # write discriminator/ and generator/ (transformers format) at the end
    overwrite: bool = False  # start afresh in an output dir that holds an older run's checkpoints
    # Seconds a step of a multi-process run may take before its rank ends itself (electra_fast.train.watchdog).
    collective_timeout: float = 600.0
    backend: Optional[str] = None  # "torch" | "triton" | "cuda" for every op; None: ELECTRA_FAST_BACKEND, else per op
    sampler: Optional[str] = None  # "cdf" | "gumbel"; None: ELECTRA_FAST_SAMPLER, else "cdf"
    attention: Optional[str] = None  # "auto" | "sdpa" | "varlen" | "flex" (the slim encoder's); None: "auto"
    fused_lm_head: Optional[bool] = None  # None: on, except for transformers' ElectraForMaskedLM

    def resolved(self) -> "TrainConfig":
        """A copy with the preset's defaults filled in, older spellings mapped to their new names, every value
        checked."""
        check_choice(self.arch, "--arch", ARCHS, error=InputError)
        presets = PRESETS if self.arch == "electra" else DEBERTA_V3_PRESETS
        check_choice(self.preset, f"--preset for --arch {self.arch}", sorted(presets), error=InputError)
        c = dataclasses.replace(self)
        c.output_dir = c.output_dir or default_output_dir(c.arch, c.preset)
        schedule = c.preset if c.arch == "electra" else DEBERTA_V3_SCHEDULE[c.preset]
        c.steps = c.steps if c.steps is not None else DEFAULT_STEPS.get(schedule, 100_000)
        if c.mask_prob is None and c.arch == "deberta-v3":
            c.mask_prob = 0.15
        for name in ("batch_size", "seq_len", "lr", "mask_prob"):
            if getattr(c, name) is None:
                setattr(c, name, PRESETS[schedule][name])
        if c.gdes is None:
            c.gdes = c.arch == "deberta-v3"
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "log_interval", "save_interval"):
            check_int(getattr(c, name), f"--{name.replace('_', '-')}", low=1, error=InputError)
        if c.warmup_steps is None:
            c.warmup_steps = min(DEFAULT_WARMUP, c.steps // 10)
        check_int(c.warmup_steps, "--warmup-steps", low=0, error=InputError)
        check_int(c.eval_interval, "--eval-interval", low=0, error=InputError)
        check_int(c.signal_check_interval, "--signal-check-interval", low=1, error=InputError)
        check_int(c.requeue_exit_code, "--requeue-exit-code", low=0, high=255, error=InputError)
        if c.save_every_minutes is not None:
            check_number(c.save_every_minutes, "--save-every-minutes", low=0, low_open=True, error=InputError)
        check_choice(c.on_save_error, "--on-save-error", ("warn", "stop"), error=InputError)
        check_number(c.collective_timeout, "--collective-timeout", low=0, low_open=True, error=InputError)
        c.adam_betas = tuple(c.adam_betas)
        for name in ("data", "eval_data"):  # absolute, so a resumed run finds the data from any working directory
            if getattr(c, name) is not None:
                setattr(c, name, [p if p == BUILTIN else os.path.abspath(p) for p in getattr(c, name)])
        c.init_from = c.init_from and os.path.abspath(c.init_from)
        if c.init_from and c.arch != "electra":
            raise InputError(f"--init-from works with --arch electra only, got --arch {c.arch}: for a saved "
                             "DeBERTa-v3 pair use ElectraPretrainer.from_pretrained, or --resume a run")
        if c.init_from and c.model:
            raise InputError("--model changes the model's shape, which --init-from takes from its checkpoints: "
                             "leave one of them out")
        check_number(c.lr, "--lr", low=0, low_open=True, error=InputError)
        c.masking = canonical_masking(c.masking)
        check_number(c.mask_prob, "--mask-prob", low=0, high=1, low_open=True, high_open=True, error=InputError)
        c.optimizer = canonical_optimizer(c.optimizer)
        if c.fp16 and c.bf16:
            raise InputError("--fp16 and --bf16 exclude each other: pass one of them")
        c.model = _canonical_model_settings(c.model)
        for name, choices in (("backend", BACKENDS), ("sampler", SAMPLERS), ("attention", ATTENTION)):
            if getattr(c, name) is not None:
                check_choice(getattr(c, name), f"--{name}", choices, error=InputError)
        if c.fused_lm_head is not None and not isinstance(c.fused_lm_head, bool):
            raise InputError(f"fused_lm_head must be true, false or null (--fused-lm-head / --no-fused-lm-head), "
                             f"got {c.fused_lm_head!r}")
        return c

    def kernel_options(self) -> KernelOptions:
        """How the kernels run for this run (`backend`, `sampler`, `attention`, `fused_lm_head`)."""
        return KernelOptions(**{name: getattr(self, name) for name in KERNEL_FIELDS})

    def to_dict(self) -> dict:
        """The run's settings, saved with its checkpoints (what `--resume` continues with and compares): every field
        but the kernel options, which may change between a run and its resume."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in KERNEL_FIELDS}
        d["adam_betas"] = list(d["adam_betas"])
        return d


def _canonical_model_settings(model: dict) -> dict:
    """`model` with an older spelling of the initializer mapped to its new name (the run's saved settings then
    carry the new one)."""
    if not isinstance(model, dict) or "initializer" not in model:
        return model
    return {**model, "initializer": check_choice(model["initializer"], "initializer", INITIALIZERS,
                                                 aliases=INITIALIZER_ALIASES, error=InputError)}


__all__ = ["TrainConfig", "DEFAULT_STEPS", "DEFAULT_WARMUP", "OPTIMIZERS", "OPTIMIZER_ALIASES", "ARCHS",
           "DEBERTA_V3_SCHEDULE", "KERNEL_FIELDS", "default_output_dir", "canonical_optimizer", "canonical_masking"]
