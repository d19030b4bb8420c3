"""Nonlinear retention (Miras' "retention gate" beyond l2 decay), applied at chunk boundaries.

The optimizers' retention (``forget`` gate) is linear and runs token by token inside a chunk. The
retentions here are nonlinear in the weights, so, as in Miras' parallel training, they act only
where a chunk commits its weights; inside a chunk the update stays linear (the engine's dual form):

* :meth:`Retention.start` maps the learned initial weights to the first chunk's weights;
* :meth:`Retention.grad_scale` scales the chunk's gradients, from its start weights;
* :meth:`Retention.chunk_end` maps (start weights, linearly updated end weights, the chunk's
  total linear decay; for ATLAS' Muon, the chunk-end momentum and its step size) to the next
  chunk's start weights.

LaCT's large-chunk update (:class:`tto.engine.LargeChunkMemory`) commits through the same parts:
Muon (:meth:`MuonRetention.orthogonalize` of its momentum) and its weight norm
(:class:`WeightNorm`).

The base class is the identity (every optimizer without a nonlinear retention).
"""

from __future__ import annotations

import torch

from .muon import newton_schulz5

Params = dict[str, torch.Tensor]


class Retention:
    #: the chunk's last token, at the boundary where the retention acts, reads the weights that
    #: :meth:`chunk_end` maps its linear weights to (the others read the linear ones)
    reads_chunk_end = False
    #: the commit is a step along the chunk-end momentum whose size the gates bound by themselves
    #: (:class:`MuonRetention`): it needs no step bound and no linearly updated end weights
    steps_along_momentum = False
    #: :meth:`grad_scale` scales the gradients (from the start weights; False: it is None)
    scales_gradients = False

    def start(self, params: Params) -> Params:
        return params

    def grad_scale(self, params: Params) -> dict[str, torch.Tensor] | None:
        """Per-weight factor (N, 1, 1) on the chunk's gradients; None: 1."""
        return None

    def chunk_end(self, start: Params, end: Params, keep: torch.Tensor | None, momentum: Params | None = None,
                  step: torch.Tensor | None = None) -> Params:
        """keep (N,): the product of the chunk's linear decays (None: 1); momentum: the chunk-end
        momentum and step (N,) its weight in the update (:attr:`Coefficients.step`), read by a
        retention that :attr:`steps_along_momentum`."""
        return end

    def commit(self, start: Params, end: Params, keep: torch.Tensor | None, active: torch.Tensor,
               momentum: Params | None = None, step: torch.Tensor | None = None) -> Params:
        """:meth:`chunk_end` at the rows (N,) `active` in the chunk; other rows, a chunk of pads (left
        padding), keep `end` (their start weights): an identity step, retention included (and no
        gradient through the retention of a zero step, Muon's normalisation of which is 1 / eps)."""
        retained = self.chunk_end(start, end, keep, momentum, step)
        return {n: torch.where(active[:, None, None], w, end[n]) for n, w in retained.items()}


def _entry_norm(w: torch.Tensor, q: float) -> torch.Tensor:
    """Entrywise l_q norm of each head's matrix: (N, a, b) -> (N, 1, 1). ``|w|^q`` as ``(w^2)^(q/2)``:
    at q = 4 a square twice, an order of magnitude cheaper than a general power of |w| on CPU."""
    return w.square().pow(q / 2).sum((-2, -1), keepdim=True).pow(1 / q)


class LqNormalization(Retention):
    """Moneta's l_q retention: the memory accumulates ``A`` and reads ``W = A / ||A||_q^(q-2)``.

    Normalisation happens at chunk boundaries, as in the paper's parallel training: with
    ``n_c = ||A_c||_q^(q-2)`` held at its chunk-start value inside a chunk, the read weights
    ``W_t = A_t / n_c`` take the optimizer's linear steps with gradients scaled by ``1 / n_c``; at the
    chunk end ``A_b = n_c W_b`` is renormalised exactly, and the chunk's last token reads that
    ``W_b = A_b / ||A_b||_q^(q-2)`` (``reads_chunk_end``; at chunk size 1 every token reads the
    paper's per-token W_t). Since ``||W|| = ||A||^(3-q)``, ``n_c`` is recovered from ``W_c`` alone
    (q != 3), so the state is just W.

    ``min_norm`` (not in the paper) floors ``||A||``: a chunk end whose ``||A_b|| < min_norm`` scales
    A_b up to that norm, direction kept. For q > 3, ``||W|| = ||A||^(3-q)`` grows without bound as a
    forget gate shrinks A (q = 4: ``||W|| = 1 / ||A||``, geometric in the tokens); with the floor
    ``||W|| <= min_norm^(3-q)``, and ``||A|| >= min_norm`` keeps W determining A. Above the floor
    (and with ``min_norm = 0``) the update is the paper's.
    """

    reads_chunk_end = True
    scales_gradients = True

    def __init__(self, q: float, min_norm: float = 0.0, eps: float = 1e-12):
        if q == 3:
            raise ValueError("LqNormalization needs q != 3 (W alone does not determine ||A|| at q = 3)")
        self.q, self.min_norm, self.eps = q, min_norm, eps

    def _n(self, w: torch.Tensor) -> torch.Tensor:
        return _entry_norm(w, self.q).clamp_min(self.eps).pow((self.q - 2) / (3 - self.q))

    def grad_scale(self, params):
        return {name: 1.0 / self._n(w) for name, w in params.items()}

    def chunk_end(self, start, end, keep, momentum=None, step=None):
        out = {}
        for name, w in end.items():
            a = self._n(start[name]) * w
            norm = _entry_norm(a, self.q).clamp_min(self.eps)
            floored = norm.clamp_min(self.min_norm)  # ||A|| after the floor: A scaled by floored / norm
            out[name] = a * (floored / norm) / floored.pow(self.q - 2)
        return out


