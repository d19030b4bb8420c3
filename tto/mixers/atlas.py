"""ATLAS: "ATLAS: Learning to Optimally Memorize the Context at Test Time" (Behrouz et al.,
arXiv:2505.23735). There is no official code; this follows the paper.

ATLAS keeps the Titans memory layer (:class:`tto.layers.memory_layer.MemoryLayer`: q, k, v
projections, short conv + SiLU, l2-normalised q and k, RMSNorm and ``silu`` output gate, output
projection) and changes what the memory learns and how:

* **polynomial features** (``poly_degree`` p): keys and queries enter the memory as
  ``phi_p(x)``, all monomials of degree <= p with learned per-degree coefficients initialised so
  that ``phi(q) . phi(k)`` is the Taylor polynomial of ``exp(q . k)``
  (:class:`tto.engine.PolynomialFeatures`); the memory MLP reads ``phi(k)`` (its input width)
  and writes values of the head width;
* **Omega rule** (``omega_window`` c): each step minimises the loss over the last c tokens,
  ``sum_i gamma_i ||M(phi(k_i)) - v_i||^2``, with data-dependent ``gamma_i`` (``omega_gate``)
  (:class:`tto.engine.OmegaWindow`); c = 1 is the online rule;
* **optimizer**, chosen by ``variant``: ``omeganet``, gradient descent with forgetting,
  ``M_t = (1 - alpha_t) M_{t-1} - eta_t g~_t``; ``atlas``, momentum ``S_t = theta_t S_{t-1} - eta_t g~_t``
  with forgetting and the Muon (Newton-Schulz) orthogonalisation of the update
  (:class:`tto.engine.MuonRetention`, post-Muon step ``muon_scale``).

Gradients are taken at the chunk-start weights (chunks of ``chunk_size``), as in Titans.

Differences from the paper: the Omega window does not reach back across a chunk boundary; Muon
is applied to each chunk's accumulated update at the chunk end (inside a chunk the reads see the
linear momentum steps), the chunk-level simplification of the per-token ``NS5(S_t)``; gates are
scalar per head and token, and the Omega weight ``gamma_i`` belongs to token i, the same in every
step whose window holds it (the paper's ``gamma_i^(t)`` may differ per step t). Because the window
stops at chunk boundaries, a token's window is ``min(c, its place in the chunk)`` tokens: at
``chunk_size`` 1 the Omega rule is the online rule whatever ``omega_window``. ``eta_t`` sits inside the
momentum (``S_t = theta_t S_{t-1} - eta_t g~_t``) as in the omeganet variant, where the paper applies it
after the orthogonalisation (``M_t = alpha_t M_{t-1} - eta_t NS5(S_t)``): Newton-Schulz normalises the
chunk's step, so eta_t weighs the tokens within a chunk but not the step's size, which is
``muon_scale``. The deep memory has no residual (``x + MLP(x)`` in the paper): it reads phi(k), wider
than the values it writes. The DeepTransformer/Dot variants (exponential kernels with
dot-product bias) and the MAG/MAL hybrids are not separate variants here (hybrids with attention
layers come from ``layer_mixers``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from ..cache import Context
from ..config import config_error
from ..engine import (DecayGD, InnerOptimizer, MLPMemory, Memory, MomentumGD, MuonRetention, OmegaWindow,
                      PolynomialFeatures, Retention, SquaredError)
from ..layers.gates import Gate
from ..layers.memory_layer import MemoryLayer, MemoryLayerConfig
from ..registry import FromAttention, qkvo, register

ATLAS_PRESETS = {
    # a 24 x 1024 model of the paper's 340M class: degree-2 features of 64-wide heads (2145 features)
    # make the memories' initial weights large, so the MLP is narrower and the memory one layer
    "340m": dict(hidden_size=1024, intermediate_size=2048, num_hidden_layers=24, num_memory_heads=16,
                 num_attention_heads=16, mem_depth=1),
    "tiny": dict(chunk_size=4, omega_window=2),
}


class AtlasConfig(MemoryLayerConfig):
    """ATLAS fields, beside the memory layer's (:class:`MemoryLayerConfig`)."""

    choices: ClassVar[dict[str, tuple]] = {**MemoryLayerConfig.choices, "variant": ("omeganet", "atlas")}
    variant_field: ClassVar[str] = "variant"
    positive_fields: ClassVar[tuple[str, ...]] = MemoryLayerConfig.positive_fields + ("omega_window", "poly_degree")

    variant: str = "atlas"  # "atlas": momentum + Muon; "omeganet": gradient descent with forgetting
    poly_degree: int = 2  # p: degree of the polynomial feature map of keys and queries (1: identity plus a constant)
    omega_window: int = 4  # c: tokens in the Omega rule's loss window (1: the online rule)
    omega_gate_bias_init: float = 4.0  # initial bias of the gamma gate (pre-sigmoid: gamma starts near 1)
    momentum_gate_bias_init: float = 0.0  # atlas: initial bias of the theta gate (pre-sigmoid)
    muon_scale: float = 0.01  # atlas: step size of the orthogonalised chunk update (singular values ~1)
    # a chunk's gradients, all at its start, act as one step of mem_max_lr x chunk x window on a
    # loss whose curvature grows with ||phi(k)||^2 (2.5 at degree 2): 0.1 diverges at chunk 16
    mem_max_lr: float = 0.01
    # the memory's first layer is phi-width (2145 x 256 per 64-wide head at degree 2): keeping every
    # chunk's weights for the backward pass takes GBs per layer, so chunks are recomputed in groups
    scan_checkpoint_group_size: int = 16

    def validate(self) -> None:
        super().validate()
        if self.muon_scale <= 0:
            raise config_error("muon_scale", self.muon_scale, "must be > 0")


