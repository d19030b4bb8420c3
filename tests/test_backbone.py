"""The generic backbone: loss, checkpointing, hybrids, the cache object, HF integration."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers import initialization as init

import tto
from tto import TTOCache
from tto.layers.conv import ShortConv

SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             mini_batch_size=4)


def ttt(**fields):
    torch.manual_seed(0)
    return tto.get("ttt").model_class(tto.build_config("ttt", **{**SIZES, **fields}))


@pytest.mark.parametrize("bias", [True, False])
def test_short_conv_token_by_token_equals_the_whole_sequence(bias):
    """The decoding path (one token: a weighted sum of the cached inputs) against conv1d over the
    whole sequence, with pads entering as zeros."""
    torch.manual_seed(0)
    conv = ShortConv(6, 4, bias=bias)
    conv._tto_init(init)
    x, mask = torch.randn(2, 9, 6), torch.ones(2, 9, dtype=torch.bool)
    mask[1, :3] = False
    whole = conv(x, mask, None, "conv")
    state = {}
    steps = torch.cat([conv(x[:, t:t + 1], mask[:, t:t + 1], state, "conv") for t in range(9)], dim=1)
    torch.testing.assert_close(steps, whole, atol=1e-6, rtol=0)  # float32 sums of 4 unit-scale products
    expect = sum(conv.weight[:, 0, j] * x[0, 8 - 3 + j] for j in range(4)) + (conv.bias if bias else 0)
    torch.testing.assert_close(steps[0, 8], expect, atol=1e-6, rtol=0)


def test_loss_ignores_minus_100_labels():
    model = ttt()
    x = torch.randint(0, 64, (2, 10))
    labels = x.clone()
    labels[:, :5] = -100
    logits = model(x).logits
    expect = torch.nn.functional.cross_entropy(logits[:, 4:-1].reshape(-1, 64), x[:, 5:].reshape(-1))
    torch.testing.assert_close(model(x, labels=labels).loss, expect)


def test_activation_checkpointing_gives_the_same_gradients():
    model = ttt(scan_checkpoint_group_size=2).train()
    x = torch.randint(0, 64, (2, 19))
    model(x, labels=x).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing_enable()
    model(x, labels=x).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], atol=1e-6, rtol=1e-5, msg=n)


def test_hybrid_layers_are_declared_in_config():
    model = ttt(num_hidden_layers=4, layer_mixers=["transformer", "transformer", "ttt", "ttt"])
    kinds = [type(layer.mixer).__name__ for layer in model.model.layers]
    assert kinds == ["AttentionMixer", "AttentionMixer", "TTTMixer", "TTTMixer"]


def test_any_type_is_a_hybrid_partner_with_its_own_fields(tmp_path):
    """A gated_deltanet layer under TTT: built from gated_deltanet's config with the model's backbone
    fields and its `mixer_fields` (its defaults otherwise); the hybrid saves and loads as one model."""
    model = ttt(layer_mixers=["gated_deltanet", "ttt"], mixer_fields={"gated_deltanet": {"num_memory_heads": 4}})
    partner, config = model.model.layers[0].mixer, model.config.layer_config(0)
    assert type(partner).__name__ == "GatedDeltaNetMixer" and partner.num_heads == 4
    assert type(config).__name__ == "GatedDeltaNetConfig" and config.num_memory_heads == 4
    assert config.hidden_size == SIZES["hidden_size"] and config.vocab_size == SIZES["vocab_size"]
    assert config.chunk_size == tto.get("gated_deltanet").config_class().chunk_size  # a default
    assert model.config.layer_config(1) is model.config
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 64, (2, 9))
    torch.testing.assert_close(loaded(x).logits, model.eval()(x).logits, atol=0, rtol=0)


@pytest.mark.parametrize("fields,message", [
    (dict(layer_mixers=["ttt_e2e", "ttt"]), "'ttt_e2e': trains prime MLPs across the whole model"),
    (dict(layer_mixers=["deltanet", "ttt"], mixer_fields={"deltanet": {"num_memory_head": 4}}),
     r"mixer_fields\['deltanet'\]: unknown config field.*did you mean 'num_memory_heads'"),
    (dict(layer_mixers=["deltanet", "ttt"], mixer_fields={"deltanet": {"hidden_size": 8}}),
     r"\['hidden_size'\] are backbone fields"),
    (dict(layer_mixers=["deltanet", "ttt"], mixer_fields={"lact": {}}), r"names no other type.*\['deltanet'\]"),
])
def test_hybrid_errors_name_the_problem(fields, message):
    with pytest.raises(ValueError, match=message):
        tto.build_config("ttt", **{**SIZES, **fields})


def test_untied_embeddings_are_separate_parameters():
    tied, untied = ttt(), ttt(tie_word_embeddings=False)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


def test_cache_persists_across_calls_and_resets():
    model = ttt().eval()
    x = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        cache = model(x[:, :7], use_cache=True).past_key_values
        cont = model(x[:, 7:], past_key_values=cache, use_cache=True).logits
        full = model(x).logits
        torch.testing.assert_close(cont, full[:, 7:], atol=2e-5, rtol=0)
        cache.reset()
        assert cache.get_seq_length() == 0
        fresh = model(x[:, 7:], past_key_values=cache, use_cache=True).logits
        torch.testing.assert_close(fresh, model(x[:, 7:]).logits, atol=2e-5, rtol=0)


@pytest.mark.parametrize("dim", [1, 2])
def test_appended_writes_in_place_while_its_buffer_has_room(dim):
    """`appended` equals concatenation; single slots join in place (same storage) until the buffer's
    capacity, then one copy into a new buffer; a narrowed view (a window's last slots) keeps the room
    behind it."""
    from tto.cache import appended

    g = torch.Generator().manual_seed(0)
    pieces = [torch.randn(2, 3, 5, generator=g).movedim(1, dim) for _ in range(12)]
    held, storages = None, []
    for i, piece in enumerate(pieces):
        held = appended(held, piece.narrow(dim, 0, 1 if i else 3), dim, capacity=6)
        storages.append(held.untyped_storage().data_ptr())
    expected = torch.cat([p.narrow(dim, 0, 1 if i else 3) for i, p in enumerate(pieces)], dim)
    assert torch.equal(held, expected)
    # 3 slots, then 3 single ones fill the 6-slot buffer; the 7th needs a buffer of 7 (max(capacity, total))
    assert len(set(storages[:4])) == 1 and storages[4] != storages[3] and len(set(storages[4:])) == 8
    window = appended(None, pieces[0], dim, capacity=8).narrow(dim, 1, 2)  # a window of the last 2 of 3
    grown = appended(window, pieces[1].narrow(dim, 0, 1), dim, capacity=8)
    assert grown.untyped_storage().data_ptr() == window.untyped_storage().data_ptr()
    assert torch.equal(grown, torch.cat([pieces[0].narrow(dim, 1, 2), pieces[1].narrow(dim, 0, 1)], dim))


def test_appended_never_writes_into_a_tensor_it_did_not_allocate():
    """Tensors that are not a buffer of `appended`'s with room (a slice of a tensor with more dims, a
    transposed view, a whole tensor) are copied, and what they view is left unchanged; so is a buffer
    made under inference mode, outside it; a deep copy of a buffer is its own buffer."""
    import copy

    from tto.cache import appended

    new = torch.ones(2, 1, 4)
    wide, square, full = torch.zeros(2, 6, 4, 3), torch.zeros(2, 4, 6), torch.zeros(2, 3, 4)
    for base, held in [(wide, wide[..., 0][:, :3]), (square, square.transpose(1, 2)[:, :3]), (full, full)]:
        before = base.clone()
        joined = appended(held, new, 1, capacity=8)
        assert torch.equal(base, before)
        assert joined.untyped_storage().data_ptr() not in (base.untyped_storage().data_ptr(),
                                                            held.untyped_storage().data_ptr())
        assert torch.equal(joined, torch.cat([held, new], 1))
    with torch.inference_mode():  # a prefill under inference mode, decoding outside it: copied, not refused
        made = appended(None, torch.zeros(2, 2, 4), 1, capacity=8)
    assert torch.equal(appended(made, new, 1, capacity=8), torch.cat([made, new], 1))
    buffer = appended(None, torch.zeros(2, 2, 4), 1, capacity=8)
    twin = copy.deepcopy(buffer)
    appended(twin, new, 1, capacity=8)
    extended = appended(buffer, 2 * new, 1, capacity=8)
    assert torch.equal(extended[:, 2], 2 * new[:, 0]) and torch.equal(buffer, torch.zeros(2, 2, 4))


def test_beam_search_and_sampling_run_with_the_cache():
    model = ttt().eval()
    x = torch.randint(0, 64, (2, 6))
    beams = model.generate(x, num_beams=3, num_return_sequences=2, max_new_tokens=5, min_new_tokens=5)
    assert beams.shape == (4, 11)
    sampled = model.generate(x, do_sample=True, num_return_sequences=2, max_new_tokens=5, min_new_tokens=5)
    assert sampled.shape == (4, 11)


def test_auto_classes_know_every_type(tmp_path):
    for name in tto.available():
        cfg = tto.build_config(name, **{k: v for k, v in SIZES.items() if k in tto.get(name).config_class.field_names()})
        assert type(AutoConfig.for_model(cfg.model_type)) is type(cfg)
        model = AutoModelForCausalLM.from_config(cfg)
        assert type(model) is tto.get(name).model_class
        model.save_pretrained(tmp_path / name)
        assert type(AutoModel.from_pretrained(tmp_path / name)) is tto.get(name).base_model_class


def test_wrong_cache_type_is_a_clear_error():
    with pytest.raises(TypeError, match="TTOCache"):
        ttt()(torch.zeros(1, 3, dtype=torch.long), past_key_values=object())


def test_bf16_autocast_forward_is_finite():
    model = ttt(ttt_layer_type="mlp").train()
    x = torch.randint(0, 64, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, labels=x).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_cache_is_a_hf_cache_with_batch_first_state():
    model = ttt().eval()
    with torch.no_grad():
        cache = model(torch.randint(0, 64, (3, 9)), use_cache=True).past_key_values
    assert isinstance(cache, TTOCache) and len(cache) == 2
    for state in cache.states:
        assert state and all(t.shape[0] == 3 for t in state.values() if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("bound", [dict(segment=5, max_cached=8), dict(window=4), dict()],
                         ids=["segments", "window", "causal"])
def test_attention_query_subset_equals_full_attention_rows(bound):
    """``queries=slice(...)``: only some slots ask, all are keys. Each selected output equals the
    full attention's row for that slot, with persistent tokens, left padding and a cache."""
    from tto.cache import Context
    from tto.layers.attention import Attention
    from tto.reference import reference_mode

    torch.manual_seed(0)
    config = tto.build_config("transformer", hidden_size=16, num_attention_heads=2, intermediate_size=32)
    attention = Attention(config, num_persistent=2, **bound).double()
    for p in attention.parameters():
        torch.nn.init.normal_(p, std=0.3)  # scores far from uniform, so a wrong mask shows
    x = torch.randn(2, 23, 16, dtype=torch.float64)
    mask = torch.ones(2, 23, dtype=torch.bool)
    mask[1, :4] = False
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    for queries in (slice(1, None, 2), slice(0, None, 3)):
        for mode in (contextlib.nullcontext, reference_mode, torch.no_grad):  # no_grad: the cache grows in place
            with mode():
                full, part, state_full, state_part = [], [], {}, {}
                for lo, hi in [(0, 9), (9, 11), (11, 23)]:  # a prefill, one step of two slots, the rest
                    ctx = Context(mask=mask[:, lo:hi], positions=positions[:, lo:hi])
                    full.append(attention(x[:, lo:hi], ctx, state_full)[:, queries])
                    part.append(attention(x[:, lo:hi], ctx, state_part, queries=queries))
            torch.testing.assert_close(torch.cat(part, 1), torch.cat(full, 1), atol=1e-12, rtol=0)


