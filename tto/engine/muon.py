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
    For n >= ``GRAM_ASPECT`` m (ATLAS' phi-wide memory layers, e.g. 2145 x 64 per head in its 340m
    preset) the same iterations run in the m x m space (:class:`GramNewtonSchulz`: 2 m^2 n + 40 m^3
    FLOPs in all)."""
    wide = g.transpose(-1, -2) if g.shape[-2] > g.shape[-1] else g  # (N, m, n), m <= n
    m, n = wide.shape[-2:]
    if n >= GRAM_ASPECT * m:
        x = GramNewtonSchulz.apply(wide, eps)
    else:
        x = wide / (wide.norm(dim=(-2, -1), keepdim=True) + eps)
        for a, b, c in NS5_COEFFICIENTS:
            gram = x @ x.transpose(-1, -2)
            x = a * x + (b * gram + c * gram @ gram) @ x
    return x.transpose(-1, -2) if g.shape[-2] > g.shape[-1] else x


def _gram_iterates(gram: torch.Tensor) -> list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]]:
    """NS5 in the Gram space of X_0 = W / ||W||: X_k = Q_k X_0 with Q_k a polynomial in G = X_0 X_0^T
    (N, m, m), so ``A_k = X_k X_k^T = Q_k G Q_k`` and ``Q_{k+1} = a Q_k + T_k Q_k``, ``T_k = b A_k + c A_k^2``
    (Q_0 = I). Returns each iteration's (Q_k (None for Q_0), A_k, T_k) and, last, (Q_5, None, None)."""
    iterates, q = [], None
    for a, b, c in NS5_COEFFICIENTS:
        s = gram if q is None else q @ gram @ q
        t = torch.baddbmm(s, s, s, beta=b, alpha=c)
        iterates.append((q, s, t))
        q = t + a * torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device) if q is None else torch.baddbmm(q, t, q, beta=a)
    iterates.append((q, None, None))
    return iterates


class GramNewtonSchulz(torch.autograd.Function):
    """NS5 of wide matrices w (N, m, n), n >= ``GRAM_ASPECT`` m, as ``P w`` with the m x m matrix
    ``P = Q_5(G) / (||w|| + eps)`` (:func:`_gram_iterates`), ``G = w w^T / (||w|| + eps)^2``.

    G is formed in float64: it squares the condition number, and float32 rounding of its small
    eigenvalues would be amplified by the iterations (1e-4 differences between a row alone and in
    a batch). The backward pass is derived by hand, so that it keeps only w (which the caller holds
    anyway: the momentum) and the m x m Gram matrix, and touches w's size twice: with ``H = w w^T``,
    ``r = 1 / (||w|| + eps)`` and dP the gradient of P (``dOut w^T``)::

        dw = P^T dOut + (dH + dH^T + (dnorm / ||w||) I) w

    where dH and dnorm come from dP through the m x m iterations (reverse mode, written out in
    :meth:`backward`), G = H r^2 and r. The tests compare both with autograd of the plain iteration."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, eps: float) -> torch.Tensor:
        w64 = w.to(torch.promote_types(w.dtype, torch.float64))
        raw = w64 @ w64.transpose(-1, -2)  # H (N, m, m)
        norm = raw.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(0).sqrt()[:, None, None]  # ||w||_F (N, 1, 1)
        r = 1.0 / (norm + eps)
        p = _gram_iterates(raw * r.square())[-1][0] * r
        ctx.eps = eps
        ctx.save_for_backward(w, raw, norm)
        return p.to(w.dtype) @ w

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        w, raw, norm = ctx.saved_tensors
        r = 1.0 / (norm + ctx.eps)
        gram = raw * r.square()
        iterates = _gram_iterates(gram)
        q5 = iterates[-1][0]
        dp = (dout @ w.transpose(-1, -2)).to(raw.dtype)
        dq, dr = dp * r, (dp * q5).sum((-2, -1), keepdim=True)
        dgram = torch.zeros_like(gram)
        for (q, s, t), (a, b, c) in zip(reversed(iterates[:-1]), reversed(NS5_COEFFICIENTS)):
            dt = dq if q is None else dq @ q.mT  # Q' = T + a I (k = 0) or a Q + T Q
            ds = b * dt + c * (dt @ s.mT + s.mT @ dt)  # T = b A + c A^2
            if q is None:  # A_0 = G
                dgram = dgram + ds
            else:  # A = Q G Q
                dgram = dgram + q.mT @ ds @ q.mT
                dq = a * dq + t.mT @ dq + ds @ q.mT @ gram.mT + gram.mT @ q.mT @ ds
        draw = dgram * r.square()  # G = H r^2
        dr = dr + 2 * r * (dgram * raw).sum((-2, -1), keepdim=True)
        dnorm = -dr * r.square()  # r = 1 / (||w|| + eps); d||w|| / dw = w / ||w|| (0 at w = 0, as torch's norm)
        shift = torch.where(norm > 0, dnorm / norm.clamp_min(torch.finfo(norm.dtype).tiny), 0.0)
        left = draw + draw.mT + shift * torch.eye(raw.shape[-1], dtype=raw.dtype, device=raw.device)
        dw = (q5 * r).to(w.dtype).mT @ dout
        return dw.baddbmm_(left.to(w.dtype), w), None


def naive_newton_schulz(u: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Muon's five Newton-Schulz iterations on u (a, b) as written: X_0 = U / (||U||_F + eps) (U the
    wide orientation of u), X <- a X + b (X X^T) X + c (X X^T)^2 X."""
    tall = u.shape[0] > u.shape[1]
    x = u.T if tall else u
    x = x / (x.norm() + eps)
    for a, b, c in NS5_COEFFICIENTS:
        x = a * x + b * (x @ x.T) @ x + c * (x @ x.T) @ (x @ x.T) @ x
    return x.T if tall else x
