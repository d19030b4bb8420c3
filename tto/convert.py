"""Checkpoint conversion from reference implementations.

:func:`convert_official_ttt` maps a state dict of the official TTT PyTorch model
(test-time-training/ttt-lm-pytorch, ``TTTForCausalLM``) to tto's ``ttt`` model of the same
config. The two compute the same function: the reference's field names are tto's, and the
rules below are the only renames and reshapes.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

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
