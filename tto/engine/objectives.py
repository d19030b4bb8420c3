"""Inner objectives: the loss a memory minimizes on each (key, value) pair.

An objective gives the loss (used by the naive reference through autograd) and its gradient with
respect to the memory output (used by the fast path, which back-propagates it by hand).
"""

from __future__ import annotations

import torch


class SquaredError:
    """l(y, v) = scale / 2 * ||y - v||^2 per token.

    scale 1 is TTT's ``1/2 ||f(k) - v||^2``; scale 2 is the unhalved ``||M(k) - v||^2`` of Titans;
    scale 2/d averages over features (titans-pytorch).
    """

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def loss(self, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.scale * (y - v).pow(2).sum(-1)

    def grad(self, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return y - v if self.scale == 1.0 else self.scale * (y - v)