#: variant -> (inner optimizer, chunk-boundary retention, its gates beyond lr / forget / omega)
VARIANTS: dict[str, Callable[[AtlasConfig], tuple[InnerOptimizer, Retention | None, dict[str, nn.Module]]]] = {
    "omeganet": lambda c: (DecayGD(), None, {}),
    "atlas": lambda c: (MomentumGD(), MuonRetention(c.muon_scale), {
        "momentum": Gate(c.hidden_size, c.num_memory_heads, 1.0, c.momentum_gate_bias_init, c.initializer_range)}),  # theta_t
}


#: retrofit (tto.retrofit): one memory head per attention head (num_memory_heads); the memory layer's
#: q, k, v, o from the attention's (k, v repeated from grouped KV heads; no RoPE, so the positions are
#: lost). Convs, gates, feature coefficients, the output gate and norm and the memory start from init.
ATLAS_FROM_ATTENTION = FromAttention(lambda mixer: qkvo(mixer.memory),
                                     heads=lambda heads, head_dim: {"num_memory_heads": heads})


@register("atlas", config=AtlasConfig, presets=ATLAS_PRESETS, paper_sizes={"340m": 340e6}, paper="arXiv:2505.23735 (Behrouz et al., 2025)",
          from_attention=ATLAS_FROM_ATTENTION)
class AtlasMixer(nn.Module):
    """ATLAS memory layer: x (B, T, hidden) -> (B, T, hidden), optimizer of `config.variant`."""

    def __init__(self, config: AtlasConfig, layer_idx: int):
        super().__init__()
        optimizer, retention, extra_gates = VARIANTS[config.variant](config)
        heads, width, std = config.num_memory_heads, config.hidden_size, config.initializer_range
        features = PolynomialFeatures(width // heads, config.poly_degree)
        fast = MLPMemory(heads, width // heads, depth=config.mem_depth, expansion=config.mem_expansion_factor,
                         activation=config.mem_activation, bias=False, residual_norm=False,
                         init_std=std, in_dim=features.out_dim)
        memory = Memory(fast, SquaredError(2.0), OmegaWindow(optimizer, config.omega_window), config.chunk_size,
                        retention=retention, checkpoint_group=config.scan_checkpoint_group_size)
        gates = {"lr": Gate(width, heads, config.mem_max_lr, config.lr_gate_bias_init, std),  # eta_t
                 "forget": Gate(width, heads, 1.0, config.forget_gate_bias_init, std),  # alpha_t
                 "omega": Gate(width, heads, 1.0, config.omega_gate_bias_init, std),  # gamma_t
                 **extra_gates}
        self.memory = MemoryLayer(config, memory, gates, feature_map=features)

    def forward(self, x: torch.Tensor, ctx: Context, state: dict | None = None) -> torch.Tensor:
        return self.memory(x, ctx, state)
