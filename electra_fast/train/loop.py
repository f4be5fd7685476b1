"""The pretraining loop: data -> `ElectraPretrainer` steps -> metrics, checkpoints, a transformers export.

Optimisation as the reference (SPEC 2): AdamW (0.9, 0.999, eps 1e-6; `optimizer="reference"`: the reference's
update without bias correction), weight decay 0.01 except LayerNorm and biases, gradient-norm clip 1.0,
LR = peak * min(1, step / warmup) * (1 - step / steps). Each step is an `electra_fast.train.step.TrainStep` (no host
sync: LR, skip of non-finite steps and metrics live on the device), on CUDA in one process replayed from CUDA
graphs; batches are gathered and copied ahead by `data.Prefetcher`.

Multi-process runs come from `torchrun` (the environment names rank and world size): DDP by default, FSDP2
(`fully_shard`) with `fsdp=True`; each rank reads its own part of every global batch (`data.BatchPlan`), and
only rank 0 logs and writes files.

Reproducibility: before each micro-batch, torch's RNG is seeded from (seed, step, chunk), where `chunk` numbers
the micro-batch within the global batch. Masking, sampling and dropout of a chunk are then the same whatever
the number of processes or the accumulation that split the batch, and whether or not the run was interrupted:
N processes x 1 micro-batch equals 1 process x N accumulated micro-batches up to float summation order, and a
resumed run repeats the losses of an uninterrupted one exactly (on the same device). The RNG states are also
saved in checkpoints, for anything else that draws from them.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist

from electra_fast.io.checkpoint import latest_checkpoint, list_checkpoints, rng_state, save_checkpoint, set_rng_state
from electra_fast.data import BUILTIN, BatchPlan, open_training_data, vocab_fingerprint
from electra_fast.data.prefetch import Prefetcher
from electra_fast.data.tokenizer import tokenizer_from_str
from electra_fast.train.distributed import Dist, apply_fsdp, full_state_dicts, grad_sync, init_distributed, load_state_dicts
from electra_fast.errors import InputError, lock_directory
from electra_fast.train.evaluate import evaluate, heldout
from electra_fast.io.export import export, model_from_spec, model_spec
from electra_fast.train.metrics_log import MetricsLog, _summary_writer_class, _wandb_module
from electra_fast.pretraining.adapters import DEBERTA_V3_PRESETS
from electra_fast.model.encoder import PRESETS
from electra_fast.train.optim import AdamWeightDecay
from electra_fast.pretraining.pretrainer import MASKINGS, ElectraPretrainer, param_groups
from electra_fast.train.step import DynamicLossScale, TrainStep, warmup_linear_decay
from electra_fast.io.warm_start import init_model, init_tokenizer

# Reference training lengths (`configure_pretraining.py`); `tiny` is a demo that finishes in a minute or two on a CPU.
DEFAULT_STEPS = {"tiny": 1000, "small": 1_000_000, "base": 766_000, "large": 400_000}
DEFAULT_WARMUP = 10_000
OPTIMIZERS = ("adamw", "reference")
ARCHS = ("electra", "deberta-v3")
# The ELECTRA preset whose schedule (steps, batch, sequence length, LR) a DeBERTa-v3 size trains with by default.
DEBERTA_V3_SCHEDULE = {"tiny": "tiny", "xsmall": "small", "small": "small", "base": "base"}


def default_output_dir(arch: str, preset: str) -> str:
    return os.path.join("runs", preset if arch == "electra" else f"{arch}-{preset}")


@dataclass
class TrainConfig:
    """Everything a run needs; `None` means "the preset's value" (or, for bf16/compile, "yes on a GPU"; for
    cuda_graph, "yes on a GPU in a single process").

    `model`: `ElectraModelConfig` overrides for the discriminator (shared fields reach the generator) and
    `generator_hidden_size` / `generator_num_attention_heads` / `generator_intermediate_size`.
    `batch_size` is the global batch per optimizer step (all processes and accumulation steps together).
    `arch="deberta-v3"`: `ElectraPretrainer.from_deberta_v3(preset)` (`model`: `DebertaV2Config` fields), GDES on by
    default, mask_prob 0.15, a Unigram tokenizer trained on text; the schedule of `DEBERTA_V3_SCHEDULE[preset]`.
    """
    preset: str = "tiny"
    arch: str = "electra"
    model: dict = field(default_factory=dict)
    gdes: Optional[bool] = None  # default: on for deberta-v3, off for electra
    mask_prob: Optional[float] = None
    masking: str = "distinct"  # or "reference": positions drawn with replacement, as the reference draws them
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
    optimizer: str = "adamw"  # or "reference": electra_fast.train.optim.AdamWeightDecay (no bias correction)
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
    tensorboard: bool = False
    wandb: Optional[str] = None  # a Weights & Biases project to log to as well
    progress: bool = True
    device: Optional[str] = None
    threads: Optional[int] = None  # torch intra-op threads; default torch's (1 for the tiny preset on a CPU)
    export: bool = True  # write discriminator/ and generator/ (transformers format) at the end
    overwrite: bool = False  # start afresh in an output dir that holds an older run's checkpoints

    def resolved(self) -> "TrainConfig":
        """A copy with the preset's defaults filled in and every value checked."""
        if self.arch not in ARCHS:
            raise InputError(f"--arch must be one of {list(ARCHS)}, got {self.arch!r}")
        presets = PRESETS if self.arch == "electra" else DEBERTA_V3_PRESETS
        if self.preset not in presets:
            raise InputError(f"--preset for --arch {self.arch} must be one of {sorted(presets)}, got {self.preset!r}")
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
        if c.warmup_steps is None:
            c.warmup_steps = min(DEFAULT_WARMUP, c.steps // 10)
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
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "log_interval", "save_interval"):
            value = getattr(c, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if isinstance(c.eval_interval, bool) or not isinstance(c.eval_interval, int) or c.eval_interval < 0:
            raise InputError(f"--eval-interval must be a non-negative integer (0: no evaluation), got "
                             f"{c.eval_interval!r}")
        if c.warmup_steps < 0:
            raise InputError(f"--warmup-steps must be >= 0, got {c.warmup_steps}")
        if not c.lr > 0:
            raise InputError(f"--lr must be positive, got {c.lr}")
        if c.masking not in MASKINGS:
            raise InputError(f"--masking must be one of {list(MASKINGS)}, got {c.masking!r}")
        if not 0 < c.mask_prob < 1:
            raise InputError(f"--mask-prob must be in (0, 1), got {c.mask_prob}")
        if c.optimizer not in OPTIMIZERS:
            raise InputError(f"--optimizer must be one of {list(OPTIMIZERS)}, got {c.optimizer!r}")
        if c.fp16 and c.bf16:
            raise InputError("--fp16 and --bf16 exclude each other: pass one of them")
        return c

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(d["adam_betas"])
        return d


def chunk_seed(seed: int, step: int, chunk: int) -> int:
    """Independent, well-mixed seed for micro-batch `chunk` of step `step` (SeedSequence hashing)."""
    return int(np.random.SeedSequence([seed, step, chunk]).generate_state(1, np.uint64)[0])


# ------------------------------------------------------------------------------------------------- the model
def build_model(cfg: TrainConfig, tok) -> ElectraPretrainer:
    """A fresh model from the preset, sized to the tokenizer and masking with its ids; `cfg.model` overrides the
    preset's shapes."""
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    overrides = dict(cfg.model)
    if "vocab_size" in overrides and overrides.pop("vocab_size") != vocab_size:
        raise InputError(f"the model's vocab_size does not match the tokenizer's {vocab_size} tokens: drop "
                         "vocab_size from the model settings or pass the matching --tokenizer")
    try:
        # The tokenizer's ids: never masked are [PAD] [CLS] [SEP] [MASK] ([UNK] stays a candidate, as in the
        # reference), [MASK] replaces, [PAD] is the embedding's padding row.
        if cfg.arch == "deberta-v3":
            return ElectraPretrainer.from_deberta_v3(cfg.preset, tokenizer=tok, gdes=cfg.gdes,
                                                     mask_prob=cfg.mask_prob, masking=cfg.masking, **overrides)
        return ElectraPretrainer.from_preset(cfg.preset, tokenizer=tok, gdes=cfg.gdes, mask_prob=cfg.mask_prob,
                                             masking=cfg.masking, **overrides)
    except (TypeError, ValueError) as e:
        raise InputError(f"invalid model settings: {e}") from None


class _WithoutSegments:
    """A dataset whose batches carry token type 0 everywhere, for models without token-type embeddings
    (DeBERTa-v3: `type_vocab_size=0`), which the step's input check would refuse segment B's ids for."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getattr__(self, name):
        return getattr(self.dataset, name)

    def __len__(self) -> int:
        return len(self.dataset)

    def gather(self, indices, **kwargs) -> dict:
        batch = self.dataset.gather(indices, **kwargs)
        batch["token_type_ids"] = torch.zeros_like(batch["token_type_ids"])
        return batch


def _has_token_types(model) -> bool:
    return getattr(model.discriminator.config, "type_vocab_size", 1) > 0


# ---------------------------------------------------------------------------------------------------- train
def train(cfg: TrainConfig, resume: Optional[dict] = None) -> dict:
    """Run pretraining. `resume`: a loaded checkpoint (`checkpoint.load_checkpoint`) to continue from.

    Returns a summary: `{"step", "output_dir", "checkpoint", "metrics": last logged record, "model": the trained
    ElectraPretrainer (on its device; a shard of it under FSDP), "skipped_lines": lines of the text that were not
    UTF-8 (also reported on stderr when the data is opened), "eval": the last held-out evaluation
    (`electra_fast.train.evaluate.evaluate`'s record with "step" and "split": "eval"; None without one)}`.
    """
    cfg = cfg.resolved()
    env, device = init_distributed(cfg.device)
    threads = cfg.threads
    if threads is None and device.type == "cpu" and cfg.preset == "tiny":
        # The tiny model's matrices are too small to gain from intra-op threads, and spinning threads slow to a
        # crawl on a busy machine (10x measured on 2 shared cores): one thread is the fast choice.
        threads = 1
    if threads:
        torch.set_num_threads(threads)
    # Rank 0 writes every file, so it alone claims the directory: a second run into it stops here, instead of
    # both overwriting each other's checkpoints. The OS releases the lock when the process ends, however it ends.
    lock = None
    try:
        if env.is_main:
            lock = lock_directory(cfg.output_dir, "--output-dir", "a pretrain run")
        return _train(cfg, resume, env, device)
    finally:
        if lock is not None:
            lock.close()
        if env.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _check_run_dir(cfg: TrainConfig, resume: Optional[dict], env: Dist) -> None:
    """A fresh run never mixes its checkpoints with an older run's; seq_len fits."""
    if cfg.fsdp and env.world_size == 1:
        raise InputError("--fsdp needs several processes: launch with torchrun --nproc-per-node N")
    saved = resume["model_spec"] if resume is not None else None
    max_positions = (cfg.model if saved is None else saved["discriminator"]["config"]
                     if saved.get("arch") == "transformers" else saved["discriminator"]).get(
        "max_position_embeddings", 512)
    if cfg.seq_len > max_positions:
        raise InputError(f"--seq-len {cfg.seq_len} exceeds the model's max_position_embeddings {max_positions}: "
                         "pass a smaller --seq-len")
    if cfg.tensorboard and env.is_main:
        _summary_writer_class()
    if cfg.wandb and env.is_main:
        _wandb_module()
    if env.is_main:
        old = list_checkpoints(os.path.join(cfg.output_dir, "checkpoints"))
        if old and resume is None:
            if not cfg.overwrite:
                raise InputError(f"{cfg.output_dir!r} already holds a run (checkpoint at step {old[-1][0]}): pass "
                                 "--resume to continue it, --overwrite to start over, or another --output-dir")
            for _, path in old:
                os.remove(path)
    env.barrier()


def _optimizer(cfg: TrainConfig, model, device: torch.device, capturable: bool) -> torch.optim.Optimizer:
    """AdamW (fused, reads the step's skip flag) or the reference's AdamWeightDecay, with a device-tensor LR that
    `TrainStep` writes the schedule into in place (a captured step follows it; no host read per step)."""
    lr = torch.tensor(cfg.lr, device=device)
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "reference":
        return AdamWeightDecay(groups, lr=lr, betas=cfg.adam_betas, eps=cfg.adam_eps)
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.adam_betas, eps=cfg.adam_eps, fused=True, capturable=capturable)


