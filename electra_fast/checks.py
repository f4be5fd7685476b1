"""Checks of Python arguments (numbers, choices) shared by every layer: each error names the argument, the expected
and the actual value. Tensor checks for the ops are in `electra_fast/ops/_checks.py`, built on these.

`error=` picks the exception: `ValueError` for the Python API, `errors.InputError` where a command-line option is
being checked (the CLI prints those as one line).
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence, Type


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(value, name: str, *, low: Optional[int] = None, high: Optional[int] = None, allow_none: bool = False,
              error: Type[Exception] = ValueError):
    """`value` an int in `[low, high]` (either bound optional); None passes when `allow_none`."""
    if value is None and allow_none:
        return None
    if not _is_int(value) or (low is not None and value < low) or (high is not None and value > high):
        if low is not None and high is not None:
            want = f"an int in [{low}, {high}]"
        elif low == 1:
            want = "a positive int"
        elif low is not None:
            want = f"an int >= {low}"
        elif high is not None:
            want = f"an int <= {high}"
        else:
            want = "an int"
        raise error(f"{name} must be {want}{' or None' if allow_none else ''}, got {value!r}")
    return value


def check_number(value, name: str, *, low: Optional[float] = None, high: Optional[float] = None,
                 low_open: bool = False, high_open: bool = False, error: Type[Exception] = ValueError) -> float:
    """`value` a finite real number within the bounds (`*_open`: the bound itself excluded); returns it as a float."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low}"
        hi = "" if high is None else f"{high}" + (")" if high_open else "]")
        where = f" in {lo}, {hi}" if low is not None and high is not None else (
            f" {'>' if low_open else '>='} {low}" if low is not None else
            f" {'<' if high_open else '<='} {high}" if high is not None else "")
        raise error(f"{name} must be a finite number{where}, got {value!r}")
    return float(value)


def check_choice(value, name: str, choices: Sequence[str], *, aliases: Optional[Mapping[str, str]] = None,
                 error: Type[Exception] = ValueError) -> str:
    """`value` one of `choices`; another spelling in `aliases` (an older name, a hyphenated one) maps to its name in
    `choices`, which is returned."""
    if aliases and value in aliases:
        value = aliases[value]
    if value not in choices:
        also = f" (also accepted: {', '.join(repr(a) for a in aliases)})" if aliases else ""
        raise error(f"{name} must be one of {tuple(choices)}{also}, got {value!r}")
    return value
