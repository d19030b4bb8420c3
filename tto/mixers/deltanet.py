"""DeltaNet and Gated DeltaNet: a linear memory written with the delta rule.

DeltaNet: "Parallelizing Linear Transformers with the Delta Rule over Sequence Length" (Yang et
al., arXiv:2406.06484). Gated DeltaNet: "Gated Delta Networks: Improving Mamba2 with Delta Rule"
(Yang, Kautz, Hatamizadeh; arXiv:2412.06464). Layers as in flash-linear-attention
(``fla/layers/delta_net.py``, ``fla/layers/gated_deltanet.py``).

Per head, the memory is a matrix ``S`` (head_k_dim x head_v_dim) and each token takes one exact
gradient step on ``1/2 ||S^T k_t - v_t||^2`` with step ``beta_t`` (the inner lr), Gated DeltaNet
after a decay ``a_t`` (the forget gate)::

    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,      o_t = S_t^T q_t / sqrt(d_k)

computed by the engine's :class:`tto.engine.DeltaRule` in its exact chunkwise (WY) form, with the
per-token recurrence as the reference.

* views: q, k, v are linear maps of x, each followed by a short causal conv and SiLU (conv weights
  ~ N(0, initializer_range), as fla's models initialise them); q and k are l2-normalised per head as
  fla's ``l2norm``: ``x / sqrt(|x|^2 + qk_norm_eps)``;
* inner lr (``lr_gate``): ``beta_t = sigmoid(x . w_h + b_h)`` per head, or twice that with
  ``allow_neg_eigval`` (fla's option: beta in (0, 2), so the transition ``I - beta k k^T`` can have
  the eigenvalue ``1 - beta < 0`` along k, which lets the state flip signs: state tracking);
* forget gate (Gated DeltaNet, ``forget_gate``): Mamba2's ``a_t = exp(-exp(A_log) softplus(x . w_h
  + dt_bias))``;
* output: per-head RMSNorm of o, times ``silu(g_proj(x))`` when ``use_gate``, then ``o_proj``.

Differences from fla: the beta projection has a bias (init 0: sigmoid 0.5, as fla's bias-free
start); fla's non-SiLU/non-l2 q/k options are not offered.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import Context
from ..config import MemoryConfig, config_error
from ..engine import DeltaRule
from ..layers.conv import ShortConv
from ..layers.gates import DecayGate, Gate
from ..registry import FromAttention, qkvo, register

#: sizes of the papers' tables: 340M (DeltaNet Table 2, fla configs/delta_net_340M), 1.3B
#: (DeltaNet Table 2 and Gated DeltaNet Table 1; fla gated_deltanet_1B: head_dim 256, expand_v 2)
DELTANET_PRESETS = {
    "340m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_memory_heads=8, num_attention_heads=16),
    "1.3b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_memory_heads=16, num_attention_heads=32),
    "tiny": dict(chunk_size=4),
    "tiny-neg-eigval": dict(chunk_size=4, allow_neg_eigval=True),
}
GATED_DELTANET_PRESETS = {
    "1.3b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=21, num_memory_heads=6,
                 head_k_dim=256, expand_v=2.0, num_attention_heads=32),
    "tiny": dict(chunk_size=4, expand_v=2.0),
}


class DeltaNetConfig(MemoryConfig):
    """DeltaNet fields (fla's names where it has them; fla's ``num_heads`` is ``num_memory_heads``)."""

    aliases: ClassVar[dict[str, str]] = {"num_heads": "num_memory_heads"}
    positive_fields: ClassVar[tuple[str, ...]] = MemoryConfig.positive_fields + ("chunk_size",)
    chunk_field: ClassVar[str] = "chunk_size"

    head_k_dim: int | None = None  # key/query width per head (None: hidden_size // num_memory_heads)
    expand_v: float = 1.0  # value width per head = expand_v * head_k_dim
    use_gate: bool = False  # output gated by silu(g_proj(x)) (fla DeltaNet: off; Gated DeltaNet: on)
    lr_gate_bias_init: float = 0.0  # initial bias of the beta gate (pre-sigmoid)
    qk_norm_eps: float = 1e-6  # q, k = x / sqrt(|x|^2 + qk_norm_eps) per head (fla's l2norm)
    allow_neg_eigval: bool = False  # beta in (0, 2) instead of (0, 1): negative eigenvalues (fla's option)
    chunk_size: int = 64  # tokens per chunk of the exact chunkwise form (changes speed, not results)

    @property
    def key_dim(self) -> int:
        return self.head_k_dim or self.hidden_size // self.num_memory_heads

    @property
    def value_dim(self) -> int:
        return int(self.key_dim * self.expand_v)

    def validate(self) -> None:
        super().validate()
        if self.head_k_dim is None and self.hidden_size % self.num_memory_heads:
            raise config_error("num_memory_heads", self.num_memory_heads, f"must divide hidden_size={self.hidden_size} (or set head_k_dim)")
        if not self.qk_norm_eps > 0:
            raise config_error("qk_norm_eps", self.qk_norm_eps, "must be > 0")
        if self.head_k_dim is not None and self.head_k_dim <= 0:
            raise config_error("head_k_dim", self.head_k_dim, "must be a positive integer or None")
        if self.expand_v <= 0 or (self.key_dim * self.expand_v) % 1:
            raise config_error("expand_v", self.expand_v, f"must be > 0 and make expand_v * head_k_dim ({self.key_dim}) whole")


class GatedDeltaNetConfig(DeltaNetConfig):
    """DeltaNet fields plus the Mamba2 decay gate's initialisation."""


    use_gate: bool = True
    a_init_max: float = 16.0  # A ~ U(0, a_init_max] per head (Mamba2)
    dt_min: float = 0.001  # dt ~ log-uniform [dt_min, dt_max] at init (Mamba2)
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4  # smallest initial dt

    def validate(self) -> None:
        super().validate()
        if not 0 < self.dt_min <= self.dt_max:
            raise config_error("dt_min", self.dt_min, f"must satisfy 0 < dt_min <= dt_max={self.dt_max}")
        if self.a_init_max <= 0:
            raise config_error("a_init_max", self.a_init_max, "must be > 0")