def _build(cfg: TrainConfig, resume: Optional[dict], tok, device: torch.device, capturable: bool):
    """The model (fresh from the preset, or the checkpoint's structure) and its optimizer."""
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    torch.manual_seed(cfg.seed)  # same seed on every rank: the same initial weights
    if resume is None:
        model = init_model(cfg.init_from, cfg.preset, tok, mask_prob=cfg.mask_prob, gdes=cfg.gdes,
                           masking=cfg.masking) \
            if cfg.init_from else build_model(cfg, tok)
    else:
        model = model_from_spec(resume["model_spec"])
        if vocab_fingerprint(tok) != vocab_fingerprint(tokenizer_from_str(resume["tokenizer"])):
            raise InputError(f"the data's tokenizer ({vocab_size} tokens) is not the one the checkpoint was "
                             f"trained with ({model.vocab_size} tokens): resume with the run's own --data")
    model.to(device)
    if cfg.fsdp:
        apply_fsdp(model)
    optimizer = _optimizer(cfg, model, device, capturable)
    if resume is not None:
        if resume["data"]["batch_size"] != cfg.batch_size:
            raise InputError(f"--batch-size {cfg.batch_size} differs from the checkpoint's "
                             f"{resume['data']['batch_size']}: resume with the same batch size")
        for option, default in (("optimizer", "adamw"), ("masking", "distinct")):
            saved, given = resume["config"].get(option, default), getattr(cfg, option)
            if saved != given:
                raise InputError(f"--{option} {given} differs from the checkpoint's {saved}: resume with "
                                 f"--{option} {saved}")
        settings = [{k: g[k] for k in ("lr", "capturable", "fused") if k in g} for g in optimizer.param_groups]
        load_state_dicts(model, optimizer, resume["model"], resume["optimizer"], cfg.fsdp)
        for group, own in zip(optimizer.param_groups, settings):
            group.update(own)  # load_state_dict puts the saved values (a copy of the LR tensor) in their place
        set_rng_state(resume["rng"])
    return model, optimizer


