"""TTT-specific checks the generic suite cannot see: the presets' sizes and the conversion of
the official reference's checkpoints."""

from __future__ import annotations

import pytest
import torch

import tto


def reference_parameter_count(hidden, intermediate, layers, heads, layer_type, vocab=32000, mini_batch=16,
                              share_qk=False, use_gate=False, pre_conv=False, kernel=4):
    """Parameters of the official TTTForCausalLM (tied embeddings), counted from its module list."""
    f = hidden // heads
    inner = f * (4 if layer_type == "mlp" else 1)
    proj = (3 if share_qk else 4) * hidden * hidden + (2 * (hidden * kernel + hidden) if share_qk else 0)
    fast = heads * (f * inner + inner) + (heads * (inner * f + f) if layer_type == "mlp" else 0)
    per_layer = (proj + heads * hidden + heads + mini_batch + 2 * hidden + fast + 2 * hidden
                 + (hidden * hidden if use_gate else 0) + 2 * hidden + 3 * hidden * intermediate
                 + (hidden + hidden * kernel + hidden if pre_conv else 0))
    return vocab * hidden + layers * per_layer + hidden


@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
@pytest.mark.parametrize("preset", ["125m", "350m", "760m", "1b"])
def test_presets_have_the_reference_sizes(preset, layer_type):
    cfg = tto.build_config("ttt", preset=preset, ttt_layer_type=layer_type)
    with torch.device("meta"):
        model = tto.get("ttt").model_class(cfg)
    fields = tto.get("ttt").presets[preset]
    expect = reference_parameter_count(fields["hidden_size"], fields["intermediate_size"],
                                       fields["num_hidden_layers"], fields["num_attention_heads"], layer_type)
    assert sum(p.numel() for p in model.parameters()) == expect


def test_mamba_backbone_size_matches_reference():
    cfg = tto.build_config("ttt", preset="125m", share_qk=True, use_gate=True, pre_conv=True)
    with torch.device("meta"):
        model = tto.get("ttt").model_class(cfg)
    expect = reference_parameter_count(768, 2048, 12, 12, "linear", share_qk=True, use_gate=True, pre_conv=True)
    assert sum(p.numel() for p in model.parameters()) == expect


def reference_state_dict(cfg) -> dict[str, torch.Tensor]:
    """Random tensors under the official model's keys and shapes (as its modules declare them)."""
    w, heads = cfg.hidden_size, cfg.num_attention_heads
    f = w // heads
    inner = f * (4 if cfg.ttt_layer_type == "mlp" else 1)
    g = torch.Generator().manual_seed(0)
    sd = {"model.embed_tokens.weight": (cfg.vocab_size, w), "model.norm.weight": (w,)}
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"model.layers.{i}.seq_modeling_block."
        sd.update({p + "seq_norm.weight": (w,), p + "ffn_norm.weight": (w,),
                   p + "mlp.gate_proj.weight": (cfg.intermediate_size, w), p + "mlp.up_proj.weight": (cfg.intermediate_size, w),
                   p + "mlp.down_proj.weight": (w, cfg.intermediate_size),
                   b + "q_proj.weight": (w, w), b + "v_proj.weight": (w, w), b + "o_proj.weight": (w, w),
                   b + "learnable_token_idx": (cfg.mini_batch_size,), b + "learnable_ttt_lr_weight": (heads, 1, w),
                   b + "learnable_ttt_lr_bias": (heads, 1), b + "ttt_norm_weight": (heads, f), b + "ttt_norm_bias": (heads, f),
                   b + "post_norm.weight": (w,), b + "post_norm.bias": (w,), b + "W1": (heads, f, inner), b + "b1": (heads, 1, inner)})
        if cfg.ttt_layer_type == "mlp":
            sd.update({b + "W2": (heads, inner, f), b + "b2": (heads, 1, f)})
        if cfg.share_qk:
            sd.update({b + "conv_q.weight": (w, 1, cfg.conv_kernel), b + "conv_q.bias": (w,),
                       b + "conv_k.weight": (w, 1, cfg.conv_kernel), b + "conv_k.bias": (w,)})
        else:
            sd[b + "k_proj.weight"] = (w, w)
        if cfg.use_gate:
            sd[b + "g_proj.weight"] = (w, w)
        if cfg.pre_conv:
            sd.update({p + "conv.norm.weight": (w,), p + "conv.conv.weight": (w, 1, cfg.conv_kernel),
                       p + "conv.conv.bias": (w,)})
    out = {k: torch.randn(shape, generator=g) for k, shape in sd.items()}
    out["model.layers.0.seq_modeling_block.token_idx"] = torch.ones(cfg.mini_batch_size)  # a buffer, ignored
    return out


