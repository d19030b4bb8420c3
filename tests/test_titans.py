"""Titans-specific checks the generic suite cannot see: the bounded cache of the attention
variants (MAC included), persistent tokens, config errors, and test-time memorization."""

from __future__ import annotations

import pytest
import torch

import tto

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def build(seed: int = 0, **fields):
    torch.manual_seed(seed)
    cfg = tto.build_config("titans", preset="tiny", **{**TINY, **fields})
    return tto.get("titans").model_class(cfg).eval()


@pytest.mark.parametrize("variant,fields", [("mag", {}), ("mal", {}), ("mac", {"segment_size": 6})])
def test_attention_variants_keep_a_bounded_cache(variant, fields):
    """After 40 tokens the attention cache holds window - 1 keys (MAC: the 2 x (segment - 1) slots
    of h and x a segment can still see; no persistent tokens), next to the memory state; decoding
    on from it equals the full forward."""
    model = build(variant=variant, **fields)
    bound = 2 * (6 - 1) if variant == "mac" else model.config.sliding_window - 1
    x = torch.randint(0, TINY["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(x).logits
        cache = model(x[:, :36], use_cache=True).past_key_values
        steps = [model(x[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(36, 40)]
    for state in cache.states:
        assert state["k"].shape[2] == bound and state["pos"].shape[1] == bound
        assert any(key.startswith("memory.W.") for key in state)
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 36:], atol=2e-5, rtol=0)


@pytest.mark.parametrize("variant", ["mag", "mal"])
def test_persistent_tokens_are_keys_not_positions(variant):
    """Persistent tokens change the outputs but add no output rows, and every query sees them."""
    model = build(variant=variant)
    x = torch.randint(0, TINY["vocab_size"], (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(x).logits
        for layer in model.model.layers:
            layer.mixer.wiring.attention.persistent.mul_(-3.0)
        after = model(x).logits
    assert before.shape == after.shape == (1, 20, TINY["vocab_size"])
    # beyond the window, only the persistent tokens and the memory connect the last query to the past
    assert ((before - after).abs().amax(-1) > 1e-4).all()


def test_lmm_has_no_attention_and_no_persistent_tokens():
    model = build(variant="lmm")
    names = [n for n, _ in model.named_parameters()]
    assert not any("attention" in n or "persistent" in n for n in names)
    assert {"lr_gate", "momentum_gate", "forget_gate"} <= {n.split(".")[-2] for n in names}


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="num_mem_heads"):
        tto.build_config("titans", hidden_size=64, num_attention_heads=4, num_key_value_heads=4, num_mem_heads=6)
    with pytest.raises(ValueError, match="num_persistent_mem_tokens"):
        tto.build_config("titans", num_persistent_mem_tokens=-1)
    with pytest.raises(ValueError, match="mem_activation.*did you mean 'silu'"):
        tto.build_config("titans", mem_activation="slu")


# ---------------------------------------------------------------------------- test-time memorization
KEYS, VALUES, PAIRS = 16, 16, 6
# outer training steps on the task (~35 s on one core) at lr 3e-2: over seeds 0-4 the second-read
# loss falls below 0.7 x the first by step 600 (0.12-0.52 x; lr 1e-2 left seed 0 unlearned at 1200)
STEPS = 800


def pairs_twice(batch: int, gen: torch.Generator) -> torch.Tensor:
    """k1 v1 ... kn vn k1 v1 ... kn vn: distinct random keys, random values (ids KEYS..)."""
    keys = torch.rand(batch, KEYS, generator=gen).argsort(1)[:, :PAIRS]
    values = KEYS + torch.randint(0, VALUES, (batch, PAIRS), generator=gen)
    once = torch.stack([keys, values], 2).flatten(1)
    return torch.cat([once, once], 1)


def value_losses(x: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean NLL of each value given its key, on the first and on the second read."""
    at_keys = torch.arange(0, 4 * PAIRS, 2)
    nll = -logits.log_softmax(-1)[:, at_keys].gather(-1, x[:, at_keys + 1, None])[..., 0]
    return nll[:, :PAIRS].mean(), nll[:, PAIRS:].mean()


def test_lmm_memorizes_at_test_time(request):
    """A one-layer LMM trained briefly on random key->value lists recalls a list it read once:
    values are unpredictable on the first read (~log 16), and far better on the second."""
    threads = torch.get_num_threads()
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    torch.set_num_threads(1)  # tiny matmuls: threads only add overhead
    torch.manual_seed(0)
    # a matrix memory (depth 1) that writes almost without decay or momentum, with a step bound
    # that allows one-shot writes of unit-norm keys (delta rule beta = 2 * theta <= 1)
    cfg = tto.build_config("titans", variant="lmm", vocab_size=KEYS + VALUES, hidden_size=64, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, num_mem_heads=2, chunk_size=2, mem_depth=1,
                           mem_residual_norm=False, mem_max_lr=0.5, lr_gate_bias_init=2.0, forget_gate_bias_init=-6.0,
                           momentum_gate_bias_init=-6.0, num_persistent_mem_tokens=0, tie_word_embeddings=True)
    model = tto.get("titans").model_class(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        x = pairs_twice(32, gen)
        first, second = value_losses(x, model(x).logits)
        opt.zero_grad()
        (first + second).backward()
        opt.step()
    x = pairs_twice(256, torch.Generator().manual_seed(1))
    with torch.no_grad():
        first, second = value_losses(x, model.eval()(x).logits)
    assert first > 0.8 * torch.log(torch.tensor(float(VALUES)))
    assert second < 0.7 * first, (first.item(), second.item())
