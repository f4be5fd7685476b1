"""The trainer's metrics: one JSON object per log interval (and per evaluation, with "split": "eval") in
`metrics.jsonl` and, optionally, TensorBoard (train/... and eval/...)."""
from __future__ import annotations

import json
import os
from typing import Optional

from electra_fast.errors import InputError


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise InputError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


def _logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):  # e.g. a line cut off by a kill
        return float("inf")


class MetricsLog:
    """JSONL metrics (one object per log interval) and, optionally, TensorBoard; rank 0 only."""

    def __init__(self, output_dir: str, resume_step: Optional[int], tensorboard: bool):
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

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            split = record.get("split", "train")  # evaluation records: eval/...
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{split}/{k}", v, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


__all__ = ["MetricsLog"]