def test_a_window_that_reaches_every_key_leaves_the_plain_causal_mask():
    """A window no shorter than the call's span of positions excludes nothing: the mask is the causal
    one (None for SDPA's causal path without cached slots), and one position less excludes exactly
    the farthest pair."""
    from tto.layers.attention import attention_mask

    pos = torch.arange(12).expand(2, 12)
    assert attention_mask(pos, pos, None, 0, window=12) is None
    narrower = attention_mask(pos, pos, None, 0, window=11)[:, 0]
    expected = torch.ones(12, 12, dtype=torch.bool).tril()
    expected[11, 0] = False
    assert torch.equal(narrower, expected.expand(2, 12, 12))
    # queries after 5 cached slots: their causal mask, with or without a window of the whole span
    queries = pos[:, 5:]
    plain = attention_mask(queries, pos, None, 5, window=None)
    assert torch.equal(attention_mask(queries, pos, None, 5, window=12), plain)
    assert not torch.equal(attention_mask(queries, pos, None, 5, window=11), plain)


@pytest.mark.parametrize("bound", [dict(window=8), dict()], ids=["window", "causal"])
def test_decoding_attention_grows_its_kv_cache_in_place(bound):
    """Decoding token by token (no grad): the outputs equal one call's, and the KV cache moves to a
    new buffer once per window of tokens (twice the cached slots per buffer) or each time it grows
    by half (no window), not at every token."""
    from tto.cache import Context
    from tto.layers.attention import Attention

    torch.manual_seed(0)
    config = tto.build_config("transformer", hidden_size=16, num_attention_heads=2, intermediate_size=32)
    attention = Attention(config, **bound).double()
    x = torch.randn(2, 60, 16, dtype=torch.float64)
    positions = torch.arange(60).expand(2, 60)
    with torch.no_grad():
        whole = attention(x, Context(mask=None, positions=positions))
        state, outs, storages = {}, [], []
        for t in range(60):
            outs.append(attention(x[:, t:t + 1], Context(mask=None, positions=positions[:, t:t + 1]), state))
            storages.append(state["k"].untyped_storage().data_ptr())
    torch.testing.assert_close(torch.cat(outs, 1), whole, atol=1e-12, rtol=0)
    moves = sum(a != b for a, b in zip(storages, storages[1:]))
    # window 8: 7 cached slots in buffers of 14, a move every 7 tokens (from token 1 on); no window: the
    # first token's keys, then buffers of 1.5x the slots they hold when made: 3, 6, 10, 16, 25, 39, 60
    assert moves == (8 if bound else 7), moves


