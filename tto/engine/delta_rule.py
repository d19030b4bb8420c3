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
on C; a sequence gives the same outputs in one call or token by token. The engine base
(:class:`tto.engine.chunkwise.ChunkwiseMemory`) lays the tokens out, keeps the state and runs
the scan; the delta rule plugs in the chunk step above.

Stability needs no bound here: the update is exact per token (no chunk-start gradients), and with
l2-normalised keys (DeltaNet and Gated DeltaNet normalise them) and ``beta_t in (0, 2)``,
``a_t in (0, 1]`` the transition is non-expansive, ``||a_t (I - beta_t k_t k_t^T)||_2 =
a_t max(1, |1 - beta_t|) <= 1``, so ``||S_t|| <= ||S_{t-1}|| + beta_t ||v_t||``: the state grows at
most linearly in the tokens, never geometrically.

:func:`naive_delta_rule` is the per-token recurrence above, the reference the chunked form is
tested against. Padding: a pad slot has ``beta = 0`` and no decay, the identity step, so the
state skips it; every step is exact, so an incomplete last chunk commits too (nothing is pending).
"""

from __future__ import annotations

import torch

from .chunkwise import ChunkwiseMemory
from .fast_models import upcast
from .layout import heads_first


class DeltaRule(ChunkwiseMemory):
    """forward(q, k (B, T, H, d_k), v (B, T, H, d_v), gates, mask (B, T) or None, state) -> outputs
    (B, T, H, d_v); gates ``lr``: beta_t (B, T, H) and, for a decay, ``log_decay``: log a_t
    (B, T, H). State: ``<prefix>.W.S`` (B, H, d_k, d_v), float32 (float64 for float64 inputs)."""

    commits_incomplete_chunk = True
    causal_only = ("the delta rule is a per-token sequential update: each token steps exactly from the state the "
                   "token before it left, so there is no chunk commit from start-weight gradients to read "
                   "(over raster order it would only be a causal scan of the image)")

    def __init__(self, chunk_size: int, state_prefix: str = "memory"):
        super().__init__()
        self.chunk_size = chunk_size
        self.prefix = state_prefix + "."

    def param_names(self):
        return ["S"]

    def initial_weights(self, tokens):
        """S_0 = 0."""
        q, v = tokens["q"], tokens["v"]
        return {"S": q.new_zeros(q.shape[0] * q.shape[2], q.shape[3], v.shape[3])}, None

    def naive(self, q, k, v, gates, mask, read_start):
        beta = upcast(gates["lr"])
        log_decay = upcast(gates["log_decay"]) if "log_decay" in gates else torch.zeros_like(beta)
        if mask is not None:  # pads: beta = 0 and a = 1, the identity step
            beta, log_decay = beta * mask[..., None], log_decay * mask[..., None]
        s0 = upcast(q).new_zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[3])
        out, _ = naive_delta_rule(upcast(q), upcast(k), upcast(v), beta, log_decay, s0)
        return out if mask is None else out * mask[..., None, None]

    # ------------------------------------------------------------------ monitoring (ChunkwiseMemory.inner_stats)
    def inner_loss(self, params, call):
        """``1/2 ||S^T k_t - v_t||^2``, the loss each step descends."""
        k, v = heads_first(call["k"]), heads_first(call["v"])
        return 0.5 * (k @ params["S"] - v).pow(2).sum(-1)

    def gate_values(self, call):
        """``lr``: beta; ``forget``: 1 - a_t (the share of the state each token forgets)."""
        gates = {"lr": call["gates"]["lr"]}
        if "log_decay" in call["gates"]:
            gates["forget"] = -torch.expm1(call["gates"]["log_decay"])
        return gates

    # ------------------------------------------------------------------ the scan
    def _scan(self, params, momentum, carried, chunks, valid, n_commit, read_start):
        """The WY form of every chunk at once (module docstring), then the chunk-to-chunk scan.
        Pad slots hold zeros: beta = 0 and log a = 0, identity steps."""
        q, k, v, beta = chunks["q"], chunks["k"], chunks["v"], chunks["gate.lr"]  # (N, n, C, ...)
        size = q.shape[-2]
        log_gamma = chunks["gate.log_decay"].cumsum(-1) if "gate.log_decay" in chunks else torch.zeros_like(beta)
        lower = torch.tril(torch.ones(size, size, dtype=torch.bool, device=q.device))
        gamma_ratio = torch.exp((log_gamma[..., :, None] - log_gamma[..., None, :]).masked_fill(~lower, float("-inf")))
        strict = gamma_ratio.tril(-1) * (k @ k.transpose(-1, -2)) * beta[..., None]
        system = torch.eye(size, dtype=q.dtype, device=q.device) + strict  # unit lower triangular
        gamma = log_gamma.exp()[..., None]
        # U = (I + A)^{-1} diag(beta) (V - diag(gamma) K S0) = U_v - W S0, both solved for all chunks
        rhs = torch.cat([beta[..., None] * v, beta[..., None] * gamma * k], dim=-1)
        solved = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
        u_v, w = solved.split([v.shape[-1], k.shape[-1]], dim=-1)
        qk = gamma_ratio * (q @ k.transpose(-1, -2))
        to_end = torch.exp(log_gamma[..., -1:] - log_gamma)[..., None] * k  # K * gamma_C / gamma

        s, outs = params["S"], []
        # per-chunk views via unbind: indexing [:, i] would make every chunk's backward write a
        # zero tensor of the whole sequence's size
        for chunk in zip(*(x.unbind(1) for x in (q, qk, u_v, w, gamma, to_end))):
            out, s = self.step(s, *chunk)
            outs.append(out)
        return torch.stack(outs, dim=1), {"S": s}, None, carried

    @staticmethod
    def _chunk(s, q, qk, u_v, w, gamma, to_end):
        """One chunk from its start state s (N, d_k, d_v): outputs (N, C, d_v), end state."""
        u = u_v - w @ s
        out = gamma * (q @ s) + qk @ u
        return out, gamma[..., -1:, :] * s + to_end.transpose(-1, -2) @ u


def naive_delta_rule(q, k, v, beta, log_decay, s0):
    """Per-token recurrence ``S_t = a_t (S_{t-1} - beta_t k_t (k_t^T S_{t-1})) + beta_t k_t v_t^T``,
    ``o_t = S_t^T q_t``. Returns (outputs (B, T, H, d_v), final state (B, H, d_k, d_v))."""
    s, outs = s0, []
    for t in range(q.shape[1]):
        a, step = log_decay[:, t].exp()[..., None, None], beta[:, t][..., None, None]
        kt, vt = k[:, t, :, :, None], v[:, t, :, None, :]
        s = a * (s - step * kt @ (kt.transpose(-1, -2) @ s)) + step * kt @ vt
        outs.append((s.transpose(-1, -2) @ q[:, t, :, :, None])[..., 0])
    return torch.stack(outs, dim=1), s
