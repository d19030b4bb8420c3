"""Miras: "It's All Connected: A Journey Through Test-Time Memorization, Attentional Bias,
Retention, and Online Optimization" (Behrouz, Razaviyayn, Zhong, Mirrokni; arXiv:2504.13173).

Miras describes a memory by four choices: its architecture, its attentional bias (the inner
objective), its retention (how strongly it keeps its past) and its memory learning algorithm. Its
three models share the architecture, a per-head 2-layer MLP memory ``x + LN(MLP(x))`` (expansion
4, GELU), and the learning algorithm, gradient descent with a data-dependent step ``eta_t``
(``lr_gate``) and retention ``alpha_t`` (``forget_gate``) on gradients at the chunk-start weights
(chunks of ``chunk_size``). They differ in bias and retention, chosen by ``variant``:

* ``moneta``: l_p bias ``||M(k) - v||_p^p`` (``lp_p`` = 3) and l_q retention (``lq_q`` = 4): the memory
  accumulates ``A_t = alpha_t A_{t-1} - eta_t grad`` and reads ``W = A / ||A||_q^(q-2)``
  (:class:`tto.engine.LpError`, :class:`tto.engine.LqNormalization`);
* ``yaad``: Huber bias, the l2 gradient while the error's RMS ``||M(k) - v|| / sqrt(d) <= delta_t``
  and ``delta_t`` times the l1 gradient beyond (``huber_delta_gate``: ``huber_delta_max * sigmoid``), with l2 retention
  (:class:`tto.engine.Huber`);
* ``memora``: l2 bias with KL retention: each row of each memory weight is a probability vector,
  updated in log space, ``W_t = softmax(alpha_t log W_{t-1} - eta_t grad)``
  (:class:`tto.engine.SoftmaxRetention`; ``memora_scale`` c, not in the paper, makes the rows sum
  to c instead: ``W_t = c softmax(alpha_t log(W_{t-1} / c) - eta_t grad / c)``).

The layer around the memory is the Titans/Miras memory layer (:class:`tto.layers.memory_layer.MemoryLayer`):
q, k, v linear maps + short conv + SiLU, l2-normalised q and k, RMSNorm and ``silu`` output gate,
output projection.

Differences from the paper (which has no public code): the nonlinear retentions act at chunk
boundaries only, as the paper's parallel training does. Inside a chunk Moneta holds the normaliser
at its chunk-start value, ``A_t / ||A_c||_q^(q-2)``; the chunk's last token reads the normalised
``W_b = A_b / ||A_b||_q^(q-2)``, so at ``chunk_size`` 1 every read is the paper's per-token
``W_t = A_t / ||A_t||_q^(q-2)``. Memora takes linear steps whose sum is applied in log space at the
chunk end, and every token of the chunk reads the linear steps (the paper's "lag token" scheme is
not reproduced). Gates are scalar per
head and token (linear maps of x), where the paper allows channel-wise gates from low-rank
projections; the hybrid "-H" models (with sliding-window attention) are the backbone's
``layer_mixers`` hybrids with ``transformer`` layers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from ..cache import Context
from ..config import config_error
from ..engine import (DecayGD, Huber, LpError, LqNormalization, MLPMemory, Memory, Objective, Retention,
                      SoftmaxRetention, SquaredError)
from ..layers.gates import Gate
from ..layers.memory_layer import MemoryLayer, MemoryLayerConfig
from ..registry import FromAttention, qkvo, register

MIRAS_PRESETS = {
    # the paper's 340M / 760M rows (Table 2): 24 layers of 1024 / 1536; at 340M the MLP is 2560 wide
    # (not 2816) so that the output gate and the memories' initial weights fit the size
    "340m": dict(hidden_size=1024, intermediate_size=2560, num_hidden_layers=24, num_memory_heads=16,
                 num_attention_heads=16),
    "760m": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=24, num_memory_heads=16,
                 num_attention_heads=16),
    # small chunks; Yaad's threshold at 1, inside the spread of unit-scale errors, so both regimes occur
    "tiny": dict(chunk_size=2, huber_delta_bias_init=0.0),
}


class MirasConfig(MemoryLayerConfig):
    """Miras fields, beside the memory layer's (:class:`MemoryLayerConfig`)."""

    choices: ClassVar[dict[str, tuple]] = {**MemoryLayerConfig.choices, "variant": ("moneta", "yaad", "memora")}
    variant_field: ClassVar[str] = "variant"

    variant: str = "moneta"  # "moneta": l_p bias + l_q retention; "yaad": Huber bias; "memora": KL retention
    mem_activation: str = "gelu"  # activation between the memory MLP's layers (the paper: GELU)
    mem_residual_norm: bool = True  # memory is x + LayerNorm(MLP(x))
    # initial bias of the alpha gate (pre-sigmoid; negative: remember). Moneta reads W = A / ||A||_4^2,
    # which grows as the decay shrinks A (down to lq_min_norm): at -4 (alpha ~ 0.018) ||A|| halves every
    # 38 tokens of weak writes
    forget_gate_bias_init: float = -8.0
    lp_p: float = 3.0  # Moneta: p of the l_p attentional bias (the paper's best: 3)
    lp_eps: float = 1e-6  # Moneta: |e| is smoothed to sqrt(e^2 + lp_eps) (0: exact)
    lq_q: float = 4.0  # Moneta: q of the l_q retention (must not be 3)
    # Moneta: floor on the accumulator's norm ||A||_q (not in the paper; tto.engine.LqNormalization): a
    # strong forget gate shrinks A geometrically and W = A / ||A||_q^(q-2) then grows as 1 / ||A|| (q = 4)
    # until it overflows; with the floor ||W||_q <= lq_min_norm^(3-q) (10 at q = 4; the 340M preset's
    # initial ||W||_4 is 0.3, its ||A||_4 3.4: the paper's update runs unchanged above the floor)
    lq_min_norm: float = 0.1
    huber_delta_max: float = 2.0  # Yaad: delta_t = huber_delta_max * sigmoid(.), the Huber threshold on the error's RMS
    huber_delta_bias_init: float = 2.0  # Yaad: initial bias of the delta gate (pre-sigmoid: delta starts at 1.76, above unit errors)
    memora_scale: float = 1.0  # Memora: every memory weight row sums to this (the paper: 1, probability rows)
    memora_logit_std: float = 1.0  # Memora: std of the initial weights' logits (near-uniform rows make x + LN(MLP(x)) ill-conditioned)

    def validate(self) -> None:
        super().validate()
        if self.lq_q == 3 or self.lq_q < 2:
            raise config_error("lq_q", self.lq_q, "must be >= 2 and != 3 (at q = 3 the read weights do not determine ||A||)")
        for name in ("lp_p", "memora_scale", "memora_logit_std", "huber_delta_max", "lq_min_norm"):
            if getattr(self, name) <= 0:
                raise config_error(name, getattr(self, name), "must be > 0")


