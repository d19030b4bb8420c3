"""Adapters with peft: a recipe's ``adapter`` section, the model it wraps, a saved adapter over its base.

Recipe section (train.py)::

    model: {from_pretrained: <the base: dir | .gguf | pkg:PACKAGE/FILE | hub name>}
    adapter: {type: lora | tinylora, target_modules: [q_proj, v_proj], <that peft config's fields>}

``type: lora`` is peft's ``LoraConfig`` (Hu et al. 2021: ``W + (lora_alpha / r) B A``),
``type: tinylora`` is peft's ``TinyLoraConfig`` ("Learning to Reason in 13 Parameters",
arXiv:2602.04118: ``W + U Σ (Σ_i v_i P_i) Vᵀ`` with the frozen rank-``r`` SVD of ``W``, fixed random
``P_i`` and one trainable vector ``v`` of ``u`` numbers per module group). Every other key is a field
of that config, converted and range-checked like any recipe field (:mod:`tto.typed`); the fields
tto sets itself (task type, base model, ...) are not keys.

Only the adapter trains (peft freezes the base). The output directory is a peft adapter directory
(``adapter_config.json``, ``adapter_model.safetensors``) plus the tokenizer; its
``base_model_name_or_path`` is the recipe's ``from_pretrained`` spec (a local path made absolute),
so ``infer.py --adapter DIR`` and ``eval.py --adapter DIR`` find the base on their own.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from peft import LoraConfig, PeftConfig, TinyLoraConfig

from .config import suggest
from .typed import AT_LEAST_1, NON_NEGATIVE, POSITIVE, Bound, convert, convert_fields, shown

#: ``adapter.type`` -> its peft config class
ADAPTERS: dict[str, type[PeftConfig]] = {"lora": LoraConfig, "tinylora": TinyLoraConfig}

#: PeftConfig fields that tto sets, not the recipe
SET_BY_TTO = ("task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
              "inference_mode")

DROPOUT = Bound(low=0, high=1, high_open=True)

#: ranges of each config's numeric fields (peft declares their types only)
ADAPTER_BOUNDS: dict[str, dict[str, Bound]] = {
    "lora": {"r": AT_LEAST_1, "lora_alpha": POSITIVE, "lora_dropout": DROPOUT},
    "tinylora": {"r": AT_LEAST_1, "u": AT_LEAST_1, "weight_tying": Bound(low=0, high=1), "init_v_bound": NON_NEGATIVE,
                 "tinylora_dropout": DROPOUT},
}

#: the file that marks a directory as a saved adapter
ADAPTER_CONFIG = "adapter_config.json"


def adapter_keys(kind: str) -> list[str]:
    """The recipe keys of adapter type `kind`: its config's fields but the ones tto sets."""
    return [f.name for f in fields(ADAPTERS[kind]) if f.init and f.name not in SET_BY_TTO]


def parse_adapter(raw) -> PeftConfig:
    """The peft config of an ``adapter`` section, every key checked (unknown keys, types, ranges) in one line."""
    if not isinstance(raw, dict) or "type" not in raw:
        raise ValueError(f"adapter: a mapping {{type: {' | '.join(ADAPTERS)}, target_modules: [...], ...}}, "
                         f"not {shown(raw)}")
    kind = convert("adapter.type", raw["type"], str)
    if kind not in ADAPTERS:
        raise ValueError(f"adapter.type={kind!r}{suggest(kind, ADAPTERS)}; valid: {sorted(ADAPTERS)}")
    valid = adapter_keys(kind)
    values = {k: v for k, v in raw.items() if k != "type"}
    unknown = [k for k in values if k not in valid]
    if unknown:
        named = ", ".join(f"{shown(k)}{suggest(str(k), valid)}" for k in unknown)
        raise ValueError(f"unknown adapter key(s) of type {kind!r}: {named}; valid: {sorted(valid)}")
    if values.get("target_modules") is None:
        raise ValueError(f"adapter.target_modules: the modules to adapt, e.g. [q_proj, v_proj] or all-linear "
                         f"(type {kind!r})")
    values = convert_fields(ADAPTERS[kind], values, "adapter", ADAPTER_BOUNDS[kind])
    try:
        return ADAPTERS[kind](task_type="CAUSAL_LM", **values)
    except (TypeError, ValueError) as err:  # peft's own checks (e.g. a combination it refuses)
        raise ValueError(f"adapter: {' '.join(str(err).split())}") from None


def base_spec(spec: str) -> str:
    """A ``from_pretrained`` spec as recorded in the adapter: a local path made absolute, else as given."""
    return str(Path(spec).resolve()) if Path(spec).exists() else spec


def with_adapter(model, config: PeftConfig, base: str):
    """`model` wrapped by peft with a fresh adapter of `config` (only the adapter trains); the adapter
    records `base` (the ``from_pretrained`` spec) as its base model."""
    from peft import get_peft_model

    try:
        wrapped = get_peft_model(model, config)
    except ValueError as err:  # e.g. target_modules that name no module of the model
        raise ValueError(f"adapter: {' '.join(str(err).split())}") from None
    wrapped.peft_config["default"].base_model_name_or_path = base_spec(base)
    return wrapped


def read_adapter_config(directory: str) -> PeftConfig:
    """The peft config of a saved adapter, or ValueError in one line."""
    if not (Path(directory) / ADAPTER_CONFIG).is_file():
        raise ValueError(f"--adapter {directory!r}: no {ADAPTER_CONFIG} there (a directory written by train.py with "
                         f"an adapter section)")
    return PeftConfig.from_pretrained(directory)


def load_adapted(directory: str, base: str | None = None, dtype=None):
    """The base model (`base`, else the one the adapter records) with the adapter of `directory`
    merged into its weights: a plain model of the base's class, adapted."""
    import torch
    from peft import PeftModel

    from .pretrained import load_pretrained

    spec = base or read_adapter_config(directory).base_model_name_or_path
    if not spec:
        raise ValueError(f"--adapter {directory!r} records no base model; give it with --model")
    model = PeftModel.from_pretrained(load_pretrained(spec), directory).merge_and_unload()
    return model.to(dtype or torch.float32).eval()
