"""The slim model: configs and presets, shared embeddings, attention masking, LM head at slots, GDES gradients."""
import math

import pytest
import torch
import torch.nn.functional as F

from electra_fast.model import PRESETS, Discriminator, ElectraEmbeddings, ElectraModelConfig, Generator, \
    num_parameters, preset_configs
from electra_fast.pretraining.pretrainer import ElectraPretrainer
from helpers import chi2_critical


def tiny_config(**changes):
    base = dict(vocab_size=97, embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=48, max_position_embeddings=40, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)
    return ElectraModelConfig(**{**base, **changes})


def test_presets_follow_the_reference_table():
    # docs/algorithm.md#model-sizes: (hidden, layers, heads, FFN, embedding, gen hidden/heads/FFN, batch, seq, lr, mask)
    table = {"small": (256, 12, 4, 1024, 128, 64, 1, 256, 128, 128, 5e-4, 0.15),
             "base": (768, 12, 12, 3072, 768, 256, 4, 1024, 256, 512, 2e-4, 0.15),
             "large": (1024, 24, 16, 4096, 1024, 256, 4, 1024, 2048, 512, 2e-4, 0.25)}
    for name, row in table.items():
        gen, disc = preset_configs(name)
        got = (disc.hidden_size, disc.num_hidden_layers, disc.num_attention_heads, disc.intermediate_size,
               disc.embedding_size, gen.hidden_size, gen.num_attention_heads, gen.intermediate_size,
               PRESETS[name]["batch_size"], PRESETS[name]["seq_len"], PRESETS[name]["lr"], PRESETS[name]["mask_prob"])
        assert got == row, name
        assert gen.num_hidden_layers == disc.num_hidden_layers and gen.embedding_size == disc.embedding_size
        assert (disc.vocab_size, disc.max_position_embeddings, disc.type_vocab_size) == (30522, 512, 2)
        assert (disc.layer_norm_eps, disc.hidden_dropout_prob, disc.initializer_range) == (1e-12, 0.1, 0.02)
    gen, disc = preset_configs("tiny")
    assert gen.hidden_size * 2 == disc.hidden_size and disc.hidden_size <= 64


def test_preset_overrides_and_errors():
    gen, disc = preset_configs("small", vocab_size=1000, num_hidden_layers=3, generator={"hidden_size": 256,
                                                                                        "num_attention_heads": 4})
    assert (disc.vocab_size, disc.num_hidden_layers, gen.num_hidden_layers, gen.hidden_size) == (1000, 3, 3, 256)
    with pytest.raises(ValueError, match="preset"):
        preset_configs("huge")
    with pytest.raises(TypeError, match="hiden_size"):
        preset_configs("tiny", hiden_size=3)
    with pytest.raises(TypeError, match="generator overrides"):
        preset_configs("tiny", generator={"vocab_size": 3})


@pytest.mark.parametrize("changes, match", [
    (dict(hidden_size=30), "multiple of num_attention_heads"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(num_hidden_layers=1.5), "num_hidden_layers"),
    (dict(pad_token_id=97), "pad_token_id"),
    (dict(hidden_dropout_prob=1.0), "hidden_dropout_prob"),
    (dict(pad_vocab_multiple=0), "pad_vocab_multiple"),
    (dict(initializer="xavier"), "initializer must be one of \\('truncated_normal', 'normal'\\) \\(also accepted: "
                                 "'reference'\\), got 'xavier'"),
])
def test_config_rejects_bad_values(changes, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**changes)


def test_shared_embeddings_and_projection():
    model = ElectraPretrainer.from_preset("tiny", vocab_size=300, mask_token_id=4, special_token_ids=(0, 1, 2, 3, 4),
                                          pad_token_id=0)
    gen, disc = model.generator, model.discriminator
    assert gen.embeddings is disc.embeddings
    # tiny: E=32, generator H=32 (no projection), discriminator H=64 (projection E -> H)
    assert gen.embeddings_project is None and disc.embeddings_project.weight.shape == (64, 32)
    assert num_parameters(model) == num_parameters(gen) + num_parameters(disc) - num_parameters(gen.embeddings)
    emb = gen.embeddings
    with pytest.raises(ValueError, match="embeddings must match"):
        Generator(tiny_config(vocab_size=300, embedding_size=16), emb)


