"""The trainer's metrics: one JSON object per log interval (and per evaluation, with "split": "eval") in
`metrics.jsonl` and, optionally, TensorBoard and Weights & Biases (train/... and eval/...); and its progress bar."""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from typing import Optional

from electra_fast.errors import InputError


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise InputError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


def _wandb_module():
    try:
        import wandb
    except ImportError:
        raise InputError("--wandb needs the wandb package: pip install wandb") from None
    return wandb


def _wandb_run(output_dir: str, project: str, config: Optional[dict]):
    """A W&B run that a resumed pretrain continues: its id is kept in the output directory."""
    wandb = _wandb_module()
    id_file = os.path.join(output_dir, "wandb_run_id")
    if os.path.exists(id_file):
        with open(id_file, encoding="utf-8") as f:
            run_id = f.read().strip()
    else:
        run_id = wandb.util.generate_id()
        with open(id_file, "w", encoding="utf-8") as f:
            f.write(run_id)
    return wandb.init(project=project, id=run_id, resume="allow", dir=output_dir, config=config)


def _logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):  # e.g. a line cut off by a kill
        return float("inf")


class MetricsLog:
    """JSONL metrics (one object per log interval) and, optionally, TensorBoard and a W&B project; rank 0 only."""

    def __init__(self, output_dir: str, resume_step: Optional[int], tensorboard: bool,
                 wandb_project: Optional[str] = None, config: Optional[dict] = None):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        if resume_step is not None and os.path.exists(self.path):
            # Drop what the interrupted run logged after the checkpoint: the resumed run logs those steps again.
            with open(self.path, encoding="utf-8") as f:
                kept = [l for l in f if _logged_step(l) <= resume_step]
            tmp = f"{self.path}.tmp-{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(kept)
            os.replace(tmp, self.path)
        elif os.path.exists(self.path):
            os.remove(self.path)
        self.file = open(self.path, "a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            self.tb = _summary_writer_class()(os.path.join(output_dir, "tensorboard"))
        self.wandb = _wandb_run(output_dir, wandb_project, config) if wandb_project else None

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        split = record.get("split", "train")  # evaluation records: eval/...
        scalars = {f"{split}/{k}": v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


class ProgressBar:
    """A tqdm bar over the run's steps showing the last logged losses, accuracy, throughput and held-out AUC."""

    def __init__(self, total: int, initial: int, desc: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)

    def show(self, record: dict, eval_record: Optional[dict] = None) -> None:
        """Show a training record (and the last evaluation's AUC), from the next refresh on."""
        shown = OrderedDict(  # an OrderedDict keeps this order (keyword arguments get sorted)
            loss=f"{record['loss']:.3f}", mlm=f"{record['mlm_loss']:.3f}", disc=f"{record['disc_loss']:.4f}",
            disc_acc=f"{record['disc_accuracy']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if record["skipped_steps"]:
            shown["skipped"] = record["skipped_steps"]
        if eval_record is not None:
            shown["eval_auc"] = f"{eval_record['disc_auc']:.3f}"
        self.bar.set_postfix(shown, refresh=False)

    def update(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


__all__ = ["MetricsLog", "ProgressBar"]
