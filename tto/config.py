"""The configuration every tto model shares: the backbone and its attention layers.

Each registered type subclasses :class:`TTOConfig` and adds the fields of its mixer, documented
where they are defined (in ``tto/mixers/<type>.py``). Configs are keyword-only dataclasses (the
Transformers v5 style): a misspelled field fails at construction with a close-match suggestion,
and so do bad values (non-positive sizes, unknown choices, heads that do not divide the width).
"""

from __future__ import annotations

import difflib
from typing import Any, ClassVar

from transformers import GenerationConfig, PreTrainedConfig

# Keys that Transformers itself writes into config.json or passes through `from_pretrained`.
# They are consumed by `PreTrainedConfig.__post_init__`; anything else unknown is an error.
_HF_INTERNAL_KEYS = frozenset(
    {
        "torch_dtype",
        "name_or_path",
        "_name_or_path",
        "_commit_hash",
        "output_attentions",
        "attn_implementation",
        "experts_implementation",
        "_attn_implementation_internal",
        "_experts_implementation_internal",
        "per_layer_config",
        "num_labels",
        "model_type",
        "auto_map",
        "_from_auto",
        "_from_pipeline",
    }
)


def suggest(name: str, valid) -> str:
    """' (did you mean 'x'?)' when a close match exists, else ''."""
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def config_error(field: str, value: Any, problem: str, valid=None) -> ValueError:
    msg = f"config field {field!r}={value!r}: {problem}"
    if valid is not None:
        msg += f"; valid choices: {sorted(valid)}"
        if isinstance(value, str):
            msg += suggest(value, valid)
    return ValueError(msg)


