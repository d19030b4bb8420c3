"""TTT-E2E (arXiv 2512.23675): the invariants of its model-level inner loop (ARCHITECTURES.md §9).

The fast path (tto/engine/e2e.py: mini-batch segments, attention windows carried between them,
per-row steps, the unfinished mini-batch re-read by the next call) is checked against a per-token
loop written here from the paper's description, in float64, where equal math agrees to ~1e-14.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import TrainerControl, TrainerState

import tto
from tto.cache import Context
from tto.engine.e2e import PRIME_KEYS
from tto.layers.rope import apply_rope, rope_cos_sin
from tto.mixers.ttt_e2e import TRANSFORMER_INTERMEDIATE, TTT_E2E_PRESETS
from tto.training import InnerLRWarmup


SIZES = dict(vocab_size=48, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2,
             num_ttt_blocks=2, mini_batch_size=4, sliding_window=6, rms_norm_eps=1e-12)


def model(seed=0, **fields):
    torch.manual_seed(seed)
    config = tto.build_config("ttt_e2e", **{**SIZES, **fields})
    return tto.get("ttt_e2e").model_class(config).double().eval()


def tokens(batch=2, length=15, seed=1):
    return torch.randint(0, SIZES["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def lm_loss(m, x: torch.Tensor) -> torch.Tensor:
    """The mean next-token cross-entropy in float64 (the Trainer's loss upcasts to float32)."""
    return F.cross_entropy(m(x, use_cache=False).logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())


def naive_logits(m, x: torch.Tensor) -> torch.Tensor:
    """One row x (1, T), token by token: each suffix block reads its own window of keys and values
    with explicit softmax; token t uses the prime weights after the steps of mini-batches < t // b;
    after the last token of a mini-batch whose next token exists, one SGD step on the mini-batch's
    mean next-token cross-entropy, gradient clipped to the global norm (graph kept: differentiable)."""
    c = m.config
    b, window, first = c.mini_batch_size, c.sliding_window, c.prime_layers[0]
    t_len = x.shape[1]
    h = m.model.embed_tokens(x)
    ctx = Context(mask=None, positions=torch.arange(t_len)[None])
    for block in m.model.layers[:first]:
        h = block(h, ctx)
    suffix = m.model.layers[first:]
    weights = [[blk.prime.gate_proj.weight, blk.prime.up_proj.weight, blk.prime.down_proj.weight] for blk in suffix]
    keys = [[] for _ in suffix]
    values = [[] for _ in suffix]
    logits = []
    for t in range(t_len):
        ht = h[:, t : t + 1]
        for i, blk in enumerate(suffix):
            att = blk.mixer
            heads, e = att.num_heads, att.head_dim
            a = blk.mixer_norm(ht)
            cos, sin = rope_cos_sin(torch.tensor([[t]]), e, c.rope_theta)
            q = apply_rope(att.q_norm(att.q_proj(a).view(1, 1, heads, e)), cos, sin)[0, 0]
            keys[i].append(apply_rope(att.k_norm(att.k_proj(a).view(1, 1, heads, e)), cos, sin)[0, 0])
            values[i].append(att.v_proj(a).view(heads, e))
            k = torch.stack(keys[i][max(0, t - window + 1) :], 1)  # (H, n, E)
            v = torch.stack(values[i][max(0, t - window + 1) :], 1)
            p = torch.softmax((k @ q[:, :, None])[..., 0] / e**0.5, -1)  # (H, n)
            ht = ht + blk.mixer_post_norm(att.o_proj((p[..., None] * v).sum(1).reshape(1, 1, heads * e)))
            gate, up, down = weights[i]
            pa = blk.prime_norm(ht)
            ht = ht + blk.prime_post_norm((F.silu(pa @ gate.T) * (pa @ up.T)) @ down.T)
            ht = ht + blk.mlp_post_norm(blk.mlp(blk.mlp_norm(ht)))
        logits.append(m.lm_head(m.model.norm(ht))[0, 0])
        if (t + 1) % b == 0 and t + 1 < t_len:
            lo = t + 1 - b
            loss = F.cross_entropy(torch.stack(logits[lo:]), x[0, lo + 1 : t + 2])
            flat = [w for layer in weights for w in layer]
            grads = torch.autograd.grad(loss, flat, create_graph=True)
            norm = torch.sqrt(sum((g**2).sum() for g in grads))
            scale = torch.where(norm > c.inner_grad_clip, c.inner_grad_clip / norm, torch.ones_like(norm))
            flat = [w - c.inner_lr * scale * g for w, g in zip(flat, grads)]
            weights = [flat[3 * i : 3 * i + 3] for i in range(len(suffix))]
    return torch.stack(logits)[None]


@pytest.mark.parametrize("fields", [{}, {"inner_lr": 3.0, "inner_grad_clip": 0.05}, {"mini_batch_size": 3}],
                         ids=["paper", "clipped", "b3"])
def test_fast_path_equals_the_per_token_loop(fields):
    """Logits of two rows and the outer gradients (through the inner steps) of one row."""
    m = model(**fields)
    x = tokens()
    with torch.no_grad():
        fast = m(x, use_cache=False).logits
    for r in range(2):
        with torch.enable_grad():
            ref = naive_logits(m, x[r : r + 1]).detach()
        torch.testing.assert_close(fast[r : r + 1], ref, atol=1e-10, rtol=0)
    params = list(m.parameters())
    loss = lm_loss(m, x[:1])
    grads = torch.autograd.grad(loss, params)
    ref_logits = naive_logits(m, x[:1])
    ref_loss = F.cross_entropy(ref_logits[0, :-1], x[0, 1:])
    ref_grads = torch.autograd.grad(ref_loss, params)
    for (name, _), g, r in zip(m.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-8, msg=lambda msg, n=name: f"{n}: {msg}")


def test_inner_steps_change_the_output():
    """The reference comparison above is not vacuous: the steps move the logits after mini-batch 0."""
    x = tokens()
    with torch.no_grad():
        adapted, static = model()(x).logits, model(inner_lr=0.0)(x).logits
    b = SIZES["mini_batch_size"]
    torch.testing.assert_close(adapted[:, :b], static[:, :b], atol=1e-12, rtol=0)  # before any step
    assert (adapted[:, b:] - static[:, b:]).abs().max() > 1e-3


def test_inner_lr_zero_is_the_swa_transformer():
    """ilr = 0 with zero prime output projections: the `transformer` type with QK-norm, post-norms, the
    same window, RoPE base and weights, exactly; and ilr = 0 with any prime weights does not depend
    on the mini-batch size (the segmented pass equals one pass)."""
    e2e = model(inner_lr=0.0)
    with torch.no_grad():
        for blk in e2e.model.layers:
            if blk.prime is not None:
                blk.prime.down_proj.weight.zero_()
    fields = {k: v for k, v in SIZES.items() if k not in ("num_ttt_blocks", "mini_batch_size")}
    swa = tto.get("transformer").model_class(tto.build_config(
        "transformer", **fields, qk_norm=True, post_norm=True, rope_theta=e2e.config.rope_theta)).double().eval()
    missing, unexpected = swa.load_state_dict(e2e.state_dict(), strict=False)
    assert not missing and all(".prime" in k for k in unexpected) and unexpected
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(e2e(x).logits, swa(x).logits, atol=1e-12, rtol=0)
        # the same zeroed model with a non-zero ilr does adapt (so the equality above can fail)
        e2e.config.inner_lr = 1.0
        assert (e2e(x).logits - swa(x).logits).abs().max() > 1e-3
        a, b = model(inner_lr=0.0)(x).logits, model(inner_lr=0.0, mini_batch_size=6)(x).logits
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_loss_of_a_mini_batch_does_not_depend_on_later_mini_batches():
    """Mini-batch i's per-token losses (targets included) are unchanged when every token after its
    last target changes; mini-batch i + 1's change."""
    m = model()
    b = SIZES["mini_batch_size"]
    x = tokens(batch=1, length=17)
    for i in range(3):
        end = (i + 1) * b  # mini-batch i is positions [i b, end); its last target is token `end`
        y = x.clone()
        y[:, end + 1 :] = (y[:, end + 1 :] + 1) % SIZES["vocab_size"]
        with torch.no_grad():
            lx, ly = (F.cross_entropy(m(s).logits[0, :-1], s[0, 1:], reduction="none") for s in (x, y))
        torch.testing.assert_close(lx[:end], ly[:end], atol=1e-12, rtol=0)
        assert (lx[end + 1 : end + 1 + b] - ly[end + 1 : end + 1 + b]).abs().max() > 1e-4


def test_outer_gradients_through_the_inner_steps_equal_finite_differences():
    """Central differences of the training loss (float64, eps 1e-6: error ~1e-10) for entries of a
    prime MLP, an attention in the suffix and one below it, the embedding and the final norm."""
    m = model(inner_lr=2.0)
    x = tokens(batch=2, length=13)
    named = dict(m.named_parameters())
    picks = [("model.layers.2.prime.gate_proj.weight", (3, 5)), ("model.layers.1.prime.down_proj.weight", (2, 7)),
             ("model.layers.2.mixer.q_proj.weight", (1, 4)), ("model.layers.0.mixer.v_proj.weight", (5, 0)),
             ("model.embed_tokens.weight", (int(x[0, 3]), 2)), ("model.norm.weight", (6,))]
    grads = torch.autograd.grad(lm_loss(m, x), [named[n] for n, _ in picks])
    static = model(inner_lr=0.0)
    static_grads = torch.autograd.grad(lm_loss(static, x),
                                       [dict(static.named_parameters())[n] for n, _ in picks])
    eps = 1e-6
    for (name, idx), g, g_static in zip(picks, grads, static_grads):
        p = named[name]
        with torch.no_grad():
            p[idx] += eps
            up = lm_loss(m, x)
            p[idx] -= 2 * eps
            down = lm_loss(m, x)
            p[idx] += eps
        fd = (up - down) / (2 * eps)
        assert abs(g[idx] - fd) < 1e-8 + 1e-6 * abs(fd), f"{name}{idx}: autograd {g[idx]:.10g}, differences {fd:.10g}"
        assert abs(g[idx] - g_static[idx]) > 1e-6, f"{name}{idx}: the inner steps do not enter its gradient"


def test_only_prime_mlps_change():
    """Reading a context leaves every parameter as it was and stores adapted copies of exactly the
    prime MLPs' weights in the cache (per row), which differ from the parameters; with ilr = 0 they
    are the parameters."""
    m = model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = tokens(length=13)
    with torch.no_grad():
        cache = m(x, use_cache=True).past_key_values
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    prime_states = [cache.states[i] for i in m.config.prime_layers]
    for i, state in zip(m.config.prime_layers, prime_states):
        blk = m.model.layers[i]
        for key, param in zip(PRIME_KEYS, (blk.prime.gate_proj, blk.prime.up_proj, blk.prime.down_proj)):
            assert state[key].shape == (2, *param.weight.shape)
            assert (state[key] - param.weight).abs().max() > 1e-4
    adapted = {k for state in cache.states for k in state if k.startswith("prime.")}
    assert adapted == set(PRIME_KEYS)
    static = model(inner_lr=0.0)
    with torch.no_grad():
        cache = static(x, use_cache=True).past_key_values
    blk = static.model.layers[m.config.prime_layers[0]]
    assert torch.equal(cache.states[m.config.prime_layers[0]]["prime.gate_proj"][1], blk.prime.gate_proj.weight)


def test_cached_decoding_of_differently_padded_rows_equals_each_row_alone():
    """Rows whose mini-batches start at different slots (left padding), read in uneven pieces that
    cross mini-batch boundaries, then decoded token by token: each row's logits are those of one
    forward over that row alone."""
    m = model()
    x = tokens(batch=3, length=27)
    pads = [0, 3, 6]
    mask = torch.ones_like(x)
    for r, n in enumerate(pads):
        mask[r, :n] = 0
    cuts = [0, 3, 4, 11, 12, 13, 19, *range(20, 28)]
    with torch.no_grad():
        cache, pieces = None, []
        for a, z in zip(cuts, cuts[1:]):
            out = m(x[:, a:z], attention_mask=mask[:, :z], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            pieces.append(out.logits)
        got = torch.cat(pieces, 1)
        for r, n in enumerate(pads):
            alone = m(x[r : r + 1, n:], use_cache=False).logits[0]
            torch.testing.assert_close(got[r, n:], alone, atol=1e-10, rtol=0)


def test_decoding_between_inner_steps_writes_in_place():
    """A decoded token that ends no mini-batch reads the stored prime weights and joins the cached
    windows and the unfinished mini-batch in place (the same buffers before and after it, the same
    weight tensors); the token that ends a mini-batch steps. Every token's logits are those of a
    forward over the whole sequence."""
    m = model()
    x = tokens(batch=2, length=13)  # b = 4: the token at position 12 starts a mini-batch, 9-11 do not
    suffix = m.model.layers[m.config.prime_layers[0]:]
    with torch.no_grad():
        cache = m(x[:, :9], use_cache=True).past_key_values
        states = cache.states[m.config.prime_layers[0]:]
        buffers = None
        for t in range(9, 13):
            weights = [[state[key] for key in PRIME_KEYS] for state in states]
            logits = m(x[:, t:t + 1], past_key_values=cache, use_cache=True).logits[:, -1]
            torch.testing.assert_close(logits, m(x[:, :t + 1], use_cache=False).logits[:, -1], atol=1e-10, rtol=0)
            after = [state[key].untyped_storage().data_ptr() for state in states for key in ("k", "v")]
            after.append(states[0]["e2e.h"].untyped_storage().data_ptr())
            stepped = [not all(state[key] is w for key, w in zip(PRIME_KEYS, ws)) for state, ws in zip(states, weights)]
            if t in (10, 11):  # the token at 9 moves each window into a buffer with room behind it
                assert after == buffers and stepped == [False] * len(suffix)
            buffers = after
        assert stepped == [True] * len(suffix) and t == 12


def test_generate_adapts_while_decoding():
    """Greedy generate() equals re-running the whole sequence for every new token, and differs from
    generation without inner steps (the prime MLPs step every b tokens of the growing context)."""
    m = model(inner_lr=3.0)
    prompt = tokens(batch=1, length=5)
    with torch.no_grad():
        out = m.generate(prompt, max_new_tokens=14, min_new_tokens=14, do_sample=False)
        seq = prompt
        for _ in range(14):
            seq = torch.cat([seq, m(seq, use_cache=False).logits[:, -1:].argmax(-1)], 1)
        static = model(inner_lr=0.0).generate(prompt, max_new_tokens=14, min_new_tokens=14, do_sample=False)
    assert torch.equal(out, seq)
    assert not torch.equal(out, static)


def test_rematerialisation_gives_the_same_gradients_and_saves_less():
    x = tokens(length=17)

    def run(remat: bool):
        m = model(remat_mini_batches=remat).train()
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = lm_loss(m, x)
        return torch.autograd.grad(loss, list(m.parameters())), sum(saved)

    (with_remat, saved_remat), (without, saved_all) = run(True), run(False)
    for g, r in zip(with_remat, without):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=0)
    assert saved_remat < 0.5 * saved_all


def test_inner_lr_warm_up_follows_the_outer_step():
    """ilr = ilr_init + (ilr - ilr_init) * min(1, (step + 1) / ceil(ratio * max_steps)), as the official
    get_ilr_multiplier; after training, ilr. A model mid-warm-up computes what a model whose
    inner_lr is that value computes."""
    m = model(inner_lr=2.0, inner_lr_init=0.5, inner_lr_warmup_ratio=0.2)
    callback, state = InnerLRWarmup(), TrainerState(max_steps=20)
    seen = []
    for step in range(6):
        state.global_step = step
        callback.on_step_begin(None, state, TrainerControl(), model=m)
        seen.append(m.model.inner_lr_warmup)
    assert seen == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    state.global_step = 1
    callback.on_step_begin(None, state, TrainerControl(), model=m)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(m(x).logits, model(inner_lr=0.5 + 1.5 * 0.5)(x).logits, atol=1e-12, rtol=0)
    callback.on_train_end(None, state, TrainerControl(), model=m)
    assert m.model.inner_lr_warmup == 1.0


@pytest.mark.parametrize("fields,message", [
    (dict(sliding_window=8, mini_batch_size=16), "sliding_window=8 < mini_batch_size=16"),
    (dict(num_ttt_blocks=-1), "'num_ttt_blocks'=-1"),
    (dict(num_ttt_blocks=4, num_hidden_layers=3), "'num_ttt_blocks'=4"),
    (dict(layer_mixers=["ttt_e2e", "ttt_e2e", "transformer"]), "layers \\[2\\] are not"),
    (dict(inner_lr=-1.0), "'inner_lr'=-1.0"),
    (dict(inner_lr_warmup_ratio=1.5), "'inner_lr_warmup_ratio'=1.5"),
    (dict(inner_grad_clip=0.0), "'inner_grad_clip'=0.0"),
])
def test_config_errors_are_one_line_naming_the_fields(fields, message):
    with pytest.raises(ValueError, match=message) as err:
        tto.build_config("ttt_e2e", **{**SIZES, **fields})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("size", sorted(TRANSFORMER_INTERMEDIATE))
def test_presets_pay_for_the_prime_mlps(size):
    """Each preset's reduced intermediate size gives about the parameters of the paper's full-attention
    baseline of that size (the same config with the baseline's intermediate size, no prime MLPs)."""
    fields = dict(TTT_E2E_PRESETS[size])
    with torch.device("meta"):
        e2e = tto.get("ttt_e2e").model_class(tto.build_config("ttt_e2e", **fields))
        base = {k: v for k, v in fields.items() if k != "num_ttt_blocks"}
        fa = tto.get("transformer").model_class(tto.build_config(
            "transformer", **{**base, "intermediate_size": TRANSFORMER_INTERMEDIATE[size]}))
    non_embedding = lambda mod: sum(p.numel() for p in mod.parameters()) - mod.model.embed_tokens.weight.numel()  # noqa: E731
    assert abs(non_embedding(e2e) / non_embedding(fa) - 1) < 0.03
    assert len(e2e.config.prime_layers) == fields["num_ttt_blocks"]


def test_transformer_qk_norm_normalises_each_head_of_q_and_k():
    """With qk_norm the logits do not change when q_proj and k_proj are scaled (RMSNorm per head
    removes the scale; eps 1e-12); without it they do."""
    fields = {k: v for k, v in SIZES.items() if k not in ("num_ttt_blocks", "mini_batch_size")}
    x = tokens()
    for qk_norm in (True, False):
        torch.manual_seed(0)
        m = tto.get("transformer").model_class(tto.build_config("transformer", **fields, qk_norm=qk_norm)).double().eval()
        assert isinstance(m.model.layers[0].mixer.q_norm, torch.nn.RMSNorm) == qk_norm
        with torch.no_grad():
            a = m(x).logits
            for blk in m.model.layers:
                blk.mixer.q_proj.weight.mul_(7.0)
                blk.mixer.k_proj.weight.mul_(0.3)
            b = m(x).logits
        if qk_norm:
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
        else:  # float64: any change beyond rounding (~1e-15) shows
            assert (a - b).abs().max() > 1e-5


def test_retrofit_adds_prime_mlps_that_leave_the_pretrained_model_unchanged_until_they_step():
    """tto.retrofit(llama, type="ttt_e2e"): the last quarter of the blocks get prime MLPs with a zero
    output projection beside the pretrained attention and MLPs, so the first mini-batch's logits are
    the Llama's; from the second on the prime MLPs have stepped and the logits move."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()
    e2e = tto.retrofit(llama, type="ttt_e2e", mini_batch_size=4, inner_lr=3.0).eval()
    assert e2e.config.prime_layers == (3,) and not e2e.config.post_norm and not e2e.config.qk_norm
    x = torch.randint(0, 64, (2, 14), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        source, got = llama(x).logits, e2e(x).logits
        static = tto.retrofit(llama, type="ttt_e2e", mini_batch_size=4, inner_lr=0.0).eval()(x).logits
    torch.testing.assert_close(static, source, atol=1e-5, rtol=0)
    torch.testing.assert_close(got[:, :4], source[:, :4], atol=1e-5, rtol=0)
    assert (got[:, 4:] - source[:, 4:]).abs().max() > 1e-3


def test_adapted_weights_stay_float32_under_bf16_autocast():
    """The prime weights step and are cached in float32 while the model computes in bf16."""
    m = model().float()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cache = m(tokens(), use_cache=True).past_key_values
    adapted = [state[key] for i in m.config.prime_layers for state in [cache.states[i]] for key in PRIME_KEYS]
    assert adapted and all(w.dtype == torch.float32 for w in adapted)
    assert (adapted[0][0] - m.model.layers[m.config.prime_layers[0]].prime.gate_proj.weight).abs().max() > 1e-4


def test_prime_mlps_stay_float32_when_the_model_is_cast_to_bf16(tmp_path):
    """A bf16 cast (and a bf16 load) keeps the prime MLPs, the inner loop's initial weights, float32
    and unrounded like every memory's parameters; the weights they adapt to are float32 too."""
    m = model().float()
    m.save_pretrained(tmp_path)
    initial = {n: p.detach().clone() for n, p in m.named_parameters() if ".prime." in n}
    assert len(initial) == 3 * len(m.config.prime_layers)
    loaded = tto.get("ttt_e2e").model_class.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    for cast in (m.to(torch.bfloat16), loaded):
        for n, p in cast.named_parameters():
            assert p.dtype == (torch.float32 if n in initial else torch.bfloat16), n
            if n in initial:
                assert torch.equal(p, initial[n]), n  # never rounded through bf16
        with torch.no_grad():
            out = cast(tokens(), use_cache=True)
        assert out.logits.dtype == torch.bfloat16 and bool(torch.isfinite(out.logits).all())
        adapted = [out.past_key_values.states[i][key] for i in m.config.prime_layers for key in PRIME_KEYS]
        assert all(w.dtype == torch.float32 for w in adapted)
        # they stepped (by more than bf16 could resolve on these weights: 2^-8 of their scale)
        first = cast.model.layers[m.config.prime_layers[0]].prime.gate_proj.weight
        assert (adapted[0][0] - first).abs().max() > first.abs().max() / 2**8
