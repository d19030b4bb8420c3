"""`memory_vit`: the language-model memory types read non-causally, one chunk per image. Their
memories against a transcription of "commit the chunk from all tokens' gradients at W_0, read the
committed weights", against the causal engine run on the image and read after it, permutation
(in)variance, and the config errors. The registry-wide image invariants (fast path == naive
reference, save/load, ...) run for every memory type in tests/test_conformance.py."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

import tto
from tto.engine import ChunkwiseMemory, DeltaRule, noncausal
from tto.mixers.memory_vit import noncausal_refusals, noncausal_types

#: the tiny preset's 8x8 images in 2x2 patches: 16 tokens, one chunk
TOKENS = 16
SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)


def model(memory_type: str, memory_fields: dict | None = None, seed: int = 0, **extra):
    torch.manual_seed(seed)
    config = tto.build_config("memory_vit", preset="tiny", memory_type=memory_type, memory_fields=memory_fields,
                              **{**SIZES, **extra})
    return tto.get("memory_vit").model_class(config).double().eval()


def engine_calls(m, pixels) -> list[tuple[ChunkwiseMemory, dict, torch.Tensor]]:
    """Each memory engine's call during a forward of `m` on `pixels`: (engine, arguments by name, reads)."""
    calls = []

    def hook(module, args, kwargs, out):
        call = inspect.signature(module.forward).bind(*args, **kwargs).arguments
        calls.append((module, dict(call), out))

    hooks = [e.register_forward_hook(hook, with_kwargs=True) for e in m.modules() if isinstance(e, ChunkwiseMemory)]
    with torch.no_grad():
        m(pixels)
    for h in hooks:
        h.remove()
    return calls


