"""`vit`: the softmax-attention baseline of the image types (Dosovitskiy et al., "An Image is Worth
16x16 Words", arXiv:2010.11929): multi-head self-attention over all of an image's tokens, no mask.

It runs on the same backbone as ViT³ (:mod:`tto.vision`: CPE, LayerNorm, GELU MLP, mean pooling),
so a comparison with ``vit3`` differs in the mixer only (the original ViT/DeiT add learned absolute
position embeddings and a class token instead of the CPE and the pooling).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..reference import in_reference_mode
from ..registry import register
from ..vision import VisionConfig

VIT_PRESETS = {
    # 8x8 images (scikit-learn's digits) in 2x2 patches: a 4x4 grid, as vit3's tiny preset
    "tiny": dict(image_size=8, patch_size=2, num_channels=1, num_labels=10),
}


class ViTConfig(VisionConfig):
    """ViT fields (heads: ``num_attention_heads``)."""

    qkv_bias: bool = True  # bias of the qkv projection


@register("vit", config=ViTConfig, presets=VIT_PRESETS, paper="An Image is Worth 16x16 Words (arXiv:2010.11929)")
class ViTAttention(nn.Module):
    """Bidirectional multi-head softmax attention: x (B, N, hidden) -> (B, N, hidden)."""

    def __init__(self, config: ViTConfig, layer_idx: int):
        super().__init__()
        self.heads, self.head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, n, width = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, H, N, d) each
        if in_reference_mode():  # softmax(q k^T / sqrt(d)) v, written out
            out = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim), dim=-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, width))
