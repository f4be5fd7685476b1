"""Small helpers shared by the tests (fixtures live in conftest.py)."""
import math
from unittest import mock

import pytest


def chi2_critical(df, z=3.29):
    """Upper chi-square quantile by Wilson-Hilferty; z = 3.29 is p ~ 5e-4 (the draws use fixed seeds)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


class Killed(Exception):
    """What `train_killed_at` raises where a crash would end the process."""


def train_killed_at(cfg, step: int, chunk: int = 0) -> None:
    """`train(cfg)` ended as a crash would end it, just before micro-batch `chunk` of optimizer step `step` (the
    loop seeds each micro-batch with `chunk_seed` first): what it wrote until then stays for a resume to find."""
    import electra_fast.train as train_mod

    real = train_mod.chunk_seed

    def dying(seed, s, c):
        if (s, c) == (step, chunk):
            raise Killed
        return real(seed, s, c)

    with mock.patch.object(train_mod, "chunk_seed", dying), pytest.raises(Killed):
        train_mod.train(cfg)
