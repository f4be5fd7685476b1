"""The slim model: configs and presets, shared embeddings, attention masking, LM head at slots, GDES gradients."""
import math

import pytest
import torch
import torch.nn.functional as F

from electra_fast.model import PRESETS, Discriminator, ElectraEmbeddings, ElectraModelConfig, Generator, \
    num_parameters, preset_configs
from electra_fast.pretrainer import ElectraPretrainer


def tiny_config(**changes):
    base = dict(vocab_size=97, embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=48, max_position_embeddings=40, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)
    return ElectraModelConfig(**{**base, **changes})


def test_presets_follow_the_reference_table():
    # SPEC section 2: (hidden, layers, heads, FFN, embedding, gen hidden/heads/FFN, batch, seq, lr, mask)
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
])
def test_config_rejects_bad_values(changes, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**changes)


def test_shared_embeddings_and_projection():
    model = ElectraPretrainer.from_preset("tiny", vocab_size=300, mask_token_id=4, special_token_ids=(0, 1, 2, 3, 4))
    gen, disc = model.generator, model.discriminator
    assert gen.embeddings is disc.embeddings
    # tiny: E=32, generator H=32 (no projection), discriminator H=64 (projection E -> H)
    assert gen.embeddings_project is None and disc.embeddings_project.weight.shape == (64, 32)
    assert num_parameters(model) == num_parameters(gen) + num_parameters(disc) - num_parameters(gen.embeddings)
    emb = gen.embeddings
    with pytest.raises(ValueError, match="embeddings must match"):
        Generator(tiny_config(vocab_size=300, embedding_size=16), emb)


def test_init_statistics():
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=2000, hidden_size=64, pad_token_id=5)
    disc = Discriminator(cfg)
    w = disc.embeddings.word.weight
    assert torch.all(w[5] == 0)
    assert abs(w.std().item() - 0.02) < 0.002 and abs(disc.layers[0].qkv.weight.std().item() - 0.02) < 0.002
    assert torch.all(disc.layers[0].qkv.bias == 0) and torch.all(disc.layers[1].ffn_norm.weight == 1)
    # A generator built around existing embeddings must not re-initialise them.
    before = w.detach().clone()
    Generator(cfg.replace(hidden_size=32), disc.embeddings)
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
    # The head is tied to the shared word embeddings.
    h = gen.head.norm(F.gelu(gen.head.dense(gen.encode(ids))))
    torch.testing.assert_close(full, h @ gen.embeddings.word.weight.T + gen.head.bias, rtol=1e-6, atol=1e-6)


def test_token_type_ids_are_used():
    disc = Discriminator(tiny_config()).eval()
    ids = torch.randint(0, 97, (2, 9))
    zeros = torch.zeros_like(ids)
    torch.testing.assert_close(disc(ids), disc(ids, token_type_ids=zeros))
    assert not torch.allclose(disc(ids), disc(ids, token_type_ids=torch.ones_like(ids)))


def test_gdes_separates_the_gradients():
    cfg = tiny_config()
    shared = ElectraEmbeddings(cfg)
    gen, disc = Generator(cfg.replace(hidden_size=16, num_attention_heads=2), shared), Discriminator(cfg, shared,
                                                                                                      gdes=True)
    ids = torch.randint(0, 97, (2, 10))
    torch.testing.assert_close(disc.embed(ids, None), shared(ids))  # delta starts at zero
    disc(ids).sum().backward()
    assert shared.word.weight.grad is None and disc.word_delta.grad.abs().sum() > 0
    assert shared.norm.weight.grad is not None  # only the word table is disentangled
    gen.zero_grad()
    disc.word_delta.grad = None
    gen(ids).logsumexp(-1).sum().backward()
    assert disc.word_delta.grad is None and shared.word.weight.grad.abs().sum() > 0


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
