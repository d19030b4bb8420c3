"""Muon's orthogonalisation of an update (LaCT's and ATLAS' inner optimizers)."""

from __future__ import annotations

import torch

#: (a, b, c) of each Newton-Schulz iteration X <- a X + (b A + c A^2) X, A = X X^T (LaCT's values)
NS5_COEFFICIENTS = ((4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
                    (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012))


def newton_schulz5(g: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Approximate orthogonalisation of each matrix of g (N, a, b): the singular vectors of g with
    singular values pushed into about [0.7, 1.2] (Muon's zeroth power). Runs in g's dtype."""
    x = g.transpose(-1, -2) if g.shape[-2] > g.shape[-1] else g
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for a, b, c in NS5_COEFFICIENTS:
        gram = x @ x.transpose(-1, -2)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.transpose(-1, -2) if g.shape[-2] > g.shape[-1] else x
