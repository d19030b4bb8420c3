"""Muon's orthogonalisation of an update (LaCT's and ATLAS' inner optimizers)."""

from __future__ import annotations

import torch

#: (a, b, c) of each Newton-Schulz iteration X <- a X + (b A + c A^2) X, A = X X^T (LaCT's values)
NS5_COEFFICIENTS = ((4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
                    (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012))
#: the largest singular value NS5 can output: X_0's singular values lie in [0, 1] and each iteration
#: maps every singular value x to a x + b x^3 + c x^5, so this is the maximum of the five polynomials'
#: composition on [0, 1] (reached near x = 0.004; tests/test_engine.py evaluates it)
NS5_MAX_GAIN = 1.1451
#: from this ratio of a matrix's long side to its short side on, the iterations run on its Gram
#: matrix (fewer FLOPs once the long side is about twice the short one; kept with a margin)
GRAM_ASPECT = 3.0


def newton_schulz5(g: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Approximate orthogonalisation of each matrix of g (N, a, b): the singular vectors of g with
    singular values pushed into about [0.7, 1.2] (Muon's zeroth power). Runs in g's dtype.

    With m = min(a, b) and n = max(a, b), each iteration costs ~4 m^2 n FLOPs on the m x n matrix.
    For n >= ``GRAM_ASPECT`` m (ATLAS' memory: 2145 x 256 per head) the same iterations run in the
    m x m space: X_k = Q_k X_0 with Q_k a polynomial in G = X_0 X_0^T, so A_k = Q_k G Q_k and
    Q_{k+1} = (a + b A_k + c A_k^2) Q_k; equal in exact arithmetic, 2 m^2 n + 40 m^3 FLOPs in all,
    and besides the m x m iterates only X_0 (and its float64 copy) kept for the backward pass."""
    wide = g.transpose(-1, -2) if g.shape[-2] > g.shape[-1] else g  # (N, m, n), m <= n
    x = wide / (wide.norm(dim=(-2, -1), keepdim=True) + eps)
    m, n = x.shape[-2:]
    if n >= GRAM_ASPECT * m:
        # in float64: G squares the condition number, and float32 rounding of its small eigenvalues
        # would be amplified by the iterations (1e-4 differences between a row alone and in a batch)
        x64 = x.to(torch.promote_types(x.dtype, torch.float64))
        gram = x64 @ x64.transpose(-1, -2)
        q = None  # Q_0 = I
        for a, b, c in NS5_COEFFICIENTS:
            s = gram if q is None else q @ gram @ q
            step = b * s + c * s @ s
            q = (step + a * torch.eye(m, dtype=gram.dtype, device=x.device)) if q is None else a * q + step @ q
        x = q.to(x.dtype) @ x
    else:
        for a, b, c in NS5_COEFFICIENTS:
            gram = x @ x.transpose(-1, -2)
            x = a * x + (b * gram + c * gram @ gram) @ x
    return x.transpose(-1, -2) if g.shape[-2] > g.shape[-1] else x


def naive_newton_schulz(u: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Muon's five Newton-Schulz iterations on u (a, b) as written: X_0 = U / (||U||_F + eps) (U the
    wide orientation of u), X <- a X + b (X X^T) X + c (X X^T)^2 X."""
    tall = u.shape[0] > u.shape[1]
    x = u.T if tall else u
    x = x / (x.norm() + eps)
    for a, b, c in NS5_COEFFICIENTS:
        x = a * x + b * (x @ x.T) @ x + c * (x @ x.T) @ (x @ x.T) @ x
    return x.T if tall else x
