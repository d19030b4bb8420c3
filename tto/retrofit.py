"""Retrofit: a pretrained Llama-family model whose chosen layers read with a registered memory.

    from transformers import AutoModelForCausalLM
    import tto

    llama = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
    model = tto.retrofit(llama, type="ttt", layers="last_quarter", ttt_layer_type="mlp")

The result is a tto model of `type` (the generic backbone, ``layer_mixers`` = `type` at `layers`
and ``transformer`` elsewhere) built from the pretrained config (:func:`backbone_fields`) and
holding every pretrained weight: embeddings, norms, MLPs, LM head and the attention layers that
stay. At each retrofitted layer the mixer's projections start from that layer's attention as the
type's registry entry declares (:class:`tto.registry.FromAttention`, next to each mixer: which
modules, how many heads, how its RoPE pairs the rows); the rest of the mixer starts from the
type's init. ``layers=[]`` is the original model, as a tto model (and ``sliding_window=N`` gives
it a sliding window).

With ``mlp_type`` "cms" (HOPE's default; a backbone field, so every block's MLP, the attention
layers' too) each block's pretrained MLP becomes its Continuum Memory System
(:mod:`tto.layers.cms`): every level starts from it (:meth:`~tto.layers.cms.ContinuumMemory.start_from`,
the paper's initialisation of CMS levels from pretrained MLP blocks), and unless ``cms_periods`` is
given the chain is one never-updated level, the pretrained MLP itself, so the retrofit keeps the
source's function (a Transformer is the CMS of one level of frequency 0). ``cms_periods=[C]`` makes
that level learn in context: it is the pretrained MLP until its first update, after C tokens.
More levels depart from the source from the start: the chain composes them without residuals, so
k levels compute the pretrained MLP k times (retrofit warns).

Sources: Llama, SmolLM, Mistral, Qwen2 (q/k/v biases; the o projection gets a zero bias) and Qwen3
configs whose every layer is plain RoPE attention; anything tto cannot represent (RoPE scaling,
partial rotary, per-layer windows, q/k norms) is refused in one line before any weight is made.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import registry
from .config import TTOConfig, suggest

logger = logging.getLogger(__name__)

#: model types of the sources: Llama-style blocks (pre-norm, RoPE attention, SwiGLU MLP)
SOURCE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
#: model types whose q/k/v projections always have biases (their configs have no attention_bias)
QKV_BIAS_MODEL_TYPES = ("qwen2",)
#: backbone fields read from the source config under the same name
SAME_NAME_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "max_position_embeddings", "hidden_act", "rms_norm_eps",
                    "initializer_range", "tie_word_embeddings", "pad_token_id", "bos_token_id", "eos_token_id")
#: named layer choices: number of layers -> layer indices
LAYER_CHOICES: dict[str, Callable[[int], list[int]]] = {
    "last_quarter": lambda n: list(range(n - n // 4, n)),  # 30 layers: 23..29 (the seed's "top 8 of 32")
    "last_half": lambda n: list(range(n - n // 2, n)),
    "all": lambda n: list(range(n)),
}

# source key -> tto key of the weights outside the attention; per-layer keys have the layer in group 1
_BACKBONE_RULES = [
    (r"model\.embed_tokens\.weight", "model.embed_tokens.weight"),
    (r"model\.norm\.weight", "model.norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", "model.layers.{}.mixer_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "model.layers.{}.mlp_norm.weight"),
    (r"model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.(weight|bias)", "model.layers.{}.mlp.{}.{}"),
]
_ATTENTION_KEY = re.compile(r"model\.layers\.(\d+)\.self_attn\.(\w+)\.(weight|bias)")
_MLP_KEY = re.compile(r"model\.layers\.(\d+)\.mlp\.\w+\.(weight|bias)")


def _refuse(problem: str) -> ValueError:
    return ValueError(f"retrofit: {problem}")


def backbone_fields(source) -> dict[str, Any]:
    """tto backbone fields equal to the pretrained config `source` (a Transformers config).

    ValueError naming what tto cannot represent: another architecture, RoPE scaling or partial
    rotary, sliding windows on some layers only, per-head q/k norms.
    """
    kind = getattr(source, "model_type", None)
    if kind not in SOURCE_MODEL_TYPES:
        raise _refuse(f"model type {kind!r} is not a supported Llama-family model; supported: {list(SOURCE_MODEL_TYPES)}")
    rope = getattr(source, "rope_parameters", None) or {"rope_type": "default", "rope_theta": source.rope_theta}
    if rope.get("rope_type", "default") != "default":
        raise _refuse(f"rope_type {rope['rope_type']!r} (RoPE scaling) is not supported by tto's RoPE; supported: ['default']")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise _refuse(f"partial_rotary_factor={rope['partial_rotary_factor']} is not supported (tto rotates whole heads)")
    layer_types = getattr(source, "layer_types", None)
    kinds = set(layer_types or ["full_attention"])
    if not kinds <= {"full_attention", "sliding_attention"} or len(kinds) > 1:
        raise _refuse(f"layer_types {sorted(kinds)}: tto gives every attention layer the same span (all full or all sliding)")
    if kind == "qwen3":
        raise _refuse("Qwen3's per-head q/k RMSNorm has no field in tto's attention yet")
    fields = {name: getattr(source, name) for name in SAME_NAME_FIELDS if getattr(source, name, None) is not None}
    fields["head_dim"] = getattr(source, "head_dim", None) or source.hidden_size // source.num_attention_heads
    fields["rope_theta"] = float(rope["rope_theta"])
    fields["mlp_bias"] = bool(getattr(source, "mlp_bias", False))
    # a bias the source lacks (Qwen2's o projection) is set to zero, its value there
    fields["attention_bias"] = bool(getattr(source, "attention_bias", kind in QKV_BIAS_MODEL_TYPES))
    # Mistral windows every layer when sliding_window is set; configs with layer_types say which do
    window = getattr(source, "sliding_window", None)
    fields["sliding_window"] = window if layer_types is None or "sliding_attention" in kinds else None
    fields["post_norm"] = fields["qk_norm"] = False  # Llama-family blocks: pre-norm only, no q/k norms
    return fields


def choose_layers(layers, num_layers: int) -> list[int]:
    """`layers` (a name of :data:`LAYER_CHOICES` or a list of indices) as sorted indices; ValueError if bad."""
    if isinstance(layers, str):
        if layers not in LAYER_CHOICES:
            raise _refuse(f"layers={layers!r}: unknown choice{suggest(layers, LAYER_CHOICES)}; valid: "
                          f"{sorted(LAYER_CHOICES)} or a list of layer indices")
        return LAYER_CHOICES[layers](num_layers)
    if not isinstance(layers, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise _refuse(f"layers={layers!r}: give one of {sorted(LAYER_CHOICES)} or a list of layer indices")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad or len(set(layers)) != len(layers):
        raise _refuse(f"layers={list(layers)}: indices must be distinct and in [0, {num_layers}) (bad: {bad or 'repeats'})")
    return sorted(layers)


def check_fields(type: str, fields: dict) -> None:
    """ValueError for a field that `type`'s config does not have (before anything is loaded)."""
    valid = registry.get(type).config_class.field_names()
    unknown = [k for k in fields if k not in valid]
    if unknown:
        hints = ", ".join(f"{k!r}{suggest(k, valid)}" for k in unknown)
        raise _refuse(f"unknown field(s) for type {type!r}: {hints}")


