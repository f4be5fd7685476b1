"""The pretraining loop: data -> `ElectraPretrainer` steps -> metrics, checkpoints, a transformers export.

Optimisation as the reference (docs/algorithm.md#optimizer-and-schedule): AdamW (0.9, 0.999, eps 1e-6;
`optimizer="electra_adam"`: the reference's update without bias correction), weight decay 0.01 except LayerNorm and
biases, gradient-norm clip 1.0, LR = peak * min(1, step / warmup) * (1 - step / steps). Each step is an
`electra_fast.train.step.TrainStep` (no host sync: LR, skip of non-finite steps and metrics live on the device), on CUDA
in one process replayed from CUDA graphs; batches are gathered and copied ahead by `data.Prefetcher`.

Multi-process runs come from `torchrun` (the environment names rank and world size): DDP by default, FSDP2
(`fully_shard`) with `fsdp=True`; each rank reads its own part of every global batch (`data.BatchPlan`), and
only rank 0 logs and writes files (under FSDP every rank writes its own checkpoint shard:
`distributed.save_sharded`).

Reproducibility: before each micro-batch, torch's RNG is seeded from (seed, step, chunk), where `chunk` numbers
the micro-batch within the global batch. Masking, sampling and dropout of a chunk are then the same whatever
the number of processes or the accumulation that split the batch, and whether or not the run was interrupted:
N processes x 1 micro-batch equals 1 process x N accumulated micro-batches up to float summation order, and a
resumed run repeats the losses of an uninterrupted one exactly (on the same device). The RNG states are also
saved in checkpoints, for anything else that draws from them.

A run goes through its phases in order (`_Run.run`): check the output directory, open the data, build (or
restore) the model and optimizer, make the step, open the logs, the step loop (each step: run, evaluate, log,
checkpoint, as their intervals say; after SIGTERM or SIGUSR1, a last log and checkpoint end it early:
`electra_fast.train.preemption`), finish (export, summary).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from electra_fast.data import BatchPlan, open_training_data
from electra_fast.data.order import LEGACY_ORDER, ORDER
from electra_fast.data.prefetch import Prefetcher
from electra_fast.errors import InputError, lock_directory
from electra_fast.io.checkpoint import (checkpoint_path, latest_checkpoint, list_checkpoints, load_checkpoint,
                                        newest_intact_checkpoint, rng_state, save_checkpoint)
from electra_fast.ops import available_backends
from electra_fast.pretraining.rtd_step import check_masking
from electra_fast.train.build import WithoutSegments, check_token_ids, has_token_types, place, restore, run_model
from electra_fast.train.config import TrainConfig
from electra_fast.train.distributed import Dist, grad_sync, init_distributed, save_sharded
from electra_fast.train.evaluate import evaluate, heldout
from electra_fast.train.export import export, model_spec
from electra_fast.train.metrics_log import MetricsLog, ProgressBar, _summary_writer_class, _wandb_module
from electra_fast.train.preemption import Preemption
from electra_fast.train.schedules import warmup_linear_decay
from electra_fast.train.step import DynamicLossScale, TrainStep
from electra_fast.train.warm_start import init_tokenizer
from electra_fast.train.watchdog import StepWatchdog


def chunk_seed(seed: int, step: int, chunk: int) -> int:
    """Independent, well-mixed seed for micro-batch `chunk` of step `step` (SeedSequence hashing)."""
    return int(np.random.SeedSequence([seed, step, chunk]).generate_state(1, np.uint64)[0])


def train(cfg: TrainConfig, resume: Optional[dict] = None) -> dict:
    """Run pretraining. `resume`: a loaded checkpoint (`checkpoint.load_checkpoint`) to continue from.

    Returns a summary: `{"step", "output_dir", "checkpoint", "metrics": last logged record, "model": the trained
    ElectraPretrainer (on its device; a shard of it under FSDP), "skipped_lines": lines of the text that were not
    UTF-8 (also reported on stderr when the data is opened), "eval": the last held-out evaluation
    (`electra_fast.train.evaluate.evaluate`'s record with "step" and "split": "eval"; None without one), "stopped":
    None, or what stopped the run early ("SIGTERM", "SIGUSR1"; "step" is then the step it stopped after, which its
    last checkpoint holds: `electra_fast.train.preemption`)}`.
    """
    cfg = cfg.resolved()
    env, device = init_distributed(cfg.device, cfg.collective_timeout)
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
        run = _Run(cfg, resume, env, device)
        with run.preemption:  # SIGTERM / SIGUSR1 now stop the run cleanly (electra_fast.train.preemption)
            return run.run()
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


class _Run:
    """One run of `train`, phase by phase; each phase sets the attributes the later ones use."""

    def __init__(self, cfg: TrainConfig, resume: Optional[dict], env: Dist, device: torch.device):
        self.cfg, self.resume, self.env, self.device = cfg, resume, env, device
        self.out_dir, self.ckpt_dir = cfg.output_dir, os.path.join(cfg.output_dir, "checkpoints")
        bf16 = cfg.bf16 if cfg.bf16 is not None else (
            device.type == "cuda" and not cfg.fp16 and torch.cuda.is_bf16_supported())
        self.amp_dtype = torch.bfloat16 if bf16 else torch.float16 if cfg.fp16 else None
        self.use_compile = cfg.compile if cfg.compile is not None else device.type == "cuda"
        self.use_graph = cfg.cuda_graph if cfg.cuda_graph is not None else (
            device.type == "cuda" and env.world_size == 1)
        # Written by the step loop, read by `finish`.
        self.record, self.eval_record, self.last_ckpt = {}, None, None
        self.watchdog = StepWatchdog(env.rank, None)  # a no-op until the step loop arms its own
        self.stopped = None  # the step after which a signal stopped the run
        self.preemption = Preemption(env.rank, env.world_size, cfg.signal_check_interval, cfg.save_every_minutes)

    def run(self) -> dict:
        """Every phase in order; returns `train`'s summary."""
        _check_run_dir(self.cfg, self.resume, self.env)
        if self.use_graph and (self.device.type != "cuda" or self.env.world_size > 1):
            raise InputError(f"--cuda-graph needs one process on a CUDA device, got {self.env.world_size} "
                             f"process(es) on {self.device}: leave --cuda-graph out")
        if self.cfg.backend is not None:  # told now, not by the first step's kernels
            usable = available_backends(self.device, "masked_gather")
            if self.cfg.backend not in usable:
                raise InputError(f"--backend {self.cfg.backend} cannot run on {self.device} here (usable: "
                                 f"{', '.join(usable)}): pass one of those, or leave --backend out")
        self.open_data()
        self.build()
        self.make_step()
        self.open_logs()
        self.step_loop()
        return self.finish()

    # ------------------------------------------------------------------------------------------------ phases
    def open_data(self) -> None:
        """The training data and its tokenizer (prepared, or tokenized into the output directory's cache); warns
        on stderr of lines that were not UTF-8."""
        cfg, env = self.cfg, self.env
        # A warm start tokenizes with the checkpoints' own tokenizer, when they come with one.
        tokenizer = cfg.tokenizer or (init_tokenizer(cfg.init_from) if cfg.init_from else None)
        self.dataset, self.tok = open_training_data(
            cfg.data, os.path.join(self.out_dir, "data"), tokenizer=tokenizer, seq_len=cfg.seq_len,
            vocab_size=cfg.vocab_size, seed=cfg.seed, is_main=env.is_main, barrier=env.barrier,
            progress=cfg.progress and env.is_main, trainer="unigram" if cfg.arch == "deberta-v3" else "wordpiece")
        if check_masking(cfg.masking) != "whole_word":
            self.dataset.word_starts = False  # a segmented dataset's bits: read by whole-word masking only
        self.skipped = self.dataset.index.get("skipped_lines", 0)
        if self.skipped and env.is_main:  # told before the run, not after: the data is what it is for all its steps
            print(f"electra-fast: warning: skipped {self.skipped} lines of the text that were not UTF-8: convert the "
                  "files to UTF-8 (e.g. iconv -f latin1 -t utf-8) to train on them", file=sys.stderr, flush=True)

    def build(self) -> None:
        """The model and optimizer on the device: fresh, warm-started, or restored from the checkpoint (weights,
        optimizer state, RNG states); the step to start from."""
        self.model = run_model(self.cfg, self.resume, self.tok)
        self.optimizer = place(self.cfg, self.model, self.device, capturable=self.use_graph)
        if self.resume is not None:
            restore(self.cfg, self.resume, self.model, self.optimizer)
        if not has_token_types(self.model):
            self.dataset = WithoutSegments(self.dataset)
        self.start = int(self.resume["data"]["batch"]) if self.resume is not None else 0  # a global batch per step
        # What every checkpoint holds besides the state.
        self.checkpoint_extra = {"config": self.cfg.to_dict(), "model_spec": model_spec(self.model),
                                 "tokenizer": self.tok.to_str(), "world_size": self.env.world_size}

    def make_step(self) -> None:
        """The held-out split, this rank's batch plan and the `TrainStep` (DDP-wrapped, compiled as asked; its CUDA
        graphs are captured on the first batch, in `step_loop`)."""
        cfg, env = self.cfg, self.env
        ddp = None
        if env.world_size > 1 and not cfg.fsdp:
            from torch.nn.parallel import DistributedDataParallel

            ddp = DistributedDataParallel(self.model,
                                          device_ids=[self.device.index] if self.device.type == "cuda" else None)
        micro = max(1, cfg.batch_size // (env.world_size * cfg.grad_accum))
        self.eval_set, self.eval_rows, train_rows = heldout(cfg, self.dataset, os.path.join(self.out_dir, "eval-data"),
                                                            micro, is_main=env.is_main, barrier=env.barrier,
                                                            progress=False)
        if self.eval_set is not None and self.eval_set is not self.dataset and not has_token_types(self.model):
            self.eval_set = WithoutSegments(self.eval_set)  # the training dataset is wrapped already
        # A run keeps the data order it started with: checkpoints written before the order was recorded used the
        # whole-permutation order (data/order.py).
        order = ORDER if self.resume is None else self.resume["data"].get("order", LEGACY_ORDER)
        self.plan = BatchPlan(train_rows, cfg.batch_size, world_size=env.world_size, rank=env.rank,
                              accum_steps=cfg.grad_accum, seed=cfg.seed, order=order)
        self.train_step = TrainStep(
            self.model, self.optimizer, accum=self.plan.accum_steps, max_grad_norm=cfg.max_grad_norm,
            lr_schedule=warmup_linear_decay(cfg.steps, cfg.warmup_steps), amp_dtype=self.amp_dtype,
            loss_scale=DynamicLossScale(self.device) if cfg.fp16 else None, forward=ddp or self.model,
            compile=self.use_compile, grad_sync=grad_sync(self.model, ddp, cfg.fsdp))
        fresh = {"step": self.start, "skipped": 0}
        self.train_step.load_state_dict(self.resume.get("step_state", fresh) if self.resume is not None else fresh)

    def open_logs(self) -> None:
        """Rank 0's metrics log (JSONL, TensorBoard, W&B) and progress bar."""
        cfg, env = self.cfg, self.env
        self.log = self.bar = None
        if env.is_main:
            # The logs show the kernel options too, which the run's saved settings leave out.
            self.log = MetricsLog(self.out_dir, self.start if self.resume is not None else None, cfg.tensorboard,
                                  cfg.wandb, {**cfg.to_dict(), **cfg.kernel_options().to_dict()})
            if cfg.progress:
                self.bar = ProgressBar(cfg.steps, self.start, f"pretrain {cfg.preset}")

    def step_loop(self) -> None:
        """Every remaining step: the step (eager, or replayed from the CUDA graphs captured on the first batch), then
        evaluation, logging and a checkpoint where their intervals fall."""
        cfg, plan = self.cfg, self.plan
        # Micro-batches gathered by a thread and copied ahead of the step (only that thread draws from the plan's
        # permutations: BatchPlan caches one epoch's and is not thread-safe). Full rows need no attention mask,
        # which frees attention for its mask-less fast path; but a captured graph has fixed inputs, so with the
        # graph every batch keeps its mask (one graph, not a second capture for mask-less batches).
        items = ((s, mb) for s in range(self.start, cfg.steps) for mb in plan.micro_batches(s))
        dataset = self.dataset
        prefetch = Prefetcher(items, lambda item: dataset.gather(item[1].indices, omit_full_mask=not self.use_graph),
                              self.device, depth=2 * plan.accum_steps)
        if self.env.is_main and self.start >= cfg.steps:
            self.last_ckpt = latest_checkpoint(self.ckpt_dir)
        runner = None  # the step itself, or its CUDA graphs
        self.model.train()
        self.window_steps, self.window_start = 0, time.perf_counter()
        self.preemption.restart_clock()  # timed checkpoints count from the first step, not from opening the data
        # A rank stuck in a step (a collective waiting on a dead or hung rank) ends itself: electra_fast.train.watchdog.
        self.watchdog = watchdog = StepWatchdog(self.env.rank,
                                                cfg.collective_timeout if self.env.world_size > 1 else None)
        with prefetch, watchdog:
            for step in range(self.start, cfg.steps):
                watchdog.arm(step + 1)
                batches = [next(prefetch) for _ in plan.chunks]  # the thread drew this step's indices
                if runner is None:
                    runner = self.first_step_runner(batches)
                runner(batches, seeds=[chunk_seed(cfg.seed, step, chunk) for chunk in plan.chunks])
                self.window_steps += 1
                self.after_step(step + 1)
                watchdog.disarm()
                if self.stopped is not None:
                    break

    def first_step_runner(self, batches: list):
        """What runs every step: the eager `TrainStep`, or its CUDA-graph capture (on the first batch). The first
        step's token ids are range-checked here, once (one host sync): later batches come from the same data and
        tokenizer."""
        for batch in batches:
            check_token_ids(self.model, batch)
        if not self.use_graph:
            return self.train_step
        from electra_fast.train.cuda_graph import CUDAGraphStep

        return CUDAGraphStep(self.train_step, batches[0])

    def after_step(self, done: int) -> None:
        """Evaluation, logging and a checkpoint after `done` steps, where their intervals fall (all at the end);
        on a signal the processes agreed on (`Preemption.decide`), the open window's metrics and a checkpoint, then
        the loop stops."""
        cfg, last = self.cfg, done == self.cfg.steps
        stop, timed = self.preemption.decide(done)
        stop = stop and not last  # the run ends here anyway, and finishes as usual
        if self.eval_set is not None and (done % cfg.eval_interval == 0 or last):
            self.run_evaluation(done)
        if done % cfg.log_interval == 0 or last or stop:
            self.log_metrics(done)
        if self.bar is not None:
            self.bar.update()
        if done % cfg.save_interval == 0 or last or stop or timed:
            # A write may take long (a large model, a network file system), and the other ranks wait for it: the
            # watchdog pauses, the process group's own timeout still bounds the wait.
            self.watchdog.disarm()
            self.save(done, needed=last or stop)
            self.watchdog.arm(done)
        if stop:
            self.stopped = done

    def save(self, step: int, needed: bool) -> None:
        """`checkpoint(step)`, where a failed write (a full disk: any OSError) is decided the same way on every
        process: an `InputError` naming the file where the checkpoint is `needed` (the end of the run, a stop on a
        signal: nothing else would keep the state) or `on_save_error="stop"`; else one warning line, and the run goes
        on to try again at the next save. Either way the previous checkpoint stays the newest (`save_checkpoint`
        writes a temporary, removed on failure)."""
        error = path = None
        try:
            path = self.checkpoint(step)
        except OSError as e:
            error = e
        if self.preemption.all_ok(error is None):
            self.last_ckpt = path or self.last_ckpt
            self.preemption.restart_clock()
            return
        why = f"{error.strerror or error}" if error is not None else "failed on another rank"
        kept = latest_checkpoint(self.ckpt_dir)
        kept = f"the newest checkpoint is still {kept!r}" if kept else "no earlier checkpoint was written"
        failed = f"could not write checkpoint {checkpoint_path(self.ckpt_dir, step)!r} ({why}); {kept}"
        if needed or self.cfg.on_save_error == "stop":
            raise InputError(f"{failed}: free space (or fix the directory), then run again with --resume auto")
        if self.env.is_main:
            print(f"electra-fast: warning: {failed}; training goes on and saves again at the next interval",
                  file=sys.stderr, flush=True)

    def run_evaluation(self, done: int) -> None:
        """The held-out metrics (`electra_fast.train.evaluate`), logged as a "split": "eval" record."""
        self.eval_record = {"step": done, "split": "eval",
                            **evaluate(self.model, self.eval_set, self.eval_rows, self.plan.micro_batch, self.cfg.seed,
                                       self.device, self.amp_dtype)}
        if self.log is not None:
            self.log.write(self.eval_record)

    def log_metrics(self, done: int) -> None:
        """The window's metrics and throughput: one all-reduce and host sync per log interval."""
        metrics, now = self.train_step.read_metrics(), time.perf_counter()
        tokens = self.window_steps * self.cfg.batch_size * self.cfg.seq_len
        self.record = {"step": done, **metrics, "tokens_per_s": tokens / max(now - self.window_start, 1e-9)}
        if self.log is not None:
            self.log.write(self.record)
        if self.bar is not None:
            self.bar.show(self.record, self.eval_record)
        self.window_steps, self.window_start = 0, now

    def checkpoint(self, step: int) -> Optional[str]:
        """Save the run at `step` (rank 0 writes; under FSDP each rank its shard, and rank 0 the manifest,
        `distributed.save_sharded`). -> the file, on rank 0."""
        step_state = self.train_step.state_dict()
        extra = {"step_state": step_state, "rng": rng_state(),
                 "data": {"batch": step, "batch_size": self.cfg.batch_size, "order": self.plan.order},
                 **self.checkpoint_extra}
        if self.cfg.fsdp:  # no rank gathers the whole state
            return save_sharded(self.model, self.optimizer, extra, self.ckpt_dir, step, self.env,
                                self.cfg.keep_checkpoints)
        if not self.env.is_main:
            return None
        return save_checkpoint({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), **extra},
                               self.ckpt_dir, step, keep=self.cfg.keep_checkpoints)

    def finish(self) -> dict:
        """Close the logs; the transformers export of the last checkpoint (rank 0); `train`'s summary."""
        if self.bar is not None:
            self.bar.close()
        if self.log is not None:
            self.log.close()
        if self.cfg.export and self.last_ckpt is not None and self.stopped is None:  # a stopped run is not done
            export(self.last_ckpt, self.out_dir)
        stopped = None
        if self.stopped is not None:
            stopped = self.preemption.signal_name or "a signal to another rank"
            if self.env.world_size > 1:  # each rank says where it stopped: the same step on all of them
                print(f"electra-fast: rank {self.env.rank}: stopped after step {self.stopped} ({stopped})",
                      file=sys.stderr, flush=True)
        self.env.barrier()
        return {"step": max(self.start, self.cfg.steps) if stopped is None else self.stopped, "stopped": stopped,
                "output_dir": self.out_dir, "checkpoint": self.last_ckpt, "metrics": self.record, "model": self.model,
                "skipped_lines": self.skipped, "eval": self.eval_record}


