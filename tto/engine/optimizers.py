"""Inner optimizers: how per-token gradients at the chunk-start weights become the weights each
query reads.

Within a chunk of b tokens every update is linear in the gradients ``g_s = x_s^T delta_s``, so an
optimizer is fully described by in-chunk coefficients (DESIGN.md section 3)::

    W_t = decay_t * W_c + carry_t * S_c - sum_{s<=t} mix[t, s] * g_s
    S_end = s_decay * S_c - sum_s s_mix[s] * g_s                  (momentum optimizers only)

where W_c, S_c are the weights and momentum at chunk start. :meth:`coefficients` returns these
for all chunks at once from the per-token gates; :meth:`end_coefficients` only their last row
(t = b: what a chunk commits), in O(b) per chunk instead of O(b^2), for a memory that reads no
updated weights inside a chunk (TNT's global memory); :meth:`naive_step` is the same optimizer
written as a per-token recurrence, the reference both are tested against.

Padding: the engine passes ``valid`` (False at pad slots). A pad must leave weights and momentum
untouched, so optimizers turn its gates into the identity step.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .fast_models import upcast

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
    #: (N, n): the weight of the momentum in the chunk's weight update, ``sum_t (prod_{r>t} (1 - forget_r))
    #: lr_t`` for ATLAS' ``W_t = (1 - forget_t) W_{t-1} + lr_t S_t`` (momentum optimizers only): the step
    #: size of a commit along the momentum (:class:`tto.engine.MuonRetention`)
    step: torch.Tensor | None = None

    def _fields(self) -> tuple:
        return self.mix, self.decay, self.carry, self.s_decay, self.s_mix, self.step

    def unbind(self) -> list["Coefficients"]:
        """Per-chunk coefficients (views whose backward is one stack, not a copy per chunk)."""
        n = self.mix.shape[1]
        split = lambda t: [None] * n if t is None else t.unbind(1)  # noqa: E731
        return [Coefficients(*p) for p in zip(*(split(t) for t in self._fields()))]

    def rows(self, first: int) -> "Coefficients":
        """The coefficients of the rows (tokens) from `first` on: what their reads use."""
        cut = lambda t: None if t is None else t[..., first:]  # noqa: E731
        return Coefficients(self.mix[..., first:, :], cut(self.decay), cut(self.carry), self.s_decay, self.s_mix,
                            self.step)

    def without_negligible(self) -> "Coefficients":
        """The same coefficients with every entry below :data:`NEGLIGIBLE` in magnitude set to 0."""
        flush = lambda t: None if t is None else t.masked_fill(t.abs() < NEGLIGIBLE, 0.0)  # noqa: E731
        return Coefficients(*(flush(t) for t in self._fields()))


#: the step bound allows this fraction of the largest step its condition allows (:func:`stable_step_factor`):
#: below 1, so a bounded chunk contracts strictly (plain gradient descent without forgetting: by a factor
#: of at least |1 - 2 * STEP_MARGIN| = 0.8 along the stiffest direction), and close to 1, so that the
#: bound leaves alone every step that meets the condition by itself
STEP_MARGIN = 0.9
#: candidate Lyapunov matrices of the momentum bound (:func:`stable_step_factor`), all checked at once
#: and the best one used: ``gamma = shift * c / (1 - e)`` (shift 1: W + gamma S is where the momentum
#: carries W, the only choice without forgetting; 0: W and S apart, the best under strong forgetting)
#: and ``nu^2 = max(balance * gamma / (1 - e), slack * (the least nu^2 with ||D||_P <= 1))``
LYAPUNOV_SHIFT, LYAPUNOV_BALANCE, LYAPUNOV_SLACK = torch.cartesian_prod(
    torch.tensor([1.0, 0.5, 0.25, 0.125, 0.0]), torch.tensor([0.25, 1.0, 4.0]), torch.tensor([1.1, 1.5, 2.0, 4.0])).T


def _weighted_gram(f: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The smaller Gram matrix of ``diag(sqrt a) F`` for a factor F (N, b, d) and weights a (..., N, b):
    ``diag(r) F F^T diag(r)`` (b x b, r = sqrt(a) where a > 0, else 0: a sqrt with a finite gradient at 0)
    and r when b <= d, else ``F^T diag(max(a, 0)) F`` (d x d) and None. Non-finite entries (a run that has
    already diverged) count as zero, as in the curvature gains, so the NaN reaches the layer's output
    instead of stopping the eigensolver."""
    if f.shape[-2] <= f.shape[-1]:
        positive = weights > 0
        root = torch.where(positive, weights, 1.0).sqrt() * positive
        gram = root[..., None] * f @ f.transpose(-1, -2) * root[..., None, :]
    else:
        root, gram = None, f.transpose(-1, -2) @ (weights.clamp_min(0.0)[..., None] * f)
    return gram.nan_to_num(0.0, 0.0, 0.0), root


