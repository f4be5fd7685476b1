"""KernelOptions (electra_fast/options.py) and the shared argument checks (electra_fast/checks.py)."""
import pytest

from electra_fast import checks
from electra_fast.options import KernelOptions, env_backend, env_sampler


def test_defaults_are_none_and_resolve_from_the_environment(monkeypatch):
    monkeypatch.delenv("ELECTRA_FAST_BACKEND", raising=False)
    monkeypatch.delenv("ELECTRA_FAST_SAMPLER", raising=False)
    opts = KernelOptions()
    assert (opts.backend, opts.sampler, opts.attention, opts.fused_lm_head) == (None, None, None, None)
    assert (env_backend(), env_sampler(), opts.resolved_sampler, opts.resolved_attention) == (None, "cdf", "cdf", "auto")
    monkeypatch.setenv("ELECTRA_FAST_BACKEND", "triton")
    monkeypatch.setenv("ELECTRA_FAST_SAMPLER", "gumbel")
    assert (env_backend(), opts.resolved_sampler) == ("triton", "gumbel")
    assert KernelOptions(sampler="cdf").resolved_sampler == "cdf"  # an explicit value beats the environment


def test_bad_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("ELECTRA_FAST_SAMPLER", "uniform")
    with pytest.raises(ValueError, match=r"ELECTRA_FAST_SAMPLER must be one of \('cdf', 'gumbel'\).*'uniform'"):
        env_sampler()
    monkeypatch.setenv("ELECTRA_FAST_BACKEND", "tpu")
    with pytest.raises(ValueError, match="ELECTRA_FAST_BACKEND must be one of.*'tpu'"):
        env_backend()


@pytest.mark.parametrize("field,value", [("backend", "tpu"), ("sampler", "argmax"), ("attention", "dense"),
                                         ("fused_lm_head", "yes")])
def test_bad_field_names_field_expected_and_actual(field, value):
    with pytest.raises(ValueError, match=rf"{field} must be .*{value!r}"):
        KernelOptions(**{field: value})


def test_replace_and_to_dict():
    opts = KernelOptions(backend="torch").replace(attention="sdpa")
    assert opts.to_dict() == {"backend": "torch", "attention": "sdpa"}
    assert opts == KernelOptions(backend="torch", attention="sdpa")
    with pytest.raises(Exception):
        opts.backend = "cuda"  # frozen: a config carrying it cannot be changed behind its back


def test_check_int():
    assert checks.check_int(3, "n", low=1) == 3
    assert checks.check_int(None, "n", low=1, allow_none=True) is None
    for bad in (0, -1, 1.0, True, "2"):
        with pytest.raises(ValueError, match=rf"n must be a positive int, got {bad!r}"):
            checks.check_int(bad, "n", low=1)
    with pytest.raises(ValueError, match=r"k must be an int in \[0, 4\], got 5"):
        checks.check_int(5, "k", low=0, high=4)
    with pytest.raises(KeyError, match="warmup must be an int >= 0, got -2"):
        checks.check_int(-2, "warmup", low=0, error=KeyError)


def test_check_number():
    assert checks.check_number(1, "lr", low=0) == 1.0
    with pytest.raises(ValueError, match=r"p must be a finite number in \(0, 1\), got 1"):
        checks.check_number(1, "p", low=0, high=1, low_open=True, high_open=True)
    for bad in (float("nan"), float("inf"), True, "0.1"):
        with pytest.raises(ValueError, match="lr must be a finite number >= 0"):
            checks.check_number(bad, "lr", low=0)


def test_check_choice_maps_aliases():
    choices, aliases = ("distinct", "with_replacement"), {"reference": "with_replacement"}
    assert checks.check_choice("reference", "masking", choices, aliases=aliases) == "with_replacement"
    assert checks.check_choice("distinct", "masking", choices, aliases=aliases) == "distinct"
    with pytest.raises(ValueError, match=r"masking must be one of \('distinct', 'with_replacement'\) \(also accepted: "
                                         r"'reference'\), got 'random'"):
        checks.check_choice("random", "masking", choices, aliases=aliases)


def test_a_backend_covers_the_ops_it_has():
    import torch

    from electra_fast import ops

    ids = torch.randint(5, 50, (2, 16))
    mask = torch.ones_like(ids)
    # No CUDA kernel for mask_tokens: asked for by name, the reference runs, with the reference's result.
    kw = dict(mask_prob=0.25, mask_token_id=3, special_token_ids=[0, 1, 2, 3])
    torch.manual_seed(0)
    got = ops.mask_tokens(ids, mask, backend="cuda", **kw)
    torch.manual_seed(0)
    want = ops.mask_tokens(ids, mask, backend="torch", **kw)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    # masked_gather has one, which cannot run on CPU tensors: that raises with the reason.
    with pytest.raises(RuntimeError, match=r"backend 'cuda' cannot run masked_gather.*CUDA tensors"):
        ops.masked_gather(torch.randn(2, 16, 4), torch.zeros(2, 3, dtype=torch.long), backend="cuda")


KEYS = {"options", "backend", "sampler", "attention", "fused_lm_head", "attention_impl"}


def _keys(obj) -> set:
    """Every dict key anywhere in `obj` (nested dicts and lists)."""
    if isinstance(obj, dict):
        return set(obj) | set().union(*(_keys(v) for v in obj.values()))
    if isinstance(obj, (list, tuple)):
        return set().union(*(_keys(v) for v in obj))
    return set()


def test_options_reach_the_models_and_never_their_saved_files(tmp_path):
    import json

    from electra_fast import ElectraPretrainer
    from electra_fast.train.export import model_from_spec, model_spec

    opts = KernelOptions(backend="torch", sampler="gumbel", attention="sdpa", fused_lm_head=False)
    model = ElectraPretrainer.from_preset("tiny", vocab_size=64, mask_token_id=3, special_token_ids=[0, 1, 2, 3],
                                          pad_token_id=0, options=opts)
    assert model.options == opts
    assert model.generator.config.options == opts and model.discriminator.config.options == opts
    model.save_pretrained(str(tmp_path))
    for name in ("generator/config.json", "discriminator/config.json", "electra_fast.json"):
        saved = json.loads((tmp_path / name).read_text())
        assert not KEYS & _keys(saved), (name, KEYS & _keys(saved))
    spec = model_spec(model)
    assert not KEYS & _keys(spec)
    assert model_from_spec(spec).options == KernelOptions()
    back = ElectraPretrainer.from_pretrained(str(tmp_path))
    assert back.options == KernelOptions()
    # The configs compare equal whatever the options: a run may resume under another backend.
    assert back.discriminator.config == model.discriminator.config
    assert back.discriminator.config.options != model.discriminator.config.options