class SoftmaxRetention(Retention):
    """Memora's KL retention: every row of a weight matrix is ``scale`` times a probability vector,
    updated by the mirror-descent step ``W <- scale * softmax(keep * log(W / scale) - sum_s c_s g_s / scale)``.

    Inside a chunk the weights take the optimizer's linear steps ``W_t = keep_t W_c - sum_s c_s g_s``;
    at the chunk end the accumulated step ``sum_s c_s g_s = keep W_c - W_b`` is applied in log
    space instead. The learned initial weights are logits: ``W_0 = scale * softmax(W_init)``.
    """

    def __init__(self, scale: float):
        self.scale = scale

    def start(self, params):
        return {name: self.scale * torch.softmax(w, dim=-1) for name, w in params.items()}

    def chunk_end(self, start, end, keep, momentum=None, step=None):
        keep = 1.0 if keep is None else keep[:, None, None]
        out = {}
        for name, w in end.items():
            linear = keep * start[name] - w
            out[name] = self.scale * torch.softmax(keep * torch.log(start[name] / self.scale) - linear / self.scale, dim=-1)
        return out


class MuonRetention(Retention):
    """ATLAS' Muon step (``M_t = alpha_t M_{t-1} - eta_t NS5(S_t)``) at chunk granularity: the chunk's
    momentum S_b (the optimizer's, :class:`tto.engine.MomentumGD` with ``lr_after_momentum``: no lr
    inside) is orthogonalised once, at the chunk end, and every token's step uses it in place of its
    own ``NS5(S_t)``::

        W_{c+1} = keep W_c + step NS5(S_b),    step = sum_t (prod_{r>t} alpha_r) eta_t

    (the engine's S is the negated momentum, ``S_t = theta_t S_{t-1} - g_t``, and NS5 is odd). With one
    token per chunk this is the paper's per-token rule. Inside the chunk the weights take the
    optimizer's linear steps (``lr_t S_t`` without the orthogonalisation), which only the reads see.
    Since NS5's singular values are at most ``NS5_MAX_GAIN`` (:mod:`tto.engine.muon`), a commit moves
    the weights by at most ``NS5_MAX_GAIN * step`` in spectral norm, whatever the gradients."""

    steps_along_momentum = True

    def orthogonalize(self, update: torch.Tensor) -> torch.Tensor:
        """Muon's direction NS5(update) of an update (N, a, b)."""
        return newton_schulz5(update)

    def chunk_end(self, start, end, keep, momentum=None, step=None):
        keep = 1.0 if keep is None else keep[:, None, None]
        return {name: torch.addcmul(keep * w, step[:, None, None], self.orthogonalize(momentum[name]))
                for name, w in start.items()}

    def commit(self, start, end, keep, active, momentum=None, step=None):
        """:meth:`chunk_end` with keep 1 and step 0 at the rows a chunk of pads leaves alone: the same
        identity step as the base class's selection (`end` is `start` here), without a selection over
        the weights' size in each direction of autograd (NS5 of any momentum, even 0, is finite)."""
        keep = torch.ones_like(step) if keep is None else keep
        return self.chunk_end(start, end, torch.where(active, keep, 1.0), momentum, torch.where(active, step, 0.0))


class WeightNorm(Retention):
    """LaCT's weight norm: after each chunk's update every column of every fast weight is rescaled
    to its norm in the learned initial weights, ``W[:, j] <- W[:, j] ||W_0[:, j]|| / ||W[:, j]||``
    (``fast``: the fast model holding W_0)."""

    def __init__(self, fast):
        self.fast = fast

    def chunk_end(self, start, end, keep, momentum=None, step=None):
        first = next(iter(end.values()))
        initial = self.fast.initial_params(first.shape[0] // self.fast.num_heads)
        return {name: w * (initial[name].norm(dim=-2, keepdim=True) / w.norm(dim=-2, keepdim=True))
                for name, w in end.items()}