MEMORY_TYPES = [n for n in tto.available() if issubclass(tto.get(n).config_class, tto.MemoryConfig)]


@pytest.mark.parametrize("name", MEMORY_TYPES)
def test_memory_heads_follow_the_attention_heads_unless_given(name):
    """One name for a memory's heads in every type; by default as many as the attention has, so a
    resized model keeps heads as wide as its attention's (hidden 64 with 2 heads: 2 heads of 32)."""
    small = dict(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    assert tto.build_config(name, **small).num_memory_heads == 2
    assert tto.build_config(name, **{**small, "num_memory_heads": 4}).num_memory_heads == 4


@pytest.mark.parametrize("name,old", [(n, old) for n in MEMORY_TYPES for old in tto.get(n).config_class.aliases])
def test_former_memory_head_names_are_accepted(name, old, tmp_path):
    """A config (or a saved config.json) that uses a type's former name for its memory heads builds
    the same model; giving both names with different values is an error naming both."""
    small = dict(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    assert tto.build_config(name, **small, **{old: 4}).num_memory_heads == 4
    saved = tto.build_config(name, **small, num_memory_heads=4).to_dict()
    saved[old] = saved.pop("num_memory_heads")
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert AutoConfig.from_pretrained(tmp_path).num_memory_heads == 4
    with pytest.raises(ValueError, match=f"'{old}'=4: is the former name of 'num_memory_heads', also given \\(8\\)"):
        tto.build_config(name, **small, **{old: 4, "num_memory_heads": 8})
