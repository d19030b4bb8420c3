"""Checkpoint conversion from reference implementations.

:func:`convert_official_ttt` maps a state dict of the official TTT PyTorch model
(test-time-training/ttt-lm-pytorch, ``TTTForCausalLM``) to tto's ``ttt`` model of the same
config. The two compute the same function: the reference's field names are tto's, and the
rules below are the only renames and reshapes.

``import tto`` also registers the official checkpoints' ``model_type: "ttt"`` with the Auto classes
(:class:`OfficialTTTConfig`, :class:`OfficialTTTForCausalLM`), so
``AutoModelForCausalLM.from_pretrained(dir)`` on a directory saved by the official code (or by the
original TTO code, whose TTT is a copy of it) returns tto's ``TTTForCausalLM``, converted on load.

It registers the original TTO code's Titans (``model_type: "titans"``; tto's own Titans
checkpoints say ``"tto_titans"``, so the two never meet) as well, and refuses those on load in
one line naming why: that code's memory computes another function than tto's Titans for every
config (:func:`original_titans_differences`), so no renaming of its weights reproduces its outputs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig

# (reference key pattern, tto key template, reshape); per-layer keys have their layer index
# in group 1
_TTT_RULES: list[tuple[str, str, Callable[[torch.Tensor], torch.Tensor] | None]] = [
    (r"model\.embed_tokens\.weight", "model.embed_tokens.weight", None),
    (r"model\.norm\.weight", "model.norm.weight", None),
    (r"lm_head\.weight", "lm_head.weight", None),
    (r"model\.layers\.(\d+)\.seq_norm\.weight", "model.layers.{}.mixer_norm.weight", None),
    (r"model\.layers\.(\d+)\.ffn_norm\.weight", "model.layers.{}.mlp_norm.weight", None),
    (r"model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight", "model.layers.{}.mlp.{}.weight", None),
    (r"model\.layers\.(\d+)\.conv\.norm\.weight", "model.layers.{}.pre_conv.norm.weight", None),
    (r"model\.layers\.(\d+)\.conv\.conv\.(weight|bias)", "model.layers.{}.pre_conv.conv.{}", None),
    (r"model\.layers\.(\d+)\.seq_modeling_block\.(q_proj|k_proj|v_proj|o_proj|g_proj)\.weight",
     "model.layers.{}.mixer.{}.weight", None),
    (r"model\.layers\.(\d+)\.seq_modeling_block\.(conv_q|conv_k)\.(weight|bias)", "model.layers.{}.mixer.{}.{}", None),
    (r"model\.layers\.(\d+)\.seq_modeling_block\.post_norm\.(weight|bias)", "model.layers.{}.mixer.post_norm.{}", None),
    # [heads, 1, width] -> [heads, width]; [heads, 1] -> [heads]
    (r"model\.layers\.(\d+)\.seq_modeling_block\.learnable_ttt_lr_weight", "model.layers.{}.mixer.lr_gate_weight",
     lambda t: t.reshape(t.shape[0], -1)),
    (r"model\.layers\.(\d+)\.seq_modeling_block\.learnable_ttt_lr_bias", "model.layers.{}.mixer.lr_gate_bias",
     lambda t: t.reshape(-1)),
    (r"model\.layers\.(\d+)\.seq_modeling_block\.learnable_token_idx",
     "model.layers.{}.mixer.memory.optimizer.token_offset", None),
    (r"model\.layers\.(\d+)\.seq_modeling_block\.ttt_norm_(weight|bias)", "model.layers.{}.mixer.memory.fast.norm_{}",
     None),
    (r"model\.layers\.(\d+)\.seq_modeling_block\.(W1|b1|W2|b2)", "model.layers.{}.mixer.memory.fast.{}", None),
]


def convert_official_ttt(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict of the official ``TTTForCausalLM`` as one for ``tto``'s ``ttt`` model.

    Load it with ``model.load_state_dict(converted)`` into a model built from the same config
    (``tto.build_config("ttt", **reference_config_fields)``). Non-persistent buffers of the
    reference (``token_idx``, RoPE ``inv_freq``) are recomputed by tto and ignored here; any other
    unknown key raises ValueError naming it.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith(("rotary_emb.inv_freq", ".token_idx")):
            continue
        for pattern, template, reshape in _TTT_RULES:
            match = re.fullmatch(pattern, key)
            if match:
                out[template.format(*match.groups())] = reshape(value) if reshape else value
                break
        else:
            raise ValueError(f"no rule maps the reference key {key!r}")
    return out


#: keys of an official config.json that describe the file, not the model
_BOOKKEEPING_KEYS = ("model_type", "architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path")


class OfficialTTTConfig(PreTrainedConfig):
    """The config.json of an official TTT checkpoint (``model_type: "ttt"``), read as it is."""

    model_type = "ttt"


def _official_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in `directory` (model.safetensors, pytorch_model.bin, or their shards)."""
    from transformers.modeling_utils import load_state_dict

    from .cli import WEIGHT_FILES

    found = [name for name in WEIGHT_FILES if (directory / name).is_file()]
    if not found:
        raise OSError(f"{directory}: no weights there (none of {', '.join(WEIGHT_FILES)})")
    files = [directory / found[0]]
    if found[0].endswith(".index.json"):
        shards = json.loads(files[0].read_text())["weight_map"].values()
        files = [directory / shard for shard in sorted(set(shards))]
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(load_state_dict(str(path)))
    return state


