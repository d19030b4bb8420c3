"""Inner objectives (Miras' "attentional bias"): the loss a memory minimizes on each (key, value) pair.

An objective gives the per-token loss (used by the naive reference through autograd) and its
gradient with respect to the memory output ``y = M(k)`` (used by the fast path, which
back-propagates it by hand). Only this gradient differs between objectives: for every fast linear
layer the weight gradient stays an outer product ``x^T delta``, so the engine's dual form holds for
all of them. ``gates`` are per-token tensors shaped like ``y`` without its feature dim, for
objectives with data-dependent parameters (``gate_names``).
"""

from __future__ import annotations

import torch


class Objective:
    #: names of the per-token gates this objective reads
    gate_names: tuple[str, ...] = ()
    #: :meth:`curvature` depends on the memory's output y (False: on the gates alone, y gives its shape)
    curvature_reads_output = True

    def loss(self, y: torch.Tensor, v: torch.Tensor, gates: dict) -> torch.Tensor:
        """Per-token loss (...,) of outputs y and targets v (..., d)."""
        raise NotImplementedError

    def grad(self, y: torch.Tensor, v: torch.Tensor, gates: dict) -> torch.Tensor:
        """d loss / d y (..., d)."""
        raise NotImplementedError

    def curvature(self, y: torch.Tensor, v: torch.Tensor, gates: dict) -> torch.Tensor:
        """Per-token top eigenvalue (...,) of the Hessian d^2 loss / d y^2 (0 where it is not
        positive): the objective's part of the engine's step bound (:mod:`tto.engine.memory`)."""
        raise NotImplementedError


class SquaredError(Objective):
    """l(y, v) = scale / 2 * ||y - v||^2 per token.

    scale 1 is TTT's ``1/2 ||f(k) - v||^2``; scale 2 is the unhalved ``||M(k) - v||^2`` of Titans;
    scale 2/d averages over features (titans-pytorch).
    """

    curvature_reads_output = False

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def loss(self, y, v, gates=None):
        return 0.5 * self.scale * (y - v).pow(2).sum(-1)

    def grad(self, y, v, gates=None):
        return y - v if self.scale == 1.0 else self.scale * (y - v)

    def curvature(self, y, v, gates=None):
        return y.new_full(y.shape[:-1], self.scale)


class DotProduct(Objective):
    """LaCT's (and Hebbian linear attention's) bias ``l(y, v) = -<y, v>``: descent raises the memory's
    alignment with the value; its gradient ``-v`` does not depend on y."""

    curvature_reads_output = False

    def loss(self, y, v, gates=None):
        return -(y * v).sum(-1)

    def grad(self, y, v, gates=None):
        return -v

    def curvature(self, y, v, gates=None):
        return y.new_zeros(y.shape[:-1])


class LpError(Objective):
    """Moneta's l_p bias ``l(y, v) = sum_i |y_i - v_i|^p``, with ``|e|`` smoothed to
    ``sqrt(e^2 + eps)`` so that p < 2 has a gradient at 0 (eps = 0: the exact bias)::

        d l / d y = p * e * (e^2 + eps)^((p - 2) / 2)
    """

    def __init__(self, p: float, eps: float = 0.0):
        self.p, self.eps = p, eps

    def loss(self, y, v, gates=None):
        return ((y - v).pow(2) + self.eps).pow(self.p / 2).sum(-1)

    def grad(self, y, v, gates=None):
        e = y - v
        return self.p * e * (e.pow(2) + self.eps).pow(self.p / 2 - 1)

    def curvature(self, y, v, gates=None):
        """The Hessian is diagonal: ``p (e^2 + eps)^(p/2 - 2) ((p - 1) e^2 + eps)``, its largest entry."""
        e2 = (y - v).pow(2)
        return (self.p * (e2 + self.eps).pow(self.p / 2 - 2) * ((self.p - 1) * e2 + self.eps)).amax(-1).clamp_min(0.0)


class Huber(Objective):
    """Yaad's Huber-style bias with a data-dependent threshold ``delta_t`` (gate ``huber_delta``):
    the squared error ``1/2 ||e||^2`` while the error's root mean square ``||e|| / sqrt(d)`` is at
    most ``delta_t``, beyond it ``delta_t ||e||_1``. The gradient is ``e`` near the target and
    ``delta_t * sign(e)`` (entries bounded by delta_t) for outliers. Measuring the RMS rather than
    ``||e||`` keeps delta's scale independent of the head width; the paper leaves the norm open."""

    gate_names = ("huber_delta",)

    @staticmethod
    def _near(e: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return e.pow(2).mean(-1) <= delta.pow(2)

    def loss(self, y, v, gates):
        e, delta = y - v, gates["huber_delta"]
        return torch.where(self._near(e, delta), 0.5 * e.pow(2).sum(-1), delta * e.abs().sum(-1))

    def grad(self, y, v, gates):
        e, delta = y - v, gates["huber_delta"]
        return torch.where(self._near(e, delta)[..., None], e, delta[..., None] * torch.sign(e))

    def curvature(self, y, v, gates):
        """1 on the squared error, 0 on the l_1 part (linear in each entry between sign changes)."""
        return self._near(y - v, gates["huber_delta"]).to(y.dtype)
