"""TTT's chunk scans (TTT-Linear's and TTT-MLP's memories) as one autograd node each, with their
backward passes written out.

The shared engine (:class:`tto.engine.Memory`) runs a chunk as a few dozen small tensor ops (the fast
model's forward and hand-written inner backward, the dual-form read, the commit), and autograd
differentiates each of them again for the outer gradient, LayerNorm's double backward included: for
TTT-Linear 154 dispatched ops per chunk and layer in a training step (forward and backward), each on a
(batch x heads, 16, 64) tensor, where op overhead outweighs the arithmetic. Here the same chunks take 51
(17 of them views) for TTT-Linear, 301 instead of 407 for TTT-MLP (whose step bound, computed chunk by
chunk from the weights, is the same code on both paths and most of the rest): the backward is derived by
hand below, and what does not depend on the previous chunk's weights is computed for all chunks at once.

The memories (:meth:`Memory._scans_fused` says when they apply): ``f(x) = x + LN(g(x))`` with a
per-head affine (gamma, beta), g linear (``x W + b``) or a two-layer tanh-GELU MLP, the squared error
``1/2 ||f(k) - v||^2``, and an optimizer whose chunk coefficients are a mix matrix alone (no decay, no
momentum: TTT's mini-batch GD). Per chunk, all rows at once (N = batch x heads), for the linear g::

    Z = K W + b,   xh, r = LN(Z) (normalised Z, 1 / std)
    e = K + gamma xh + beta - V,   u = gamma e                         (d loss / d xh)
    delta = r (u - mean(u) - xh mean(u xh))                            (d loss / d Z)
    g(Q) = Q W + b - M delta                                           (M: mix * (Q K^T + 1))
    W' = flush(W - K^T (a delta)),   b' = flush(b - sum_s a_s delta_s)  (a: the chunk-end row of mix, times kappa)

(``flush``: :func:`tto.engine.fast_models.flush_subnormal`). The wrapper ``Q + LN(g(Q))`` holds no
fast weight and is applied by the engine to all chunks at once, as on the generic path.

Backward of one chunk, from the gradients G_out of its reads and G_W, G_b of the weights it
commits (the flush passes them where its output is not zero, as ``hardshrink``'s backward)::

    G_D = -(K G_W + G_b),  G_K = -D G_W^T,  G_a = sum_d G_D delta,  G_delta = a G_D - M^T G_out   (D = a delta)
    G_Q = G_out W^T,  G_M = -G_out delta^T,  G_W += Q^T G_out,  G_b += sum_s G_out
    G_u = r P G_delta,  G_xh = gamma G_e - r (mean(u xh) G_delta + u mean(G_delta xh)),  G_r = sum_d G_delta delta / r
        (P = I - 1 1^T / d - xh xh^T / d is symmetric; delta = r P u)
    G_e = gamma G_u,  G_gamma += sum(e G_u + xh G_e),  G_beta += sum G_e,  G_K += G_e,  G_V = -G_e
    G_Z = r P G_xh - G_r r^2 xh / d     (the LayerNorm's backward; d r / d Z = -r^2 xh / d)
    G_K += G_Z W^T,  G_W += K^T G_Z,  G_b += sum_s G_Z

:class:`MLPScan` adds the first layer (its docstring). Tested against the generic chunk steps (reads,
committed weights and every input's gradient, float64) and by ``torch.autograd.gradcheck``
(``tests/test_engine.py``). The backward passes are not themselves differentiable (no double backward
through a scan).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .fast_models import ACTIVATIONS, layer_norm_backward, subnormal_threshold


def _objective(z: torch.Tensor, base: torch.Tensor, gamma: torch.Tensor, eps: float) -> tuple:
    """TTT's inner loss at the last layer's outputs z (N, C, d): ``e = base + gamma xh`` (base = K + beta
    - V), ``u = gamma e``, ``delta = r P u``. Returns (z, xh, mean, rstd, e, u, delta)."""
    xh, mean, rstd = torch.native_layer_norm(z, (z.shape[-1],), None, None, eps)
    e = torch.addcmul(base, gamma, xh)
    u = gamma * e
    return z, xh, mean, rstd, e, u, layer_norm_backward(u, (z, mean, rstd))


def _objective_backward(g_delta, gamma, z, mean, rstd, rstd_d, xh, u, delta, dot_u) -> tuple:
    """From the gradient of delta (N, C, d), those of u, e (= gamma G_u) and z; `rstd_d` = r / d and
    `dot_u` = mean(u xh) per token."""
    gu = layer_norm_backward(g_delta, (z, mean, rstd))
    ge = gamma * gu
    dot_g = (g_delta * xh).mean(-1, keepdim=True)
    g_xh = torch.addcmul(gamma * ge, rstd, torch.addcmul(dot_u * g_delta, dot_g, u), value=-1.0)
    g_r = (g_delta * delta).sum(-1, keepdim=True)  # times 1 / r, which the r^2 of d r / d z cancels to r
    return gu, ge, torch.addcmul(layer_norm_backward(g_xh, (z, mean, rstd)), g_r * rstd_d, xh, value=-1.0)


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for (N, n, i, j) and (N, n, j, k): one bmm over the flattened leading dims."""
    return torch.bmm(a.flatten(0, 1), b.flatten(0, 1)).view(*a.shape[:-1], b.shape[-1])


