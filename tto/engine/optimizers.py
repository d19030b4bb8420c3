"""Inner optimizers: how per-token gradients at the chunk-start weights become the weights each
query reads.

Within a chunk of b tokens every update is linear in the gradients ``g_s = x_s^T delta_s``, so an
optimizer is fully described by in-chunk coefficients (DESIGN.md section 3)::

    W_t = decay_t * W_c + carry_t * S_c - sum_{s<=t} mix[t, s] * g_s
    S_end = s_decay * S_c - sum_s s_mix[s] * g_s                  (momentum optimizers only)

where W_c, S_c are the weights and momentum at chunk start. :meth:`coefficients` returns these
for all chunks at once from the per-token gates; :meth:`naive_step` is the same optimizer written
as a per-token recurrence, the reference the coefficients are tested against.

Padding: the engine passes ``valid`` (False at pad slots). A pad must leave weights and momentum
untouched, so optimizers turn its gates into the identity step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .fast_models import inner

#: Coefficients below this are set to zero. Products of many gates (prod (1 - alpha) over a chunk
#: of 128 tokens at alpha = 0.5 is 3e-39) otherwise reach subnormal floats, and so do their products
#: with activations; CPUs process subnormals 10-100x slower (a Titans MAC trained 4x slower). A
#: term with such a coefficient is 2^-64 (5e-20) times its weights, 14 decades below float32's
#: resolution of the terms it is added to.
NEGLIGIBLE = 2.0**-64


@dataclass
class Coefficients:
    """In-chunk coefficients; leading dims (N, n_chunks), chunk dim b last."""

    mix: torch.Tensor  # (N, n, b, b), lower triangular
    decay: torch.Tensor | None = None  # (N, n, b): coefficient of W_c in row t (None: 1)
    carry: torch.Tensor | None = None  # (N, n, b): coefficient of S_c in row t (None: no momentum)
    s_decay: torch.Tensor | None = None  # (N, n): momentum carried to the next chunk
    s_mix: torch.Tensor | None = None  # (N, n, b): gradients into the next chunk's momentum

    def unbind(self) -> list["Coefficients"]:
        """Per-chunk coefficients (views whose backward is one stack, not a copy per chunk)."""
        n = self.mix.shape[1]
        split = lambda t: [None] * n if t is None else t.unbind(1)  # noqa: E731
        parts = zip(*(split(t) for t in (self.mix, self.decay, self.carry, self.s_decay, self.s_mix)))
        return [Coefficients(*p) for p in parts]

    def without_negligible(self) -> "Coefficients":
        """The same coefficients with every entry below :data:`NEGLIGIBLE` in magnitude set to 0."""
        flush = lambda t: None if t is None else t.masked_fill(t.abs() < NEGLIGIBLE, 0.0)  # noqa: E731
        return Coefficients(*(flush(t) for t in (self.mix, self.decay, self.carry, self.s_decay, self.s_mix)))


#: the step bound allows this fraction of the largest stable step (:func:`stable_step_factor`): below 1,
#: so a bounded chunk contracts strictly (plain gradient descent without forgetting: by a factor of at
#: least |1 - 2 * STEP_MARGIN| = 0.8 along the stiffest direction), and close to 1, so that the bound
#: leaves alone every step that is stable by itself
STEP_MARGIN = 0.9


def stable_step_factor(decay: torch.Tensor, carry: torch.Tensor | None, s_decay: torch.Tensor | None,
                       mix: torch.Tensor, s_mix: torch.Tensor | None, curvature: torch.Tensor) -> torch.Tensor:
    """The factor kappa (N,) in (0, 1] on one chunk's gradients that keeps the chunk map stable.

    A chunk commits ``W' = d W + c S - sum_s m_s g_s``, ``S' = e S - sum_s p_s g_s`` (d = decay, c =
    carry, e = s_decay at the chunk end, m_s = mix[-1, s], p_s = s_mix[s]; every g_s at the chunk-start
    W). Near a minimum ``g_s = H_s (W - W*)``; along a direction in which token s's curvature is
    ``h_s in [0, L_s]`` the map is ``[[d - sum m_s h_s, c], [-sum p_s h_s, e]]``, whose eigenvalues lie
    inside the unit circle iff (Jury) with ``a = sum m_s h_s``, ``b = sum p_s h_s``::

        (1)  a (1 + e) - c b < (1 + d)(1 + e)        (2)  c b - a e < 1 - d e        (3)  a e - c b < 1 + d e

    (the fourth, ``(1 - d)(1 - e) + a (1 - e) + c b > 0``, always holds). Each left side is linear in
    the h_s, so its largest value over the box is ``A_i = sum_s L_s max(0, coefficient of h_s)``; with
    the chunk's gradients scaled by kappa the left sides scale by kappa, and
    ``kappa = min(1, STEP_MARGIN * min_i B_i / A_i)`` (B_i the right sides) meets all three with
    margin. Without momentum (c = e = 0, no ``S``) only (1) remains: ``kappa sum_s m_s L_s <=
    STEP_MARGIN (1 + d)``, which also holds for matrices: ``||d I - kappa sum_s m_s H_s||_2 <= max(d,
    kappa sum_s m_s L_s - d) < 1`` for positive semidefinite H_s with ``||H_s||_2 <= L_s``. kappa = 1
    exactly (the paper's update) wherever the step is already inside the bound.

    decay, carry, s_decay (N,) (carry and s_decay None: no momentum), mix, s_mix, curvature (N, b).
    """
    if carry is None:
        terms = [(mix, 1 + decay)]
    else:
        e = s_decay[:, None]
        cb = carry[:, None] * s_mix
        terms = [(mix * (1 + e) - cb, (1 + decay) * (1 + s_decay)), (cb - mix * e, 1 - decay * s_decay),
                 (mix * e - cb, 1 + decay * s_decay)]
    kappa = torch.ones_like(decay)
    for coefficient, bound in terms:
        worst = torch.where(coefficient > 0, coefficient * curvature, 0.0).sum(-1)
        kappa = torch.minimum(kappa, torch.where(worst > 0, STEP_MARGIN * bound / worst, 1.0))
    return kappa


def segsum(x: torch.Tensor) -> torch.Tensor:
    """out[..., i, j] = sum_{r=j+1..i} x[..., r] for j <= i, -inf above the diagonal."""
    b = x.shape[-1]
    lower = torch.tril(torch.ones(b, b, dtype=torch.bool, device=x.device), -1)
    out = x[..., :, None].expand(*x.shape, b).masked_fill(~lower, 0).cumsum(-2)
    return out.masked_fill(~torch.tril(torch.ones(b, b, dtype=torch.bool, device=x.device)), float("-inf"))


class InnerOptimizer(nn.Module):
    has_momentum = False
    #: names of the per-token gates this optimizer reads
    gate_names: tuple[str, ...] = ()

    def coefficients(self, gates: dict[str, torch.Tensor], valid: torch.Tensor) -> Coefficients:
        raise NotImplementedError

    def naive_init(self, params: dict[str, torch.Tensor]) -> dict:
        raise NotImplementedError

    def naive_step(self, state: dict, grads: dict, gates: dict, t: int) -> dict[str, torch.Tensor]:
        """Consume token t's gradient (t = position in its chunk); return the weights t reads."""
        raise NotImplementedError

    def naive_chunk_end(self, state: dict) -> None:
        """Start a new chunk from the current state."""
        raise NotImplementedError


class MiniBatchGD(InnerOptimizer):
    """TTT's mini-batch gradient descent with a learned position scale.

    Token t of a chunk reads ``W_t = W_c - eta_t * sum_{s<=t} lr_s g_s`` with
    ``eta_t = max(0, 1/t + offset_t)`` (``offset`` learned, init 0: the in-chunk gradient sum is
    averaged); the next chunk starts from ``W_b``. No momentum, no forgetting.
    Gate: ``lr`` (N, T), the per-token inner learning rate.
    """

    gate_names = ("lr",)

    def __init__(self, chunk_size: int):
        super().__init__()
        self.chunk_size = chunk_size
        self.token_offset = nn.Parameter(torch.empty(chunk_size))

    def _tto_init(self, std: float, init) -> None:
        init.zeros_(self.token_offset)

    def position_scale(self) -> torch.Tensor:
        offset = inner(self.token_offset)
        base = 1.0 / torch.arange(1, self.chunk_size + 1, device=offset.device, dtype=offset.dtype)
        return (base + offset).clamp_min(0.0)

    def coefficients(self, gates, valid):
        lr = gates["lr"] * valid
        b = lr.shape[-1]
        eta = self.position_scale()[:b]
        mix = torch.tril(eta[:, None] * lr[..., None, :])
        return Coefficients(mix=mix)

    def naive_init(self, params):
        return {"W": dict(params), "G": {k: torch.zeros_like(v) for k, v in params.items()}}

    def naive_step(self, state, grads, gates, t):
        eta = self.position_scale()[t]
        state["G"] = {k: state["G"][k] + gates["lr"][..., None, None] * grads[k] for k in grads}
        state["read"] = {k: state["W"][k] - eta * state["G"][k] for k in grads}
        return state["read"]

    def naive_chunk_end(self, state):
        state["W"] = state["read"]
        state["G"] = {k: torch.zeros_like(v) for k, v in state["W"].items()}


class DecayGD(InnerOptimizer):
    """Gradient descent with a forget gate and no momentum (Miras' Yaad, Moneta, Memora)::

        W_t = (1 - forget_t) * W_{t-1} - lr_t * g_t

    Gates (N, T): ``lr`` (eta) and ``forget`` (alpha) in [0, 1]. With valid = False a token is skipped.
    """

    gate_names = ("lr", "forget")

    def coefficients(self, gates, valid):
        v = valid.to(gates["lr"].dtype)
        log_keep = torch.log1p(-gates["forget"] * v)  # 0 at pads
        retain = torch.exp(segsum(log_keep))  # retain[i, j] = prod_{r=j+1..i} (1 - alpha_r)
        return Coefficients(mix=retain * (gates["lr"] * v)[..., None, :], decay=torch.exp(log_keep.cumsum(-1)))

    def naive_init(self, params):
        return {"W": dict(params)}

    def naive_step(self, state, grads, gates, t):
        lr, keep = gates["lr"][..., None, None], 1 - gates["forget"][..., None, None]
        state["W"] = {k: keep * state["W"][k] - lr * grads[k] for k in grads}
        return state["W"]

    def naive_chunk_end(self, state):
        pass


class MomentumGD(InnerOptimizer):
    """Gradient descent with momentum and a forget gate (Titans eqs. 13-14)::

        S_t = eta_t * S_{t-1} - lr_t * g_t          (past and momentary surprise)
        W_t = (1 - forget_t) * W_{t-1} + S_t        (retention)

    Gates (N, T): ``lr`` (theta), ``momentum`` (eta) and ``forget`` (alpha), all in [0, 1].
    With valid = False a token is skipped: S and W stay as they are.
    """

    has_momentum = True
    gate_names = ("lr", "momentum", "forget")

    def coefficients(self, gates, valid):
        v = valid.to(gates["lr"].dtype)
        lr = gates["lr"] * v
        log_keep = torch.log1p(-gates["forget"] * v)  # log(1 - alpha); 0 at pads
        log_eta = torch.log(torch.where(valid, gates["momentum"], torch.ones_like(v)))
        retain = torch.exp(segsum(log_keep))  # retain[i, m] = prod_{r=m+1..i} (1 - alpha_r)
        carry_mat = torch.exp(segsum(log_eta))  # carry_mat[m, j] = prod_{r=j+1..m} eta_r
        decay = torch.exp(log_keep.cumsum(-1))  # prod_{r<=i} (1 - alpha_r)
        eta0 = torch.exp(log_eta.cumsum(-1))  # prod_{r<=m} eta_r
        applied = retain * v[..., None, :]  # W_t += S_t only at real tokens
        mix = (applied @ carry_mat) * lr[..., None, :]
        carry = (applied @ eta0[..., None])[..., 0]
        return Coefficients(mix=mix, decay=decay, carry=carry, s_decay=eta0[..., -1], s_mix=carry_mat[..., -1, :] * lr)

    def naive_init(self, params):
        return {"W": dict(params), "S": {k: torch.zeros_like(v) for k, v in params.items()}}

    def naive_step(self, state, grads, gates, t):
        lr, eta, keep = (gates[k][..., None, None] for k in ("lr", "momentum", "forget"))
        keep = 1 - keep
        state["S"] = {k: eta * state["S"][k] - lr * grads[k] for k in grads}
        state["W"] = {k: keep * state["W"][k] + state["S"][k] for k in grads}
        return state["W"]

    def naive_chunk_end(self, state):
        pass


class OmegaWindow(InnerOptimizer):
    """ATLAS' Omega rule on top of another optimizer: the gradient at token t is that of the
    weighted loss over the last ``window`` tokens, ``sum_{i=t-window+1..t} gamma_i grad l_i``, all at
    the chunk-start weights. Gate ``omega`` (N, T): gamma_i in [0, 1] (0 drops a token).

    Because every gradient is taken at the chunk start, the window is a banded matrix G on the
    gradients (``G[s, i] = gamma_i`` for ``s - window < i <= s``) and the wrapped optimizer's
    coefficients become ``mix @ G`` and ``s_mix @ G``. The window does not reach back across a chunk
    boundary (the previous chunk's gradients were taken at other weights). window = 1 with
    gamma = 1 is the wrapped optimizer.
    """

    def __init__(self, base: InnerOptimizer, window: int):
        super().__init__()
        self.base, self.window = base, window
        self.has_momentum = base.has_momentum
        self.gate_names = base.gate_names + ("omega",)

    def coefficients(self, gates, valid):
        c = self.base.coefficients(gates, valid)
        b = valid.shape[-1]
        pos = torch.arange(b, device=valid.device)
        band = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] < self.window)
        window = band.to(gates["omega"].dtype) * (gates["omega"] * valid)[..., None, :]  # (N, n, b, b)
        s_mix = None if c.s_mix is None else (c.s_mix[..., None, :] @ window)[..., 0, :]
        return Coefficients(mix=c.mix @ window, decay=c.decay, carry=c.carry, s_decay=c.s_decay, s_mix=s_mix)

    def naive_init(self, params):
        state = self.base.naive_init(params)
        state["window"] = []
        return state

    def naive_step(self, state, grads, gates, t):
        state["window"] = (state["window"] + [{k: gates["omega"][..., None, None] * g for k, g in grads.items()}])
        state["window"] = state["window"][-self.window:]
        summed = {k: sum(step[k] for step in state["window"]) for k in grads}
        return self.base.naive_step(state, summed, gates, t)

    def naive_chunk_end(self, state):
        self.base.naive_chunk_end(state)
        state["window"] = []