def find_resume_checkpoint(resume: str, output_dir: str) -> str:
    """The checkpoint `--resume` means: a file, or "latest" (the newest in `output_dir/checkpoints`)."""
    if resume != "latest":
        return resume
    path = latest_checkpoint(os.path.join(output_dir, "checkpoints"))
    if path is None:
        raise InputError(f"--resume: no checkpoint in {os.path.join(output_dir, 'checkpoints')!r}: start without "
                         "--resume, or pass the --output-dir of the run to continue")
    return path


def resume_state(resume: str, output_dir: str) -> Optional[dict]:
    """The loaded checkpoint `--resume` means: a file, "latest" (`find_resume_checkpoint`), or "auto": the newest in
    `output_dir/checkpoints` that verifies, skipping damaged files and unfinished writes with one warning line each
    (rank 0 tells them), None (a fresh start) where there is no checkpoint at all, so a job script can always pass it.
    """
    if resume != "auto":
        return load_checkpoint(find_resume_checkpoint(resume, output_dir))

    def warn(line: str) -> None:
        if os.environ.get("RANK", "0") == "0":
            print(f"electra-fast: warning: --resume auto: {line}", file=sys.stderr, flush=True)

    return newest_intact_checkpoint(os.path.join(output_dir, "checkpoints"), warn)


__all__ = ["train", "chunk_seed", "find_resume_checkpoint", "resume_state"]
