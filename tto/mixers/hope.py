"""HOPE: "Nested Learning: The Illusion of Deep Learning Architectures" (Behrouz, Razaviyayn, Zhong,
Mirrokni; arXiv:2512.24695).

**HOPE** is a sequence mixer followed by a Continuum Memory System (CMS) in place of the block MLP:
a chain of MLP levels, level l trained while reading at the end of every chunk of ``C^(l)`` tokens
with the gradients of its chunk, every level read at every token (:mod:`tto.layers.cms`, the
backbone's ``mlp_type: cms``, which any type can use). A ``hope`` model is such a backbone: its
blocks are ``h += mixer(RMSNorm(h)); h += CMS(RMSNorm(h))``, with the CMS levels of
``cms_periods`` (default three levels, ``[16, 256, 2048]``: the paper's figure shows 16 -> 1M ->
16M, its experiments' levels are not given; a level with a million-token period would hold a
million pending tokens per layer while decoding, so the defaults stay within a training sequence).

**Variants** (``variant``):

* ``titans``: the mixer is Titans' neural long-term memory (the LMM layer of
  :mod:`tto.mixers.titans`: deep MLP memory, momentum and forgetting, chunk-start gradients, with
  all of Titans' memory fields). The paper's HOPE uses a *self-modifying* Titans, whose keys,
  values, inner step eta and retention alpha are the outputs of their own in-context memories
  (each trained on values it generates itself, ``v^_t = M_{.,t-1}(v_t)``, with delta-gradient-descent
  chunk updates; q is a static projection). That self-modification is **not implemented**: here
  k, v, eta and alpha come from static projections and gates, so this variant is HOPE's block
  structure (Titans memory + CMS) without it.
* ``attention``: HOPE-Attention, the paper's variant with softmax attention (the backbone's
  attention: RoPE, GQA, optional sliding window and QK-norm) followed by the CMS.

**Retrofit** (:func:`tto.retrofit`): the ``titans`` variant's memory takes q, k, v, o from the
pretrained attention as Titans' does (:data:`tto.mixers.titans.TITANS_FROM_ATTENTION`); in
HOPE-Attention the attention is the pretrained one, as it was. Each block's pretrained MLP starts
every CMS level, and the chain defaults to that MLP alone, never updated (the source's function
kept); ``cms_periods=[C]`` makes it learn in context from its first C tokens on (see
:mod:`tto.retrofit` for why more levels cannot keep the source's function).

Fields are Titans' (:class:`tto.mixers.titans.TitansConfig`) and the backbone's CMS fields, with
HOPE's defaults: ``mlp_type: cms``, full causal attention (no window) in HOPE-Attention.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..cache import Context
from ..layers.attention import Attention
from ..registry import register
from .titans import LMM, TITANS_FROM_ATTENTION, TitansConfig

#: the backbone of the paper's 760M / 30B-token comparison (Titans' 760M setting: 24 blocks of width
#: 1536, Llama-2's 32k vocabulary), with the SwiGLU levels narrowed so that the three CMS levels per
#: block fit the parameter budget; the paper gives no per-level widths (unconfirmed)
HOPE_PRESETS = {
    "760m": dict(vocab_size=32000, hidden_size=1536, intermediate_size=1024, num_hidden_layers=24,
                 num_attention_heads=16, num_memory_heads=16, chunk_size=16, cms_periods=[16, 256, 2048]),
    # small chunks and periods, so 13 tokens cross every boundary of the memory and two CMS levels
    "tiny": dict(chunk_size=2, cms_periods=[2, 5, None], num_persistent_mem_tokens=0),
    "tiny-attention": dict(variant="attention", cms_periods=[3, None, 4], sliding_window=5),
}


class HopeConfig(TitansConfig):
    """HOPE fields: Titans' memory fields (used by the ``titans`` variant) and the backbone's CMS
    fields (``cms_periods``, ``cms_max_lr``, ``cms_lr_bias_init``), with HOPE's defaults."""

    choices: ClassVar[dict[str, tuple]] = {**TitansConfig.choices, "variant": ("titans", "attention")}

    variant: str = "titans"  # "titans": Titans' memory + CMS (not self-modifying); "attention": HOPE-Attention
    sliding_window: int | None = None  # HOPE-Attention's attention window (None: full causal attention)
    num_persistent_mem_tokens: int = 0  # unused: neither variant has Titans' attention branch
    mlp_type: str = "cms"  # the block MLP is the Continuum Memory System
    cms_periods: list[int | None] | None = None  # C^(l) per CMS level (None: [16, 256, 2048])

    def __post_init__(self, **kwargs):
        if self.mlp_type == "cms" and self.cms_periods is None:
            self.cms_periods = [16, 256, 2048]
        super().__post_init__(**kwargs)


class HopeAttention(nn.Module):
    """HOPE-Attention's mixer: the backbone's softmax attention (the CMS is the block's MLP)."""

    def __init__(self, config: HopeConfig):
        super().__init__()
        self.attention = Attention(config, window=config.sliding_window, qk_norm=config.qk_norm)

    def forward(self, x: torch.Tensor, ctx: Context, state: dict | None) -> torch.Tensor:
        return self.attention(x, ctx, state)


VARIANTS: dict[str, type[nn.Module]] = {"titans": LMM, "attention": HopeAttention}


@register("hope", config=HopeConfig, presets=HOPE_PRESETS, paper_sizes={"760m": 760e6},
          paper="arXiv:2512.24695 (Behrouz, Razaviyayn, Zhong, Mirrokni, 2025)", from_attention=TITANS_FROM_ATTENTION)
class HopeMixer(nn.Module):
    """HOPE's mixer: x (B, T, hidden) -> (B, T, hidden), wired as `config.variant`."""

    def __init__(self, config: HopeConfig, layer_idx: int):
        super().__init__()
        self.wiring = VARIANTS[config.variant](config)

    def forward(self, x: torch.Tensor, ctx: Context, state: dict | None = None) -> torch.Tensor:
        return self.wiring(x, ctx, state)
