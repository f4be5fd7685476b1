"""The GPU tests and their CPU twins, checked.

A GPU gets short and rare turns, so a GPU test must not fail for its own bugs: each test that runs only on CUDA (marked
`cuda`, which is how `pytest -m cuda` and benchmarks/validate_gpu.py select them) names here either its CPU twin, a
collected test that runs the same body on the CPU (the GPU test's own logic proven before a GPU runs it), or why it
has none. The check runs on what pytest collected in this session when that was the whole suite (every xdist worker
collects it), else it collects the suite once in a subprocess."""
import json
import os
import subprocess
import sys
from typing import NamedTuple, Optional

import pytest

from conftest import INTERPRET, _CollectionRecord, describe

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


class Twin(NamedTuple):
    """The CPU twin of a GPU test: the items of `test` (None: the same test function) whose parameters `cpu` take
    these values (compared as repr), and whose other parameters equal the GPU item's, except those in `sizes` (the
    shapes each device is given)."""

    cpu: dict
    test: Optional[str] = None
    sizes: tuple = ()


class NoTwin(NamedTuple):
    """A GPU test without a CPU twin, and why."""

    why: str


def on_cpu(sizes=(), **cpu):
    return Twin(cpu, None, tuple(sizes))


def elsewhere(test, sizes=(), **cpu):
    return Twin(cpu, test, tuple(sizes))


OPS, RS = "tests/ops", "tests/test_real_size.py"
CS, AT = "tests/train/test_cuda_step.py", "tests/model/test_attention.py"
MLM, GS, GSD = f"{OPS}/test_mlm_loss_and_sample_gpu.py", f"{OPS}/test_gumbel_sample.py", \
    f"{OPS}/test_gumbel_sample_distribution.py"
MG, RT, BCE, HEAD, BK = (f"{OPS}/test_{op}.py" for op in ("masked_gather", "replace_tokens", "rtd_bce_loss",
                                                         "rtd_head_loss", "backends"))
