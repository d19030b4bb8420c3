"""DESIGN.md section 4: the invariants every registered type and variant must pass.

Parametrized from the registry: a new entry is tested by registering it (with a ``tiny`` preset
for any of its own fields that must be small). Every variant runs; so does every preset named
``tiny-*`` (an entry's way to put other wirings, e.g. TTT's Mamba backbone, under the same
invariants), and each type runs as a hybrid with another registered type's layer below it.

Tolerances: the models are tiny and fp32; two mathematically equal evaluation orders agree to
~1e-6 on logits of scale ~1, so 2e-5 (absolute) separates rounding from bugs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import tto
from tto.engine import ChunkwiseMemory, Float32Parameters
from tto.reference import reference_mode

ATOL = 2e-5
SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
LENGTH = 13  # not a multiple of any tiny chunk size


def _cases():
    cases = []
    for name, entry in ((n, tto.get(n)) for n in tto.available()):
        for variant, fields in entry.variant_configs():
            cases.append(pytest.param(name, fields, id=f"{name}-{variant}" if variant else name))
        for preset, fields in entry.presets.items():
            if preset.startswith("tiny-"):
                cases.append(pytest.param(name, fields, id=f"{name}-{preset}"))
        variant, fields = entry.variant_configs()[0]
        partner = hybrid_partner(name)
        fields = {**fields, "layer_mixers": [partner, name], "mixer_fields": {partner: tiny(partner)}}
        cases.append(pytest.param(name, fields, id=f"{name}-{variant or ''}-{partner}-hybrid"))
    return cases


def tiny(name: str) -> dict:
    """A type's own fields of its tiny preset (backbone fields left out)."""
    backbone = tto.TTOConfig.field_names()
    return {k: v for k, v in tto.get(name).presets.get("tiny", {}).items() if k not in backbone}


def hybrid_partner(name: str) -> str:
    """The layer below `name` in its hybrid case: the next registered type (cyclically) that can be a
    layer of another type's model, so that every such type is some case's partner."""
    names = list(tto.available())
    for offset in range(1, len(names)):
        partner = names[(names.index(name) + offset) % len(names)]
        if not tto.build_config(partner, num_hidden_layers=1).prime_layers:
            return partner
    raise AssertionError("no type can be a hybrid partner")


CASES = _cases()


def build(name: str, fields: dict, seed: int = 0, **extra):
    entry = tto.get(name)
    values = {**SIZES, **entry.presets.get("tiny", {}), **fields, **extra}
    torch.manual_seed(seed)
    return entry.model_class(tto.build_config(name, **values)).eval()


def has_memory(model) -> bool:
    return any(isinstance(m, ChunkwiseMemory) for m in model.modules())


def tokens(batch=2, length=LENGTH, seed=1):
    return torch.randint(0, SIZES["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_every_parameter_has_a_gradient(model) -> None:
    """After a backward: every parameter got a finite, non-zero gradient."""
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} gets no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{pname} gets a zero gradient"


def assert_matches_reference(model, inputs, labels) -> None:
    """A float64 `model`'s logits and its loss's parameter gradients equal those of the engines' naive
    references (:func:`tto.reference.reference_mode`) to 1e-10."""
    out = model(inputs, labels=labels)
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    with reference_mode():
        ref = model(inputs, labels=labels)
        ref_grads = torch.autograd.grad(ref.loss, list(model.parameters()))
    assert out.logits.dtype == torch.float64
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-10, rtol=0)
    for (pname, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-8, msg=lambda m, p=pname: f"{p}: {m}")


def assert_roundtrip(model, auto_class, inputs, tmp_path) -> None:
    """`model` saved and loaded through `auto_class` is its class with bit-identical weights and the
    same outputs on `inputs`."""
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = auto_class.from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    for (name_, p), q in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(p, q), name_
    with torch.no_grad():  # equal weights; kernels may round differently on differently aligned storage
        torch.testing.assert_close(loaded(inputs).logits, model(inputs).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name,fields", CASES)
def test_causality(name, fields):
    model = build(name, fields)
    x = tokens()
    cut = 6
    y = x.clone()
    y[:, cut:] = torch.randint(0, SIZES["vocab_size"], y[:, cut:].shape)
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :cut], b[:, :cut], atol=ATOL, rtol=0)
    assert (a[:, cut:] - b[:, cut:]).abs().max() > 1e-3  # the perturbation is visible after the cut


@pytest.mark.parametrize("name,fields", CASES)
def test_fast_path_matches_reference(name, fields):
    """Logits and parameter gradients of the fast path equal the naive per-token references, in
    float64: the two are the same math in different orders, so they agree to ~1e-14; float32 would
    blur that with rounding that some updates amplify (Muon's Newton-Schulz polynomial, l_q norms)."""
    model = build(name, fields).train().double()
    x = tokens()
    assert_matches_reference(model, x, x)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name,fields", CASES)
