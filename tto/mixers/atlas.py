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
  (:class:`tto.engine.OmegaWindow`); c = 1 is the online rule. The window reaches back across chunk
  boundaries: the layer's state keeps the last c - 1 keys, values and gammas of the committed
  chunks (``memory.window.*``), so a sequence gives the same result in one call or token by token;
* **optimizer**, chosen by ``variant``: ``omeganet``, gradient descent with forgetting,
  ``M_t = alpha_t M_{t-1} - eta_t g~_t`` (:class:`tto.engine.DecayGD`; the engine's forget gate is
  1 - alpha_t); ``atlas``, Muon: momentum of the raw windowed gradients ``S_t = theta_t S_{t-1} + g~_t``
  and ``M_t = alpha_t M_{t-1} - eta_t NS5(S_t)`` (:class:`tto.engine.MomentumGD` with
  ``lr_after_momentum``, :class:`tto.engine.MuonRetention`): eta_t is the step size of an
  orthogonalised step, at most ``mem_max_lr``.

Gradients are taken at the chunk-start weights (chunks of ``chunk_size``), as in the paper's
parallel form, those of the window's tokens from the previous chunk included; at ``chunk_size`` 1
both variants commit the paper's per-token rules (omeganet's within the engine's step bound, which
is 1 wherever a step is stable by itself, :mod:`tto.engine.memory`).

Differences from the paper:

* **Muon at chunk granularity.** NS5 runs once per chunk, on the chunk-end momentum S_b, and every
  token's step uses it: ``M_b = (prod alpha) M_c - eta_bar NS5(S_b)``, ``eta_bar = sum_t (prod_{r>t}
  alpha_r) eta_t``, where the per-token rule has ``sum_t (prod_{r>t} alpha_r) eta_t NS5(S_t)`` (b
  Newton-Schulz runs on b materialised momenta per chunk). S_b rather than, say, the eta-weighted
  sum of the chunk's S_t: it is the momentum the next chunk continues from, it makes ``chunk_size`` 1
  the paper's rule exactly, and NS5 keeps only the direction, which the S_t of a chunk share with
  S_b as theta nears 1. The step's size is the paper's (eta after NS5: eta / 100 gives a step 100 x
  smaller) and needs no step bound (:mod:`tto.engine.memory`).
* **Reads inside a chunk.** The paper reads ``M_t(q_t)``; here token t reads the weights of the
  same recurrence without the orthogonalisation, ``W_t = alpha_t W_{t-1} + eta_t S_t`` (engine sign:
  S is the negated momentum) through the dual form, update-then-read, and only chunk ends commit the
  Muon step: NS5(S_t) per token would need every S_t materialised (b x 2145 x 256 per head and
  chunk), what the dual form avoids. At ``chunk_size`` 1 a token's read differs from ``M_t(q_t)``
  only by its own step being linear; ``read_start`` reads ``M_{t-1}(q_t)`` exactly.
* **gamma_i, not gamma_i^(t).** The paper writes the Omega weights gamma_i^(t) (per token i and step t)
  without defining their parametrisation; here gamma_i is one data-dependent gate of token i
  (``omega_gate``), the same in every window that holds it. Gates are scalar per head and token.
* **No residual in the deep memory.** The paper's memory is ``x + MLP(x)``; here it reads phi(k)
  (2145 wide for 64-wide heads at degree 2) and writes values of the head width, so the residual
  does not type-check; the memory is the plain MLP.
* **Variants.** The DeepTransformer/Dot variants (exponential kernels with dot-product bias) and the
  MAG/MAL hybrids are not separate variants here (hybrids with attention layers come from
  ``layer_mixers``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from ..cache import Context
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
    # the largest eta_t. omeganet: a chunk's gradients, all at its start, act as one step of
    # mem_max_lr x chunk x window on a loss whose curvature grows with ||phi(k)||^2 (2.5 at degree 2):
    # 0.1 diverges at chunk 16 without the engine's step bound. atlas: each token's Muon step has
    # spectral norm <= 1.15 eta_t (NS5's singular values are ~1), whatever the gradients
    mem_max_lr: float = 0.01
    # the memory's first layer is phi-width (2145 x 256 per 64-wide head at degree 2): keeping every
    # chunk's weights for the backward pass takes GBs per layer, so chunks are recomputed in groups
    scan_checkpoint_group_size: int = 16

#: variant -> (inner optimizer, chunk-boundary retention, its gates beyond lr / forget / omega)
VARIANTS: dict[str, Callable[[AtlasConfig], tuple[InnerOptimizer, Retention | None, dict[str, nn.Module]]]] = {
    "omeganet": lambda c: (DecayGD(), None, {}),
    "atlas": lambda c: (MomentumGD(lr_after_momentum=True), MuonRetention(), {
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