MAP = {
    # The Triton kernels at ELECTRA sizes: the same bodies in the interpreter at tiny sizes; the full-vocabulary
    # sampling test with the reference in the kernels' place (the interpreter would take minutes over the draws).
    **{name: on_cpu(device="cpu") for name in (
        f"{MLM}::test_triton_at_electra_sizes_matches_fp64", f"{MG}::test_triton_at_electra_shapes",
        f"{RT}::test_triton_at_electra_shapes", f"{BCE}::test_triton_at_electra_shapes",
        f"{HEAD}::test_triton_at_electra_shapes",
        f"{GS}::test_triton_cuda_graph_replays_draw_fresh_samples_and_follow_manual_seed")},
    f"{GSD}::test_sampling_distribution_at_full_vocabulary": on_cpu(backend="torch", sampler=None),
    # The CUDA C++ backend: the same bodies with the reference on the CPU (parity tests: reference vs interpreter).
    **{name: on_cpu(backend="torch") for name in (
        f"{GS}::test_matches_reference", f"{GSD}::test_cdf_sampling_across_warps_and_tiles",
        f"{GS}::test_samples_follow_torch_seed", f"{MG}::test_gather_and_scatter_match_reference",
        f"{RT}::test_matches_definition", f"{BCE}::test_matches_reference", f"{BCE}::test_without_real_tokens_is_zero",
        f"{MLM}::test_without_real_slots_is_zero", f"{GS}::test_cuda_graph_replays_draw_fresh_samples")},
    **{name: on_cpu(backend="torch", sampler=None) for name in (
        f"{MLM}::test_matches_reference", f"{GSD}::test_sampling_distribution")},
    **{f"{test}::test_parity_with_triton": on_cpu(pair=("torch", "triton")) for test in (MLM, MG, BCE, RT)},
    "tests/test_ops_compile.py::test_cuda_kernel_entries_compile_fullgraph_and_match_eager": elsewhere(
        "tests/test_ops_compile.py::test_chain_compiles_fullgraph_and_matches_eager", sizes=("compiler",),
        backend="torch"),
    # Each op's opcheck of its CUDA custom ops: the fake kernels and autograd wiring of those ops on meta tensors.
    **{f"{OPS}/test_{op}.py::test_opcheck": elsewhere(f"{BK}::test_cuda_fake_kernels_and_autograd_wiring_on_meta")
       for op in ("mlm_loss_and_sample", "gumbel_sample", "masked_gather", "replace_tokens", "rtd_bce_loss")},
    f"{MLM}::test_cuda_row_offsets_beyond_int32": NoTwin(
        "int32 offsets wrap only past 2^31 logits (8+ GiB of bf16 on the GPU); the reference indexes in int64"),
    f"{BK}::test_backend_is_listed_on_cuda": elsewhere(f"{BK}::test_backend_cuda_on_cpu_tensors_raises"),
    # The training step: eager on the CPU where the GPU captures it in CUDA graphs.
    **{f"{CS}::{name}": on_cpu(device="cpu") for name in (
        "test_bf16_step_is_finite_and_close_to_fp32", "test_cuda_graph_step_with_dropout_takes_flash_varlen_and_trains",
        "test_cuda_graph_step_draws_fresh_samples_and_trains",
        "test_cuda_graph_accumulation_replays_equal_the_eager_step", "test_cuda_graph_skips_a_non_finite_step",
        "test_cuda_graph_whole_word_step_draws_fresh_whole_words")},
    # CUDAGraphStep checks the LR before the optimizer, and only a CUDA tensor passes that check; the LR refusals
    # that come first are the CPU's.
    f"{CS}::test_cuda_graph_step_requires_capturable_optimizer": elsewhere(
        "tests/train/test_train_step.py::test_cuda_graph_step_refuses_a_float_lr_and_says_how_to_pass_a_tensor"),
    # Attention: FlexAttention eagerly and flash's branch with a CPU stand-in for its kernel (flash_on_cpu).
    f"{AT}::test_gpu_paths_match_naive_masked_softmax": on_cpu(device="cpu"),
    f"{AT}::test_encoder_default_path_matches_sdpa_eager_and_compiled": on_cpu(device="cpu"),
    f"{AT}::test_varlen_flash_dropout_is_unbiased": on_cpu(device="cpu"),
    f"{GS}::test_seed_high_word_changes_draws": on_cpu(backend="triton", device="cpu"),
    # Real-size correctness of the default path: the same bodies in the interpreter at tiny shapes.
    f"{RS}::test_mlm_loss_and_sample_matches_fp64": on_cpu(device="cpu", sizes=("m", "v", "width")),
    f"{RS}::test_lm_head_loss_and_sample_matches_fp64": on_cpu(device="cpu", sizes=("m", "e", "v", "width",
                                                                                    "chunk_size")),
    f"{RS}::test_dropout_add_layer_norm_matches_fp64": on_cpu(device="cpu", sizes=("m",)),
    f"{RS}::test_mask_tokens_at_l512": on_cpu(device="cpu", sizes=("b",)),
    f"{RS}::test_varlen_attention_matches_fp64": on_cpu(device="cpu", sizes=("lengths", "heads", "d")),
}


def _whole_suite_collected(items, skipped_modules) -> bool:
    files = {os.path.relpath(str(i.path), ROOT).replace(os.sep, "/") for i in items}
    files |= {nodeid.split("::")[0] for nodeid in skipped_modules}
    wanted = {os.path.relpath(os.path.join(folder, name), ROOT).replace(os.sep, "/")
              for folder, _, names in os.walk(TESTS) for name in names
              if name.startswith("test_") and name.endswith(".py")}
    return wanted <= files


@pytest.fixture(scope="module")
def collected(request, tmp_path_factory):
    """`(items, skipped_modules)` of the whole suite, as `conftest.describe` records them."""
    items, skipped = _CollectionRecord.items, _CollectionRecord.skipped_modules
    if _whole_suite_collected(items, skipped):
        return [describe(i, str(request.config.rootpath)) for i in items], dict(skipped)
    dump = tmp_path_factory.mktemp("collection") / "items.json"
    env = dict(os.environ, ELECTRA_FAST_COLLECTION_DUMP=str(dump))
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-p", "no:xdist", "tests"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert dump.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads(dump.read_text())
    return record["items"], record["skipped_modules"]


