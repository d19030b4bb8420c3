"""TTT-Linear's chunk scan as one autograd node, with its backward written out.

The shared engine (:class:`tto.engine.Memory`) runs a chunk as a few dozen small tensor ops
(the fast model's forward and hand-written inner backward, the dual-form read, the commit), and
autograd differentiates each of them again for the outer gradient, LayerNorm's double backward
included: 154 dispatched ops per chunk and layer in a training step (forward and backward), each on
a (batch x heads, 16, 64) tensor, where op overhead outweighs the arithmetic. For the memory
TTT-Linear uses, this module computes the same chunks in 51 (17 of them views), the backward derived
by hand below; what does not depend on the previous chunk's weights is computed for all chunks at once.

The memory (:meth:`Memory._scans_fused` says when it applies): one linear layer with a bias, the
``f(x) = x + LN(x W + b)`` wrapper with a per-head affine (gamma, beta), the squared error
``1/2 ||f(k) - v||^2``, and an optimizer whose chunk coefficients are a mix matrix alone (no decay,
no momentum: TTT's mini-batch GD). Per chunk, all rows at once (N = batch x heads)::

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

Tested against the generic chunk step and the naive reference (outputs, final weights and every
input's gradient, float64) and by ``torch.autograd.gradcheck`` (``tests/test_engine.py``). The
backward is not itself differentiable (no double backward through the scan).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .fast_models import layer_norm_backward, subnormal_threshold


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for (N, n, i, j) and (N, n, j, k): one bmm over the flattened leading dims."""
    return torch.bmm(a.flatten(0, 1), b.flatten(0, 1)).view(*a.shape[:-1], b.shape[-1])


class LinearNormScan(torch.autograd.Function):
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
            xh, mean, rstd = torch.native_layer_norm(z, (d,), None, None, eps)
            e = torch.addcmul(base[:, i], gamma, xh)
            u = gamma * e
            delta = layer_norm_backward(u, (z, mean, rstd))
            values.append((z, xh, mean, rstd, e, u, delta))
            if i < n_commit:
                wa = F.hardshrink(torch.baddbmm(wa, ka[:, i].transpose(-1, -2), end[:, i, :, None] * delta, alpha=-1.0),
                                  threshold)
                weights.append(wa)
        z, xh, mean, rstd, e, u, delta = zip(*values)
        # the LayerNorm's statistics stay one tensor per chunk: ATen's CPU layer-norm backward reads
        # non-contiguous mean / rstd (slices of a stack) wrongly (torch 2.13)
        ctx.statistics = mean, rstd
        z, xh, e, u, delta = (torch.stack(t, dim=1) for t in (z, xh, e, u, delta))
        starts = torch.stack([weights[min(i, n_commit)] for i in range(n)], dim=1)  # (N, n, d + 1, d)
        reads = _bmm(qa, starts) - _bmm(mixed, delta)
        # the flush's gradient is 0 where it zeroed an entry (hardshrink's backward): masks only if it did
        ctx.kept = None if not n_commit or bool(torch.stack([w.all() for w in weights[1:]]).all()) else [
            w != 0 for w in weights[1:]]
        ctx.save_for_backward(qa, ka, mixed, end, gamma, starts, z, xh, e, u, delta)
        ctx.n_commit = n_commit
        return reads, wa[:, :d].clone(), wa[:, d:].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_reads, grad_w, grad_b):
        qa, ka, mixed, end, gamma, starts, z, xh, e, u, delta = ctx.saved_tensors
        mean, rstd = ctx.statistics
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
                if ctx.kept is not None:
                    gwa = gwa * ctx.kept[i]
                h = torch.bmm(ka[:, i], gwa)  # minus the gradient of the chunk's step
                g_end.append((h * delta[:, i]).sum(-1))
                g_delta = torch.addcmul(g_delta, end[:, i, :, None], h, value=-1.0)
                g_k_commit.append(torch.bmm(steps[:, i], gwa.transpose(-1, -2)))
            else:
                g_end.append(torch.zeros_like(end[:, i]))
                g_k_commit.append(torch.zeros_like(ka[:, i]))
            zi, xhi, meani, rstdi, ui = z[:, i], xh[:, i], mean[i], rstd[i], u[:, i]
            gu = layer_norm_backward(g_delta, (zi, meani, rstdi))
            ge = gamma * gu
            dot_g = (g_delta * xhi).mean(-1, keepdim=True)
            g_xh = torch.addcmul(gamma * ge, rstdi, torch.addcmul(dot_u[:, i] * g_delta, dot_g, ui), value=-1.0)
            g_r = (g_delta * delta[:, i]).sum(-1, keepdim=True)
            gz = torch.addcmul(layer_norm_backward(g_xh, (zi, meani, rstdi)), g_r * rstd_d[:, i], xhi, value=-1.0)
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


def linear_norm_scan(w, b, q, k, v, mixed, end, gamma, beta, eps: float, n_commit: int):
    """:class:`LinearNormScan` (its docstring has the shapes)."""
    return LinearNormScan.apply(w, b, q, k, v, mixed, end, gamma, beta, eps, n_commit)
