"""Data-dependent gates: per token and head, a linear map of the mixer input squashed to a range."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Gate(nn.Module):
    """``scale * sigmoid(x W^T + b)``: (B, T, width) -> (B, T, heads), in (0, scale)."""

    def __init__(self, width: int, heads: int, scale: float, bias_init: float, init_std: float):
        """Initialised with weights ~ N(0, init_std^2) and the bias at ``bias_init``."""
        super().__init__()
        self.weight = nn.Parameter(torch.empty(heads, width))
        self.bias = nn.Parameter(torch.empty(heads))
        self.scale, self.bias_init, self.init_std = scale, bias_init, init_std

    def _tto_init(self, init) -> None:
        init.normal_(self.weight, mean=0.0, std=self.init_std)
        init.constant_(self.bias, self.bias_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.sigmoid(F.linear(x, self.weight, self.bias))


class HeadGate(Gate):
    """``scale * sigmoid(m_h . w_h + b_h)``: each head's scalar from that head's own features,
    (B, T, heads, width) -> (B, T, heads) (HOPE's eta and alpha, read out of their memories)."""

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.sigmoid((m * self.weight.to(m.dtype)).sum(-1) + self.bias.to(m.dtype))


class DecayGate(nn.Module):
    """Mamba2's decay in log space: ``log a_t = -exp(A_log) * softplus(x W^T + dt_bias)`` (B, T, heads), <= 0.

    Initialised as Mamba2: ``A ~ U(0, a_init_max]`` per head and ``dt_bias = softplus^{-1}(dt)`` with
    ``dt`` log-uniform in [dt_min, dt_max] (at least dt_init_floor); weights ~ N(0, init_std^2).
    """

    def __init__(self, width: int, heads: int, a_init_max: float, dt_min: float, dt_max: float, dt_init_floor: float,
                 init_std: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(heads, width))
        self.A_log = nn.Parameter(torch.empty(heads))
        self.dt_bias = nn.Parameter(torch.empty(heads))
        self.a_init_max, self.dt_range, self.dt_init_floor = a_init_max, (dt_min, dt_max), dt_init_floor
        self.init_std = init_std

    def _tto_init(self, init) -> None:
        init.normal_(self.weight, mean=0.0, std=self.init_std)
        with torch.no_grad():
            a = torch.empty_like(self.A_log).uniform_(0.0, self.a_init_max).clamp_min(torch.finfo(torch.float32).tiny)
            init.copy_(self.A_log, a.log())
            lo, hi = (math.log(v) for v in self.dt_range)
            dt = torch.exp(torch.empty_like(self.dt_bias).uniform_(lo, hi)).clamp_min(self.dt_init_floor)
            init.copy_(self.dt_bias, dt + torch.log(-torch.expm1(-dt)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """In float32 at least (the decay compounds over the sequence), float64 for float64 inputs."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        return -self.A_log.to(dtype).exp() * F.softplus(F.linear(x, self.weight).to(dtype) + self.dt_bias.to(dtype))