def retrofit_config(source, type: str, layers="last_quarter", **fields) -> TTOConfig:
    """The tto config of :func:`retrofit`: the source's backbone, the type's head fields (its
    ``FromAttention.heads``), then `fields` on top; checked (ValueError) before any weight is made."""
    entry = registry.get(type)
    check_fields(type, fields)
    values = backbone_fields(source)
    chosen = choose_layers(layers, values["num_hidden_layers"])
    values.update(entry.from_attention.heads(values["num_attention_heads"], values["head_dim"]))
    values.update(fields)
    if values.get("mlp_type", entry.config_class.mlp_type) == "cms" and "cms_periods" not in fields:
        values["cms_periods"] = [None]  # the pretrained MLP as it is (module docstring)
    values["layer_mixers"] = [type if i in chosen else "transformer" for i in range(values["num_hidden_layers"])]
    return registry.build_config(type, **values)


# ---------------------------------------------------------------- weights
def interleave_order(head_dim: int) -> torch.Tensor:
    """Row order taking rotate-half's pairs (i, i + d/2) to adjacent pairs (2i, 2i + 1)."""
    half = torch.arange(head_dim // 2)
    return torch.stack([half, half + head_dim // 2], dim=1).flatten()


#: FromAttention.rope -> the row order within a head of the q and k that the mixer gets
ROW_ORDERS: dict[str, Callable[[int], torch.Tensor]] = {
    "half": torch.arange,
    "interleaved": interleave_order,
    "none": torch.arange,
}
#: the projections whose rows RoPE rotates, and those of grouped KV heads
_ROTATED, _KV = ("q_proj", "k_proj"), ("k_proj", "v_proj")


def mapped_rows(name: str, weight: torch.Tensor, head_dim: int, kv_heads: int, heads: int, rope: str,
                out_rows: int) -> torch.Tensor | None:
    """The source parameter `weight` ((out, ...) rows by head) laid out for a target of `out_rows`
    rows: q/k rows reordered within each head for the mixer's RoPE, k/v heads repeated to the query
    heads when the target is that much wider. None when it still does not fit."""
    if name in _ROTATED and weight.shape[0] % head_dim == 0 and weight.shape[0] > 0:
        order = ROW_ORDERS[rope](head_dim)
        weight = weight.unflatten(0, (-1, head_dim))[:, order].flatten(0, 1)
    if name in _KV and weight.shape[0] == kv_heads * head_dim and out_rows == heads * head_dim != weight.shape[0]:
        weight = weight.unflatten(0, (kv_heads, head_dim)).repeat_interleave(heads // kv_heads, dim=0).flatten(0, 1)
    return weight if weight.shape[0] == out_rows else None


def _backbone_key(key: str) -> str | None:
    """The tto key of a source weight outside the attention (None: no rule maps it)."""
    for pattern, template in _BACKBONE_RULES:
        match = re.fullmatch(pattern, key)
        if match:
            return template.format(*match.groups())
    return None


def _copy_attention(source_attention: nn.Module, mixer: nn.Module, spec: registry.FromAttention, config: TTOConfig,
                    source_config, layer: int) -> list[str]:
    """Copy one layer's attention into `mixer` as `spec` says; returns the source modules not used."""
    kv_heads = getattr(source_config, "num_key_value_heads", None) or config.num_attention_heads
    unused = []
    for name, target in spec.projections(mixer):
        src = getattr(source_attention, name)
        for param in ("weight", "bias"):
            s, t = getattr(src, param, None), getattr(target, param, None)
            if t is None:
                if s is not None and bool(s.any()):
                    unused.append(f"{name}.{param}")
                continue
            if s is None:  # a bias the source does not have: zero is its value there
                with torch.no_grad():
                    t.zero_()
                continue
            rows = mapped_rows(name, s.detach(), config.head_dim, kv_heads, config.num_attention_heads, spec.rope,
                               t.shape[0])
            if rows is None or rows.shape != t.shape:
                unused.append(f"{name}.{param}")
                continue
            with torch.no_grad():
                t.copy_(rows)
    if unused:
        logger.warning("retrofit: layer %d (%s): %s do not fit the mixer and start from its init",
                       layer, config.layer_mixers[layer], ", ".join(unused))
    return unused


def retrofit(model: nn.Module, type: str, layers="last_quarter", **fields) -> nn.Module:
    """`model` (a Llama-family ``*ForCausalLM``) as a tto model of `type` whose `layers` (indices,
    or a name of :data:`LAYER_CHOICES`) read with that type's mixer; `fields` are the type's config
    fields (and backbone fields, e.g. ``sliding_window``). The new mixers' init follows the global
    torch seed. The result is float32, on `model`'s device, in `model`'s train/eval mode."""
    config = retrofit_config(model.config, type, layers, **fields)
    device = next(model.parameters()).device
    target = registry.get(type).model_class(config)
    own = target.state_dict()
    cms = config.mlp_type == "cms"
    for key, value in model.state_dict().items():
        if key.endswith("rotary_emb.inv_freq") or _ATTENTION_KEY.fullmatch(key) or (cms and _MLP_KEY.fullmatch(key)):
            continue  # RoPE tables are recomputed; attention weights go through each type's FromAttention, MLPs into the CMS
        new = _backbone_key(key)
        if new is None:
            raise _refuse(f"no rule maps the source weight {key!r} (is this a Llama-family model?)")
        if own[new].shape != value.shape:
            raise _refuse(f"source weight {key!r} has shape {tuple(value.shape)}, tto's {new!r} {tuple(own[new].shape)}")
        with torch.no_grad():
            own[new].copy_(value)
    for i, block in enumerate(target.model.layers):
        spec = registry.get(config.layer_mixers[i]).from_attention
        _copy_attention(model.model.layers[i].self_attn, block.mixer, spec, config, model.config, i)
        if cms:
            block.mlp.start_from(model.model.layers[i].mlp)
    if cms and len(config.cms_periods) > 1:
        logger.warning("retrofit: each block's CMS chains %d levels, each starting from the pretrained MLP, so the "
                       "model computes that MLP %d times per block: it departs from the source from the start",
                       len(config.cms_periods), len(config.cms_periods))
    for block in target.model.layers:
        if block.prime is not None:  # a prime MLP (TTT-E2E) added to a pretrained block: zero output, model unchanged
            with torch.no_grad():
                block.prime.down_proj.weight.zero_()
    if config.tie_word_embeddings:
        target.tie_weights()
    target.generation_config = copy.deepcopy(model.generation_config)
    return target.to(device).train(model.training)