class LinearScan(torch.autograd.Function):
    """forward(W (N, d, d), b (N, 1, d), q, k, v (N, n, C, d), mixed (N, n, C, C), end (N, n, C),
    gamma, beta (N, 1, d), eps, n_commit) -> (g(q) (N, n, C, d), W and b after the first
    `n_commit` chunks' commits; the later chunks are only read).

    The bias is W's last row and the keys and queries get a 1 appended, so one product serves both.
    Only what depends on the previous chunk's weights is computed chunk by chunk; the reads ``Q W + b``
    (from all chunks' start weights), ``M delta`` and the gradients that do not flow back through the
    weights are products over all chunks at once."""

    @staticmethod
    def forward(ctx, w, b, q, k, v, mixed, end, gamma, beta, eps: float, n_commit: int):
        n, d = q.shape[1], q.shape[-1]
        threshold = subnormal_threshold(w.dtype)
        ones = q.new_ones(*q.shape[:-1], 1)
        qa, ka = torch.cat([q, ones], -1), torch.cat([k, ones], -1)
        wa = torch.cat([w, b], 1)  # (N, d + 1, d)
        base = beta[:, None] + k - v  # e = base + gamma * xh
        weights, values = [wa], []
        for i in range(n):
            z = torch.bmm(ka[:, i], wa)
            values.append(_objective(z, base[:, i], gamma, eps))
            delta = values[-1][-1]
            if i < n_commit:
                wa = F.hardshrink(torch.baddbmm(wa, ka[:, i].transpose(-1, -2), end[:, i, :, None] * delta, alpha=-1.0),
                                  threshold)
                weights.append(wa)
        starts = torch.stack([weights[min(i, n_commit)] for i in range(n)], dim=1)  # (N, n, d + 1, d)
        reads = _bmm(qa, starts) - _bmm(mixed, torch.stack([chunk[-1] for chunk in values], dim=1))
        if not any(ctx.needs_input_grad):  # inference: nothing to keep
            return reads, wa[:, :d].clone(), wa[:, d:].clone()
        z, xh, mean, rstd, e, u, delta = zip(*values)
        # the LayerNorm's statistics stay one tensor per chunk: ATen's CPU layer-norm backward reads
        # non-contiguous mean / rstd (slices of a stack) wrongly (torch 2.13)
        z, xh, e, u, delta = (torch.stack(t, dim=1) for t in (z, xh, e, u, delta))
        # the flush's gradient is 0 where it zeroed an entry (hardshrink's backward): masks only if it did
        # (the committed weights are starts[:, 1:] and the last ones: two checks for all chunks)
        ctx.flushed = bool(n_commit) and not (bool(starts[:, 1:].all()) and bool(wa.all()))
        # everything through save_for_backward, so that a checkpoint frees it until the recomputation
        ctx.save_for_backward(qa, ka, mixed, end, gamma, starts, wa, z, xh, e, u, delta, *mean, *rstd)
        ctx.n_commit = n_commit
        return reads, wa[:, :d].clone(), wa[:, d:].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_reads, grad_w, grad_b):
        qa, ka, mixed, end, gamma, starts, last, z, xh, e, u, delta, *statistics = ctx.saved_tensors
        mean, rstd = statistics[:len(statistics) // 2], statistics[len(statistics) // 2:]
        n, d = qa.shape[1], qa.shape[-1] - 1
        go = torch.zeros_like(delta) if grad_reads is None else grad_reads
        gwa = torch.cat([torch.zeros_like(starts[:, 0, :d]) if grad_w is None else grad_w,
                         torch.zeros_like(starts[:, 0, d:]) if grad_b is None else grad_b], 1)
        # the parts that do not flow back through later weights, all chunks at once
        g_delta_reads = _bmm(mixed.transpose(-1, -2), go).neg_()
        g_starts_reads = _bmm(qa.transpose(-1, -2), go)
        steps = end[..., None] * delta
        dot_u = (u * xh).mean(-1, keepdim=True)
        rstd_d = torch.stack(rstd, dim=1) / d
        g_u, g_e, g_z, g_k_commit, g_end = [], [], [], [], []
        for i in reversed(range(n)):
            g_delta = g_delta_reads[:, i]
            if i < ctx.n_commit:
                if ctx.flushed:
                    gwa = gwa * ((starts[:, i + 1] if i + 1 < n else last) != 0)
                h = torch.bmm(ka[:, i], gwa)  # minus the gradient of the chunk's step
                g_end.append((h * delta[:, i]).sum(-1))
                g_delta = torch.addcmul(g_delta, end[:, i, :, None], h, value=-1.0)
                g_k_commit.append(torch.bmm(steps[:, i], gwa.transpose(-1, -2)))
            else:
                g_end.append(torch.zeros_like(end[:, i]))
                g_k_commit.append(torch.zeros_like(ka[:, i]))
            gu, ge, gz = _objective_backward(g_delta, gamma, z[:, i], mean[i], rstd[i], rstd_d[:, i], xh[:, i], u[:, i],
                                             delta[:, i], dot_u[:, i])
            gwa = torch.baddbmm(gwa + g_starts_reads[:, i], ka[:, i].transpose(-1, -2), gz)
            g_u.append(gu)
            g_e.append(ge)
            g_z.append(gz)
        stack = lambda grads: torch.stack(grads[::-1], dim=1)  # noqa: E731
        g_u, g_e, g_z = stack(g_u), stack(g_e), stack(g_z)
        starts_t = starts.transpose(-1, -2)
        g_k = (_bmm(g_z, starts_t) - stack(g_k_commit))[..., :d] + g_e
        g_q = _bmm(go, starts_t)[..., :d]
        g_mixed = _bmm(go, delta.transpose(-1, -2)).neg_()
        g_gamma = (e * g_u + xh * g_e).sum((1, 2))[:, None]
        g_beta = g_e.sum((1, 2))[:, None]
        return (gwa[:, :d], gwa[:, d:], g_q, g_k, g_e.neg(), g_mixed, stack(g_end).neg_(), g_gamma, g_beta, None,
                None)


def linear_scan(w, b, q, k, v, mixed, end, gamma, beta, eps: float, n_commit: int):
    """:class:`LinearScan` (its docstring has the shapes)."""
    return LinearScan.apply(w, b, q, k, v, mixed, end, gamma, beta, eps, n_commit)


class BoundActive(Exception):
    """Raised by a fused scan's step bound where kappa < 1: its gradient in the gates is not part of the
    fused backward, so the caller runs the generic chunk steps instead."""


#: the tanh-approximated GELU of TTT-MLP and its backward ``g * gelu'(z)``, the fast models' own
_gelu, _gelu_backward = ACTIVATIONS["gelu_tanh"]


def _gelu_tanh_second(z: torch.Tensor) -> torch.Tensor:
    """The second derivative of the tanh-approximated GELU ``0.5 z (1 + tanh(s))``, ``s = c (z + a z^3)``:
    ``(1 - t^2) (s' - z t s'^2 + z s'' / 2)`` with t = tanh(s), ``s' = c (1 + 3 a z^2)``, ``s'' = 6 a c z``."""
    c, a = math.sqrt(2 / math.pi), 0.044715
    z2 = z * z
    t = torch.tanh(c * z * (1 + a * z2))
    s1 = c * (1 + 3 * a * z2)
    return (1 - t * t) * (s1 - z * t * s1 * s1 + 3 * a * c * z2)


class MLPScan(torch.autograd.Function):
    """TTT-MLP's scan: ``g(x) = gelu(x W1 + b1) W2 + b2`` (tanh GELU) in ``x + LN(g(x))``. Per chunk::

        Z1 = K W1 + b1,  A = gelu(Z1),  Z2 = A W2 + b2,  delta2 as TTT-Linear's delta at Z2
        delta1 = (delta2 W2^T) gelu'(Z1)
        g(Q) = gelu(Q W1 + b1 - M1 delta1) W2 + b2 - M2 delta2,  M1 = mix (Q K^T + 1),  M2 = mix (gelu(.) A^T + 1)
        W1' = flush(W1 - K^T (a delta1)),  W2' = flush(W2 - A^T (a delta2))  (and the biases),  a = kappa mix[-1]

    forward(W1 (N, d, h), b1 (N, 1, h), W2 (N, h, d), b2 (N, 1, d), q, k, v (N, n, C, d), mixed = M1 and mix
    (N, n, C, C), gamma, beta (N, 1, d), eps, n_commit, bound) -> (g(q) (N, n, C, d), W1, b1, W2, b2 after the
    commits). ``bound(i, params, grads, y)`` gives chunk i's kappa (N,) and raises :class:`BoundActive`
    where it is below 1; ``bound.committed(before, after)`` follows each commit (the carried norms).
    The backward is :class:`LinearScan`'s with a second layer: ``delta1``'s own gradient goes through
    W2 and through gelu'(Z1) (gelu'' below), and the reads' second layer reads ``gelu(Z1q)`` and the keys'
    activations A, whose gradients (through M2) join the chunk's."""

    @staticmethod
    def forward(ctx, w1, b1, w2, b2, q, k, v, mixed, mix, gamma, beta, eps: float, n_commit: int, bound):
        n, d, hidden = q.shape[1], q.shape[-1], w1.shape[-1]
        threshold = subnormal_threshold(w1.dtype)
        ones = q.new_ones(q.shape[0], q.shape[2], 1)
        qa, ka = (torch.cat([t, ones[:, None].expand(*t.shape[:-1], 1)], -1) for t in (q, k))
        w1a, w2a = torch.cat([w1, b1], 1), torch.cat([w2, b2], 1)  # (N, d + 1, h), (N, h + 1, d)
        base = beta[:, None] + k - v
        unit = q.new_ones(q.shape[0], q.shape[2], hidden)
        weights, values, layer1, reads, kappas = [(w1a, w2a)], [], [], [], []
        for i in range(n):
            z1 = torch.bmm(ka[:, i], w1a)
            a = torch.cat([_gelu(z1), ones], -1)
            values.append(_objective(torch.bmm(a, w2a), base[:, i], gamma, eps))
            delta2 = values[-1][-1]
            p1 = torch.bmm(delta2, w2a[:, :hidden].transpose(-1, -2))
            s1 = _gelu_backward(unit, z1)
            delta1 = p1 * s1
            # the chunk's reads: the first layer's dual form, its activations, the second layer's
            z1q = torch.baddbmm(torch.bmm(qa[:, i], w1a), mixed[:, i], delta1, alpha=-1.0)
            aq = torch.cat([_gelu(z1q), ones], -1)
            att2 = torch.bmm(aq[..., :hidden], a[..., :hidden].transpose(-1, -2)).add_(1.0)
            reads.append(torch.baddbmm(torch.bmm(aq, w2a), mix[:, i] * att2, delta2, alpha=-1.0))
            layer1.append((z1, a, p1, s1, delta1, z1q, aq, att2))
            if i < n_commit:
                params = {"W1": w1a[:, :d], "b1": w1a[:, d:], "W2": w2a[:, :hidden], "b2": w2a[:, hidden:]}
                kappa = bound(i, params, [("W1", k[:, i], delta1), ("W2", a[..., :hidden], delta2)], values[-1][4] + v[:, i])
                kappas.append(kappa)
                end = (kappa[:, None] * mix[:, i, -1])[..., None]
                w1a = F.hardshrink(torch.baddbmm(w1a, ka[:, i].transpose(-1, -2), end * delta1, alpha=-1.0), threshold)
                w2a = F.hardshrink(torch.baddbmm(w2a, a.transpose(-1, -2), end * delta2, alpha=-1.0), threshold)
                bound.committed(params, {"W1": w1a[:, :d], "b1": w1a[:, d:], "W2": w2a[:, :hidden], "b2": w2a[:, hidden:]})
                weights.append((w1a, w2a))
        reads = torch.stack(reads, dim=1)
        if not any(ctx.needs_input_grad):  # inference: nothing to keep
            return reads, w1a[:, :d].clone(), w1a[:, d:].clone(), w2a[:, :hidden].clone(), w2a[:, hidden:].clone()
        z, xh, mean, rstd, e, u, delta2 = zip(*values)
        z, xh, e, u, delta2 = (torch.stack(t, dim=1) for t in (z, xh, e, u, delta2))
        z1, a, p1, s1, delta1, z1q, aq, att2 = (torch.stack(t, dim=1) for t in zip(*layer1))
        ctx.flushed = bool(n_commit) and not all(bool(w.all()) for pair in weights[1:] for w in pair)
        # mean, rstd one tensor per chunk (see LinearScan.forward); all through save_for_backward (ibid.)
        ctx.save_for_backward(qa, ka, mixed, mix, gamma, z, xh, e, u, delta2, z1, a, p1, s1, delta1, z1q, aq, att2,
                              *mean, *rstd, *(w for pair in weights for w in pair), *kappas)
        ctx.n_commit = n_commit
        return reads, w1a[:, :d].clone(), w1a[:, d:].clone(), w2a[:, :hidden].clone(), w2a[:, hidden:].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_reads, grad_w1, grad_b1, grad_w2, grad_b2):
        qa, ka, mixed, mix, gamma, z, xh, e, u, delta2, z1, a, p1, s1, delta1, z1q, aq, att2, *rest = ctx.saved_tensors
        n, d, hidden, n_commit = qa.shape[1], qa.shape[-1] - 1, z1.shape[-1], ctx.n_commit
        mean, rstd, rest = rest[:n], rest[n:2 * n], rest[2 * n:]
        weights, kappas = list(zip(rest[:2 * (n_commit + 1):2], rest[1:2 * (n_commit + 1):2])), rest[2 * (n_commit + 1):]
        last1, last2 = weights[-1]
        zero_or = lambda g, like: torch.zeros_like(like) if g is None else g  # noqa: E731
        go = zero_or(grad_reads, delta2)
        gw1 = torch.cat([zero_or(grad_w1, last1[:, :d]), zero_or(grad_b1, last1[:, d:])], 1)
        gw2 = torch.cat([zero_or(grad_w2, last2[:, :hidden]), zero_or(grad_b2, last2[:, hidden:])], 1)
        # the reads' gradients that do not go through the weights, all chunks at once
        g_mix2 = _bmm(go, delta2.transpose(-1, -2)).neg_()  # of M2 = mix * att2
        g_att2 = g_mix2 * mix
        g_delta2_reads = _bmm((mix * att2).transpose(-1, -2), go).neg_()
        g_a_reads = _bmm(g_att2.transpose(-1, -2), aq[..., :hidden])
        g_aq_att = _bmm(g_att2, a[..., :hidden])
        second = _gelu_tanh_second(z1)
        dot_u = (u * xh).mean(-1, keepdim=True)
        rstd_d = torch.stack(rstd, dim=1) / d
        g_u, g_e, g_z1q, g_q, g_k, g_end = [], [], [], [], [], []
        for i in reversed(range(n)):
            w1, w2 = weights[min(i, n_commit)]
            g_delta2, g_a = g_delta2_reads[:, i], g_a_reads[:, i]
            if i < n_commit:
                if ctx.flushed:
                    after1, after2 = weights[i + 1]
                    gw1, gw2 = gw1 * (after1 != 0), gw2 * (after2 != 0)
                end = (kappas[i][:, None] * mix[:, i, -1])[..., None]
                h1, h2 = torch.bmm(ka[:, i], gw1), torch.bmm(a[:, i], gw2)  # minus the gradients of the steps
                g_end.append(kappas[i][:, None] * ((h1 * delta1[:, i]).sum(-1) + (h2 * delta2[:, i]).sum(-1)))
                g_delta1 = -end * h1
                g_delta2 = torch.addcmul(g_delta2, end, h2, value=-1.0)
                g_k_commit = torch.bmm(end * delta1[:, i], gw1.transpose(-1, -2))
                g_a = g_a - torch.bmm(end * delta2[:, i], gw2.transpose(-1, -2))[..., :hidden]
            else:
                g_end.append(torch.zeros_like(mix[:, i, -1]))
                g_delta1, g_k_commit = torch.zeros_like(delta1[:, i]), torch.zeros_like(ka[:, i])
            # the reads: Z2q = [Aq, 1] W2 - M2 delta2, Aq = gelu(Z1q), Z1q = [Q, 1] W1 - M1 delta1
            goi = go[:, i]
            g_aq = torch.baddbmm(g_aq_att[:, i], goi, w2[:, :hidden].transpose(-1, -2))
            gzq = _gelu_backward(g_aq, z1q[:, i])
            g_delta1 = torch.baddbmm(g_delta1, mixed[:, i].transpose(-1, -2), gzq, alpha=-1.0)
            gw2 = torch.baddbmm(gw2, aq[:, i].transpose(-1, -2), goi)
            gw1 = torch.baddbmm(gw1, qa[:, i].transpose(-1, -2), gzq)
            g_q.append(torch.bmm(gzq, w1[:, :d].transpose(-1, -2)))
            # delta1 = p1 * s1, p1 = delta2 W2^T
            g_p1 = g_delta1 * s1[:, i]
            g_delta2 = torch.baddbmm(g_delta2, g_p1, w2[:, :hidden])
            g_z1 = g_delta1 * p1[:, i] * second[:, i]
            gu, ge, gz = _objective_backward(g_delta2, gamma, z[:, i], mean[i], rstd[i], rstd_d[:, i], xh[:, i], u[:, i],
                                             delta2[:, i], dot_u[:, i])
            g_a = torch.baddbmm(g_a, gz, w2[:, :hidden].transpose(-1, -2))
            g_z1 = torch.addcmul(g_z1, g_a, s1[:, i])
            gw2 = torch.baddbmm(gw2, a[:, i].transpose(-1, -2), gz)
            gw2[:, :hidden] += torch.bmm(g_p1.transpose(-1, -2), delta2[:, i])
            gw1 = torch.baddbmm(gw1, ka[:, i].transpose(-1, -2), g_z1)
            g_k.append(torch.baddbmm(ge, g_z1, w1[:, :d].transpose(-1, -2)) - g_k_commit[..., :d])
            g_u.append(gu)
            g_e.append(ge)
            g_z1q.append(gzq)
        stack = lambda grads: torch.stack(grads[::-1], dim=1)  # noqa: E731
        g_u, g_e, g_z1q = stack(g_u), stack(g_e), stack(g_z1q)
        g_mixed = _bmm(g_z1q, delta1.transpose(-1, -2)).neg_()
        g_mix = g_mix2 * att2
        g_mix[..., -1, :] -= stack(g_end)
        g_gamma = (e * g_u + xh * g_e).sum((1, 2))[:, None]
        g_beta = g_e.sum((1, 2))[:, None]
        return (gw1[:, :d], gw1[:, d:], gw2[:, :hidden], gw2[:, hidden:], stack(g_q), stack(g_k), g_e.neg(), g_mixed,
                g_mix, g_gamma, g_beta, None, None, None)


def mlp_scan(w1, b1, w2, b2, q, k, v, mixed, mix, gamma, beta, eps: float, n_commit: int, bound):
    """:class:`MLPScan` (its docstring has the shapes)."""
    return MLPScan.apply(w1, b1, w2, b2, q, k, v, mixed, mix, gamma, beta, eps, n_commit, bound)