class TTOConfig(PreTrainedConfig):
    """Backbone fields shared by every type.

    A model is ``embed_tokens -> num_hidden_layers x Block -> norm -> lm_head``. Each block is
    pre-norm: ``h += mixer(RMSNorm(h)); h += SwiGLU(RMSNorm(h))`` (``post_norm``: each output is
    RMS-normalised before its add; a type's ``prime_layers`` add a prime SwiGLU between the two,
    trained at test time by :mod:`tto.engine.e2e`). The mixer of layer ``i`` is
    ``layer_mixers[i]``: any registered type (``"transformer"``: softmax attention), so hybrids need
    no code. A layer of another type is built from that type's config (:meth:`layer_config`): this
    config's backbone fields, that type's own fields from ``mixer_fields[type]``, its defaults
    otherwise.
    """

    model_type: ClassVar[str] = "tto"
    #: registry key of the mixer this config describes (set by each subclass)
    tto_type: ClassVar[str] = ""
    #: what the type's model does: "causal-lm" (this backbone) or "image-classification"
    #: (:mod:`tto.vision`); layers of a hybrid are types of the same task
    task: ClassVar[str] = "causal-lm"
    #: fields whose values must come from a fixed set: {field: choices}; a choice set may be a function
    #: returning the tuple, called when used (a set derived from the registry, once every type is registered)
    choices: ClassVar[dict[str, tuple]] = {"hidden_act": ("silu", "gelu", "gelu_pytorch_tanh", "relu"),
                                           "mlp_type": ("swiglu", "cms")}
    #: the field that selects the paper's variant (None: the type has one variant)
    variant_field: ClassVar[str | None] = None
    #: former names of fields, still accepted in configs and saved config.json files: {old: field}
    aliases: ClassVar[dict[str, str]] = {}
    #: integer fields that must be > 0 (subclasses extend)
    positive_fields: ClassVar[tuple[str, ...]] = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
        "conv_kernel",
    )
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values"]

    # --- sizes ---
    vocab_size: int = 32000  # number of token ids
    hidden_size: int = 768  # residual stream width d
    intermediate_size: int = 2048  # SwiGLU MLP hidden width
    num_hidden_layers: int = 12  # number of blocks
    num_attention_heads: int = 12  # heads of the attention layers (memory mixers may have their own)
    num_key_value_heads: int | None = None  # grouped-query attention: KV heads (None: = num_attention_heads)
    head_dim: int | None = None  # attention head width (None: hidden_size // num_attention_heads)
    max_position_embeddings: int = 2048  # nominal context of the recipe (RoPE needs no table)
    # --- blocks ---
    hidden_act: str = "silu"  # activation of the SwiGLU MLP gate
    rms_norm_eps: float = 1e-6  # epsilon of every RMSNorm in the backbone
    initializer_range: float = 0.02  # std of the normal init of linear and embedding weights
    tie_word_embeddings: bool = True  # lm_head shares the embedding matrix
    mlp_bias: bool = False  # biases in the SwiGLU MLP projections
    # the block MLP: "swiglu" (static, trained in pre-training only) or "cms" (Nested Learning's Continuum
    # Memory System, tto.layers.cms: a chain of SwiGLU levels, each trained while reading every C^(l) tokens)
    mlp_type: str = "swiglu"
    # mlp_type "cms": C^(l) per level, in chain order: level l updates at the end of each of its chunks of
    # C^(l) tokens; None = infinite (a plain MLP, frozen at test time). E.g. [16, 256, None]
    cms_periods: list[int | None] | None = None
    cms_max_lr: float = 0.01  # mlp_type "cms": bound of each level's per-token inner step, lr = cms_max_lr * sigmoid(.)
    cms_lr_bias_init: float = 0.0  # mlp_type "cms": initial bias of the lr gates (pre-sigmoid)
    layer_mixers: list[str] | None = None  # per-layer mixer: any registered type (None: all this type)
    # the own fields of the other types in layer_mixers, {type: {field: value}} (e.g. {"gated_deltanet":
    # {"num_memory_heads": 4}}); a type not listed takes its defaults; backbone fields are always this config's
    mixer_fields: dict[str, dict[str, Any]] | None = None
    pre_conv: bool = False  # Mamba-style branch before the mixer: h += ShortConv(RMSNorm(h))
    post_norm: bool = False  # RMSNorm on each sublayer's output before its residual: h += RMSNorm'(f(RMSNorm(h)))
    conv_kernel: int = 4  # kernel size of the pre_conv branch (and of mixers' short convs unless they say otherwise)
    check_finite: bool = True  # raise naming the layer whose output holds NaN/Inf (one reduction + host sync per layer)
    # torch.compile each memory's per-chunk step: fused kernels, faster training and prefill (Titans
    # LMM on CPU 1.3x); every new shape, dtype or grad mode compiles once (tens of seconds on CPU)
    compile_inner_step: bool = False
    # --- attention layers ---
    rope_theta: float = 10000.0  # RoPE base
    sliding_window: int | None = None  # attention sees the last `sliding_window` tokens (None: all)
    attention_bias: bool = False  # biases in q/k/v/o projections of attention
    qk_norm: bool = False  # learned RMSNorm on each head of q and k, before RoPE (QK-norm)
    # --- generation and tokens ---
    use_cache: bool = True  # forward returns a cache (fast weights, KV) for generation
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self, **kwargs):
        self._take_aliases(kwargs)
        generation_keys = set(GenerationConfig._get_default_generation_params())
        unknown = sorted(k for k in kwargs if k not in _HF_INTERNAL_KEYS and k not in generation_keys)
        if unknown:
            valid = self.field_names()
            hints = ", ".join(f"{k!r}{suggest(k, valid)}" for k in unknown)
            raise ValueError(f"unknown config field(s) for type {self.tto_type!r}: {hints}; valid fields: {sorted(valid)}")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads and self.hidden_size:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.layer_mixers is None:
            self.layer_mixers = [self.tto_type] * self.num_hidden_layers
        self.validate()
        super().__post_init__(**kwargs)

    def _take_aliases(self, kwargs: dict) -> None:
        """Moves values given under a former name (:attr:`aliases`) from `kwargs` to their field."""
        for old, name in self.aliases.items():
            if old in kwargs:
                value = kwargs.pop(old)
                if getattr(self, name) is not None and getattr(self, name) != value:
                    raise config_error(old, value, f"is the former name of {name!r}, also given ({getattr(self, name)!r}): "
                                       "give one")
                setattr(self, name, value)

    @property
    def prime_layers(self) -> tuple[int, ...]:
        """Layers with a prime MLP trained at test time by the model-level inner loop
        (:mod:`tto.engine.e2e`); none unless the type declares them."""
        return ()

    @classmethod
    def field_names(cls) -> set[str]:
        from dataclasses import fields

        base = {f.name for f in fields(PreTrainedConfig)}
        return {f.name for f in fields(cls)} - base

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ValueError naming the field for any value the model cannot be built from."""
        for name in self.positive_fields:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise config_error(name, value, "must be a positive integer")
        for name, valid in self.choices.items():
            valid = valid() if callable(valid) else valid
            value = getattr(self, name)
            if value not in valid:
                raise config_error(name, value, "unknown choice", valid)
        if self.hidden_size % self.num_attention_heads:
            raise config_error(
                "num_attention_heads",
                self.num_attention_heads,
                f"must divide hidden_size={self.hidden_size}",
            )
        if self.num_key_value_heads <= 0 or self.num_attention_heads % self.num_key_value_heads:
            raise config_error(
                "num_key_value_heads",
                self.num_key_value_heads,
                f"must be positive and divide num_attention_heads={self.num_attention_heads}",
            )
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise config_error("sliding_window", self.sliding_window, "must be a positive integer or None")
        if len(self.layer_mixers) != self.num_hidden_layers:
            raise config_error(
                "layer_mixers",
                self.layer_mixers,
                f"needs one entry per layer (num_hidden_layers={self.num_hidden_layers})",
            )
        self._validate_mlp()
        from . import registry

        registered = registry.available(self.task)
        for kind in self.layer_mixers:
            if kind not in registered:
                raise config_error("layer_mixers", kind, "unknown layer mixer", registered)
        partners = sorted(set(self.layer_mixers) - {self.tto_type})
        for kind in self.mixer_fields or {}:
            if kind not in partners:
                raise config_error("mixer_fields", kind, "names no other type of layer_mixers", partners)
        for kind in partners:
            if self._partner_config(kind).prime_layers:
                raise config_error("layer_mixers", kind, f"trains prime MLPs across the whole model (a model-level "
                                   f"inner loop), so it cannot be a layer of a {self.tto_type!r} model")

    def _validate_mlp(self) -> None:
        """The CMS fields (:mod:`tto.layers.cms`) are given exactly when ``mlp_type`` is "cms", and valid."""
        if self.mlp_type != "cms":
            if self.cms_periods is not None:
                raise config_error("cms_periods", self.cms_periods, f"is a field of mlp_type 'cms' (mlp_type={self.mlp_type!r})")
            return
        if self.task != "causal-lm":
            raise config_error("mlp_type", self.mlp_type, f"the CMS is a block MLP of the causal LM backbone, not of "
                               f"{self.task!r} models", ("swiglu",))
        periods = self.cms_periods
        if not isinstance(periods, (list, tuple)) or not periods or any(
                p is not None and (not isinstance(p, int) or isinstance(p, bool) or p <= 0) for p in periods):
            raise config_error("cms_periods", periods, "mlp_type 'cms' needs a non-empty list of levels' periods, each "
                               "a positive integer (tokens between updates) or None (never updated)")
        if self.hidden_act != "silu":
            raise config_error("hidden_act", self.hidden_act, "mlp_type 'cms' levels are SwiGLU MLPs", ("silu",))
        if self.mlp_bias:
            raise config_error("mlp_bias", self.mlp_bias, "mlp_type 'cms' levels have no biases", (False,))
        if self.cms_max_lr < 0:
            raise config_error("cms_max_lr", self.cms_max_lr, "must be >= 0")
        if self.prime_layers:
            raise config_error("mlp_type", self.mlp_type, "a type with prime layers (a model-level inner loop) "
                               "keeps its static MLPs", ("swiglu",))

    def layer_config(self, layer_idx: int) -> TTOConfig:
        """The config of layer `layer_idx`'s mixer: this one, or for a layer of another type that
        type's config (see the class docstring)."""
        kind = self.layer_mixers[layer_idx]
        return self if kind == self.tto_type else self._partner_config(kind)

    def _partner_config(self, kind: str) -> TTOConfig:
        return self.type_config(kind, (self.mixer_fields or {}).get(kind, {}), f"mixer_fields[{kind!r}]")

    def type_config(self, kind: str, own: dict[str, Any], where: str) -> TTOConfig:
        """Type `kind`'s config with this config's backbone fields and `own`, that type's own fields,
        validated by its config class; errors name `where` (the field that holds `own`)."""
        from . import registry

        backbone = {name: getattr(self, name) for name in TTOConfig.field_names() - {"layer_mixers", "mixer_fields"}}
        shared = sorted(set(own) & backbone.keys())
        if shared:
            raise config_error(where, own, f"{shared} are backbone fields: set them on the model's config")
        try:
            return registry.get(kind).config_class(**backbone, **own)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None


class MemoryConfig(TTOConfig):
    """The fields every type whose layers hold a memory (fast weights trained while reading) shares."""

    positive_fields: ClassVar[tuple[str, ...]] = TTOConfig.positive_fields + ("num_memory_heads",)
    #: the field of the memory's chunk (tokens per inner update; None: the type has none): the image form
    #: of the type (:mod:`tto.mixers.memory_vit`) sets it to the image's token count, one chunk per image
    chunk_field: ClassVar[str | None] = None

    # memory heads, each with its own fast weights (None: num_attention_heads, so that a resized model
    # keeps heads as wide as its attention's); their width is hidden_size // num_memory_heads unless
    # the type has a head-width field
    num_memory_heads: int | None = None

    def __post_init__(self, **kwargs):
        self._take_aliases(kwargs)
        if self.num_memory_heads is None:
            self.num_memory_heads = self.num_attention_heads
        super().__post_init__(**kwargs)
