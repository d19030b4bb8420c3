"""The delta rule: a linear memory trained by one exact gradient step per token.

Per head the state is a matrix ``S`` (d_k x d_v) read as ``o_t = S_t^T q_t``. Token t takes one
gradient step of size ``beta_t`` on ``1/2 ||S^T k_t - v_t||^2`` *at the current state* (not at a
chunk start: the update is exact), after an optional decay ``a_t = exp(log_decay_t)``::

    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T          (update-then-read)

``log_decay = None`` is DeltaNet (arXiv 2406.06484), with it Gated DeltaNet (arXiv 2412.06464).
Because the recurrence is linear in S, chunks of C tokens are exact too (the WY / UT form): with
``gamma_i = prod_{r<=i} a_r`` inside a chunk, ``Gamma[i, j] = gamma_i / gamma_j`` and S0 the state at
the chunk start, the corrected values ``u_t = beta_t (v_t - a_t S_{t-1}^T k_t)`` solve a unit lower
triangular system::

    (I + tril(diag(beta) (Gamma * K K^T), -1)) U = diag(beta) (V - diag(gamma) K S0)
    O   = diag(gamma) Q S0 + tril(Gamma * Q K^T) U
    S_C = gamma_C S0 + (K * gamma_C / gamma)^T U

so a chunk costs a few (C x C) and (C x d) matmuls and one triangular solve. Outputs do not depend
on C; a sequence gives the same outputs in one call or token by token.

Stability needs no bound here: the update is exact per token (no chunk-start gradients), and with
l2-normalised keys (DeltaNet and Gated DeltaNet normalise them) and ``beta_t in (0, 2)``,
``a_t in (0, 1]`` the transition is non-expansive, ``||a_t (I - beta_t k_t k_t^T)||_2 =
a_t max(1, |1 - beta_t|) <= 1``, so ``||S_t|| <= ||S_{t-1}|| + beta_t ||v_t||``: the state grows at
most linearly in the tokens, never geometrically.

:func:`naive_delta_rule` is the per-token recurrence above, the reference the chunked form is
tested against. Padding: tokens with ``mask`` False get ``beta = 0`` and no decay, the identity
step, so the state skips them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reference import in_reference_mode
from .chunkwise import ChunkwiseMemory
from .fast_models import inner
from .memory import heads_first


class DeltaRule(ChunkwiseMemory):
    """forward(q, k (B, T, H, d_k), v (B, T, H, d_v), beta (B, T, H), log_decay (B, T, H) or None,
    mask (B, T) or None, state) -> outputs (B, T, H, d_v). The state holds ``<prefix>.W.S``
    (B, H, d_k, d_v) in float32; inner arithmetic runs in float32 (float64 for float64 inputs), autocast off."""

    def __init__(self, chunk_size: int, state_prefix: str = "memory"):
        super().__init__()
        self.chunk_size = chunk_size
        self.key = state_prefix + ".W.S"

    def forward(self, q, k, v, beta, log_decay=None, mask=None, state: dict | None = None):
        out_dtype = q.dtype
        with torch.autocast(device_type=q.device.type, enabled=False):
            q, k, v, beta = inner(q), inner(k), inner(v), inner(beta)
            log_decay = torch.zeros_like(beta) if log_decay is None else inner(log_decay)
            if mask is not None:  # pads: beta = 0 and a = 1, the identity step
                beta = beta * mask[..., None]
                log_decay = log_decay * mask[..., None]
            s0 = state.get(self.key) if state is not None else None
            if s0 is None:
                s0 = q.new_zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[3])
            run = naive_delta_rule if in_reference_mode() else self._chunked
            out, s = run(q, k, v, beta, log_decay, s0)
        if state is not None:
            state[self.key] = s.detach()
        return out.to(out_dtype)

    # ------------------------------------------------------------------ monitoring (ChunkwiseMemory.inner_stats)
    def fast_weights(self, state, call):
        s = state.get(self.key)
        if s is None:
            q, v = call["q"], call["v"]
            s = inner(q).new_zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[3])
        return {"S": s.flatten(0, 1)}, None

    def inner_loss(self, params, call):
        """``1/2 ||S^T k_t - v_t||^2``, the loss each step descends."""
        k, v = heads_first(call["k"]), heads_first(call["v"])
        return 0.5 * (k @ params["S"] - v).pow(2).sum(-1)

    def gate_values(self, call):
        """``lr``: beta; ``forget``: 1 - a_t (the share of the state each token forgets)."""
        gates = {"lr": call["beta"]}
        if call.get("log_decay") is not None:
            gates["forget"] = -torch.expm1(call["log_decay"])
        return gates

    def _chunked(self, q, k, v, beta, log_decay, s0):
        batch, length, heads, _ = q.shape
        c = self.chunk_size
        n = -(-length // c)
        pad = n * c - length  # trailing pads: beta = 0 and a = 1 leave the state as it is

        def chunked(x):  # (B, T, H, ...) -> (B, H, n, C, ...)
            x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad)).transpose(1, 2)
            return x.reshape(batch, heads, n, c, *x.shape[3:])

        Q, K, V, B, G = chunked(q), chunked(k), chunked(v), chunked(beta), chunked(log_decay).cumsum(-1)
        lower = torch.tril(torch.ones(c, c, dtype=torch.bool, device=q.device))
        gamma_ratio = torch.exp((G[..., :, None] - G[..., None, :]).masked_fill(~lower, float("-inf")))
        strict = gamma_ratio.tril(-1) * (K @ K.transpose(-1, -2)) * B[..., None]
        system = torch.eye(c, device=q.device) + strict  # unit lower triangular
        gamma = G.exp()[..., None]
        # U = (I + A)^{-1} diag(beta) (V - diag(gamma) K S0) = U_v - W S0, both solved for all chunks
        rhs = torch.cat([B[..., None] * V, B[..., None] * gamma * K], dim=-1)
        solved = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
        u_v, w = solved.split([V.shape[-1], K.shape[-1]], dim=-1)
        qk = gamma_ratio * (Q @ K.transpose(-1, -2))
        to_end = torch.exp(G[..., -1:] - G)[..., None] * K  # K * gamma_C / gamma

        s, outs = s0, []
        # per-chunk views via unbind: indexing [:, :, i] would make every chunk's backward write a
        # zero tensor of the whole sequence's size
        for chunk in zip(*(x.unbind(2) for x in (Q, qk, u_v, w, gamma, to_end))):
            out, s = self.step(s, *chunk)
            outs.append(out)
        out = torch.stack(outs, dim=2).reshape(batch, heads, n * c, -1)[:, :, :length]
        return out.transpose(1, 2), s

    @staticmethod
    def _chunk(s, q, qk, u_v, w, gamma, to_end):
        """One chunk from its start state s (B, H, d_k, d_v): outputs (B, H, C, d_v), end state."""
        u = u_v - w @ s
        out = gamma * (q @ s) + qk @ u
        return out, gamma[..., -1:, :] * s + to_end.transpose(-1, -2) @ u


def naive_delta_rule(q, k, v, beta, log_decay, s0):
    """Per-token recurrence ``S_t = a_t (S_{t-1} - beta_t k_t (k_t^T S_{t-1})) + beta_t k_t v_t^T``,
    ``o_t = S_t^T q_t``. Returns (outputs (B, T, H, d_v), final state (B, H, d_k, d_v))."""
    s, outs = s0, []
    for t in range(q.shape[1]):
        a, b = log_decay[:, t].exp()[..., None, None], beta[:, t][..., None, None]
        kt, vt = k[:, t, :, :, None], v[:, t, :, None, :]
        s = a * (s - b * kt @ (kt.transpose(-1, -2) @ s)) + b * kt @ vt
        outs.append((s.transpose(-1, -2) @ q[:, t, :, :, None])[..., 0])
    return torch.stack(outs, dim=1), s