def _checkpoint_fields(path) -> tuple[Path, dict]:
    """The directory of checkpoint `path` (a directory or a hub name in the local cache) and its
    config.json's model fields (bookkeeping keys dropped)."""
    from transformers.utils import cached_file

    directory = Path(path) if Path(path).is_dir() else Path(cached_file(str(path), "config.json")).parent
    fields = json.loads((directory / "config.json").read_text())
    for key in _BOOKKEEPING_KEYS:
        fields.pop(key, None)
    return directory, fields


class OfficialTTTForCausalLM:
    """What ``AutoModelForCausalLM`` loads for ``model_type: "ttt"``: the checkpoint converted to tto."""

    config_class = OfficialTTTConfig

    @classmethod
    def from_pretrained(cls, path, *args, config=None, dtype=None, torch_dtype=None, **kwargs):
        """tto's ``TTTForCausalLM`` with the official checkpoint's config (same field names) and weights
        (:func:`convert_official_ttt`), in eval mode. `path`: a directory or a hub name in the local cache."""
        from .registry import build_config, get

        directory, fields = _checkpoint_fields(path)
        model = get("ttt").model_class(build_config("ttt", **fields))
        result = model.load_state_dict(convert_official_ttt(_official_state_dict(directory)), strict=False)
        tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
        if result.unexpected_keys or set(result.missing_keys) - tied:
            raise ValueError(f"{path}: the checkpoint does not fit its config (missing: "
                             f"{sorted(set(result.missing_keys) - tied)}, unexpected: {result.unexpected_keys})")
        dtype = dtype if dtype is not None else torch_dtype
        return (model if dtype in (None, "auto") else model.to(dtype)).eval()


#: the original TTO TitansConfig's defaults of the fields that decide what else differs
_ORIGINAL_TITANS_DEFAULTS = dict(variant="lmm", num_mem_heads=32, num_persistent_mem_tokens=4, rms_qk_norm=False,
                                 attention_conv=False)


def original_titans_differences(fields: dict) -> list[str]:
    """What the original TTO code's Titans with config `fields` (its field names) computes that tto's
    ``titans`` cannot: one phrase each. Never empty: the first three hold for every config."""
    f = {**_ORIGINAL_TITANS_DEFAULTS, **fields}
    found = ["its memory reads every token of a chunk from the chunk-start weights (tto: after the token's own update)",
             "it normalises q and k before their conv and SiLU (tto: after)",
             "its memory MLP ends in a LayerNorm without residual and its read-out has no RMSNorm "
             "(tto: MLP(x) or x + LayerNorm(MLP(x)), then an RMSNorm)"]
    if f["num_mem_heads"] > 1:
        found.append(f"with num_mem_heads={f['num_mem_heads']} > 1 it reshapes full-chunk read-outs across heads, "
                     "mixing later positions into earlier ones (not causal)")
    if f["num_persistent_mem_tokens"] > 0:
        found.append(f"its num_persistent_mem_tokens={f['num_persistent_mem_tokens']} persistent tokens are sequence "
                     "positions written into the memory (tto: a key/value prefix of the attention only)")
    if f["variant"] == "mag":
        found.append("its MAG attention reads the memory output (tto: the block input)")
    if f["variant"] in ("mag", "mal"):
        found.append("its gate and output projection act on the attention output (tto: on the memory read-out)")
        if not f["rms_qk_norm"]:
            found.append("its attention l2-normalises q and k (tto: none, as rms_qk_norm is false)")
        if f["attention_conv"]:
            found.append("attention_conv=true convolves the attention's q, k, v (tto: no conv there)")
    if f["variant"] == "mac":
        found.append("variant 'mac' is not implemented by the original code")
    return found


class OriginalTitansConfig(PreTrainedConfig):
    """The config.json of an original TTO Titans checkpoint (``model_type: "titans"``), read as it is."""

    model_type = "titans"


class OriginalTitansForCausalLM:
    """What ``AutoModelForCausalLM`` loads for ``model_type: "titans"``: a refusal naming the differences."""

    config_class = OriginalTitansConfig

    @classmethod
    def from_pretrained(cls, path, *args, **kwargs):
        """Raise ValueError in one line: the original TTO Titans checkpoint at `path` and what of it
        tto's ``titans`` cannot compute (:func:`original_titans_differences`)."""
        _, fields = _checkpoint_fields(path)
        raise ValueError(f"{path}: an original TTO Titans checkpoint (model_type 'titans') cannot be converted to "
                         f"tto's titans: {'; '.join(original_titans_differences(fields))}")


AutoConfig.register(OriginalTitansConfig.model_type, OriginalTitansConfig, exist_ok=True)
AutoModelForCausalLM.register(OriginalTitansConfig, OriginalTitansForCausalLM, exist_ok=True)
AutoConfig.register(OfficialTTTConfig.model_type, OfficialTTTConfig, exist_ok=True)
AutoModelForCausalLM.register(OfficialTTTConfig, OfficialTTTForCausalLM, exist_ok=True)
