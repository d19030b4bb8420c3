"""Nested Learning (arXiv:2512.24695): the Continuum Memory System as a block MLP (any mixer), checked
against a per-token transcription of its update rule, and its invariants (infinite period = a
plain MLP; a level's weights change only at multiples of its period; cached decoding = one
forward)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tto
from tto.layers.cms import ContinuumMemory
from tto.mixers.hope import SelfModifyingTitans
from tto.cache import Context

SIZES = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2)


def build(type_: str = "transformer", seed: int = 0, **fields):
    torch.manual_seed(seed)
    entry = tto.get(type_)
    return entry.model_class(tto.build_config(type_, **{**SIZES, **fields})).eval()


def tokens(batch=2, length=13, seed=1):
    return torch.randint(0, SIZES["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def reference_cms(cms: ContinuumMemory, x: torch.Tensor) -> torch.Tensor:
    """The CMS chain from its equations, token by token: level l reads its weights theta^(l) at every
    token; at the end of each chunk of C^(l) tokens, theta^(l) -= sum over the chunk of
    lr_t * grad_theta 1/(2d) ||MLP(x_t; theta) - x_t||^2, the gradients at the chunk-start theta
    (autograd), lr_t = cms_max_lr * sigmoid(w . x_t + b). x (B, T, d) -> (B, T, d)."""

    def mlp(x_t, w):  # SwiGLU: (silu(x W0) * (x W2)) W1
        return (F.silu(x_t @ w["W0"]) * (x_t @ w["W2"])) @ w["W1"]

    for level in cms.levels:
        if level.memory is None:  # the backbone's SwiGLU, in the fast model's layout
            mlp_ = level.mlp
            initial = {"W0": mlp_.gate_proj.weight.T, "W2": mlp_.up_proj.weight.T, "W1": mlp_.down_proj.weight.T}
        else:
            initial = {n: getattr(level.memory.fast, n)[0] for n in ("W0", "W1", "W2")}
        outs = []
        for row in range(x.shape[0]):
            theta = dict(initial)
            step = {n: torch.zeros_like(w) for n, w in theta.items()}
            row_out = []
            for t in range(x.shape[1]):
                x_t = x[row, t]
                row_out.append(mlp(x_t, theta))
                if level.period is None:
                    continue
                lr = level.lr_gate.scale * torch.sigmoid(level.lr_gate.weight[0] @ x_t + level.lr_gate.bias[0])
                loss = 0.5 * (mlp(x_t, theta) - x_t).pow(2).mean()
                grads = torch.autograd.grad(loss, list(theta.values()), create_graph=True)
                step = {n: step[n] + lr * g for n, g in zip(theta, grads)}
                if (t + 1) % level.period == 0:
                    theta = {n: theta[n] - step[n] for n in theta}
                    step = {n: torch.zeros_like(w) for n, w in theta.items()}
            outs.append(torch.stack(row_out))
        x = torch.stack(outs)
    return x


def initialised_cms(config) -> ContinuumMemory:
    """A CMS chain with MLP weights ~ N(0, 1 / fan_in) and lr gates ~ N(0, 0.3^2), seed 0."""
    torch.manual_seed(0)
    cms = ContinuumMemory(config)
    with torch.no_grad():
        for name, p in cms.named_parameters():
            fan_in = p.shape[-2] if p.dim() == 3 else p.shape[-1]
            torch.nn.init.normal_(p, std=0.3 if "lr_gate" in name else fan_in ** -0.5)
    return cms


def test_cms_matches_per_token_reference_in_float64():
    """The engine's CMS (chunk-start reads and summed-gradient commits per level) equals the
    transcription, outputs and the gradients of every parameter and of the input, to 1e-10 in
    float64; the periods do not divide the length, and one level is never updated. At this lr every
    chunk's step is stable by itself, so the step bound leaves it unchanged (kappa = 1: at 0.05 it
    falls to 0.64 and the outputs differ by 0.06; the engine's commit with kappa < 1 is tested
    against tto.engine.naive_memory in test_engine)."""
    config = tto.build_config("transformer", **SIZES, mlp_type="cms", cms_periods=[2, None, 5], cms_max_lr=0.03)
    cms = initialised_cms(config).double()
    x = torch.randn(2, 13, SIZES["hidden_size"], dtype=torch.float64, requires_grad=True)
    target = torch.randn_like(x)
    ctx = Context(mask=None, positions=torch.arange(13).expand(2, 13))
    params = [x, *cms.parameters()]
    out = cms(x, ctx, None)
    grads = torch.autograd.grad((out * target).sum(), params)
    ref = reference_cms(cms, x)
    ref_grads = torch.autograd.grad((ref * target).sum(), params)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    for name, g, r in zip(["x", *(n for n, _ in cms.named_parameters())], grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-8, msg=lambda m, n=name: f"{n}: {m}")
    # the reference is not vacuous: the updated levels do change their outputs
    frozen = ContinuumMemory(config).double()
    frozen.load_state_dict(cms.state_dict())
    for level in frozen.levels:
        if level.lr_gate is not None:
            torch.nn.init.constant_(level.lr_gate.bias, -1e4)  # lr = 0
    assert (frozen(x, ctx, None) - out).abs().max() > 1e-3


def test_long_period_level_stays_bounded_where_the_unbounded_update_diverges(monkeypatch):
    """One CMS level with a 64-token period at lr up to 1, on 512 tokens of unit-RMS inputs: the
    paper's summed update (the step bound forced to kappa = 1) grows the weights geometrically to
    NaN/inf or an RMS above 1e3, while with the bound they stay within 10x of their initial RMS and
    the outputs are finite."""
    from tto.engine.memory import Memory

    config = tto.build_config("transformer", **SIZES, mlp_type="cms", cms_periods=[64], cms_max_lr=1.0)
    cms = initialised_cms(config)
    x = torch.randn(2, 512, SIZES["hidden_size"], generator=torch.Generator().manual_seed(3))
    ctx = Context(mask=None, positions=torch.arange(512).expand(2, 512))

    def run():
        state = {}
        with torch.no_grad():
            out = cms(x, ctx, state)
        return out, torch.cat([state[f"cms.0.W.{n}"].flatten() for n in ("W0", "W1", "W2")])

    initial = torch.cat([getattr(cms.levels[0].memory.fast, n).flatten() for n in ("W0", "W1", "W2")]).pow(2).mean().sqrt()
    out, weights = run()
    assert torch.isfinite(out).all()
    assert weights.pow(2).mean().sqrt() < 10 * initial
    monkeypatch.setattr(Memory, "_step_bound", lambda self, bound, factors: torch.ones_like(bound.inverse_t[0]))
    _, unbounded = run()
    rms = unbounded.pow(2).mean().sqrt()
    assert not torch.isfinite(rms) or rms > 1e3 * initial


def test_infinite_period_is_a_plain_mlp():
    """mlp_type cms with one never-updated level gives the SwiGLU model's logits exactly, with the same
    weights, and keeps no CMS state in the cache."""
    cms = build(mlp_type="cms", cms_periods=[None]).double()
    plain = build(seed=1).double()
    plain.load_state_dict({k.replace(".mlp.levels.0.mlp.", ".mlp."): v for k, v in cms.state_dict().items()})
    x = tokens()
    with torch.no_grad():
        out = cms(x, use_cache=True)
        torch.testing.assert_close(out.logits, plain(x).logits, atol=0, rtol=0)
    assert not any(k.startswith("cms.") for state in out.past_key_values.states for k in state)


def test_level_weights_change_only_at_multiples_of_its_period():
    """Decoding one token at a time: after token t, level l's fast weights in the cache differ from
    before exactly when t is a multiple of C^(l) (a never-updated level keeps none)."""
    periods = [2, 3, None]
    model = build(mlp_type="cms", cms_periods=periods, cms_max_lr=0.5)
    x = tokens(length=12)
    cache, before = None, {}
    with torch.no_grad():
        for t in range(x.shape[1]):
            out = model(x[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            for layer, state in enumerate(cache.states):
                assert not any(k.startswith("cms.2.") for k in state)
                for level, period in enumerate(periods[:2]):
                    weights = torch.cat([state[f"cms.{level}.W.{n}"].flatten() for n in ("W0", "W1", "W2")])
                    if t > 0:
                        changed = not torch.equal(weights, before[layer, level])
                        assert changed == ((t + 1) % period == 0), (layer, level, t)
                    before[layer, level] = weights.clone()


@pytest.mark.parametrize("mixer", ["transformer", "titans"])
def test_cms_cache_equals_full_forward(mixer):
    """Prefill of a prefix that ends inside every level's chunk, then token by token, with a left-padded
    row: the same logits as one forward over the whole sequence, for attention and a memory mixer."""
    model = build(mixer, mlp_type="cms", cms_periods=[2, 5, None], cms_max_lr=0.5,
                  **({"chunk_size": 2, "sliding_window": 5} if mixer == "titans" else {}))
    x = tokens(length=14)
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    with torch.no_grad():
        full = model(x, attention_mask=mask).logits
        out = model(x[:, :7], attention_mask=mask[:, :7], use_cache=True)
        steps = [out.logits]
        for t in range(7, x.shape[1]):
            out = model(x[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=out.past_key_values,
                        use_cache=True)
            steps.append(out.logits)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], atol=2e-5, rtol=0)


def test_cms_fast_weights_stay_float32_under_bf16_autocast():
    model = build(mlp_type="cms", cms_periods=[2, None])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tokens(), use_cache=True)
    weights = [t for k, t in out.past_key_values.states[0].items() if k.startswith("cms.0.W.")]
    assert weights and all(w.dtype == torch.float32 for w in weights)


@pytest.mark.parametrize("fields,match", [
    (dict(mlp_type="cms"), "cms_periods"),
    (dict(mlp_type="cms", cms_periods=[]), "cms_periods"),
    (dict(mlp_type="cms", cms_periods=[4, 0]), "cms_periods"),
    (dict(mlp_type="cms", cms_periods=[4], hidden_act="gelu"), "hidden_act"),
    (dict(mlp_type="cms", cms_periods=[4], mlp_bias=True), "mlp_bias"),
    (dict(cms_periods=[4]), "is a field of mlp_type 'cms'"),
    (dict(mlp_type="kan"), r"valid choices: \['cms', 'swiglu'\]"),
])
def test_bad_cms_configs_name_the_problem(fields, match):
    with pytest.raises(ValueError, match=match):
        tto.build_config("transformer", **SIZES, **fields)


def test_cms_is_rejected_where_the_block_has_no_place_for_it():
    """The image backbone's blocks keep their MLP, and TTT-E2E's model-level inner loop its static ones."""
    with pytest.raises(ValueError, match="not of 'image-classification' models"):
        tto.build_config("vit3", mlp_type="cms", cms_periods=[4], mlp_bias=False)
    with pytest.raises(ValueError, match="prime layers"):
        tto.build_config("ttt_e2e", **SIZES, mlp_type="cms", cms_periods=[4])


@pytest.mark.parametrize("variant,peer,peer_fields", [("attention", "transformer", {"tie_word_embeddings": False}),
                                                      ("titans", "titans", {"variant": "lmm", "chunk_size": 2})])
def test_hope_with_a_never_updated_level_is_its_peer(variant, peer, peer_fields):
    """HOPE-Attention whose CMS is one never-updated level is the transformer, and HOPE's Titans
    variant so is Titans LMM, with the same weights: the same logits exactly."""
    hope = build("hope", variant=variant, chunk_size=2, cms_periods=[None]).double()
    other = build(peer, seed=1, **peer_fields).double()
    rename = {".mlp.levels.0.mlp.": ".mlp."} | ({".mixer.wiring.attention.": ".mixer."} if variant == "attention" else {})

    def renamed(key: str) -> str:
        for old, new in rename.items():
            key = key.replace(old, new)
        return key

    other.load_state_dict({renamed(k): v for k, v in hope.state_dict().items()})
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(hope(x).logits, other(x).logits, atol=0, rtol=0)


def self_modifying_titans_equations(layer: SelfModifyingTitans, x: torch.Tensor) -> torch.Tensor:
    """HOPE's self-modifying Titans from the paper's equations (Sec. 8.1-8.3), row by row, head by head,
    token by token, with explicit weights and autograd: x (B, T, hidden) -> (B, T, hidden).

    Each of the five memories (k, v, eta, alpha, the main one) is ``M(z) = z + silu(z W1) W2``.
    Token t of a chunk of C reads the projection memories at the chunk-start weights on its head's
    slice of x, l2-normalised (x_t below): ``k_t = normalize(M_k(x_t))``, ``v_t = M_v(x_t)``,
    ``eta_t = max_lr sigmoid(w_eta . M_eta(x_t) + b)``, ``alpha_t = sigmoid(w_alpha . M_alpha(x_t) + b)``,
    ``q_t = normalize(x W_q)``; every memory steps ``M <- (1 - alpha_t) M - eta_t grad ||M(k_t) - v^_t||^2``
    with the gradient at the chunk-start weights and its own generated value ``v^_t = M_start(v_t)``
    as target (its norm at most ``value_norm_cap``), and the main memory's read is
    ``y_t = M_memory,t(q_t)`` after the token's step. Outer gradients flow through everything but
    the chunk-start weights that generate the values."""
    heads, d, chunk = layer.num_heads, layer.head_dim, layer.chunk_size
    proj, main = layer.projections.fast, layer.memory.fast
    scale = layer.memory.objective.scale

    def memory(w, z):
        return z + F.silu(z @ w[0]) @ w[1]

    def fast(module, head):
        return [module.W1[head], module.W2[head]]

    out = torch.zeros(*x.shape[:2], heads, d, dtype=x.dtype)
    q_all = x @ layer.q_proj.weight.T
    for row in range(x.shape[0]):
        for h in range(heads):
            names = ("k", "v", "lr", "forget", "memory")
            weights = {name: fast(main, h) if name == "memory" else fast(proj, m * heads + h)
                       for m, name in enumerate(names)}
            for t in range(x.shape[1]):
                if t % chunk == 0:
                    start = {name: list(w) for name, w in weights.items()}
                x_t = F.normalize(x[row, t, h * d:(h + 1) * d], dim=-1)
                read = {name: memory(start[name], x_t) for name in ("k", "v", "lr", "forget")}
                k_t, v_t = F.normalize(read["k"], dim=-1), read["v"]
                lr = layer.lr_gate.scale * torch.sigmoid(read["lr"] @ layer.lr_gate.weight[h] + layer.lr_gate.bias[h])
                keep = 1 - torch.sigmoid(read["forget"] @ layer.forget_gate.weight[h] + layer.forget_gate.bias[h])
                for name in names:
                    # the gradient with respect to the weights at fixed k_t (which M_k's weights also
                    # produce): taken at an alias of the chunk-start weights that only y reads
                    alias = [w.view_as(w) for w in start[name]]
                    y = memory(alias, k_t)
                    target = memory([w.detach() for w in start[name]], v_t)
                    target = target * (layer.value_norm_cap / target.norm()).clamp(max=1.0)
                    grads = torch.autograd.grad(y, alias, grad_outputs=scale * (y - target), create_graph=True)
                    weights[name] = [keep * w - lr * g for w, g in zip(weights[name], grads)]
                q_t = F.normalize(q_all[row, t, h * d:(h + 1) * d], dim=-1)
                out[row, t, h] = memory(weights["memory"], q_t)
    out = layer.out_norm(out.flatten(2)) * F.silu(layer.gate_proj(x))
    return layer.o_proj(out)


@pytest.mark.parametrize("chunk", [1, 3])
def test_self_modifying_titans_matches_its_equations(chunk):
    """The self-modifying Titans (two engines run piece by piece along the chunks) equals the paper's
    recurrence transcribed token by token, outputs and every parameter's gradient, in float64; 8
    tokens at chunk 3 end in an incomplete chunk. At these sizes every chunk's step is stable by
    itself, so the engine's step bound is 1 and the update is the paper's."""
    model = build("hope", chunk_size=chunk, cms_periods=[None]).double()
    layer = next(m for m in model.modules() if isinstance(m, SelfModifyingTitans))
    x = torch.randn(2, 8, SIZES["hidden_size"], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ctx = Context(mask=None, positions=torch.arange(8).expand(2, -1))
    out = layer(x, ctx, None)
    expected = self_modifying_titans_equations(layer, x)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    params = list(layer.parameters())
    grads = torch.autograd.grad(out.pow(2).sum(), params)
    expected_grads = torch.autograd.grad(expected.pow(2).sum(), params)
    for (name, _), g, e in zip(layer.named_parameters(), grads, expected_grads):
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-8, msg=lambda m, n=name: f"{n}: {m}")


def test_self_generated_values_need_their_norm_cap():
    """A memory that learns from values it generates itself chases a target that moves with its own
    weights (``||M(k) - M(v)||^2`` with M(v) read at the chunk start: a bootstrap), so its chunk map
    can expand at any step size. A linear residual memory, one head, a large step and no forgetting
    (a configuration the config class accepts): with the generated values uncapped its fast weights
    (initially ~N(0, 0.02^2)) grow geometrically, past RMS 1e6 within 128 tokens; under the default
    cap they stay at RMS < 2 (1.13 after 2,048 tokens, growing ever more slowly)."""

    def largest_rms(cap: float) -> float:
        model = build("hope", hidden_size=32, num_memory_heads=1, mem_depth=1, chunk_size=2, mem_max_lr=0.63,
                      lr_gate_bias_init=1.0, forget_gate_bias_init=-9.0, cms_periods=[None], value_norm_cap=cap,
                      seed=2)
        x = torch.randint(0, SIZES["vocab_size"], (2, 128), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            out = model(x, use_cache=True)
        assert torch.isfinite(out.logits).all()
        weights = [w for state in out.past_key_values.states for k, w in state.items() if ".W." in k]
        return max(w.double().pow(2).mean().sqrt().item() for w in weights)

    assert largest_rms(2.0) < 2.0
    assert largest_rms(1e30) > 1e6


def test_self_modifying_checkpoint_groups_give_the_same_gradients():
    """Training with ``scan_checkpoint_group_size`` (the pieces of a call in groups whose activations
    are recomputed in the backward) gives the loss and gradients of the plain run, in float64."""
    x = tokens(length=13)
    results = []
    for group in (0, 2):
        model = build("hope", chunk_size=2, cms_periods=[None], scan_checkpoint_group_size=group).double().train()
        out = model(x, labels=x)
        results.append((out.loss, torch.autograd.grad(out.loss, list(model.parameters()))))
    (loss, grads), (group_loss, group_grads) = results
    torch.testing.assert_close(group_loss, loss, atol=1e-12, rtol=0)
    for g, r in zip(group_grads, grads):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-10)
