"""Feature maps applied to keys and queries before the memory (ATLAS' polynomial kernels).

:class:`PolynomialFeatures` of degree p maps x (d) to all monomials of degree <= p, weighted so
that ``<phi(q), phi(k)> = sum_i a_i^2 (q . k)^i``. With the learnable per-degree coefficients at
their initial ``a_i = 1 / sqrt(i!)`` this is the Taylor polynomial of ``exp(q . k)``: a memory on
phi(k) can store O(d^p) independent pairs instead of O(d).
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class PolynomialFeatures(nn.Module):
    """x (..., dim) -> (..., out_dim), ``out_dim = sum_{i<=p} C(dim + i - 1, i)``.

    Degree i contributes ``a_i sqrt(multinomial) x_{j1} ... x_{ji}`` for each multiset
    j1 <= ... <= ji; ``a`` (degree + 1,) is learned."""

    def __init__(self, dim: int, degree: int):
        super().__init__()
        self.dim, self.degree = dim, degree
        self.coefficients = nn.Parameter(torch.empty(degree + 1))
        self.out_dim = sum(math.comb(dim + i - 1, i) for i in range(degree + 1))
        self._tables: dict = {}  # (degree, device, dtype) -> (monomial index, sqrt multinomial); built on first use

    def _table(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (i, x.device, x.dtype)
        if key not in self._tables:
            combos = list(itertools.combinations_with_replacement(range(self.dim), i))
            counts = [math.factorial(i) / math.prod(math.factorial(c.count(j)) for j in set(c)) for c in combos]
            self._tables[key] = (torch.tensor(combos, device=x.device),
                                 torch.tensor(counts, device=x.device, dtype=x.dtype).sqrt())
        return self._tables[key]

    def _tto_init(self, init) -> None:
        init.copy_(self.coefficients, torch.tensor([1 / math.sqrt(math.factorial(i)) for i in range(self.degree + 1)],
                                                  dtype=self.coefficients.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """phi(x); with gradients, the monomials are recomputed in the backward pass, which then
        keeps only x: autograd would otherwise keep each degree's gathered factors, their product
        and its scaled copy, (..., out_dim, p) + 2 x (..., out_dim) floats (at 64-wide heads and
        degree 2, 0.27 GB for each of q and k per layer and 512 tokens, 130x the input)."""
        if not torch.is_grad_enabled():
            return self._features(x)
        return checkpoint(self._features, x, use_reentrant=False)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        a = self.coefficients.to(x.dtype)
        parts = [a[0] * torch.ones_like(x[..., :1])]
        if self.degree >= 1:
            parts.append(a[1] * x)
        for i in range(2, self.degree + 1):
            index, weight = self._table(i, x)
            parts.append(a[i] * weight * x[..., index].prod(-1))
        return torch.cat(parts, dim=-1)