def normal_cdf(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def std_tolerance(n, kurtosis):
    """6 standard errors of a sample std, relative: sqrt((kurtosis - 1) / 4n) each."""
    return 6 * math.sqrt((kurtosis - 1) / (4 * n))


def assert_truncated_normal(w, std):
    """tf.truncated_normal_initializer(stddev=std): N(0, std) redrawn outside +-2 std. Bounds, the truncated
    distribution's std (std * 0.8796) and a chi-square test of 20 equal bins against its CDF."""
    w = w.detach().flatten().double()
    assert w.abs().max() <= 2 * std
    mass = normal_cdf(2) - normal_cdf(-2)
    want_std = std * math.sqrt(1 - 4 * math.exp(-2) / math.sqrt(2 * math.pi) / mass)
    assert abs(want_std / std - 0.8796) < 1e-4
    assert abs(w.std().item() / want_std - 1) < std_tolerance(w.numel(), 2.37), (w.std().item(), want_std)
    edges = torch.linspace(-2, 2, 21, dtype=torch.float64)
    counts = torch.histc(w / std, bins=20, min=-2, max=2)
    expected = torch.tensor([normal_cdf(b) - normal_cdf(a) for a, b in zip(edges[:-1].tolist(), edges[1:].tolist())],
                            dtype=torch.float64) / mass * w.numel()
    assert ((counts - expected) ** 2 / expected).sum() < chi2_critical(19)


def assert_glorot_uniform(w, large: bool):
    """U(-a, a), a = sqrt(6 / (fan_in + fan_out)): bounds, std a / sqrt(3), and a large matrix reaches the bound."""
    fan_out, fan_in = w.shape
    bound = math.sqrt(6 / (fan_in + fan_out))
    assert w.abs().max() <= bound
    assert abs(w.std().item() / (bound / math.sqrt(3)) - 1) < std_tolerance(w.numel(), 1.8), (w.std().item(), bound)
    if large:
        assert w.abs().max() > 0.99 * bound


def init_models(initializer):
    cfg = tiny_config(vocab_size=4000, embedding_size=64, hidden_size=512, num_attention_heads=8, num_hidden_layers=1,
                      intermediate_size=64, pad_token_id=5, initializer=initializer)
    disc = Discriminator(cfg, gdes=True)
    return disc, Generator(cfg.replace(hidden_size=128, num_attention_heads=2), disc.embeddings)


def assert_fixed_parts(disc, gen):
    """What both initializers share: zero biases and pad row, LayerNorm 1/0, zero GDES deltas."""
    assert torch.all(disc.embeddings.word.weight[5] == 0) and torch.all(disc.embeddings.word.weight[4000:] == 0)
    for model in (disc, gen):
        for name, p in model.named_parameters():
            if name.endswith("bias") and "norm" not in name:
                assert torch.all(p == 0), name
            if "norm" in name and not name.startswith("embeddings_delta"):
                assert torch.all(p == (1 if name.endswith("weight") else 0)), name
    assert all(torch.all(p == 0) for p in disc.embeddings_delta.parameters())


def test_reference_init_is_truncated_normal_and_glorot_where_the_reference_is():
    torch.manual_seed(0)
    assert tiny_config().initializer == "truncated_normal"  # the default
    disc, gen = init_models("reference")
    std = 0.02
    word = disc.embeddings.word.weight[:4000]
    assert_truncated_normal(torch.cat([word[:5], word[6:]]), std)  # the pad row (5) is zero
    for w in (disc.layers[0].qkv.weight, disc.layers[0].ffn_in.weight, disc.head.dense.weight,
              gen.layers[0].attn_out.weight, gen.head.dense.weight):
        assert_truncated_normal(w, std)
    for w in (disc.embeddings.position.weight, disc.embeddings.token_type.weight):  # too few for statistics
        assert w.abs().max() <= 2 * std and w.std() > 0.5 * std
    # tf.layers.dense without a kernel initializer: the discriminator's dense(H -> 1) and each embeddings_project.
    assert_glorot_uniform(disc.head.out.weight, large=False)
    assert_glorot_uniform(disc.embeddings_project.weight, large=True)
    assert_glorot_uniform(gen.embeddings_project.weight, large=True)
    assert_fixed_parts(disc, gen)


def test_normal_init_is_transformers():
    torch.manual_seed(0)
    disc, gen = init_models("normal")
    for w in (disc.embeddings.word.weight[6:4000], disc.layers[0].qkv.weight, disc.embeddings_project.weight):
        assert abs(w.std().item() / 0.02 - 1) < std_tolerance(w.numel(), 3) and w.abs().max() > 3 * 0.02
    assert disc.head.out.weight.abs().max() < 0.1  # std 0.02, far inside the Glorot bound 0.108
    assert_fixed_parts(disc, gen)


def test_shared_embeddings_are_not_reinitialised():
    disc = Discriminator(tiny_config())
    before = disc.embeddings.word.weight.detach().clone()
    Generator(tiny_config(hidden_size=16, num_attention_heads=2), disc.embeddings)
    assert torch.equal(disc.embeddings.word.weight, before)


def naive_encoder(model, ids, mask):
    """The same network written out with explicit softmax attention and separate q/k/v: an independent oracle."""
    cfg = model.config
    emb = model.embeddings
    x = emb.word.weight[ids] + emb.position.weight[: ids.shape[1]] + emb.token_type.weight[0]
    x = F.layer_norm(x, (cfg.embedding_size,), emb.norm.weight, emb.norm.bias, cfg.layer_norm_eps)
    if model.embeddings_project is not None:
        x = x @ model.embeddings_project.weight.T + model.embeddings_project.bias
    h, nh = cfg.hidden_size, cfg.num_attention_heads
    for layer in model.layers:
        wq, wk, wv = layer.qkv.weight.split(h)
        bq, bk, bv = layer.qkv.bias.split(h)
        b, l, _ = x.shape
        heads = lambda t: t.view(b, l, nh, h // nh).transpose(1, 2)  # noqa: E731
        q, k, v = heads(x @ wq.T + bq), heads(x @ wk.T + bk), heads(x @ wv.T + bv)
        scores = q @ k.transpose(-1, -2) / math.sqrt(h // nh)
        scores = scores.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
        a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, l, h)
        x = F.layer_norm(x + layer.attn_out(a), (h,), layer.attn_norm.weight, layer.attn_norm.bias, 1e-12)
        f = layer.ffn_out(0.5 * layer.ffn_in(x) * (1 + torch.erf(layer.ffn_in(x) / math.sqrt(2))))
        x = F.layer_norm(x + f, (h,), layer.ffn_norm.weight, layer.ffn_norm.bias, 1e-12)
    return x


def test_encoder_matches_naive_attention_in_fp64():
    model = Discriminator(tiny_config()).double().eval()
    ids = torch.randint(0, 97, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 2:] = 0
    got = model.encode(ids, mask)
    want = naive_encoder(model, ids, mask)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_padding_does_not_change_real_tokens():
    model = Discriminator(tiny_config()).eval()
    ids = torch.randint(5, 97, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    padded = model(ids, mask)
    alone = model(ids[:1, :8])
    torch.testing.assert_close(padded[0, :8], alone[0], rtol=1e-5, atol=1e-5)
    # A row without any real token stays finite (finite additive mask, no NaN from an all -inf softmax).
    assert torch.isfinite(model(ids, torch.zeros_like(ids))).all()


def test_generator_logits_at_positions_equal_full_logits_gathered():
    gen = Generator(tiny_config()).eval()
    ids = torch.randint(0, 97, (3, 20))
    positions = torch.randint(0, 20, (3, 5))
    full = gen(ids)
    at = gen(ids, positions=positions)
    want = torch.stack([full[b, positions[b]] for b in range(3)])
    torch.testing.assert_close(at, want, rtol=1e-6, atol=1e-6)
    # The head is tied to the shared word embeddings; forward leaves out the padded vocabulary columns.
    h = gen.head.norm(F.gelu(gen.head.dense(gen.encode(ids))))
    torch.testing.assert_close(full, (h @ gen.embeddings.word.weight.T + gen.head.bias)[..., :97], rtol=1e-6,
                               atol=1e-6)


def test_token_type_ids_are_used():
    disc = Discriminator(tiny_config()).eval()
    ids = torch.randint(0, 97, (2, 9))
    zeros = torch.zeros_like(ids)
    torch.testing.assert_close(disc(ids), disc(ids, token_type_ids=zeros))
    assert not torch.allclose(disc(ids), disc(ids, token_type_ids=torch.ones_like(ids)))


def test_gdes_disentangles_every_shared_parameter():
    cfg = tiny_config()
    disc = Discriminator(cfg, gdes=True)
    gen = Generator(cfg.replace(hidden_size=16, num_attention_heads=2), disc.embeddings)
    assert disc.gdes and not Discriminator(cfg).gdes
    delta, shared = disc.embeddings_delta, disc.embeddings
    assert sorted(n for n, _ in delta.named_parameters()) == sorted(n for n, _ in shared.named_parameters())
    ids, types = torch.randint(0, 97, (2, 10)), torch.randint(0, 2, (2, 10))
    # The deltas start at zero: the discriminator reads exactly the generator's embeddings.
    assert all(torch.all(p == 0) for p in delta.parameters())
    torch.testing.assert_close(disc.embed(ids, types), gen.embed(ids, types), rtol=0, atol=0)
    with torch.no_grad():
        for p in delta.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    # It reads shared + delta for each of the five: the same as embeddings holding the sums, run without a delta.
    summed = ElectraEmbeddings(cfg)
    summed.load_state_dict({k: v + delta.state_dict()[k] for k, v in shared.state_dict().items()})
    torch.testing.assert_close(disc.embed(ids, types), summed(ids, types), rtol=1e-6, atol=1e-6)

    gen_params = dict(gen.named_parameters())
    rtd = F.logsigmoid(disc(ids, token_type_ids=types)).sum()
    grads = torch.autograd.grad(rtd, list(gen_params.values()) + list(delta.parameters()), allow_unused=True)
    for name, g in zip(gen_params, grads):  # no parameter the generator uses hears the discriminator
        assert g is None or torch.all(g == 0), name
    for (name, _), g in zip(delta.named_parameters(), grads[len(gen_params):]):
        assert g is not None and g.abs().sum() > 0, name
    mlm = gen(ids, token_type_ids=types).logsumexp(-1).sum()
    grads = torch.autograd.grad(mlm, list(delta.parameters()) + list(shared.parameters()), allow_unused=True)
    assert all(g is None for g in grads[:5])  # the MLM loss never reaches the deltas ...
    assert all(g.abs().sum() > 0 for g in grads[5:])  # ... and reaches every shared parameter


def test_dropout_only_in_training():
    disc = Discriminator(tiny_config(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1))
    ids = torch.randint(0, 97, (2, 10))
    assert not torch.equal(disc(ids), disc(ids))
    disc.eval()
    assert torch.equal(disc(ids), disc(ids))


def test_bf16_autocast_forward_stays_close():
    gen = Generator(tiny_config()).eval()
    ids = torch.randint(0, 97, (2, 16))
    ref = gen(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = gen(ids)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, rtol=0.05, atol=0.05)


def test_vocabulary_is_padded_inside_the_model():
    for name in PRESETS:  # every preset pads to a multiple of 128; vocab_size stays the logical size
        gen, disc = preset_configs(name)
        assert (disc.vocab_size, disc.pad_vocab_multiple, disc.padded_vocab_size) == (30522, 128, 30592)
        assert gen.padded_vocab_size == 30592
    assert tiny_config(pad_vocab_multiple=1).padded_vocab_size == 97
    assert tiny_config(vocab_size=256).padded_vocab_size == 256 and tiny_config(vocab_size=257).padded_vocab_size == 384
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=300)  # padded to 384
    disc = Discriminator(cfg, gdes=True)
    gen = Generator(cfg.replace(hidden_size=16, num_attention_heads=2), disc.embeddings)
    for table in (disc.embeddings.word.weight, disc.embeddings_delta.word.weight, gen.head.bias):
        assert table.shape[0] == 384 and torch.all(table[300:] == 0)
    assert disc.embeddings.word.weight[:300].abs().sum() > 0
    ids = torch.randint(0, 300, (2, 12))
    logits = gen.lm_logits(gen.encode(ids))
    assert logits.shape == (2, 12, 384) and logits.stride(-2) % 16 == 0  # 16-byte aligned rows in bf16 and fp32
    full = gen(ids)
    assert full.shape == (2, 12, 300)
    torch.testing.assert_close(full, logits[..., :300], rtol=0, atol=0)
    with pytest.raises(ValueError, match="padded_vocab_size"):  # shared embeddings must have the same padding
        Generator(cfg.replace(pad_vocab_multiple=1), disc.embeddings)
