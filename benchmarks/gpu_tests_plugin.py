"""The pytest plugin of benchmarks/validate_gpu.py's tests stages, loaded as `-p validate_gpu` (validate_gpu.py
re-exports these hooks; benchmarks/ on PYTHONPATH): it records the node id of every test run, and leaves out the
tests an earlier call already ran. Inert without its options."""
from __future__ import annotations

import os

_pytest_config = None


def pytest_addoption(parser):
    group = parser.getgroup("validate_gpu")
    group.addoption("--validate-gpu-skip", default=None, help="file of node ids to leave out (already run)")
    group.addoption("--validate-gpu-ran", default=None, help="file to append the node id of every test run to")


def pytest_configure(config):
    global _pytest_config
    _pytest_config = config


def pytest_collection_modifyitems(config, items):
    path = config.getoption("validate_gpu_skip", None)
    if not path or not os.path.exists(path):
        return
    with open(path) as f:
        done = {line.strip() for line in f if line.strip()}
    keep = [item for item in items if item.nodeid not in done]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if item.nodeid in done])
        items[:] = keep


def pytest_runtest_logreport(report):
    config = _pytest_config
    path = config.getoption("validate_gpu_ran", None) if config is not None else None
    # The xdist controller records what its workers report; the workers themselves do not write.
    if not path or hasattr(config, "workerinput"):
        return
    if report.when == "call" or (report.when == "setup" and not report.passed):
        with open(path, "a") as f:  # a line per test as it ends: a killed session keeps what it ran
            f.write(report.nodeid + "\n")