def curvature_norm(factors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """``sum_l ||F_l^T diag(weights) F_l||_2`` (N,) for curvature factors F_l (N, b, d_l) and token
    weights (..., N, b) >= 0 (leading dims kept): the largest eigenvalue of the smaller of the two
    Gram matrices, b x b or d_l x d_l, which share their non-zero eigenvalues."""
    return sum(torch.linalg.eigvalsh(_weighted_gram(f, weights)[0])[..., -1].clamp_min(0.0) for f in factors)


def curvature_norm_slopes(factors: list[torch.Tensor], weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`curvature_norm` and its derivative with respect to the weights (..., N, b), in closed form
    from the top eigenvector: ``d lambda / d a_s = (F[s] . v)^2`` for the unit top eigenvector v of
    ``F^T diag(a) F``, which is ``F^T (r u) / sqrt(lambda)`` for the top eigenvector u of the b x b form
    ``diag(r) F F^T diag(r)`` (r = sqrt a), so there ``d lambda / d a_s = u_s (F[s] . F^T (r u)) / r_s``.
    Both are what autograd takes through the eigensolver, including its conventions at the edges: 0 where
    a_s = 0 in the b x b form (the sqrt's masked branch), and where the clamp of lambda at 0 is active."""
    total, slopes = 0.0, 0.0
    for f in factors:
        gram, root = _weighted_gram(f, weights)
        values, vectors = torch.linalg.eigh(gram)
        top, vector = values[..., -1], vectors[..., -1]
        if root is None:
            slope = (f @ vector[..., None]).squeeze(-1).pow(2) * (weights >= 0)
        else:
            along = ((root * vector)[..., None, :] @ f) @ f.transpose(-1, -2)  # (u r)^T F F^T (..., N, 1, b)
            slope = torch.where(root > 0, vector * along.squeeze(-2) / torch.where(root > 0, root, 1.0), 0.0)
        total = total + top.clamp_min(0.0)
        slopes = slopes + slope * (top >= 0)[..., None]
    return total, slopes


def trace_curvature(factors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """An upper bound of :func:`curvature_norm` from elementwise work alone: the trace
    ``sum_l sum_s weights_s |F_l[s]|^2 >= sum_l ||F_l^T diag(weights) F_l||_2`` (a PSD matrix's top
    eigenvalue is at most its trace), equal to it when a chunk's keys are parallel."""
    total = 0.0
    for f in factors:
        total = total + (weights.clamp_min(0.0) * f.pow(2).sum(-1).nan_to_num(0.0, 0.0, 0.0)).sum(-1)
    return total


class StepGates(NamedTuple):
    """What the step bound (:func:`step_factor`) takes from a chunk's gates alone, before any key is
    seen: computed for all chunks at once (leading dims ``...`` = (N, n)) or for one (N,). E is 1
    without momentum (the weights m_s), 2 with it (u_s and v_s, the two extreme directions)."""

    weights: torch.Tensor  # (E, ..., b): token weights whose curvature norms (*) the bound sums
    inverse_t: torch.Tensor  # (E, ...): each norm's factor in that sum: 1 / t_max at the chosen P, or 1 / (1 + d)
    bounded: torch.Tensor  # (...) bool: a candidate P has ||D||_P <= 1 (else a chunk that steps gets kappa = 0)
    steps: torch.Tensor  # (..., b) bool: the tokens with a step

    def unbind(self) -> list["StepGates"]:
        """Per-chunk parts of gates computed for all chunks (leading dims (N, n))."""
        return [StepGates(*p) for p in zip(self.weights.unbind(2), self.inverse_t.unbind(2), self.bounded.unbind(1),
                                           self.steps.unbind(1))]


def step_gates(decay: torch.Tensor, carry: torch.Tensor | None, s_decay: torch.Tensor | None,
               mix: torch.Tensor, s_mix: torch.Tensor | None) -> StepGates:
    """The gates' part of :func:`step_factor` (its docstring has the derivation): the token weights
    u_s, v_s, the candidate P that minimises the bound with their sums in place of the curvature
    norms, and 1 / t_max of both ends at that P. decay, carry, s_decay (...), mix, s_mix (..., b)."""
    if carry is None:
        return StepGates(mix[None], (1 + decay).reciprocal()[None], torch.ones_like(decay, dtype=torch.bool), mix > 0)
    tiny = torch.finfo(decay.dtype).tiny
    s_mix = torch.where(((carry == 0) & (s_decay == 0))[..., None], 0.0, s_mix)  # S unread: see step_factor
    one_minus_e = (1 - s_decay).clamp_min(torch.finfo(decay.dtype).eps)[..., None]  # e = 1 only if a momentum gate rounds to 1
    d, c, e = decay[..., None], carry[..., None], 1 - one_minus_e
    shift = LYAPUNOV_SHIFT.to(d)
    gamma = c / one_minus_e * shift  # (..., K) candidate P's
    delta = c * ((1 - shift) * one_minus_e + shift * (1 - d)) / one_minus_e  # c + gamma (e - d): 0 at d = 1, shift 1
    least = delta**2 / ((1 - d**2) * (1 - e**2)).clamp_min(tiny)  # the least nu^2 with ||D||_P <= 1
    nu = torch.maximum(LYAPUNOV_BALANCE.to(d) * gamma / one_minus_e, LYAPUNOV_SLACK.to(d) * least)
    nu = nu.sqrt().clamp_min(tiny)
    off = delta / nu
    q11, q12, q22 = 1 - d**2, -d * off, 1 - e**2 - off**2
    det_q = q11 * q22 - q12**2
    z2 = -gamma / nu
    valid_p = (q22 >= 0) & (det_q >= 0)  # candidates with ||D||_P <= 1 (without forgetting only shift 1)
    size = mix + s_mix
    steps = size > 0
    lam = torch.where(steps, s_mix / size.clamp_min(tiny), 0.0)
    lo = torch.where(steps, lam, torch.inf).amin(-1, keepdim=True)
    hi = torch.where(steps, lam, -torch.inf).amax(-1, keepdim=True)
    to_hi = torch.where(hi > lo, ((lam - lo) / (hi - lo).clamp_min(tiny)).clamp(0.0, 1.0), 0.0)
    weights = torch.where(steps, size, 0.0) * torch.stack([1 - to_hi, to_hi])  # (2, ..., b): u_s, v_s
    inverse_t = []  # 1 / t_max per end and candidate P (0 where the direction never expands V)
    for end in (lo, hi):
        w1, w2 = 1 - end + gamma * end, nu * end
        l1, l2 = d * w1, off * w1 + e * w2
        beta = q22 * l1 - q12 * (l2 + z2 * l1) + q11 * z2 * l2
        alpha = (w1**2 + w2**2) * (q22 - 2 * q12 * z2 + q11 * z2**2) + (l2 - z2 * l1) ** 2
        inverse_t.append(alpha / (beta + (beta**2 + alpha * det_q.clamp_min(0.0)).sqrt()))
    inverse_t = torch.stack(inverse_t)  # (2, ..., K)
    mass = weights.sum(-1)[..., None]  # (2, ..., 1): the gates' stand-in for the curvature norms that picks P
    by_gates = torch.where(valid_p, _inverse_kappa(mass, inverse_t), torch.inf).nan_to_num(torch.inf)
    choice = by_gates.argmin(-1, keepdim=True)  # the P of these gates, the same whatever the keys
    at_choice = inverse_t.gather(-1, choice.expand(2, *choice.shape))[..., 0]
    return StepGates(weights, at_choice, by_gates.gather(-1, choice)[..., 0] < torch.inf, steps)


def _inverse_kappa(norms: torch.Tensor, inverse_t: torch.Tensor) -> torch.Tensor:
    """``sum_e N_e / t_max(e)`` over the first dim (a zero norm adds nothing, whatever its t_max)."""
    return torch.where(norms > 0, norms * inverse_t, 0.0).sum(0)


def bound_factor(gates: StepGates, factors: list[torch.Tensor], curvature=curvature_norm) -> torch.Tensor:
    """The keys' part of :func:`step_factor`: kappa (N,) of one chunk from its :class:`StepGates` (N,)
    and its curvature factors, ``min(1, STEP_MARGIN / sum_e N_e / t_max(e))`` with N_e the curvature
    norms (*) at the gates' token weights (0 where no P is valid, 1 where no token steps)."""
    return _combine(curvature(factors, gates.weights), gates.inverse_t, gates.bounded, _counted(gates.steps, factors))


def _counted(steps: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """(N,) bool: the chunk has a token that takes a step (a step weight and a non-zero curvature factor)."""
    return (steps & (sum(f.pow(2).sum(-1) for f in factors) > 0)).any(-1)


def _combine(norms, inverse_t, bounded, counted) -> torch.Tensor:
    best = torch.where(bounded, 1 / _inverse_kappa(norms, inverse_t), 0.0).nan_to_num(0.0)
    return torch.where(counted, (STEP_MARGIN * best).clamp_max(1.0), 1.0)


def step_factor(decay: torch.Tensor, carry: torch.Tensor | None, s_decay: torch.Tensor | None,
                mix: torch.Tensor, s_mix: torch.Tensor | None, factors: list[torch.Tensor],
                curvature=curvature_norm) -> torch.Tensor:
    """The factor kappa (N,) in (0, 1] on one chunk's gradients that keeps the chunk map non-expanding.

    A chunk commits ``W' = d W + c S - sum_s m_s g_s``, ``S' = e S - sum_s p_s g_s`` (d = decay, c =
    carry, e = s_decay at the chunk end, m_s = mix[-1, s], p_s = s_mix[s] >= 0; every g_s at the
    chunk-start W). Near a minimum ``g_s = H_s (W - W*)`` with token Hessians ``H_s >= 0``, so on
    z = (W, S) the chunk is the linear map ``M = D x I - [[A, 0], [B, 0]]``, ``D = [[d, c], [0, e]]``,
    ``A = sum_s m_s H_s``, ``B = sum_s p_s H_s``. What is known of the H_s is the *curvature factors*
    F_l (N, b, d_l), one per fast layer: for every token weighting a >= 0::

        || sum_s a_s H_s ||_2  <=  sum_l || F_l^T diag(a) F_l ||_2                        (*)

    (:func:`curvature_norm`; the engine's F_l are the layer inputs times the curvature along them,
    :mod:`tto.engine.memory`). Keys that point in different directions make (*) smaller than the sum of
    the tokens' own curvatures sum_s a_s |F_s|^2, which it equals when they are parallel.

    The key directions change from chunk to chunk, so a spectral-radius condition per direction does
    not bound products of such maps (the momentum map is not normal). The bound asks instead for a
    common quadratic Lyapunov function: a 2 x 2 ``P > 0`` with ``||M||_P <= 1`` (``||M||_P =
    ||(P^1/2 x I) M (P^-1/2 x I)||_2``; ``P x I`` does not see rotations of the directions), which then
    holds for every product of chunks with the same gates, whatever their keys.

    *Reduction to 2 x 2 checks.* Token s steps along ``(m_s, p_s) = (m_s + p_s) eps(lam_s)``,
    ``eps(lam) = (1 - lam, lam)``, ``lam_s = p_s / (m_s + p_s)`` in [lo, hi] (the least and largest
    lam_s). Every such vector is a non-negative combination of the two extremes,
    ``(m_s, p_s) = u_s eps(lo) + v_s eps(hi)``, ``u_s = (m_s + p_s) (hi - lam_s) / (hi - lo)``,
    ``v_s = (m_s + p_s) (lam_s - lo) / (hi - lo)`` (u_s = m_s + p_s, v_s = 0 if hi = lo), so
    ``[[A], [B]] = eps(lo) x K_lo + eps(hi) x K_hi`` with ``K_lo = sum_s u_s H_s >= 0`` and
    ``K_hi = sum_s v_s H_s >= 0``. With weights ``w_lo + w_hi = 1``,
    ``M = w_lo (D x I - eps(lo) e_1^T x K_lo / w_lo) + w_hi (D x I - eps(hi) e_1^T x K_hi / w_hi)``,
    and each term splits along the eigenvectors of its K into 2 x 2 blocks ``D - t eps e_1^T`` with
    t in [0, ||K|| / w]. If ``||D - t eps e_1^T||_P <= 1`` for t in [0, t_max(eps)] (below), then
    ``||M||_P <= 1`` as soon as ``||K_lo|| / t_max(eps(lo)) + ||K_hi|| / t_max(eps(hi)) <= 1``
    (take w proportional to ||K|| / t_max), with ||K|| bounded by (*). So::

        kappa = min(1, STEP_MARGIN / (N_lo / t_max(eps(lo); P) + N_hi / t_max(eps(hi); P)))

    N_lo, N_hi the right side of (*) at weights u and v; kappa = 1 exactly (the paper's update)
    wherever the chunk meets the condition by itself. P is the candidate (below) that minimises the
    same sum with ``sum_s u_s`` and ``sum_s v_s`` in place of N_lo and N_hi: a function of the gates
    alone, so that chunks with equal gates share their Lyapunov function whatever their keys. With one token, or equal lam_s, it is
    ``t_max / ||sum_s (m_s + p_s) H_s||``: the chunk's Gram matrix of keys, not the sum of its tokens'
    curvatures.

    *P.* ``P = R^T diag(1, nu^2) R``, ``R = [[1, gamma], [0, 1]]``: V = (W + gamma S)^2 + nu^2 S^2.
    Without forgetting (d = 1) ``gamma = c / (1 - e)`` (W + gamma S is where the momentum carries W)
    is the only gamma with ``||D||_P <= 1``; otherwise any gamma works with nu large enough.
    :data:`LYAPUNOV_SHIFT` and co. give a fixed set of candidates (gamma, nu) per chunk, every
    one with ``||D||_P <= 1``; each gives valid t_max. In the scaled
    coordinates ``D`` is ``N0 = [[d, delta / nu], [0, e]]``, ``delta = c + gamma (e - d)``, and a step
    ``t eps e_1^T`` is ``t w z^T``, ``w = (eps_1 + gamma eps_2, nu eps_2)``, ``z = (1, -gamma / nu)``.
    With ``Q = I - N0^T N0 >= 0`` and ``l = N0^T w``::

        I - (N0 - t w z^T)^T (N0 - t w z^T) = Q + t (z l^T + l z^T) - t^2 |w|^2 z z^T

    a 2 x 2 matrix whose determinant is ``det Q + 2 beta t - alpha t^2`` with ``beta = z^T adj(Q) l``,
    ``alpha = |w|^2 z^T adj(Q) z + (z_1 l_2 - z_2 l_1)^2``; it is positive semidefinite (it is at
    t = 0, and its determinant stays >= 0) for ``0 <= t <= t_max = (beta + sqrt(beta^2 + alpha det Q))
    / alpha``. Without forgetting and one token of momentum eta per chunk (d = 1, c = e = eta,
    m = p = theta) this is ``theta L <= 2 (1 - eta)^2 / (1 + eta)``, the heavy-ball step whose averaged
    iterate ``W + gamma S`` moves by at most ``2 (1 - eta) / (1 + eta)`` of its distance to the minimum.

    Without momentum (no S, or a chunk that neither reads nor keeps it: c = e = 0) the condition is
    ``kappa ||A|| <= STEP_MARGIN (1 + d)``: ``||d I - kappa A||_2 <= max(d, kappa ||A|| - d) < 1`` for
    every A >= 0 of that norm, ||A|| by (*) at weights m. (At c = e = 0 the S' that the chunk writes
    reaches W only through a later chunk's carry, which at equal gates is 0 too: the p_s drop out, so
    a momentum optimizer with its momentum gate at 0 takes exactly the momentum-free step.)
    P depends on the chunk's gates (d, c, e), not on its keys: the non-expansion holds across chunks
    whose keys rotate at equal gates.

    decay, carry, s_decay (N,) (carry and s_decay None: no momentum), mix, s_mix (N, b), factors a list
    of (N, b, d_l). `curvature` is the right side of (*), :func:`curvature_norm`; an upper bound of it
    (:func:`trace_curvature`, or factors that bound the true ones) gives a kappa no larger than this
    one (kappa falls as the norms grow: the choice of P does not see them), so where that is 1, so is
    this.

    Everything but the norms N_lo, N_hi depends on the gates alone: :func:`step_gates` computes it
    (for the engine, for all chunks at once before the scan), :func:`bound_factor` adds the keys.
    """
    return bound_factor(step_gates(decay, carry, s_decay, mix, s_mix), factors, curvature)


def stable_step_factor(decay: torch.Tensor, carry: torch.Tensor | None, s_decay: torch.Tensor | None,
                       mix: torch.Tensor, s_mix: torch.Tensor | None, factors: list[torch.Tensor]) -> torch.Tensor:
    """:func:`step_factor` (below), differentiated with respect to the gates' coefficients (decay,
    carry, s_decay, mix, s_mix), not the curvature factors (taken as constants, like a clipping norm):
    :func:`stable_bound_factor` of :func:`stable_step_gates`."""
    return stable_bound_factor(stable_step_gates(decay, carry, s_decay, mix, s_mix), factors)


def stable_step_gates(decay, carry, s_decay, mix, s_mix) -> StepGates:
    """:func:`step_gates` whose vector-Jacobian products have their non-finite entries zeroed. The
    bound's branches for degenerate chunks (zero weights, no momentum, a direction that never expands
    the norm) are selected by ``torch.where``, whose discarded sides can hold 0 x inf; their non-finite
    gradient entries are zero, the derivative of the branch actually taken."""
    inputs = (decay, carry, s_decay, mix, s_mix)
    return StepGates(*_FiniteGradients.apply(_step_gates_tuple, len(inputs), *inputs))


def _step_gates_tuple(*inputs) -> tuple:
    return tuple(step_gates(*inputs))


def stable_bound_factor(gates: StepGates, factors: list[torch.Tensor]) -> torch.Tensor:
    """:func:`bound_factor` differentiated with respect to the gates' part (the curvature factors
    detached, like a clipping norm): :class:`_BoundFactor`, or without a gradient to take (inference)
    :func:`bound_factor` itself."""
    factors = [f.detach() for f in factors]
    if not (torch.is_grad_enabled() and (gates.weights.requires_grad or gates.inverse_t.requires_grad)):
        return bound_factor(gates, factors)
    return _BoundFactor.apply(gates.weights, gates.inverse_t, gates.bounded, _counted(gates.steps, factors), *factors)


class _BoundFactor(torch.autograd.Function):
    """kappa of :func:`bound_factor` at :func:`curvature_norm`, whose backward takes the norms' derivatives
    with respect to the token weights in closed form (:func:`curvature_norm_slopes`, saved in the forward)
    instead of differentiating the eigensolver: the vector-Jacobian product with respect to the weights
    and inverse_t, with non-finite entries zeroed (a zero norm's ``where`` branch, ``1 / 0`` where no token
    steps). Where kappa is 1 on every row, each row is the constant branch of ``min(1, .)``, whose
    derivative is 0 (not decided under ``torch.compile``, whose graph cannot branch on a tensor's value)."""

    @staticmethod
    def forward(ctx, weights, inverse_t, bounded, counted, *factors):
        norms, slopes = curvature_norm_slopes(list(factors), weights)
        kappa = _combine(norms, inverse_t, bounded, counted)
        ctx.constant = not torch.compiler.is_compiling() and bool((kappa >= 1.0).all())
        ctx.save_for_backward(norms, slopes, inverse_t, bounded, counted)
        return kappa

    @staticmethod
    def backward(ctx, grad):
        none = (None,) * (len(ctx.needs_input_grad) - 2)
        if ctx.constant:
            return (None, None, *none)
        norms, slopes, inverse_t, bounded, counted = ctx.saved_tensors
        norms, inverse_t = norms.detach().requires_grad_(), inverse_t.detach().requires_grad_()
        with torch.enable_grad():
            kappa = _combine(norms, inverse_t, bounded, counted)
        d_norms, d_inverse_t = torch.autograd.grad(kappa, (norms, inverse_t), grad)
        finite = lambda t: t.nan_to_num(0.0, 0.0, 0.0)  # noqa: E731
        return finite(d_norms[..., None] * slopes), finite(d_inverse_t), *none


class _FiniteGradients(torch.autograd.Function):
    """``fn(*inputs)`` in the forward; in the backward, its vector-Jacobian product with respect to the
    first `n_differentiable` inputs, recomputed under autograd, with non-finite entries zeroed."""

    @staticmethod
    def forward(ctx, fn, n_differentiable, *inputs):
        ctx.fn, ctx.n = fn, n_differentiable
        ctx.save_for_backward(*inputs)
        with torch.no_grad():
            out = fn(*inputs)
        ctx.mark_non_differentiable(*(o for o in (out if isinstance(out, tuple) else (out,)) if not o.is_floating_point()))
        return out

    @staticmethod
    def backward(ctx, *grads):
        inputs = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        leaves = [None if x is None else x.detach().requires_grad_(need and i < ctx.n)
                  for i, (x, need) in enumerate(zip(inputs, needs))]
        wanted = [x for x in leaves if x is not None and x.requires_grad]
        with torch.enable_grad():
            out = ctx.fn(*leaves)
        pairs = [(o, g) for o, g in zip(out if isinstance(out, tuple) else (out,), grads) if g is not None and o.requires_grad]
        found = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
                     if pairs and wanted else [None] * len(wanted))
        result = [next(found) if x is not None and x.requires_grad else None for x in leaves]
        return (None, None, *(None if g is None else g.nan_to_num(0.0, 0.0, 0.0) for g in result))


@functools.lru_cache(maxsize=None)
def inverse_positions(b: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``1 / t`` for t = 1..b (b,): a constant table, built once per size, device and dtype."""
    return torch.arange(1, b + 1, device=device, dtype=dtype).reciprocal()


def segsum(x: torch.Tensor) -> torch.Tensor:
    """out[..., i, j] = sum_{r=j+1..i} x[..., r] for j <= i, -inf above the diagonal."""
    b = x.shape[-1]
    lower = torch.tril(torch.ones(b, b, dtype=torch.bool, device=x.device), -1)
    out = x[..., :, None].expand(*x.shape, b).masked_fill(~lower, 0).cumsum(-2)
    return out.masked_fill(~torch.tril(torch.ones(b, b, dtype=torch.bool, device=x.device)), float("-inf"))


def suffix_scan(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """out[..., s] = sum_{m >= s} a[..., m] * prod_{r=s+1..m} g[..., r] over the last dim (b): the
    backward recurrence ``out_s = a_s + g_{s+1} out_{s+1}`` in ceil(log2 b) doubling steps. Products
    of gates are formed by multiplication, never as differences of cumulative log sums (which lose
    float32 precision over long chunks), so for a, g >= 0 each entry, a sum of non-negative terms,
    carries a relative error of O(log2 b) roundings at any chunk length; a product that underflows
    goes to 0."""
    b = a.shape[-1]
    out, link = a, F.pad(g[..., 1:], (0, 1))  # link_s = g_{s+1}, from s to s + 1; 0 after the last
    span = 1  # out_s sums m in [s, s + span), link_s = prod_{r=s+1..s+span} g_r (0 past the end)
    while span < b:
        out = out + link * F.pad(out[..., span:], (0, span))
        link = link * F.pad(link[..., span:], (0, span))
        span *= 2
    return out


def _last_one(v: torch.Tensor) -> torch.Tensor:
    """A one at the last position of the chunk dim, zeros elsewhere, like `v`: the `a` of
    :func:`suffix_scan` whose scan is the suffix products ``prod_{r=s+1..b-1} g_r``."""
    return F.pad(v.new_ones(*v.shape[:-1], 1), (v.shape[-1] - 1, 0))


class InnerOptimizer(nn.Module):
    has_momentum = False
    #: names of the per-token gates this optimizer reads
    gate_names: tuple[str, ...] = ()
    #: tokens before a chunk whose gradients, taken at the chunk-start weights, its steps also use
    #: (the Omega window's reach into the previous chunk), and the gates of theirs it reads
    lookback: int = 0
    lookback_gates: tuple[str, ...] = ()

    def coefficients(self, gates: dict[str, torch.Tensor], valid: torch.Tensor) -> Coefficients:
        raise NotImplementedError

    def read_coefficients(self, gates: dict[str, torch.Tensor], valid: torch.Tensor, first: int) -> Coefficients:
        """``coefficients(gates, valid).rows(first)``: the rows of the tokens from `first` on, what
        their reads use (a decoding step reads its new tokens' rows alone). An optimizer whose rows
        do not need the earlier ones computes only these."""
        return self.coefficients(gates, valid).rows(first)

    def end_coefficients(self, gates: dict[str, torch.Tensor], valid: torch.Tensor) -> Coefficients:
        """``coefficients(gates, valid).rows(b - 1)``, the chunk-end row alone (mix (N, n, 1, b), decay
        and carry (N, n, 1), the rest as there), computed in O(b) per chunk."""
        raise NotImplementedError

    def naive_init(self, params: dict[str, torch.Tensor]) -> dict:
        raise NotImplementedError

    def naive_step(self, state: dict, grads: dict, gates: dict, t: int) -> dict[str, torch.Tensor]:
        """Consume token t's gradient (t = position in its chunk); return the weights t reads."""
        raise NotImplementedError

    def naive_chunk_end(self, state: dict) -> None:
        """Start a new chunk from the current state."""
        raise NotImplementedError

    def naive_chunk_start(self, state: dict, grads: list[dict], gates: list[dict]) -> None:
        """Before a chunk's first step: the gradients at its start weights and the gates of the (up to
        :attr:`lookback`) tokens before it, oldest first."""


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

    def _tto_init(self, init) -> None:
        init.zeros_(self.token_offset)

    def position_scale(self) -> torch.Tensor:
        offset = upcast(self.token_offset)
        return (inverse_positions(self.chunk_size, offset.device, offset.dtype) + offset).clamp_min(0.0)

    def coefficients(self, gates, valid):
        return self.read_coefficients(gates, valid, 0)

    def read_coefficients(self, gates, valid, first):
        lr = gates["lr"] * valid
        eta = self.position_scale()[first: lr.shape[-1]]
        return Coefficients(mix=torch.tril(eta[:, None] * lr[..., None, :], diagonal=first))

    def end_coefficients(self, gates, valid):
        lr = gates["lr"] * valid
        return Coefficients(mix=(self.position_scale()[lr.shape[-1] - 1] * lr)[..., None, :])

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


class PlainGD(InnerOptimizer):
    """Plain gradient descent, no momentum, no forgetting::

        W_t = W_{t-1} - lr_t * g_t

    so a chunk commits ``W_c - sum_s lr_s g_s``, the gradients summed over the chunk at its start
    weights (the Continuum Memory System's levels, :mod:`tto.layers.cms`). Gate: ``lr`` (N, T).
    """

    gate_names = ("lr",)

    def coefficients(self, gates, valid):
        lr = gates["lr"] * valid
        return Coefficients(mix=torch.tril(lr[..., None, :].expand(*lr.shape, lr.shape[-1])))

    def end_coefficients(self, gates, valid):
        return Coefficients(mix=(gates["lr"] * valid)[..., None, :])

    def naive_init(self, params):
        return {"W": dict(params)}

    def naive_step(self, state, grads, gates, t):
        state["W"] = {k: state["W"][k] - gates["lr"][..., None, None] * grads[k] for k in grads}
        return state["W"]

    def naive_chunk_end(self, state):
        pass


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

    def end_coefficients(self, gates, valid):
        v = valid.to(gates["lr"].dtype)
        keep = 1 - gates["forget"] * v  # 1 at pads
        retain = suffix_scan(_last_one(v), keep)  # prod_{r=m+1..b-1} (1 - alpha_r)
        return Coefficients(mix=(retain * gates["lr"] * v)[..., None, :], decay=(keep[..., 0] * retain[..., 0])[..., None])

    def naive_init(self, params):
        return {"W": dict(params)}

    def naive_step(self, state, grads, gates, t):
        lr, keep = gates["lr"][..., None, None], 1 - gates["forget"][..., None, None]
        state["W"] = {k: keep * state["W"][k] - lr * grads[k] for k in grads}
        return state["W"]

    def naive_chunk_end(self, state):
        pass


class MomentumGD(InnerOptimizer):
    """Gradient descent with momentum and a forget gate: Titans (eqs. 13-14), the learning rate on
    the gradient::

        S_t = eta_t * S_{t-1} - lr_t * g_t          (past and momentary surprise)
        W_t = (1 - forget_t) * W_{t-1} + S_t        (retention)

    or, with ``lr_after_momentum``, ATLAS' order (its Muon step without the orthogonalisation): the
    momentum sums the raw gradients and the learning rate scales the momentum's step::

        S_t = eta_t * S_{t-1} - g_t
        W_t = (1 - forget_t) * W_{t-1} + lr_t * S_t

    Gates (N, T): ``lr`` (Titans' theta, ATLAS' eta), ``momentum`` (Titans' eta, ATLAS' theta) and
    ``forget`` (alpha; ATLAS' alpha_t is 1 - forget_t), all in [0, 1]. With valid = False a token is
    skipped: S and W stay as they are.
    """

    has_momentum = True
    gate_names = ("lr", "momentum", "forget")

    def __init__(self, lr_after_momentum: bool = False):
        super().__init__()
        self.lr_after_momentum = lr_after_momentum

    def coefficients(self, gates, valid):
        v = valid.to(gates["lr"].dtype)
        lr = gates["lr"] * v
        lr_w, lr_s = (lr, v) if self.lr_after_momentum else (v, lr)  # on the momentum's step / on the gradient
        log_keep = torch.log1p(-gates["forget"] * v)  # log(1 - alpha); 0 at pads
        log_eta = torch.log(torch.where(valid, gates["momentum"], torch.ones_like(v)))
        retain = torch.exp(segsum(log_keep))  # retain[i, m] = prod_{r=m+1..i} (1 - alpha_r)
        carry_mat = torch.exp(segsum(log_eta))  # carry_mat[m, j] = prod_{r=j+1..m} eta_r
        decay = torch.exp(log_keep.cumsum(-1))  # prod_{r<=i} (1 - alpha_r)
        eta0 = torch.exp(log_eta.cumsum(-1))  # prod_{r<=m} eta_r
        applied = retain * lr_w[..., None, :]  # W_t += lr_w S_t only at real tokens
        mix = (applied @ carry_mat) * lr_s[..., None, :]
        carry = (applied @ eta0[..., None])[..., 0]
        return Coefficients(mix=mix, decay=decay, carry=carry, s_decay=eta0[..., -1], s_mix=carry_mat[..., -1, :] * lr_s,
                            step=applied[..., -1, :].sum(-1))

    def end_coefficients(self, gates, valid):
        """The last row by :func:`suffix_scan`: ``mix[b-1, s] = lr_s[s] sum_{m>=s} applied[m]
        prod_{r=s+1..m} eta_r`` with ``applied[m] = lr_w[m] prod_{r=m+1..b-1} (1 - alpha_r)``, and the
        chunk-wide products ``decay = prod (1 - alpha)``, ``s_decay = prod eta``, ``carry = eta_0 *
        (that scan at s = 0)``."""
        v = valid.to(gates["lr"].dtype)
        lr = gates["lr"] * v
        lr_w, lr_s = (lr, v) if self.lr_after_momentum else (v, lr)
        keep = 1 - gates["forget"] * v  # 1 - alpha; 1 at pads
        eta = torch.where(valid, gates["momentum"], torch.ones_like(v))
        last = _last_one(v)
        retain = suffix_scan(last, keep)  # prod_{r=m+1..b-1} (1 - alpha_r)
        carried = suffix_scan(last, eta)  # prod_{r=j+1..b-1} eta_r
        applied = retain * lr_w  # row b-1 of `applied` in coefficients
        through = suffix_scan(applied, eta)  # sum_{m>=s} applied[m] prod_{r=s+1..m} eta_r
        return Coefficients(mix=(through * lr_s)[..., None, :], decay=keep[..., :1] * retain[..., :1],
                            carry=eta[..., :1] * through[..., :1], s_decay=eta[..., 0] * carried[..., 0],
                            s_mix=carried * lr_s, step=applied.sum(-1))

    def naive_init(self, params):
        return {"W": dict(params), "S": {k: torch.zeros_like(v) for k, v in params.items()}}

    def naive_step(self, state, grads, gates, t):
        lr, eta, keep = (gates[k][..., None, None] for k in ("lr", "momentum", "forget"))
        keep = 1 - keep
        if self.lr_after_momentum:
            state["S"] = {k: eta * state["S"][k] - grads[k] for k in grads}
            state["W"] = {k: keep * state["W"][k] + lr * state["S"][k] for k in grads}
        else:
            state["S"] = {k: eta * state["S"][k] - lr * grads[k] for k in grads}
            state["W"] = {k: keep * state["W"][k] + state["S"][k] for k in grads}
        return state["W"]

    def naive_chunk_end(self, state):
        pass


class OmegaWindow(InnerOptimizer):
    """ATLAS' Omega rule on top of another optimizer: the gradient at token t is that of the
    weighted loss over the last ``window`` tokens, ``g~_t = sum_{i=t-window+1..t} gamma_i grad l_i``, all
    at the chunk-start weights, the window reaching back into the previous chunk (its last
    ``window - 1`` tokens, :attr:`lookback`, their gradients taken at this chunk's start weights like
    every gradient of the chunk). Gate ``omega`` (N, T): gamma_i in [0, 1] (0 drops a token).

    Because every gradient is taken at the chunk start, the window is a banded matrix G
    (b x (lookback + b)) from the gradients of the lookback tokens and the chunk's to the windowed
    ones (``G[s, i] = gamma_i`` for ``s - window < i <= s``), and the wrapped optimizer's coefficients
    become ``mix @ G`` and ``s_mix @ G``: one column per lookback token and per chunk token.
    window = 1 with gamma = 1 is the wrapped optimizer.
    """

    lookback_gates = ("omega",)

    def __init__(self, base: InnerOptimizer, window: int):
        super().__init__()
        self.base, self.window = base, window
        self.has_momentum = base.has_momentum
        self.gate_names = base.gate_names + ("omega",)
        self.lookback = window - 1

    def coefficients(self, gates, valid):
        """As the base class's, with ``gates["omega"]`` (N, n, lookback + b): the gammas of the lookback
        tokens before each chunk (0 where there is none), then the chunk's; mix (N, n, b, lookback + b)
        and s_mix (N, n, lookback + b) have a column per lookback token first."""
        c = self.base.coefficients(gates, valid)
        b = valid.shape[-1]
        gamma, lookback = self._gammas(gates, valid)
        row = torch.arange(b, device=valid.device)[:, None]
        col = torch.arange(-lookback, b, device=valid.device)[None, :]  # place in the chunk
        band = (col <= row) & (row - col < self.window)
        window = band.to(gamma.dtype) * gamma[..., None, :]  # (N, n, b, lookback + b)
        s_mix = None if c.s_mix is None else (c.s_mix[..., None, :] @ window)[..., 0, :]
        return Coefficients(mix=c.mix @ window, decay=c.decay, carry=c.carry, s_decay=c.s_decay, s_mix=s_mix, step=c.step)

    def end_coefficients(self, gates, valid):
        """The band applied to the base's last row without building it: column i (lookback token or
        chunk token) is ``gamma_i`` times the sum of the row's entries at s in [i, i + window)."""
        c = self.base.end_coefficients(gates, valid)
        gamma, lookback = self._gammas(gates, valid)
        banded = lambda row: gamma * F.pad(row, (lookback, self.window - 1)).unfold(-1, self.window, 1).sum(-1)  # noqa: E731
        return Coefficients(mix=banded(c.mix[..., 0, :])[..., None, :], decay=c.decay, carry=c.carry, s_decay=c.s_decay,
                            s_mix=None if c.s_mix is None else banded(c.s_mix), step=c.step)

    @staticmethod
    def _gammas(gates, valid) -> tuple[torch.Tensor, int]:
        """gamma (N, n, lookback + b): the lookback tokens' omega gates, then the chunk's (0 at pads),
        and the number of lookback columns."""
        omega = gates["omega"]
        lookback = omega.shape[-1] - valid.shape[-1]
        return torch.cat([omega[..., :lookback], omega[..., lookback:] * valid], -1), lookback

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

    def naive_chunk_start(self, state, grads, gates):
        state["window"] = [{k: g["omega"][..., None, None] * x for k, x in grad.items()}
                           for grad, g in zip(grads, gates)]
