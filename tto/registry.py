"""The registry: ``type:`` keys -> entries (config class, mixer, variants, presets).

A paper is added by decorating its mixer::

    @register("ttt", config=TTTConfig, presets=TTT_PRESETS, paper="arXiv:2407.04620")
    class TTTMixer(nn.Module): ...

Registration also creates the entry's Hugging Face classes (``<Name>ForCausalLM`` on the one
generic backbone; for a type whose config's ``task`` is "image-classification",
``<Name>ForImageClassification`` on the vision backbone of :mod:`tto.vision`) and registers them
with ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM`` (``AutoModelForImageClassification``)
under the model type ``tto_<type>``, so ``from_pretrained`` needs no ``trust_remote_code``. Nothing
else in tto lists the types: train.py, infer.py, the tests and the benchmarks all read
:func:`available`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageClassification

from .config import TTOConfig, config_error, suggest


#: how a mixer rotates the q and k it gets from a pretrained attention (see FromAttention.rope)
ROPE_LAYOUTS = ("half", "interleaved", "none")


@dataclass(frozen=True)
class FromAttention:
    """How a mixer starts from a pretrained softmax attention (:func:`tto.retrofit`); one per entry.

    projections: mixer -> [(name, module)]: the mixer's module that starts from the attention's
        module `name` (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``; ``q_norm``, ``k_norm`` where
        the attention has them). Keys and values of grouped KV heads are repeated to the query heads
        when the module is that much wider; a module whose shape still differs starts from the
        type's init (and retrofit warns), as does every module not listed.
    heads: (attention heads, head width) -> the type's config fields that give the mixer the same
        heads, so each head's projection rows carry over whole.
    rope: how the mixer rotates q and k: "half" (Llama's rotate-half: rows kept), "interleaved"
        (adjacent pairs: each head's rows reordered so pair i holds the two rows rotate-half turned
        by frequency i), "none" (no RoPE: rows kept, the attention's positions are lost).
    """

    projections: Callable[[nn.Module], list[tuple[str, nn.Module]]]
    heads: Callable[[int, int], dict[str, Any]] = lambda heads, head_dim: {}
    rope: str = "half"

    def __post_init__(self):
        if self.rope not in ROPE_LAYOUTS:
            raise ValueError(f"FromAttention.rope={self.rope!r}; valid: {list(ROPE_LAYOUTS)}")


def qkvo(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The attention's q/k/v/o projections onto the same-named ones of `module` (those it has)."""
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    return [(name, getattr(module, name)) for name in names if getattr(module, name, None) is not None]


#: the tasks a type's model can do (:attr:`TTOConfig.task`)
TASKS = ("causal-lm", "image-classification")


@dataclass(frozen=True)
class Entry:
    name: str
    config_class: type[TTOConfig]
    mixer_class: type[nn.Module]
    model_class: type  # <Name>ForCausalLM (<Name>ForImageClassification for an image type)
    base_model_class: type  # <Name>Model
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    paper: str = ""
    from_attention: FromAttention | None = None  # how tto.retrofit maps a pretrained attention onto it
    #: size preset -> the parameter count its paper (or official code) gives; tests build each preset
    #: and every recipe of configs/ (which names its size preset) within 10% of it
    paper_sizes: dict[str, float] = field(default_factory=dict)

    @property
    def task(self) -> str:
        return self.config_class.task

    @property
    def variants(self) -> tuple[str, ...]:
        """The paper variants selectable through the config's `variant_field` (() if none)."""
        vf = self.config_class.variant_field
        if not vf:
            return ()
        choices = self.config_class.choices[vf]
        return tuple(choices() if callable(choices) else choices)

    def variant_configs(self) -> list[tuple[str | None, dict[str, Any]]]:
        """(variant, {variant_field: variant}) for each variant; [(None, {})] when there are none."""
        vf = self.config_class.variant_field
        return [(v, {vf: v}) for v in self.variants] if vf else [(None, {})]


_REGISTRY: dict[str, Entry] = {}

#: the backbone of every type's ``tiny`` preset, the one tiny model of tto: ``configs/tiny/<type>.yml``
#: (smoke runs, ``infer.py --config-type``) and the tests (which may narrow it further) build it.
#: A type's own ``tiny`` entry adds its chunk and head choices: chunks of 2-8 tokens, so that a
#: test sequence of a dozen tokens crosses several chunk boundaries.
TINY_BACKBONE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


def _camel(name: str) -> str:
    return "".join(part.upper() if len(part) <= 3 else part.capitalize() for part in name.split("_"))


def register(name: str, *, config: type[TTOConfig], presets: dict[str, dict] | None = None, paper: str = "",
             paper_sizes: dict[str, float] | None = None, from_attention: FromAttention | None = None):
    """Class decorator registering a mixer (and its config) under the type key `name`;
    `paper_sizes` gives the paper's parameter count of size presets (see :class:`Entry`),
    `from_attention` declares how :func:`tto.retrofit` starts it from a pretrained attention."""
    unknown = sorted(set(paper_sizes or {}) - set(presets or {}))
    if unknown:
        raise ValueError(f"type {name!r}: paper_sizes names presets {unknown} it does not have; presets: {sorted(presets or {})}")

    if config.task not in TASKS:
        raise ValueError(f"type {name!r}: its config's task {config.task!r} is not one of {list(TASKS)}")

    def decorate(mixer_class: type[nn.Module]) -> type[nn.Module]:
        from . import modeling, vision

        if name in _REGISTRY:
            raise ValueError(f"type {name!r} is registered twice")
        config.tto_type = name
        config.model_type = f"tto_{name}"
        prefix = _camel(name)
        module, base_class, head_class, head_name, auto = (
            (modeling, modeling.TTOModel, modeling.TTOForCausalLM, "ForCausalLM", AutoModelForCausalLM)
            if config.task == "causal-lm" else
            (vision, vision.TTOVisionModel, vision.TTOForImageClassification, "ForImageClassification",
             AutoModelForImageClassification))
        base = type(f"{prefix}Model", (base_class,), {"config_class": config, "__module__": module.__name__})
        model = type(f"{prefix}{head_name}", (head_class,), {"config_class": config, "__module__": module.__name__})
        setattr(module, base.__name__, base)
        setattr(module, model.__name__, model)
        AutoConfig.register(config.model_type, config, exist_ok=True)
        AutoModel.register(config, base, exist_ok=True)
        auto.register(config, model, exist_ok=True)
        all_presets = {**(presets or {}), "tiny": {**TINY_BACKBONE, **(presets or {}).get("tiny", {})}}
        _REGISTRY[name] = Entry(name, config, mixer_class, model, base, all_presets, paper, from_attention,
                                dict(paper_sizes or {}))
        return mixer_class

    return decorate


def available(task: str | None = "causal-lm") -> dict[str, tuple[str, ...]]:
    """Registered types of `task`, each with its variants: ``{"ttt": ("linear", "mlp"), ...}``. The
    default lists the language models (what the text pipeline, its tests and benchmarks run);
    ``task=None`` lists every type, ``"image-classification"`` the image models."""
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid: {list(TASKS)}")
    return {name: entry.variants for name, entry in _REGISTRY.items() if task is None or entry.task == task}


def get(name: str) -> Entry:
    """The entry for a type key; an unknown key raises ValueError listing the valid ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown type {name!r}{suggest(name, _REGISTRY)}; registered types: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def entries() -> list[Entry]:
    """Every registered entry, in registration order (the order of :func:`available`)."""
    return list(_REGISTRY.values())


def build_config(type: str, *, preset: str | None = None, variant: str | None = None, **fields) -> TTOConfig:
    """A config for `type`, from an optional preset, with `fields` on top.

    `variant` is a shorthand for the type's variant field (``ttt_layer_type`` for TTT, ``variant``
    for Titans). Unknown types, presets, variants and fields raise ValueError naming the problem.
    """
    entry = get(type)
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in entry.presets:
            raise config_error("preset", preset, f"unknown preset for type {type!r}", entry.presets)
        values.update(entry.presets[preset])
    if variant is not None:
        vf = entry.config_class.variant_field
        if vf is None:
            raise ValueError(f"type {type!r} has no variants (got variant={variant!r})")
        values[vf] = variant
    values.update(fields)
    return entry.config_class(**values)