def pixels(batch=2, seed=1):
    return torch.randn(batch, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _variant_cases():
    """(memory type, its variant fields) for every variant of every type that runs non-causally."""
    cases = []
    for name in tto.get("memory_vit").variants:
        for variant, fields in tto.get(name).variant_configs():
            try:
                model(name, fields)
            except ValueError:  # a variant with causal attention (Titans MAC/MAG/MAL)
                continue
            cases.append(pytest.param(name, fields, id=f"{name}-{variant}" if variant else name))
    return cases


# ---------------------------------------------------------------------------- transcriptions

def _ttt_linear(x, w, b, gamma, beta, eps):
    """TTT-Linear's fast model f(x) = x + LN(x W + b), per head (x (T, d))."""
    return x + F.layer_norm(x @ w + b, (x.shape[-1],), gamma, beta, eps)


def _titans_mlp(x, w1, w2):
    """Titans' 2-layer memory f(x) = silu(x W1) W2, per head."""
    return F.silu(x @ w1) @ w2


def test_ttt_linear_commits_the_mini_batch_step_from_all_tokens_and_reads_it():
    """TTT-Linear as an image mixer, written out: per row and head,
    ``W_N = W_0 - eta_N sum_s lr_s grad l_s(W_0)`` with ``eta_N = max(0, 1/N + offset_N)`` and
    ``l_s = 1/2 ||f(k_s; W) - v_s||^2``; every query reads f(q; W_N); the mixer's output is
    ``o_proj(post_norm(reads))``."""
    m = model("ttt")
    mixer = m.model.layers[0].mixer.mixer
    engine = mixer.memory
    with torch.no_grad():  # a learned position scale away from its init, so that eta_N is exercised
        engine.optimizer.token_offset.copy_(0.05 * torch.randn(TOKENS, dtype=torch.float64))
    outputs = []
    hook = m.model.layers[0].mixer.register_forward_hook(lambda module, args, out: outputs.append(out))
    (_, call, reads), = engine_calls(m, pixels())
    hook.remove()
    mixer_output, = outputs
    q, k, v, lr = call["q"], call["k"], call["v"], call["gates"]["lr"]
    fast = engine.fast
    eta = (1.0 / TOKENS + engine.optimizer.token_offset[-1].detach()).clamp_min(0.0)
    expected = torch.zeros_like(reads)
    moved = 0.0
    for row in range(q.shape[0]):
        for h in range(q.shape[2]):
            w0 = fast.W1[h].detach().clone().requires_grad_(True)
            b0 = fast.b1[h].detach().clone().requires_grad_(True)
            norm = (fast.norm_weight[h].detach(), fast.norm_bias[h].detach(), fast.norm_eps)
            with torch.enable_grad():
                losses = 0.5 * (_ttt_linear(k[row, :, h], w0, b0, *norm) - v[row, :, h]).pow(2).sum(-1)
                gw, gb = torch.autograd.grad((lr[row, :, h] * losses).sum(), (w0, b0))
            w_end, b_end = w0.detach() - eta * gw, b0.detach() - eta * gb
            expected[row, :, h] = _ttt_linear(q[row, :, h], w_end, b_end, *norm)
            at_start = _ttt_linear(q[row, :, h], w0.detach(), b0.detach(), *norm)
            moved = max(moved, float((expected[row, :, h] - at_start).abs().max()))
    torch.testing.assert_close(reads, expected, atol=1e-10, rtol=0)
    assert moved > 1e-3  # the committed step changes the reads: reading W_0 would fail the comparison
    with torch.no_grad():
        torch.testing.assert_close(mixer_output, mixer.o_proj(mixer.post_norm(expected.flatten(2))), atol=1e-10, rtol=0)


def test_titans_commits_momentum_and_forgetting_over_all_tokens_and_reads_it():
    """Titans LMM as an image mixer, its memory written out: per row and head, every token's gradient
    at W_0 through the recurrence ``S_t = eta_t S_{t-1} - theta_t g_t``, ``W_t = (1 - alpha_t) W_{t-1}
    + S_t`` from S_0 = 0; every query reads f(q; W_N)."""
    (engine, call, reads), = engine_calls(model("titans"), pixels())
    q, k, v, gates = call["q"], call["k"], call["v"], call["gates"]
    fast = engine.fast
    scale = engine.objective.scale
    expected = torch.zeros_like(reads)
    for row in range(q.shape[0]):
        for h in range(q.shape[2]):
            w = [fast.W1[h].detach().clone().requires_grad_(True), fast.W2[h].detach().clone().requires_grad_(True)]
            s = [torch.zeros_like(t) for t in w]
            end = [t.detach().clone() for t in w]
            for t in range(TOKENS):
                with torch.enable_grad():
                    loss = 0.5 * scale * (_titans_mlp(k[row, t, h], *w) - v[row, t, h]).pow(2).sum()
                    g = torch.autograd.grad(loss, w)
                theta, eta, alpha = (gates[n][row, t, h] for n in ("lr", "momentum", "forget"))
                s = [eta * si - theta * gi for si, gi in zip(s, g)]
                end = [(1 - alpha) * ei + si for ei, si in zip(end, s)]
            expected[row, :, h] = _titans_mlp(q[row, :, h], *end)
            assert float((expected[row, :, h] - _titans_mlp(q[row, :, h], *(t.detach() for t in w))).abs().max()) > 1e-6
    torch.testing.assert_close(reads, expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("name,fields", _variant_cases())
def test_noncausal_reads_equal_the_causal_engine_read_after_the_chunk(name, fields):
    """Each memory's non-causal reads equal its causal path (the decoding pipeline, state and all):
    the image's tokens as one chunk of the engine's chunk size N, then the queries read at the
    weights that chunk committed (the next call's chunk-start reads)."""
    m = model(name, fields)
    calls = engine_calls(m, pixels())
    assert calls
    for engine, call, reads in calls:
        assert engine.chunk_size == TOKENS
        args = (call["q"], call["k"], call["v"], call["gates"])
        state = {}
        with torch.no_grad():
            engine(*args, state=state)
            after = engine(*args, state=state, read_start="only")
        torch.testing.assert_close(reads, after, atol=1e-10, rtol=0)
        with torch.no_grad():  # and not the causal reads inside the chunk
            assert float((engine(*args) - reads).abs().max()) > 1e-6


def _permuted(call: dict, order: torch.Tensor, with_queries: bool) -> tuple:
    pick = lambda t: t[:, order]  # noqa: E731
    q = pick(call["q"]) if with_queries else call["q"]
    return q, pick(call["k"]), pick(call["v"]), {n: pick(g) for n, g in call["gates"].items()}


def test_a_gradient_sum_commit_does_not_see_the_order_of_the_tokens():
    """TTT's commit sums the tokens' gradients at W_0 (times the last position's scale): shuffling the
    keys, values and gates leaves every read as it was, and shuffling the queries too shuffles the
    reads the same way."""
    m = model("ttt")
    (engine, call, reads), = engine_calls(m, pixels())
    order = torch.randperm(TOKENS, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), noncausal():
        torch.testing.assert_close(engine(*_permuted(call, order, False)), reads, atol=1e-12, rtol=0)
        torch.testing.assert_close(engine(*_permuted(call, order, True)), reads[:, order], atol=1e-12, rtol=0)


def test_a_momentum_commit_sees_the_order_of_the_tokens():
    """Titans' momentum and forgetting weigh a token's gradient by the gates after it: the same
    shuffle changes the reads."""
    m = model("titans")
    (engine, call, reads), = engine_calls(m, pixels())
    order = torch.randperm(TOKENS, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), noncausal():
        assert float((engine(*_permuted(call, order, False)) - reads).abs().max()) > 1e-6


# ---------------------------------------------------------------------------- config errors

def test_the_choices_are_derived_from_the_registry():
    """Every language-model type is decided (no list to keep): the ones with an exact per-token
    update or causal attention are refused, each with its reason."""
    refusals = noncausal_refusals()
    assert set(refusals) == set(tto.available())
    assert set(noncausal_types()) == {n for n, r in refusals.items() if r is None} == set(tto.get("memory_vit").variants)
    assert "delta rule" in refusals["deltanet"] and "delta rule" in refusals["gated_deltanet"]
    assert "attention" in refusals["transformer"] and "attention" in refusals["lact"]
    assert "chunk-start" in refusals["tnt"]
    assert {"ttt", "titans"} <= set(noncausal_types())


@pytest.mark.parametrize("memory_type,fields,match", [
    ("gated_deltanet", None, r"'memory_type'='gated_deltanet': cannot run non-causally: .*delta rule.*valid choices: "
                             r"\[.*'titans', 'ttt'\]"),  # the derived choices, whatever else registers
    ("tnt", None, r"'memory_type'='tnt': cannot run non-causally: .*chunk-start"),
    ("tttt", None, r"'memory_type'='tttt': unknown choice.*did you mean 'ttt'"),
    ("ttt", {"mini_batch_sise": 4}, r"memory_fields: unknown config field\(s\) for type 'ttt': 'mini_batch_sise'"),
    ("ttt", {"ttt_layer_type": "rnn"}, r"memory_fields: .*'ttt_layer_type'='rnn'"),
    ("ttt", {"mini_batch_size": 4}, r"memory_fields\['mini_batch_size'\]\"=4: is set by the image: one chunk of its 16 tokens"),
    ("titans", {"hidden_size": 16}, r"\['hidden_size'\] are backbone fields"),
])
def test_bad_configs_fail_naming_the_problem(memory_type, fields, match):
    with pytest.raises(ValueError, match=match):
        tto.build_config("memory_vit", preset="tiny", memory_type=memory_type, memory_fields=fields)


def test_a_variant_with_causal_attention_is_refused_when_built():
    config = tto.build_config("memory_vit", preset="tiny", memory_type="titans", memory_fields={"variant": "mag"})
    with pytest.raises(ValueError, match=r"make 'titans' unable to run non-causally: it holds causal softmax attention"):
        tto.get("memory_vit").model_class(config)


def test_engines_refuse_what_a_noncausal_call_cannot_do():
    q = torch.randn(1, 4, 2, 8)
    with noncausal():
        with pytest.raises(ValueError, match="DeltaRule cannot run non-causally: the delta rule"):
            DeltaRule(4)(q, q, q, {"lr": torch.rand(1, 4, 2)})
    (engine, call, _), = engine_calls(model("ttt"), pixels())
    args = (call["q"], call["k"], call["v"], call["gates"])
    with noncausal():
        with pytest.raises(ValueError, match="no padding mask and no state"):
            engine(*args, mask=torch.ones(2, TOKENS, dtype=torch.bool))
        with pytest.raises(ValueError, match="no padding mask and no state"):
            engine(*args, state={})
        with pytest.raises(ValueError, match="no chunk-start reads"):
            engine(*args, read_start=True)


# ---------------------------------------------------------------------------- recipes

@pytest.mark.parametrize("memory_type", ["ttt", "titans"])
def test_digits_recipes_match_vit3s_size(memory_type):
    """configs/vision/memory_vit_<type>_tiny.yml (the README's digits rows) build within 0.2% of the
    vit3 recipe's parameter count, and with the memory type they name."""
    from pathlib import Path

    from tto.training import load_recipe

    root = Path(__file__).resolve().parents[1] / "configs" / "vision"

    def count(recipe: str):
        fields = dict(load_recipe(root / recipe).model)
        name = fields.pop("type")
        preset = fields.pop("preset")
        built = tto.get(name).model_class(tto.build_config(name, preset=preset, **fields))
        return sum(p.numel() for p in built.parameters()), built.config

    target, _ = count("vit3_tiny.yml")
    n, config = count(f"memory_vit_{memory_type}_tiny.yml")
    assert config.memory_type == memory_type and abs(n - target) / target < 0.002, (n, target)


def test_deciding_the_choices_leaves_the_random_stream_alone():
    """The probe builds and reads mixers once, when a config is first checked: it must not shift the
    random numbers a seeded run draws after it."""
    noncausal_refusals.cache_clear()
    torch.manual_seed(0)
    tto.build_config("memory_vit", preset="tiny")
    after_probe = torch.rand(3)
    torch.manual_seed(0)
    tto.build_config("memory_vit", preset="tiny")
    torch.testing.assert_close(torch.rand(3), after_probe, atol=0, rtol=0)
