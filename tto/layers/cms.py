"""Continuum Memory System (CMS; Nested Learning, Behrouz et al., arXiv:2512.24695, Sec. 7): the
block MLP as a chain of MLP levels, each trained while reading at its own frequency.

The block's MLP becomes ``y_t = MLP^(k)(... MLP^(1)(x_t))``. Level l has a period ``C^(l)``
(``cms_periods[l]``): its weights theta^(l) change only at the end of each of its chunks of
``C^(l)`` tokens, by the gradients of its chunk, all taken at the chunk-start weights::

    theta^(l) <- theta^(l) - sum_{tau in chunk} lr_tau^(l) grad l(theta^(l); x_tau)   if t = 0 mod C^(l)
    theta^(l) unchanged                                                             otherwise

and every level is read at every token. Level l with ``C^(l) = None`` (infinite: never updated)
is a plain MLP, learned in pre-training and frozen at test time; one such level is the
Transformer's MLP.

Each updated level runs on the shared engine (:class:`tto.engine.Memory`, chunk ``C^(l)``, plain
gradient descent :class:`tto.engine.PlainGD`, chunk-start reads alone, ``read_start="only"``): a
token reads its level's weights as they were when its chunk started; its chunk's update serves the
tokens after the chunk. The fast weights live in the layer's cache state under ``cms.<l>.``
(float32 under autocast, as every memory's), so decoding token by token continues them exactly.

**Deviation: the engine's step bound.** A chunk sums up to ``C^(l)`` tokens' steps taken at one
point, so at long periods the paper's update overshoots and the level's weights grow geometrically
(HOPE-Attention at width 256, level period 2048: NaN within 4K tokens). Each commit therefore takes
its summed gradient times the engine's factor kappa in (0, 1] (:mod:`tto.engine.memory`: the chunk map
``W -> W - kappa sum_s lr_s H_s (W - W*)`` does not expand, ``kappa ||sum_s lr_s H_s|| <= 1.8``, with
the SwiGLU's Gauss-Newton curvature bounded by :meth:`tto.engine.SwiGLUMemory.curvature_gains`).
Where a chunk's step is stable by itself kappa = 1 and the update is the paper's.

Choices where the paper leaves the detail open (its "f(theta; x)" is "the error component of an
arbitrary optimizer"):

* the levels are SwiGLU MLPs (the backbone's MLP, ``hidden_size -> intermediate_size ->
  hidden_size``, SiLU, no biases), chained without residuals as the paper's composition is
  written; a never-updated level is the backbone's :class:`tto.layers.mlp.SwiGLU` itself (its
  init, its parameter names), an updated one the engine's :class:`tto.engine.SwiGLUMemory`
  (initial weights ~ N(0, 1 / fan_in), float32);
* each level's inner loss is its own input's reconstruction, ``1/(2 d) ||MLP^(l)(x) - x||^2`` with
  x the level's input (keys = values = x) and d = hidden_size (the mean over features, so that the
  step does not grow with the width): each level compresses its own context flow, no extra
  projections;
* the per-token step ``lr_tau^(l) = cms_max_lr * sigmoid(w^(l) . x_tau + b^(l))`` is a
  data-dependent gate of the level's input (one per level, shared by its three weights), the
  paper's eta_tau^(l);
* the chunk boundary is apply-then-update: the update at the end of a chunk reaches the tokens
  after it, not the chunk's own tokens (those read the chunk-start weights their gradients are
  taken at).
"""

from __future__ import annotations

import torch
from torch import nn

from ..cache import Context
from ..engine import Memory, PlainGD, SquaredError, SwiGLUMemory
from .gates import Gate
from .mlp import SwiGLU


class CMSLevel(nn.Module):
    """One level: x (B, T, hidden) -> MLP^(l)(x) (B, T, hidden), updated every `period` tokens
    (None: never, a plain MLP)."""

    def __init__(self, config, index: int, period: int | None):
        super().__init__()
        self.period = period
        if period is None:  # the backbone's own MLP
            self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, config.hidden_act)
            self.memory, self.lr_gate = None, None
        else:
            fast = SwiGLUMemory(1, config.hidden_size, hidden=config.intermediate_size)  # init N(0, 1 / fan_in)
            self.memory = Memory(fast, SquaredError(1 / config.hidden_size), PlainGD(), period, state_prefix=f"cms.{index}")
            self.lr_gate = Gate(config.hidden_size, 1, config.cms_max_lr, config.cms_lr_bias_init,
                                config.initializer_range)

    def forward(self, x: torch.Tensor, ctx: Context, state: dict | None) -> torch.Tensor:
        if self.memory is None:
            return self.mlp(x)
        q = x[:, :, None]  # one head of the full width: query = key = value = the level's input
        return self.memory(q, q, q, {"lr": self.lr_gate(x)}, ctx.mask, state, read_start="only")[:, :, 0]

    @torch.no_grad()
    def start_from(self, mlp: nn.Module) -> None:
        """Take the weights of the SwiGLU `mlp` (``gate_proj``, ``up_proj``, ``down_proj``, e.g. a
        pretrained block's MLP): a never-updated level holds them as they are, an updated one as its
        initial fast weights (``W0 = gate^T``, ``W2 = up^T``, ``W1 = down^T``), so the level computes
        `mlp` until its first update."""
        if self.memory is None:
            self.mlp.load_state_dict(mlp.state_dict())
            return
        fast = self.memory.fast
        for name, proj in (("W0", mlp.gate_proj), ("W2", mlp.up_proj), ("W1", mlp.down_proj)):
            getattr(fast, name).copy_(proj.weight.T[None])


class ContinuumMemory(nn.Module):
    """The CMS chain (module docstring): x (B, T, hidden) -> (B, T, hidden)."""

    def __init__(self, config):
        super().__init__()
        self.levels = nn.ModuleList(CMSLevel(config, i, period) for i, period in enumerate(config.cms_periods))

    def forward(self, x: torch.Tensor, ctx: Context, state: dict | None) -> torch.Tensor:
        for level in self.levels:
            x = level(x, ctx, state)
        return x

    def start_from(self, mlp: nn.Module) -> None:
        """Every level starts from the SwiGLU `mlp` (:meth:`CMSLevel.start_from`)."""
        for level in self.levels:
            level.start_from(mlp)