def _train(cfg: TrainConfig, resume: Optional[dict], env: Dist, device: torch.device) -> dict:
    _check_run_dir(cfg, resume, env)
    out_dir, ckpt_dir = cfg.output_dir, os.path.join(cfg.output_dir, "checkpoints")
    bf16 = cfg.bf16 if cfg.bf16 is not None else (
        device.type == "cuda" and not cfg.fp16 and torch.cuda.is_bf16_supported())
    use_compile = cfg.compile if cfg.compile is not None else device.type == "cuda"
    use_graph = cfg.cuda_graph if cfg.cuda_graph is not None else (device.type == "cuda" and env.world_size == 1)
    if use_graph and (device.type != "cuda" or env.world_size > 1):
        raise InputError(f"--cuda-graph needs one process on a CUDA device, got {env.world_size} process(es) on "
                         f"{device}: leave --cuda-graph out")
    # A warm start tokenizes with the checkpoints' own tokenizer, when they come with one.
    tokenizer = cfg.tokenizer or (init_tokenizer(cfg.init_from) if cfg.init_from else None)
    dataset, tok = open_training_data(cfg.data, os.path.join(out_dir, "data"), tokenizer=tokenizer,
                                      seq_len=cfg.seq_len, vocab_size=cfg.vocab_size, seed=cfg.seed,
                                      is_main=env.is_main, barrier=env.barrier, progress=cfg.progress and env.is_main,
                                      trainer="unigram" if cfg.arch == "deberta-v3" else "wordpiece")
    skipped = dataset.index.get("skipped_lines", 0)
    if skipped and env.is_main:  # told before the run, not after: the data is what it is for all its steps
        print(f"electra-fast: warning: skipped {skipped} lines of the text that were not UTF-8: convert the files to "
              "UTF-8 (e.g. iconv -f latin1 -t utf-8) to train on them", file=sys.stderr, flush=True)
    model, optimizer = _build(cfg, resume, tok, device, capturable=use_graph)
    if not _has_token_types(model):
        dataset = _WithoutSegments(dataset)
    start = int(resume["data"]["batch"]) if resume is not None else 0  # one global batch per optimizer step
    ddp = None
    if env.world_size > 1 and not cfg.fsdp:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if use_compile:
        model.validate = False  # compiled code skips the host-side id check anyway; off first avoids a recompile
    micro = max(1, cfg.batch_size // (env.world_size * cfg.grad_accum))
    eval_set, eval_rows, train_rows = heldout(cfg, dataset, os.path.join(out_dir, "eval-data"), micro,
                                              is_main=env.is_main, barrier=env.barrier, progress=False)
    if eval_set is not None and eval_set is not dataset and not _has_token_types(model):  # dataset: wrapped already
        eval_set = _WithoutSegments(eval_set)
    plan = BatchPlan(train_rows, cfg.batch_size, world_size=env.world_size, rank=env.rank,
                     accum_steps=cfg.grad_accum, seed=cfg.seed)
    amp_dtype = torch.bfloat16 if bf16 else torch.float16 if cfg.fp16 else None
    ts = TrainStep(model, optimizer, accum=plan.accum_steps, max_grad_norm=cfg.max_grad_norm,
                   lr_schedule=warmup_linear_decay(cfg.steps, cfg.warmup_steps), amp_dtype=amp_dtype,
                   loss_scale=DynamicLossScale(device) if cfg.fp16 else None, forward=ddp or model,
                   compile=use_compile, grad_sync=grad_sync(model, ddp, cfg.fsdp))
    ts.load_state_dict(resume.get("step_state", {"step": start, "skipped": 0}) if resume is not None else
                       {"step": start, "skipped": 0})
    runner = None  # the step itself, or its CUDA graphs (captured on the first batch)

    log = MetricsLog(out_dir, start if resume is not None else None, cfg.tensorboard, cfg.wandb,
                     cfg.to_dict()) if env.is_main else None
    bar = None
    if env.is_main and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc=f"pretrain {cfg.preset}", unit="step", dynamic_ncols=True)
    checkpoint_extra = {"config": cfg.to_dict(), "model_spec": model_spec(model), "tokenizer": tok.to_str(),
                        "world_size": env.world_size}

    def checkpoint(step: int) -> Optional[str]:
        model_state, optim_state = full_state_dicts(model, optimizer, cfg.fsdp)  # every rank: a collective under FSDP
        step_state = ts.state_dict()
        if not env.is_main:
            return None
        return save_checkpoint({"model": model_state, "optimizer": optim_state, "step_state": step_state,
                                "rng": rng_state(), "data": {"batch": step, "batch_size": cfg.batch_size},
                                **checkpoint_extra}, ckpt_dir, step, keep=cfg.keep_checkpoints)

    # Micro-batches gathered by a thread and copied ahead of the step (only that thread draws from the plan's
    # permutations: BatchPlan caches one epoch's and is not thread-safe). Full rows need no attention mask, which
    # frees attention for its mask-less fast path; but a captured graph has fixed inputs, so with the graph every
    # batch keeps its mask (one graph, not a second capture for mask-less batches).
    items = ((s, mb) for s in range(start, cfg.steps) for mb in plan.micro_batches(s))
    prefetch = Prefetcher(items, lambda item: dataset.gather(item[1].indices, omit_full_mask=not use_graph), device,
                          depth=2 * plan.accum_steps)
    model.train()
    window_steps, window_start, record, eval_record = 0, time.perf_counter(), {}, None
    last_ckpt = latest_checkpoint(ckpt_dir) if env.is_main and start >= cfg.steps else None
    with prefetch:
        for step in range(start, cfg.steps):
            batches = [next(prefetch) for _ in plan.chunks]  # the thread drew this step's indices
            if runner is None:
                if use_graph:
                    from electra_fast.train.cuda_graph import CUDAGraphStep

                    runner = CUDAGraphStep(ts, batches[0])
                else:
                    runner = ts
            runner(batches, seeds=[chunk_seed(cfg.seed, step, chunk) for chunk in plan.chunks])
            # Token ids were range-checked on the first batch (one host sync); later batches come from the same
            # data and tokenizer, so checking them again would only cost a sync per step.
            model.validate = False
            window_steps += 1
            done = step + 1
            if eval_set is not None and (done % cfg.eval_interval == 0 or done == cfg.steps):
                eval_record = {"step": done, "split": "eval",
                               **evaluate(model, eval_set, eval_rows, plan.micro_batch, cfg.seed, device, amp_dtype)}
                if log is not None:
                    log.write(eval_record)
            if done % cfg.log_interval == 0 or done == cfg.steps:
                metrics, now = ts.read_metrics(), time.perf_counter()  # one all-reduce and host sync per interval
                record = {"step": done, **metrics,
                          "tokens_per_s": window_steps * cfg.batch_size * cfg.seq_len / max(now - window_start, 1e-9)}
                if log is not None:
                    log.write(record)
                if bar is not None:
                    shown = OrderedDict(  # an OrderedDict keeps this order (keyword arguments get sorted)
                        loss=f"{record['loss']:.3f}", mlm=f"{record['mlm_loss']:.3f}",
                        disc=f"{record['disc_loss']:.4f}", disc_acc=f"{record['disc_accuracy']:.3f}",
                        tok_s=f"{record['tokens_per_s']:.0f}")
                    if record["skipped_steps"]:
                        shown["skipped"] = record["skipped_steps"]
                    if eval_record is not None:
                        shown["eval_auc"] = f"{eval_record['disc_auc']:.3f}"
                    bar.set_postfix(shown, refresh=False)
                window_steps, window_start = 0, now
            if bar is not None:
                bar.update(1)
            if done % cfg.save_interval == 0 or done == cfg.steps:
                last_ckpt = checkpoint(done) or last_ckpt
    if bar is not None:
        bar.close()
    if log is not None:
        log.close()
    if cfg.export and last_ckpt is not None:
        export(last_ckpt, out_dir)
    env.barrier()
    return {"step": max(start, cfg.steps), "output_dir": out_dir, "checkpoint": last_ckpt, "metrics": record,
            "model": model, "skipped_lines": skipped, "eval": eval_record}


def find_resume_checkpoint(resume: str, output_dir: str) -> str:
    """The checkpoint `--resume` means: a file, or "latest" (the newest in `output_dir/checkpoints`)."""
    if resume != "latest":
        return resume
    path = latest_checkpoint(os.path.join(output_dir, "checkpoints"))
    if path is None:
        raise InputError(f"--resume: no checkpoint in {os.path.join(output_dir, 'checkpoints')!r}: start without "
                         "--resume, or pass the --output-dir of the run to continue")
    return path


__all__ = ["TrainConfig", "train", "export", "chunk_seed", "find_resume_checkpoint", "DEFAULT_STEPS",
           "ARCHS", "default_output_dir"]
