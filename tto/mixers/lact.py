"""LaCT: "Test-Time Training Done Right" (Zhang et al., arXiv:2505.23884), following the official
code (a1600012888/LaCT, ``lact_llm/lact_model/layer_lact_swiglu.py`` and ``ttt_operation.py``).

One q/k/v projection feeds two branches whose outputs are summed before the output projection:

* **sliding-window attention** (window ``window_size``, RoPE, RMSNorm on q and k): the
  dependencies inside a chunk;
* **large-chunk TTT**: per fast head a SwiGLU memory ``f(x) = (silu(x W0) * (x W2)) W1``
  (hidden ``inter_multi`` x head width) trained on the dot-product loss ``-<f(k), v>`` one chunk of
  ``lact_chunk_size`` tokens at a time, apply-then-update: chunk i reads the weights left by
  chunks < i (:class:`tto.engine.LargeChunkMemory`). Each weight has its own per-token inner lr
  (``lr_gate``: ``softplus(x W + softplus^{-1}(base_lr))``, three per head); optional momentum
  (``momentum_gate``: ``sigmoid(x W)``, averaged over the chunk), Muon (``use_muon``) and weight
  norm (columns keep their initial norms). Fast q and k are a per-channel affine of the
  attention's normalised q and k; q, k, v pass through SiLU (``qkv_silu``), q and k are
  l2-normalised per fast head as the official ``l2_norm``, ``x / (|x| + qk_norm_eps)``, and
  rotated with the attention's RoPE (unless ``ttt_nope``). The read-out is RMS-normalised per
  fast head and scaled by ``silu(x W)`` per head (``learnable_ttt_scale``).

Differences from the official code: the Newton-Schulz iterations run in the inner dtype (float32)
rather than bfloat16, and the weight norm has no epsilon; the attention's q/k RMSNorm is per head
(the official normalises the whole width); the low-rank parametrisation of W0/W2 used by the
official LM configs to save parameters (``w0_w2_low_rank``) is not offered (full-rank fast weights);
the last complete chunk of a sequence also updates the state (the official skips it: it changes
no output of that call, and decoding needs it); there is no ``ttt_prenorm`` option. The defaults are
the official LM configs' (full-rank fast weights at 1 / sqrt(fan_in), no attention q/k norm, RMSNorm
eps 1e-5). Parameter layout (for converting official
weights): q/k/v are three projections (the official one ``qkv``), ``qk_scale``/``qk_offset`` are
(2, hidden) (official (hidden, 2)), the fast weights are the official ``w0``, ``w2``, ``w1``
transposed (x @ W), and ``lr_gate``'s three rows per head are in that order, W0, W2, W1 (the
official ``lr_proj``'s: w0, w1, w2).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import Context
from ..config import MemoryConfig, config_error
from ..engine import DotProduct, LargeChunkMemory, SwiGLUMemory
from ..layers.attention import Attention
from ..layers.rope import apply_rope, rope_cos_sin
from ..registry import FromAttention, qkvo, register

LACT_PRESETS = {
    # lact_llm/configs 760M: hidden 1536, 24 layers, 24 attention heads, 4 fast heads, chunk = window = 2048
    "760m": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=24,
                 num_memory_heads=4, lact_chunk_size=2048, window_size=2048, rope_theta=1e6),
    "tiny": dict(lact_chunk_size=4, window_size=4),
    # the other branch of every option: Muon, no momentum, no weight norm, no RoPE on the fast branch
    "tiny-muon": dict(lact_chunk_size=4, window_size=4, use_muon=True, use_momentum=False,
                      weight_norm=False, ttt_nope=True, learnable_ttt_scale=False, qkv_silu=False),
}


class LaCTConfig(MemoryConfig):
    """LaCT fields, named as in the official ``LaCTSWIGLUConfig`` (its ``num_lact_heads`` is
    ``num_memory_heads``: few wide heads, 4 in every official config, which the presets set)."""

    aliases: ClassVar[dict[str, str]] = {"num_lact_heads": "num_memory_heads"}
    positive_fields: ClassVar[tuple[str, ...]] = MemoryConfig.positive_fields + ("lact_chunk_size",)
    chunk_field: ClassVar[str] = "lact_chunk_size"

    inter_multi: float = 1.0  # hidden width of the SwiGLU memory, in multiples of its head width
    lact_chunk_size: int = 2048  # tokens per fast-weight update (apply-then-update)
    window_size: int | None = 2048  # sliding-window attention span (None: full causal attention)
    use_muon: bool = False  # orthogonalise each chunk update with 5 Newton-Schulz iterations
    use_momentum: bool = True  # add the previous chunk's update times the chunk-mean momentum gate
    weight_norm: bool = True  # after each update, rescale fast-weight columns to their initial norms
    base_lr: float = 0.001  # inner lr at a zero gate pre-activation: lr = softplus(x W + softplus^{-1}(base_lr))
    fw_init_gain: float = 1.0  # initial fast weights ~ N(0, fw_init_gain^2 / fan_in)
    attn_qk_norm: bool = False  # RMSNorm on the attention's q and k (off in every official LM config)
    rms_norm_eps: float = 1e-5  # epsilon of every RMSNorm, the layer's and the backbone's (the official norm_eps)
    qkv_silu: bool = True  # SiLU on the fast branch's q, k, v
    ttt_nope: bool = False  # no RoPE on the fast branch's q and k
    learnable_ttt_scale: bool = True  # scale the fast read-out by silu(x W) per head
    rope_theta: float = 1e6  # RoPE base of both branches (the official configs' value)
    qk_norm_eps: float = 1e-5  # fast q, k = x / (|x| + qk_norm_eps) per fast head (the official l2_norm)

    def validate(self) -> None:
        super().validate()
        if self.hidden_size % self.num_memory_heads:
            raise config_error("num_memory_heads", self.num_memory_heads, f"must divide hidden_size={self.hidden_size}")
        if self.num_key_value_heads != self.num_attention_heads:
            raise config_error("num_key_value_heads", self.num_key_value_heads,
                               f"must equal num_attention_heads={self.num_attention_heads} (k also feeds the fast weights)")
        if self.window_size is not None and self.window_size <= 0:
            raise config_error("window_size", self.window_size, "must be a positive integer or None")
        for name in ("inter_multi", "base_lr", "fw_init_gain", "qk_norm_eps"):
            if getattr(self, name) <= 0:
                raise config_error(name, getattr(self, name), "must be > 0")


#: retrofit (tto.retrofit): the attention branch's q, k, v, o from the attention's (rotate-half RoPE,
#: as the attention's). LaCT feeds k to its fast weights too, so it needs as many KV heads as query
#: heads: every attention layer of the model gets its KV heads repeated (the same function, more
#: weights). q/k norms, the fast weights and their gates start from init.
LACT_FROM_ATTENTION = FromAttention(lambda mixer: qkvo(mixer.attention),
                                    heads=lambda heads, head_dim: {"num_key_value_heads": heads})


@register("lact", config=LaCTConfig, presets=LACT_PRESETS, paper_sizes={"760m": 760e6}, paper="arXiv:2505.23884 (Zhang et al., 2025)",
          from_attention=LACT_FROM_ATTENTION)
class LaCTMixer(nn.Module):
    """LaCT layer: x (B, T, hidden) -> (B, T, hidden). State: the attention window, ``memory.*``."""

    def __init__(self, config: LaCTConfig, layer_idx: int):
        super().__init__()
        width, self.heads = config.hidden_size, config.num_memory_heads
        self.head_dim, self.rope_theta, self.nope = width // self.heads, config.rope_theta, config.ttt_nope
        self.attention = Attention(config, window=config.window_size)  # q/k/v/o projections shared with the fast branch
        self.attn_heads, self.attn_head_dim = config.num_attention_heads, config.head_dim
        norm = lambda: nn.RMSNorm(config.head_dim, eps=config.rms_norm_eps) if config.attn_qk_norm else nn.Identity()  # noqa: E731
        self.q_norm, self.k_norm = norm(), norm()
        self.qk_scale = nn.Parameter(torch.empty(2, width))  # per-channel affine making fast q, k from q, k
        self.qk_offset = nn.Parameter(torch.empty(2, width))
        self.qkv_silu, self.qk_norm_eps = config.qkv_silu, config.qk_norm_eps
        fast = SwiGLUMemory(self.heads, self.head_dim, expansion=config.inter_multi, init_gain=config.fw_init_gain)
        self.memory = LargeChunkMemory(fast, DotProduct(), config.lact_chunk_size, use_momentum=config.use_momentum,
                                       use_muon=config.use_muon, weight_norm=config.weight_norm)
        self.lr_gate = nn.Linear(width, self.heads * len(fast.weight_names))
        self.base_lr_inv = math.log(math.expm1(config.base_lr))  # softplus^{-1}(base_lr)
        self.momentum_gate = nn.Linear(width, self.heads) if config.use_momentum else None
        self.ttt_norm = nn.RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.ttt_scale_proj = nn.Linear(width, self.heads) if config.learnable_ttt_scale else None

    def _tto_init(self, init) -> None:
        init.ones_(self.qk_scale)
        init.zeros_(self.qk_offset)

    def _fast_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, hidden) -> (B, T, fast heads, head_dim)."""
        return x.reshape(*x.shape[:2], self.heads, self.head_dim)

    def _l2_norm(self, x: torch.Tensor) -> torch.Tensor:
        """x / (|x| + qk_norm_eps) over the last dim."""
        return x / (x.norm(dim=-1, keepdim=True) + self.qk_norm_eps)

    def forward(self, x: torch.Tensor, ctx: Context, state: dict | None = None) -> torch.Tensor:
        b, t, width = x.shape
        attn = self.attention
        q = self.q_norm(attn.q_proj(x).view(b, t, self.attn_heads, self.attn_head_dim))
        k = self.k_norm(attn.k_proj(x).view(b, t, self.attn_heads, self.attn_head_dim))
        v = attn.v_proj(x).view(b, t, self.attn_heads, self.attn_head_dim)
        o = attn.attend(q, k, v, ctx, state)

        fast_q = q.flatten(2) * self.qk_scale[0] + self.qk_offset[0]
        fast_k = k.flatten(2) * self.qk_scale[1] + self.qk_offset[1]
        fast_v = v.flatten(2)
        if self.qkv_silu:
            fast_q, fast_k, fast_v = F.silu(fast_q), F.silu(fast_k), F.silu(fast_v)
        fast_q, fast_k = self._l2_norm(self._fast_heads(fast_q)), self._l2_norm(self._fast_heads(fast_k))
        if not self.nope:  # the attention's RoPE, on the attention's head layout
            cos, sin = rope_cos_sin(ctx.positions, self.attn_head_dim, self.rope_theta)
            rotate = lambda h: apply_rope(h.reshape(b, t, self.attn_heads, self.attn_head_dim), cos, sin)  # noqa: E731
            fast_q, fast_k = self._fast_heads(rotate(fast_q)), self._fast_heads(rotate(fast_k))
        lr = self.lr_gate(x)
        lr = F.softplus(lr.to(torch.promote_types(lr.dtype, torch.float32)) + self.base_lr_inv)  # float32 at least
        gates = {"lr": lr.view(b, t, self.heads, -1)}
        if self.momentum_gate is not None:
            gates["momentum"] = torch.sigmoid(self.momentum_gate(x))
        read = self.ttt_norm(self.memory(fast_q, fast_k, self._fast_heads(fast_v), gates, ctx.mask, state))
        if self.ttt_scale_proj is not None:
            read = read * F.silu(self.ttt_scale_proj(x))[..., None]
        return attn.o_proj(o + read.flatten(2).to(o.dtype))
