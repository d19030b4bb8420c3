"""`transformer`: the softmax-attention baseline every benchmark compares against.

Causal SDPA attention with RoPE, grouped-query heads (``num_key_value_heads``) and an optional
sliding window (``sliding_window``) and optional QK-norm (``qk_norm``); all its fields are backbone
fields of :class:`TTOConfig`.
"""

from __future__ import annotations

from ..config import TTOConfig
from ..layers.attention import Attention
from ..registry import FromAttention, qkvo, register


class TransformerConfig(TTOConfig):
    """Only backbone fields: the attention layer is the backbone's own."""


@register("transformer", config=TransformerConfig, paper="Attention Is All You Need (arXiv:1706.03762); Llama-style block",
          from_attention=FromAttention(qkvo))  # the same attention: every projection as it is
class AttentionMixer(Attention):
    """Softmax attention as a mixer: ``mixer(x, ctx, state)``."""

    def __init__(self, config: TTOConfig, layer_idx: int):
        super().__init__(config, qk_norm=config.qk_norm)