def test_padding(name, fields, side):
    """A padded row gives, at its real tokens, the logits of the same tokens unpadded."""
    model = build(name, fields)
    x = tokens()
    real = 8
    short = x[1, :real]
    padded = x.clone()
    mask = torch.ones_like(x)
    if side == "left":
        padded[1, : LENGTH - real], padded[1, LENGTH - real :] = 0, short
        mask[1, : LENGTH - real] = 0
    else:
        padded[1, real:] = 0
        mask[1, real:] = 0
    with torch.no_grad():
        batch = model(padded, attention_mask=mask).logits
        alone = model(short[None]).logits[0]
        full_row = model(x[:1]).logits[0]
    got = batch[1, LENGTH - real :] if side == "left" else batch[1, :real]
    torch.testing.assert_close(got, alone, atol=ATOL, rtol=0)
    torch.testing.assert_close(batch[0], full_row, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name,fields", CASES)
def test_cached_decode_matches_full_forward(name, fields):
    """Prefill, then pieces crossing chunk boundaries and single tokens, with the cache, give the
    logits of one forward over the whole sequence."""
    model = build(name, fields)
    x = tokens()
    with torch.no_grad():
        full = model(x, use_cache=False).logits
        cache, pieces = None, []
        for a, b in [(0, 5), (5, 9), *[(t, t + 1) for t in range(9, LENGTH)]]:
            out = model(x[:, a:b], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            pieces.append(out.logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=ATOL, rtol=0)
    assert cache.get_seq_length() == LENGTH


@pytest.mark.parametrize("name,fields", CASES)
def test_a_deep_copied_cache_decodes_on_its_own(name, fields):
    """A cache copied with ``copy.deepcopy`` after a prefill, then it and the original decoded token by
    token with different tokens, alternately: each gives the logits of one forward over its own
    sequence (states grow in place in their buffers; a copy has its own)."""
    model = build(name, fields)
    x, other = tokens(), tokens(seed=2)
    y = torch.cat([x[:, :6], other[:, 6:]], 1)
    with torch.no_grad():
        cache = model(x[:, :6], use_cache=True).past_key_values
        twin = copy.deepcopy(cache)
        outs = [], []
        for t in range(6, LENGTH):
            outs[0].append(model(x[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
            outs[1].append(model(y[:, t:t + 1], past_key_values=twin, use_cache=True).logits)
        full_x, full_y = model(x, use_cache=False).logits, model(y, use_cache=False).logits
    torch.testing.assert_close(torch.cat(outs[0], 1), full_x[:, 6:], atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.cat(outs[1], 1), full_y[:, 6:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name,fields", CASES)
def test_generate_with_cache_equals_recompute(name, fields):
    model = build(name, fields)
    prompt = tokens(length=7)
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=9, do_sample=False, min_new_tokens=9)
        seq = prompt
        for _ in range(9):
            logits = model(seq, use_cache=False).logits[:, -1]
            if model.config.eos_token_id is not None:  # min_new_tokens: generate never picks EOS before the last token
                logits[:, model.config.eos_token_id] = -torch.inf
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(cached, seq)


@pytest.mark.parametrize("name,fields", CASES)
def test_left_padded_batch_generate(name, fields):
    """Batched generation with left padding gives each row the tokens it gets alone."""
    model = build(name, fields)
    x = tokens(length=9)
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    x[1, :3] = 0
    with torch.no_grad():
        both = model.generate(x, attention_mask=mask, max_new_tokens=6, do_sample=False, min_new_tokens=6)
        alone = model.generate(x[1:, 3:], max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert torch.equal(both[1, 9:], alone[0, 6:])


@pytest.mark.parametrize("name,fields", CASES)
def test_gradients_reach_every_parameter(name, fields):
    model = build(name, fields).train()
    x = tokens()
    model(x, labels=x).loss.backward()
    assert_every_parameter_has_a_gradient(model)


@pytest.mark.parametrize("name,fields", CASES)
def test_save_load_roundtrip(name, fields, tmp_path):
    assert_roundtrip(build(name, fields), AutoModelForCausalLM, tokens(), tmp_path)


@pytest.mark.parametrize("name,fields", [c for c in CASES if has_memory(build(c.values[0], c.values[1]))])
def test_inner_state_stays_float32_under_bf16(name, fields):
    model = build(name, fields)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cache = model(tokens(), use_cache=True).past_key_values
    fast_weights = [t for state in cache.states for key, t in state.items() if ".W." in key or ".S." in key]
    assert fast_weights, "a memory model must keep fast weights in its cache"
    assert all(t.dtype == torch.float32 for t in fast_weights)


@pytest.mark.parametrize("name,fields", CASES)
def test_deterministic_under_seed(name, fields):
    a, b = build(name, fields, seed=5), build(name, fields, seed=5)
    x = tokens()
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)
    c = build(name, fields, seed=6)
    with torch.no_grad():
        assert not torch.equal(a(x).logits, c(x).logits)


@pytest.mark.parametrize("name,fields", CASES)
def test_batch_rows_are_independent(name, fields):
    model = build(name, fields)
    x = tokens(batch=3)
    with torch.no_grad():
        batch = model(x).logits
        for i in range(3):
            torch.testing.assert_close(batch[i], model(x[i : i + 1]).logits[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(tto.available()))
@pytest.mark.parametrize("check", [True, False])
def test_nonfinite_layer_output_is_named(name, check):
    """DESIGN section 7: NaN/Inf in a layer (e.g. a diverged inner loop) is an error naming the layer."""
    model = build(name, tto.get(name).variant_configs()[0][1], check_finite=check)
    with torch.no_grad():
        for p in model.model.layers[1].mixer.parameters():
            p.fill_(float("nan"))
        if check:
            with pytest.raises(FloatingPointError, match=rf"layer 1 \({name}\)"):
                model(tokens())
        else:
            assert model(tokens()).logits.isnan().all()


@pytest.mark.parametrize("name", list(tto.available()))
def test_config_errors_name_the_problem(name):
    entry = tto.get(name)
    field = sorted(entry.config_class.field_names())[0]
    with pytest.raises(ValueError, match=f"did you mean '{field}'"):
        tto.build_config(name, **{field + "x": 1})
    with pytest.raises(ValueError, match="hidden_size"):
        tto.build_config(name, hidden_size=0)
    with pytest.raises(ValueError, match="num_attention_heads"):
        tto.build_config(name, hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="layer_mixers"):
        tto.build_config(name, num_hidden_layers=2, layer_mixers=["transformer", "nope"])
    if entry.variants:
        with pytest.raises(ValueError, match=str(list(sorted(entry.variants)))[1:-1].split(",")[0]):
            tto.build_config(name, variant=entry.variants[0] + "z")


def test_unknown_type_suggests_and_lists():
    with pytest.raises(ValueError, match="did you mean 'transformer'.*registered types"):
        tto.build_config("transfomer")


def test_available_lists_every_registered_variant():
    avail = tto.available()
    assert "transformer" in avail
    for name, variants in avail.items():
        entry = tto.get(name)
        assert variants == entry.variants
        assert entry.config_class.model_type == f"tto_{name}"
        assert entry.paper, f"{name} must cite its paper"


#: one type per memory engine (compiling takes seconds per graph, so not every entry): Titans MAC
#: (the dual-form scan with momentum, forgetting and chunk-start reads), DeltaNet (the delta rule),
#: LaCT (large chunks with Muon and weight norm)
COMPILED = {"titans": {"variant": "mac"}, "deltanet": {}, "lact": {}}


def test_compiled_cases_cover_every_memory_engine():
    """Every engine on the shared base (found by subclassing, not listed) has a compiled case."""
    engines = {type(m) for name, fields in COMPILED.items() for m in build(name, fields).modules()
               if isinstance(m, ChunkwiseMemory)}
    assert engines == set(ChunkwiseMemory.__subclasses__())


@pytest.mark.parametrize("name", list(COMPILED))
def test_compiled_inner_step_matches_eager(name):
    """compile_inner_step changes how the chunk steps run, not what they compute: the same loss and
    gradients in training (left padding included), the same logits when decoding from a cache."""
    eager = build(name, COMPILED[name]).train()
    compiled = build(name, COMPILED[name], compile_inner_step=True).train()
    compiled.load_state_dict(eager.state_dict())
    x = tokens()
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    losses = [m(x, attention_mask=mask, labels=x).loss for m in (eager, compiled)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], atol=ATOL, rtol=0)
    for (n, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=ATOL, rtol=0, msg=n)
    with torch.no_grad():
        logits = []
        for model in (eager.eval(), compiled.eval()):
            out = model(x[:, :9], use_cache=True)
            steps = [out.logits]
            for t in range(9, LENGTH):
                out = model(x[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
                steps.append(out.logits)
            logits.append(torch.cat(steps, 1))
    torch.testing.assert_close(logits[1], logits[0], atol=ATOL, rtol=0)


def test_compile_inner_step_needs_a_memory():
    with pytest.raises(ValueError, match="compile_inner_step.*no layer of this model has a memory"):
        build("transformer", {}, compile_inner_step=True)


# ---------------------------------------------------------------------------- image types
# The image types (task "image-classification") read a whole image at once, with no causality, cache
# or padding: they get the invariants that apply to a bidirectional classifier instead.

#: initializer_range 1: projections whose inner gradients have norms ~1, where the nonlinear parts of
#: the inner steps (ViT³'s g / (||g|| + 1)) matter
IMAGE_SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, initializer_range=1.0)


def _image_cases():
    cases = []
    for name, entry in ((n, tto.get(n)) for n in tto.available("image-classification")):
        for variant, fields in entry.variant_configs():
            cases.append(pytest.param(name, fields, id=f"{name}-{variant}" if variant else name))
        for preset, fields in entry.presets.items():
            if preset.startswith("tiny-"):
                cases.append(pytest.param(name, fields, id=f"{name}-{preset}"))
    return cases


IMAGE_CASES = _image_cases()


def build_image(name: str, fields: dict, seed: int = 0, **extra):
    entry = tto.get(name)
    torch.manual_seed(seed)
    return entry.model_class(tto.build_config(name, **{**entry.presets["tiny"], **IMAGE_SIZES, **fields, **extra})).eval()


def images(model, batch=2, seed=1):
    """Random pixel values and labels for `model`'s input size."""
    c, gen = model.config, torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, c.num_channels, c.image_size, c.image_size, generator=gen)
    return pixels, torch.randint(0, c.num_labels, (batch,), generator=gen)


@pytest.mark.parametrize("name,fields", IMAGE_CASES)
def test_image_fast_path_matches_reference(name, fields):
    """As for the language models: logits and parameter gradients of the fast path equal the naive
    per-token references, in float64."""
    model = build_image(name, fields).train().double()
    pixels, labels = images(model)
    pixels = pixels.double()
    assert_matches_reference(model, pixels, labels)


@pytest.mark.parametrize("name,fields", IMAGE_CASES)
def test_image_gradients_reach_every_parameter(name, fields):
    model = build_image(name, fields).train()
    pixels, labels = images(model)
    model(pixels, labels=labels).loss.backward()
    assert_every_parameter_has_a_gradient(model)


@pytest.mark.parametrize("name,fields", IMAGE_CASES)
def test_image_save_load_roundtrip(name, fields, tmp_path):
    from transformers import AutoModelForImageClassification

    model = build_image(name, fields)
    assert_roundtrip(model, AutoModelForImageClassification, images(model)[0], tmp_path)


@pytest.mark.parametrize("name,fields", [c for c in IMAGE_CASES if any(
    isinstance(m, Float32Parameters) for m in build_image(c.values[0], c.values[1]).modules())])
def test_image_inner_arithmetic_stays_float32_under_bf16(name, fields):
    """Under bf16 autocast every memory that runs computes (and returns) float32, and a bf16 cast of the
    model keeps the memories' parameters float32. (A memory can be read without running: the
    self-modifying Titans' projection memories, read at their initial weights in a non-causal call,
    whose commit nothing would read.)"""
    model = build_image(name, fields)
    memories = [m for m in model.modules() if isinstance(m, Float32Parameters)]
    dtypes = []
    hooks = [m.register_forward_hook(lambda mod, args, out: dtypes.append(out.dtype)) for m in memories]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(images(model)[0])
    for hook in hooks:
        hook.remove()
    assert dtypes and set(dtypes) == {torch.float32}, dtypes
    model = model.to(torch.bfloat16)
    assert all(p.dtype == torch.float32 for m in memories for p in m.parameters())


@pytest.mark.parametrize("name,fields", IMAGE_CASES)
def test_image_deterministic_under_seed(name, fields):
    a, b, c = build_image(name, fields, seed=5), build_image(name, fields, seed=5), build_image(name, fields, seed=6)
    pixels, _ = images(a)
    with torch.no_grad():
        assert torch.equal(a(pixels).logits, b(pixels).logits)
        assert not torch.equal(a(pixels).logits, c(pixels).logits)


@pytest.mark.parametrize("name,fields", IMAGE_CASES)
def test_image_batch_rows_are_independent(name, fields):
    model = build_image(name, fields)
    pixels, _ = images(model, batch=3)
    with torch.no_grad():
        batch = model(pixels).logits
        for i in range(3):
            torch.testing.assert_close(batch[i], model(pixels[i: i + 1]).logits[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(tto.available("image-classification")))
def test_image_nonfinite_layer_output_is_named(name):
    model = build_image(name, {})
    with torch.no_grad():
        for p in model.model.layers[1].mixer.parameters():
            p.fill_(float("nan"))
        with pytest.raises(FloatingPointError, match=rf"layer 1 \({name}\)"):
            model(images(model)[0])