@pytest.mark.parametrize("fields", [dict(ttt_layer_type="linear"),
                                    dict(ttt_layer_type="mlp", share_qk=True, use_gate=True, pre_conv=True)])
def test_convert_official_checkpoint_loads_exactly(fields):
    cfg = tto.build_config("ttt", vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, mini_batch_size=4, **fields)
    model = tto.get("ttt").model_class(cfg)
    ref = reference_state_dict(cfg)
    converted = tto.convert_official_ttt(ref)
    result = model.load_state_dict(converted, strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys == ["lm_head.weight"]  # tied to the embeddings
    mixer = model.model.layers[1].mixer
    lr_weight = ref["model.layers.1.seq_modeling_block.learnable_ttt_lr_weight"]
    assert torch.equal(mixer.lr_gate_weight, lr_weight[:, 0, :])
    assert torch.equal(mixer.memory.fast.W1, ref["model.layers.1.seq_modeling_block.W1"])
    assert torch.equal(model.lm_head.weight, ref["model.embed_tokens.weight"])


def test_convert_rejects_unknown_keys():
    with pytest.raises(ValueError, match="model.layers.0.mystery"):
        tto.convert_official_ttt({"model.layers.0.mystery": torch.zeros(1)})


#: config.json as the official TTTConfig (ttt-lm-pytorch, copied by the original TTO code) saves it:
#: every argument of its __init__ under its own name, plus the file's bookkeeping
def official_config_json(**fields) -> dict:
    config = dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  hidden_act="silu", max_position_embeddings=2048, initializer_range=0.02, rms_norm_eps=1e-6,
                  use_cache=False, pad_token_id=None, bos_token_id=1, eos_token_id=2, pretraining_tp=1,
                  tie_word_embeddings=True, rope_theta=10000.0, use_gate=False, share_qk=False,
                  ttt_layer_type="linear", ttt_base_lr=1.0, mini_batch_size=4, pre_conv=False, conv_kernel=4,
                  scan_checkpoint_group_size=0)
    config.update(fields)
    return {**config, "model_type": "ttt", "architectures": ["TTTForCausalLM"], "torch_dtype": "float32",
            "transformers_version": "4.40.0"}


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
@pytest.mark.parametrize("fields", [dict(ttt_layer_type="linear"),
                                    dict(ttt_layer_type="mlp", share_qk=True, use_gate=True, pre_conv=True,
                                         ttt_base_lr=0.1)])
def test_official_checkpoint_loads_with_auto_classes(tmp_path, weights, fields):
    import json

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    config = official_config_json(**fields)
    (tmp_path / "config.json").write_text(json.dumps(config))
    expected_cfg = tto.build_config("ttt", **{k: v for k, v in config.items() if k in tto.TTTConfig.field_names()})
    ref = reference_state_dict(expected_cfg)
    ref.pop("model.layers.0.seq_modeling_block.token_idx")  # non-persistent in the reference: never saved
    (save_file if weights.endswith(".safetensors") else torch.save)(ref, tmp_path / weights)

    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(model) is tto.TTTForCausalLM and not model.training
    assert model.config.ttt_base_lr == fields.get("ttt_base_lr", 1.0) and model.config.model_type == "tto_ttt"
    expected = tto.TTTForCausalLM(expected_cfg)
    expected.load_state_dict(tto.convert_official_ttt(ref), strict=False)
    ids = torch.randint(0, 50, (1, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected.eval()(ids).logits)
    assert torch.equal(model.model.layers[1].mixer.memory.fast.W1, ref["model.layers.1.seq_modeling_block.W1"])


def test_official_checkpoint_with_an_unknown_field_names_it(tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    (tmp_path / "config.json").write_text(json.dumps(official_config_json(ttt_mystery=1)))
    with pytest.raises(ValueError, match="ttt_mystery"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