def twins_of(item, twin, items):
    """The collected items that are `item`'s CPU twin under `twin`."""
    function = twin.test or item["function"]
    want = {k: repr(v) for k, v in twin.cpu.items()}
    found = []
    for other in items:
        if other["function"] != function or other["cuda"]:
            continue
        params = other["params"]
        if any(params.get(k) != v for k, v in want.items()):
            continue
        shared = set(item["params"]) & set(params) - set(want) - set(twin.sizes)
        if all(item["params"][k] == params[k] for k in shared):
            found.append(other["id"])
    return found


def test_every_gpu_test_names_its_cpu_twin_or_why_not(collected):
    items, _ = collected
    gpu = [i for i in items if i["cuda"]]
    assert gpu, "no test carries the `cuda` marker: `pytest -m cuda` would select nothing"
    unmapped = sorted({i["function"] for i in gpu} - set(MAP))
    assert not unmapped, f"GPU tests missing from MAP (name each one's CPU twin or why it has none): {unmapped}"
    stale = sorted(set(MAP) - {i["function"] for i in gpu})
    assert not stale, f"MAP names tests that are not (or no longer) GPU tests: {stale}"
    by_id = {i["id"]: i for i in items}
    missing, skipped = [], []
    for item in gpu:
        entry = MAP[item["function"]]
        if isinstance(entry, NoTwin):
            assert len(entry.why) > 20, item["id"]
            continue
        twins = twins_of(item, entry, items)
        if not twins:
            missing.append(item["id"])
        elif INTERPRET and all(by_id[t]["skipped_here"] for t in twins):  # CI's setting: the twins must run
            skipped.append(item["id"])
    assert not missing, f"GPU tests whose CPU twin was not collected: {missing}"
    assert not skipped, f"GPU tests whose CPU twins are all skipped under TRITON_INTERPRET=1: {skipped}"


def test_the_cuda_marker_is_exactly_the_gpu_tests(collected):
    items, skipped_modules = collected
    for item in items:
        # A GPU test is skipped without a GPU (conftest.CUDA_MARKS gives both marks), and a test skipped for want of
        # one (other than a Triton test the interpreter runs on the CPU) is a GPU test; the CUDA backend's extension
        # is built for GPU tests only.
        if item["cuda"]:
            assert "needs a CUDA GPU" in item["skip_reasons"], (item["id"], item["skip_reasons"])
        wants_gpu = any("CUDA GPU" in r and "TRITON_INTERPRET" not in r for r in item["skip_reasons"])
        assert item["cuda"] or not wants_gpu, f"{item['id']} needs a GPU but is not marked `cuda` (requires_cuda)"
        assert "ext" not in item["fixtures"] or item["cuda"], item["id"]
    cut = {m: why for m, why in skipped_modules.items() if "CUDA GPU" in why and "TRITON_INTERPRET" not in why}
    assert not cut, f"modules skipped whole without a GPU (their CPU bodies never run): {cut}"


def test_twin_lookup_tells_parameters_apart():
    """The map's matching itself: the twin keeps the other parameters, `sizes` may differ, and a GPU item is no
    twin."""
    def item(id_, cuda, **params):
        return {"id": id_, "function": "t.py::f", "cuda": cuda, "params": {k: repr(v) for k, v in params.items()}}

    gpu = item("gpu-bf16", True, device="cuda", dtype="bf16", m=2048)
    items = [gpu, item("cpu-bf16", False, device="cpu", dtype="bf16", m=7),
             item("cpu-fp32", False, device="cpu", dtype="fp32", m=7), item("gpu-fp32", True, device="cuda",
                                                                              dtype="fp32", m=2048)]
    assert twins_of(gpu, on_cpu(device="cpu", sizes=("m",)), items) == ["cpu-bf16"]
    assert twins_of(gpu, on_cpu(device="cpu"), items) == []  # m differs and is not a size
    assert twins_of(gpu, on_cpu(device="tpu", sizes=("m",)), items) == []