#: retrofit (tto.retrofit): one delta-rule head per attention head, as wide (num_memory_heads, head_k_dim);
#: q, k, v, o from the attention's (k, v repeated from grouped KV heads; no RoPE, so the positions are
#: lost; with expand_v != 1, v and o do not fit and start from init). Convs, the beta gate (and the
#: decay gate), the output norm and gate start from init.
DELTANET_FROM_ATTENTION = FromAttention(qkvo, heads=lambda heads, head_dim: {"num_memory_heads": heads, "head_k_dim": head_dim})


@register("deltanet", config=DeltaNetConfig, presets=DELTANET_PRESETS, paper_sizes={"340m": 340e6, "1.3b": 1.3e9},
          paper="arXiv:2406.06484 (Yang et al., 2024)",
          from_attention=DELTANET_FROM_ATTENTION)
class DeltaNetMixer(nn.Module):
    """DeltaNet layer: x (B, T, hidden) -> (B, T, hidden). State: ``memory.W.S`` and the conv tails."""

    def __init__(self, config: DeltaNetConfig, layer_idx: int):
        super().__init__()
        width, heads, std = config.hidden_size, config.num_memory_heads, config.initializer_range
        self.num_heads, self.head_k_dim, self.head_v_dim = heads, config.key_dim, config.value_dim
        key_width, value_width = heads * self.head_k_dim, heads * self.head_v_dim
        self.q_proj = nn.Linear(width, key_width, bias=False)
        self.k_proj = nn.Linear(width, key_width, bias=False)
        self.v_proj = nn.Linear(width, value_width, bias=False)
        self.conv_q = ShortConv(key_width, config.conv_kernel, bias=False, init_std=std)
        self.conv_k = ShortConv(key_width, config.conv_kernel, bias=False, init_std=std)
        self.conv_v = ShortConv(value_width, config.conv_kernel, bias=False, init_std=std)
        self.qk_norm_eps = config.qk_norm_eps
        self.lr_gate = Gate(width, heads, 2.0 if config.allow_neg_eigval else 1.0, config.lr_gate_bias_init, std)  # beta_t
        self.memory = DeltaRule(config.chunk_size)
        self.out_norm = nn.RMSNorm(self.head_v_dim, eps=config.rms_norm_eps)
        self.g_proj = nn.Linear(width, value_width, bias=False) if config.use_gate else None
        self.o_proj = nn.Linear(value_width, width, bias=False)

    def gates(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The delta rule's gates, (B, T, heads) each: ``lr`` beta_t (DeltaNet has no decay)."""
        return {"lr": self.lr_gate(x)}

    def _view(self, proj: nn.Linear, conv: ShortConv, x, ctx: Context, state, key: str, dim: int) -> torch.Tensor:
        """SiLU(conv(proj(x))) per head: (B, T, heads, dim)."""
        return F.silu(conv(proj(x), ctx.mask, state, key)).view(*x.shape[:2], self.num_heads, dim)

    def _l2norm(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + self.qk_norm_eps)

    def forward(self, x: torch.Tensor, ctx: Context, state: dict | None = None) -> torch.Tensor:
        q = self._l2norm(self._view(self.q_proj, self.conv_q, x, ctx, state, "conv_q", self.head_k_dim))
        k = self._l2norm(self._view(self.k_proj, self.conv_k, x, ctx, state, "conv_k", self.head_k_dim))
        v = self._view(self.v_proj, self.conv_v, x, ctx, state, "conv_v", self.head_v_dim)
        o = self.memory(q * self.head_k_dim**-0.5, k, v, self.gates(x), ctx.mask, state)
        o = self.out_norm(o).flatten(2)
        if self.g_proj is not None:
            o = o * F.silu(self.g_proj(x))
        return self.o_proj(o)


@register("gated_deltanet", config=GatedDeltaNetConfig, presets=GATED_DELTANET_PRESETS, paper_sizes={"1.3b": 1.3e9},
          paper="arXiv:2412.06464 (Yang, Kautz, Hatamizadeh, 2024)", from_attention=DELTANET_FROM_ATTENTION)
class GatedDeltaNetMixer(DeltaNetMixer):
    """Gated DeltaNet layer: DeltaNet with the decay ``a_t`` (its only difference)."""

    def __init__(self, config: GatedDeltaNetConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.forget_gate = DecayGate(config.hidden_size, config.num_memory_heads, config.a_init_max, config.dt_min,
                                     config.dt_max, config.dt_init_floor, config.initializer_range)

    def gates(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """DeltaNet's gates and ``log_decay``: log a_t."""
        return {**super().gates(x), "log_decay": self.forget_gate(x)}
