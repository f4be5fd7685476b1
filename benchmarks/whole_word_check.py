"""Whole-word against token masking on the README's demo (not in CI): train the `tiny` preset on the built-in corpus
(`electra-fast pretrain`'s defaults: 1000 steps, Python's documentation) with each masking and several seeds, then
score every model on the same held-out rows with the same token masks (`masking="distinct"`, one fixed eval seed),
so the numbers compare what the discriminators learned, not how hard their training masks were.

Prints a table (held-out ROC-AUC and accuracy at 0.5: mean and standard deviation over seeds, per masking), the
step-time ratio (whole-word / token, from the runs' logged tokens per second: wall-clock, so on a busy machine a
rough figure), and the kernel launches and bytes of the masking stage for both (counted on fake tensors as
benchmarks/step_model.py counts a step: the Triton backend, launches intercepted; at the small preset's B128 L128).

    python benchmarks/whole_word_check.py                     # 3 seeds x 2 maskings x 1000 steps
    python benchmarks/whole_word_check.py --seeds 1 --steps 200 --out /tmp/ww   # a quick look

Each run's scores are kept in `--out`/results/ and the table covers every run kept there (of these steps): a later
call with `--first-seed` adds seeds to earlier ones.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from electra_fast.data import open_training_data  # noqa: E402
from electra_fast.train.config import TrainConfig  # noqa: E402
from electra_fast.train.evaluate import evaluate, heldout  # noqa: E402
from electra_fast.train.loop import train  # noqa: E402

MASKINGS = ("whole_word", "distinct")
EVAL_SEED = 20240  # the same token masks for every model


def prepare(out: str) -> tuple:
    """The demo's data prepared once (the default config's tokenizer, L and seed), shared by every run."""
    cfg = TrainConfig().resolved()
    data_dir = os.path.join(out, "data")
    dataset, _ = open_training_data(None, data_dir, seq_len=cfg.seq_len, vocab_size=cfg.vocab_size, seed=cfg.seed,
                                    progress=False)
    return cfg, data_dir, dataset


def run(masking: str, seed: int, steps: int, data_dir: str, out: str) -> dict:
    """One training run; its held-out rows are excluded from training by the trainer's own split."""
    cfg = TrainConfig(masking=masking, seed=seed, steps=steps, data=[data_dir], eval_interval=steps, export=False,
                      progress=False, output_dir=os.path.join(out, f"{masking}-{seed}"), overwrite=True,
                      device="cpu", log_interval=max(1, steps // 20))
    start = time.perf_counter()
    summary = train(cfg)
    wall = time.perf_counter() - start
    with open(os.path.join(cfg.output_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    rates = [r["tokens_per_s"] for r in records if r.get("split") != "eval" and "tokens_per_s" in r][1:]
    return {"model": summary["model"], "cfg": cfg.resolved(), "wall_s": wall,
            "tokens_per_s": statistics.median(rates) if rates else float("nan"), "own_eval": summary["eval"]}


def score(result: dict, dataset) -> dict:
    """Held-out metrics under token masking (the same masks for every model)."""
    model, cfg = result["model"], result["cfg"]
    micro = cfg.batch_size
    eval_set, rows, _ = heldout(cfg, dataset, os.path.join(cfg.output_dir, "eval-data"), micro, progress=False)
    saved = model.masking
    model.masking = "distinct"
    try:
        return evaluate(model, eval_set, rows, micro, EVAL_SEED, torch.device("cpu"))
    finally:
        model.masking = saved


def interleaved_step_ratio(dataset, tok, repeats: int = 40) -> tuple:
    """`(whole_word / distinct step time, whole_word s, distinct s)`: median of forward + backward of the tiny model
    on one batch, the two maskings alternated step by step so that both see the same load on a shared machine."""
    from electra_fast.pretraining.pretrainer import ElectraPretrainer

    cfg = TrainConfig().resolved()
    batch = dataset.gather(list(range(cfg.batch_size)))
    model = ElectraPretrainer.from_preset(cfg.preset, tokenizer=tok, masking="whole_word", validate=False)
    times = {m: [] for m in MASKINGS}
    for i in range(repeats):
        for masking in MASKINGS:
            model.masking = masking
            torch.manual_seed(i)
            start = time.perf_counter()
            model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).loss.backward()
            times[masking].append(time.perf_counter() - start)
    ww, tok_s = (statistics.median(times[m][repeats // 4:]) for m in MASKINGS)  # the first quarter warms up
    return ww / tok_s, ww, tok_s


def masking_stage_counts(batch: int = 128, seq_len: int = 128, vocab: int = 30522) -> dict:
    """Launches and bytes of the masking stage (the word-start lookup, then `mask_tokens`) per masking, on fake
    tensors with the Triton backend's launches intercepted (benchmarks/cuda_emulation.py)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.module_tracker import ModuleTracker

    from cuda_emulation import cuda_like
    from electra_fast.ops import mask_tokens
    from step_counter import StepCounter

    special = torch.tensor([0, 2, 3, 4])
    table = torch.rand(vocab) < 0.7
    ids = torch.randint(5, vocab, (batch, seq_len))
    mask = torch.ones_like(ids)
    out = {}
    for masking in MASKINGS:
        counter = StepCounter(ModuleTracker(), [], {vocab}, 0.15)
        fake = FakeTensorMode()
        f_ids, f_mask, f_special, f_table = (fake.from_tensor(t) for t in (ids, mask, special, table))
        with fake, counter, cuda_like(counter):
            counter.counting = True
            starts = None
            if masking == "whole_word":  # what ElectraPretrainer does with its vocabulary lookup
                starts = f_table[f_ids]
            mask_tokens(f_ids, f_mask, mask_prob=0.15, mask_token_id=4, special_token_ids=f_special,
                        **({"word_starts": starts} if starts is not None else {}))
        out[masking] = {"launches": sum(r.launches for r in counter.records),
                        "bytes": sum(r.nbytes for r in counter.records),
                        "ops": [r.op for r in counter.records]}
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3, help="how many seeds (default 3)")
    p.add_argument("--first-seed", type=int, default=1, help="the first seed (default 1)")
    p.add_argument("--steps", type=int, default=TrainConfig().resolved().steps)
    p.add_argument("--out", help="working directory (default: a temporary one)")
    p.add_argument("--no-train", action="store_true", help="no training runs: the interleaved step time and the "
                   "masking stage's launch and byte counts only")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # as the trainer does for tiny on a CPU
    if not args.no_train:
        out = args.out or tempfile.mkdtemp(prefix="whole-word-check-")
        _, data_dir, dataset = prepare(out)
        kept = os.path.join(out, "results")
        os.makedirs(kept, exist_ok=True)
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for masking in MASKINGS:
                r = run(masking, seed, args.steps, data_dir, out)
                r["scores"] = score(r, dataset)
                r = {"masking": masking, "seed": seed, "steps": args.steps, "wall_s": r["wall_s"],
                     "tokens_per_s": r["tokens_per_s"], "scores": r["scores"]}
                with open(os.path.join(kept, f"{masking}-{seed}-{args.steps}.json"), "w") as f:
                    json.dump(r, f)
                s = r["scores"]
                print(f"{masking:>10} seed {seed}: AUC {s['disc_auc']:.4f} accuracy {s['disc_accuracy']:.4f} "
                      f"(all-original {s['baseline_accuracy']:.4f}), {r['tokens_per_s']:.0f} tokens/s, "
                      f"{r['wall_s']:.0f} s", flush=True)

        results = {m: [] for m in MASKINGS}
        for name in sorted(os.listdir(kept)):
            with open(os.path.join(kept, name)) as f:
                r = json.load(f)
            if r["steps"] == args.steps:
                results[r["masking"]].append(r)
        seeds = sorted({r["seed"] for rs in results.values() for r in rs})

        def spread(xs):
            return statistics.stdev(xs) if len(xs) > 1 else float("nan")

        print(f"\nheld-out under token masking ({results[MASKINGS[0]][0]['scores']['eval_tokens']} tokens, the same "
              f"masks for every model), {args.steps} steps, seeds {seeds}:")
        print("| masking | ROC-AUC mean | sd | accuracy mean | sd | lift over all-original |")
        print("|---|---|---|---|---|---|")
        for m in MASKINGS:
            auc = [r["scores"]["disc_auc"] for r in results[m]]
            acc = [r["scores"]["disc_accuracy"] for r in results[m]]
            lift = [r["scores"]["accuracy_lift"] for r in results[m]]
            print(f"| {m} | {statistics.mean(auc):.4f} | {spread(auc):.4f} | {statistics.mean(acc):.4f} | "
                  f"{spread(acc):.4f} | {statistics.mean(lift):+.4f} |")
        tps = {m: statistics.mean(r["tokens_per_s"] for r in results[m]) for m in MASKINGS}
        print(f"\nstep time whole_word / distinct: {tps['distinct'] / tps['whole_word']:.3f} (CPU wall clock, "
              f"median tokens/s per run; noisy on a shared machine)")
        ratio, ww, tok_s = interleaved_step_ratio(dataset, dataset.tokenizer())
        print(f"step time, the two maskings alternated on one batch (tiny, CPU, eager, PyTorch reference ops): "
              f"{ww * 1e3:.1f} ms / {tok_s * 1e3:.1f} ms = {ratio:.3f}")
    else:
        _, _, dataset = prepare(args.out or tempfile.mkdtemp(prefix="whole-word-check-"))
        ratio, ww, tok_s = interleaved_step_ratio(dataset, dataset.tokenizer())
        print(f"step time, the two maskings alternated on one batch (tiny, CPU, eager, PyTorch reference ops): "
              f"{ww * 1e3:.1f} ms / {tok_s * 1e3:.1f} ms = {ratio:.3f}")
    counts = masking_stage_counts()
    print("\nmasking stage at B128 L128 V30522 (Triton backend, counted on fake tensors):")
    for m, c in counts.items():
        print(f"  {m:>10}: {c['launches']} launches, {c['bytes'] / 1e6:.2f} MB moved ({', '.join(c['ops'])})")


if __name__ == "__main__":
    main()