#: variant -> (attentional bias, retention, the bias's own gates, init std of the memory weights)
VARIANTS: dict[str, Callable[[MirasConfig], tuple[Objective, Retention, dict[str, nn.Module], float]]] = {
    "moneta": lambda c: (LpError(c.lp_p, c.lp_eps), LqNormalization(c.lq_q, c.lq_min_norm), {}, c.initializer_range),
    "yaad": lambda c: (Huber(), Retention(), {
        "huber_delta": Gate(c.hidden_size, c.num_memory_heads, c.huber_delta_max, c.huber_delta_bias_init, c.initializer_range)},
        c.initializer_range),
    "memora": lambda c: (SquaredError(1.0), SoftmaxRetention(c.memora_scale), {}, c.memora_logit_std),
}


#: retrofit (tto.retrofit): as ATLAS and Titans LMM, the memory layer's q, k, v, o from the
#: attention's, one memory head per attention head; everything else from init
MIRAS_FROM_ATTENTION = FromAttention(lambda mixer: qkvo(mixer.memory),
                                     heads=lambda heads, head_dim: {"num_memory_heads": heads})


@register("miras", config=MirasConfig, presets=MIRAS_PRESETS, paper_sizes={"340m": 340e6, "760m": 760e6},
          paper="arXiv:2504.13173 (Behrouz et al., 2025)",
          from_attention=MIRAS_FROM_ATTENTION)
class MirasMixer(nn.Module):
    """Miras memory layer: x (B, T, hidden) -> (B, T, hidden), with the bias and retention of `config.variant`."""

    def __init__(self, config: MirasConfig, layer_idx: int):
        super().__init__()
        objective, retention, bias_gates, init_std = VARIANTS[config.variant](config)
        heads, width, std = config.num_memory_heads, config.hidden_size, config.initializer_range
        fast = MLPMemory(heads, width // heads, depth=config.mem_depth, expansion=config.mem_expansion_factor,
                         activation=config.mem_activation, bias=False, residual_norm=config.mem_residual_norm,
                         norm_eps=config.rms_norm_eps, init_std=init_std)
        memory = Memory(fast, objective, DecayGD(), config.chunk_size, retention=retention,
                        checkpoint_group=config.scan_checkpoint_group_size)
        gates = {"lr": Gate(width, heads, config.mem_max_lr, config.lr_gate_bias_init, std),  # eta_t
                 "forget": Gate(width, heads, 1.0, config.forget_gate_bias_init, std),  # alpha_t
                 **bias_gates}
        self.memory = MemoryLayer(config, memory, gates)

    def forward(self, x: torch.Tensor, ctx: Context, state: dict | None = None) -> torch.Tensor:
        return self.memory(x, ctx, state)
