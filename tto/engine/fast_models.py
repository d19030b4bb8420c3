"""Fast models: the per-head networks a memory trains while it reads.

Every fast model here is a composition of linear layers ``z = x W + b`` (row-vector convention,
``W: (d_in, d_out)``) and fixed elementwise functions, so the gradient of any inner loss with
respect to ``W`` is an outer product ``x^T delta``. A fast model is written once, in
:meth:`FastModel.apply`, against an abstract ``linear(name, x)``; the engine passes either a plain
linear (forward at the chunk-start weights, the naive reference) or the dual-form read-out, which
reads every in-chunk update without building per-token weights.

Fast weights are tensors of shape (N, ...) with N = batch x heads; the model's outer parameters
(the initial weights, the LayerNorm of the ``x + LN(g(x))`` wrapper) have a leading head dim.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

Linear = Callable[[str, torch.Tensor], torch.Tensor]


#: dtype -> the inner dtype of a tensor of that dtype (filled on first use); a Python lookup, where
#: ``torch.promote_types`` and a same-dtype ``.to`` each dispatch an op: the decoding of a small model
#: runs a few hundred upcasts per token
_INNER_DTYPE: dict[torch.dtype, torch.dtype] = {}


def upcast(t: torch.Tensor) -> torch.Tensor:
    """`t` in the dtype of inner (fast-weight) arithmetic: float32, or float64 when `t` is float64."""
    inner = _INNER_DTYPE.get(t.dtype)
    if inner is None:
        inner = _INNER_DTYPE.setdefault(t.dtype, torch.promote_types(t.dtype, torch.float32))
    return t if t.dtype == inner else t.to(inner)


def subnormal_threshold(dtype: torch.dtype) -> float:
    """The magnitude below which :func:`flush_subnormal` zeroes an entry: the square root of the
    dtype's smallest normal number."""
    return torch.finfo(dtype).tiny ** 0.5


def flush_subnormal(weights: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """`weights` with every entry below the square root of the dtype's smallest normal number set to
    zero (|w| < 1.1e-19 in float32, 1.5e-154 in float64); NaN and infinities kept. A memory whose
    forget gate shrinks its weights every chunk drives the entries no update refreshes towards zero
    and through the subnormal range, where a CPU computes every product with them in microcode; the
    square root also keeps their squares (the step bound's norms) normal. Measured at random init
    (Titans LMM, bench's small model, 16K tokens of context, one thread): 97-99% of the memory's
    weights were subnormal, decoding 3.5x and the prefill 5x slower than with them zero. Outputs
    change by less than the threshold times the other factor of each product."""
    if weights is None:
        return None
    return {name: F.hardshrink(w, subnormal_threshold(w.dtype)) for name, w in weights.items()}


def autocast_off(device_type: str):
    """A context in which autocast is off on `device_type`, for inner arithmetic:
    ``torch.autocast(device_type, enabled=False)`` where autocast is on, and no context where it is
    already off (entering and leaving one costs about as much as a few ops, per layer and call)."""
    return torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else contextlib.nullcontext()


#: activation name -> (function, backward(g, z) = g * function'(z)); fused ATen backward kernels,
#: themselves differentiable, so outer gradients flow through the hand-written inner backward
ACTIVATIONS: dict[str, tuple[Callable, Callable]] = {
    "gelu_tanh": (lambda z: F.gelu(z, approximate="tanh"),
                  lambda g, z: torch.ops.aten.gelu_backward(g, z, approximate="tanh")),
    "gelu": (F.gelu, lambda g, z: torch.ops.aten.gelu_backward(g, z)),
    "silu": (F.silu, lambda g, z: g * torch.sigmoid(z) * (1 + z * (1 - torch.sigmoid(z)))),  # ATen's has no double backward
    "relu": (F.relu, lambda g, z: g * (z > 0).to(g.dtype)),
}

#: activation name -> an upper bound of its largest slope ``max_z |activation'(z)|`` (rounded up in the
#: fourth decimal: GELU's 1.12899 near z = 1.42, SiLU's 1.09984 near z = 2.40), for gains that need no
#: pre-activations (:class:`GainBound`)
MAX_SLOPES: dict[str, float] = {"gelu_tanh": 1.1290, "gelu": 1.1290, "silu": 1.0999, "relu": 1.0}


def layer_norm(z: torch.Tensor, eps: float) -> tuple[torch.Tensor, tuple]:
    """Affine-free LayerNorm over the last dim, and what its backward needs (fused kernels)."""
    out, mean, rstd = torch.native_layer_norm(z, (z.shape[-1],), None, None, eps)
    return out, (z, mean, rstd)


def layer_norm_backward(dout: torch.Tensor, saved: tuple) -> torch.Tensor:
    """d loss / d z from d loss / d LN(z); twice differentiable (ATen's LayerNorm double backward)."""
    z, mean, rstd = saved
    return torch.ops.aten.native_layer_norm_backward(dout, z, (z.shape[-1],), mean, rstd, None, None,
                                                     (True, False, False))[0]


class FastModel(nn.Module):
    """Interface of a fast model (see the module docstring)."""

    #: names of the fast linear layers, in order
    weight_names: tuple[str, ...]
    #: the step bound's curvature factors (:meth:`curvature_gains`, the layers' inputs) depend on the fast
    #: weights; a single linear layer's do not (its input is the key, its gain is fixed), and the engine
    #: then bounds all chunks at once, before the scan (:mod:`tto.engine.memory`)
    curvature_reads_weights = True
    #: the weights whose spectral norms :meth:`curvature_gains` reads (a later layer's, bounding its Jacobian)
    norm_weights: tuple[str, ...] = ()

    @property
    def param_names(self) -> tuple[str, ...]:
        """Names of all fast weights (the keys of :meth:`initial_params`): the layers' weights."""
        return self.weight_names

    def initial_params(self, batch: int) -> dict[str, torch.Tensor]:
        """Fast weights at the start of a sequence: the learned initial weights tiled over the
        batch, float32 (float64 for a float64 model), shapes (batch * heads, ...)."""
        raise NotImplementedError

    def core(self, x: torch.Tensor, linear: Linear) -> torch.Tensor:
        """The part of f that holds fast weights, with linear layers given by `linear`."""
        raise NotImplementedError

    def wrap(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The rest of f (no fast weights): f(x) = wrap(x, core(x, linear))."""
        return h

    def apply(self, x: torch.Tensor, linear: Linear) -> torch.Tensor:
        return self.wrap(x, self.core(x, linear))

    def forward_backward(self, params: dict, x: torch.Tensor, dloss: Callable) -> list[tuple]:
        """Forward `x` at `params`, then backward ``dloss(y)``: [(name, input, delta)] per layer."""
        raise NotImplementedError

    def curvature_gains(self, params: dict, inputs: dict[str, torch.Tensor], bound: "GainBound | None" = None,
                        norms: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Per fast linear layer, a bound (N, b) per token on ``||d f / d z||_2^2`` (z the layer's
        output) at `params`, given every layer's inputs (N, b, d_l) there: a token's Gauss-Newton
        curvature of the inner loss in that layer's weights is at most ``loss curvature * (||layer
        input||^2 [+ 1 with a bias]) * gain``. `bound` (default :data:`EXACT_GAINS`) says how the later
        layers' Jacobians are bounded; the looser :data:`SCREEN_GAINS` give upper bounds of these gains.
        `norms` {name: (N,)}: upper bounds of the :attr:`norm_weights`' spectral norms that the caller
        holds (:meth:`tto.engine.Memory.carried_norms`), used instead of ``bound.norm``."""
        raise NotImplementedError

    def _norm(self, params: dict, name: str, bound: "GainBound", norms: dict | None) -> torch.Tensor:
        """``||W_name||_2`` (N,) or an upper bound of it: the caller's `norms`, else ``bound.norm``."""
        return norms[name] if norms is not None else bound.norm(params[name])


def _smaller_gram(w: torch.Tensor) -> torch.Tensor:
    """``W^T W`` or ``W W^T`` of w (N, d, d'), whichever is smaller: both have the eigenvalues
    ``||W||_2^2 >= ...`` (and zeros). Non-finite entries (weights that have already diverged) are
    zeroed, so the eigensolver runs and the NaN reaches the layer's output instead."""
    return (w.mT @ w if w.shape[-1] <= w.shape[-2] else w @ w.mT).nan_to_num(0.0, 0.0, 0.0)


#: :func:`spectral_norm` solves for the eigenvalues of ``G + j I`` with ``j`` this fraction of G's largest
#: diagonal entry, then subtracts j: the same top eigenvalue, but no block of exactly zero eigenvalues,
#: on which float32's symmetric eigensolver failed to converge (the Gram matrix of a weight whose
#: entries a forget gate had mostly flushed to zero: 237 nonzeros of 16,384)
SPECTRAL_JITTER = 1e-6


def spectral_norm(w: torch.Tensor) -> torch.Tensor:
    """``||W||_2`` (N,) of w (N, d, d'): the square root of its smaller Gram matrix's top eigenvalue (a
    symmetric eigensolver on min(d, d')^2 entries, 2.5x faster here than the SVD of W at 256 x 64).
    Each W is divided by its largest finite entry first and the norm scaled back (the Gram matrix of
    weights near 1e20 overflows, its norm read as 0, and that of weights near 1e-20 underflows), and
    the eigensolver sees the Gram matrix shifted by :data:`SPECTRAL_JITTER`."""
    scale = w.nan_to_num(0.0, 0.0, 0.0).abs().amax((-2, -1))
    gram = _smaller_gram(w / torch.where(scale > 0, scale, 1.0)[:, None, None])
    shift = SPECTRAL_JITTER * gram.diagonal(dim1=-2, dim2=-1).amax(-1)
    top = torch.linalg.eigvalsh(gram + shift[:, None, None] * torch.eye(gram.shape[-1], dtype=gram.dtype,
                                                                          device=gram.device))[..., -1]
    return (top - shift).clamp_min(0.0).sqrt() * scale


#: k of :func:`spectral_norm_bound`, which bounds ``||W||_2^2 = lambda_max(G)`` of the Gram matrix G by
#: ``(tr G^(2^k))^(1/2^k)`` (k - 1 matrix squarings), at most ``rank^(1/2^k)`` times too large (1.68 at
#: k = 3 and rank 64; about 1.2 for the singular values of a random 256 x 64 init)
NORM_BOUND_SQUARINGS = 3


def spectral_norm_floor(w: torch.Tensor) -> torch.Tensor:
    """``<= ||W||_2`` (N,) for w (N, d, d'): the longest row or column (``||W e_j||`` and ``||e_i^T W||`` are at
    most ``||W||_2``), a few reductions; at most sqrt(min(d, d')) times too small (about 0.67 times the norm
    of a random 256 x 64 init). Non-finite weights give NaN."""
    square = w * w
    return torch.maximum(square.sum(-2).amax(-1), square.sum(-1).amax(-1)).sqrt()


def frobenius_norm(w: torch.Tensor) -> torch.Tensor:
    """``||W||_F >= ||W||_2`` (N,) for w (N, d, d'): one reduction, at most sqrt(rank) times too large."""
    return torch.linalg.matrix_norm(w)


def spectral_norm_bound(w: torch.Tensor) -> torch.Tensor:
    """An upper bound (N,) of ``||W||_2`` for w (N, d, d') from matrix products alone:
    ``lambda_max(G)^(2^k) <= tr(G^(2^k)) = ||G^(2^(k-1))||_F^2`` for the PSD Gram matrix G of W,
    k = :data:`NORM_BOUND_SQUARINGS`. Each power is renormalised to unit Frobenius norm (tracked in
    the exponent), so nothing overflows; a zero W gives 0."""
    power = _smaller_gram(w)
    scale = torch.linalg.matrix_norm(power)  # ||G||_F >= lambda_max(G), the k = 1 bound
    bound = scale
    for k in range(1, NORM_BOUND_SQUARINGS):
        power = power / torch.where(scale > 0, scale, 1.0)[:, None, None]
        power = power @ power
        scale = torch.linalg.matrix_norm(power)
        bound = bound * scale.pow(1.0 / 2**k)  # lambda_max(G) <= ||G||_F prod_k ||A_k^2||_F^(1/2^k)
    return bound.sqrt()


class GainBound(NamedTuple):
    """How :meth:`FastModel.curvature_gains` bounds a later layer's Jacobian ``diag(activation'(z)) W``:
    `norm` (N, d, d') -> (N,) is ``||W||_2`` or an upper bound of it; `token_slopes` takes each token's
    largest activation slope at its pre-activations z (False: the activation's largest slope anywhere,
    :data:`MAX_SLOPES`, which needs no forward)."""

    norm: Callable[[torch.Tensor], torch.Tensor]
    token_slopes: bool = True


#: the exact gains of the step bound
EXACT_GAINS = GainBound(spectral_norm)
#: the step bound's screens, cheapest first (:meth:`tto.engine.Memory._step_bound`): Frobenius norms and
#: the activation's largest slope (a few reductions), then :func:`spectral_norm_bound` and the tokens' slopes
SCREEN_GAINS = (GainBound(frobenius_norm, token_slopes=False), GainBound(spectral_norm_bound))


class MLPMemory(FastModel):
    """Per-head MLP ``g(x) = W_L act(... act(x W_1 + b_1) ...) + b_L``, optionally wrapped as
    ``f(x) = x + LN(g(x))`` with a per-head LayerNorm whose affine is an outer parameter
    (``residual_norm``), or as the plain residual ``f(x) = x + g(x)`` (``residual``).

    depth 1 is a matrix memory (TTT-Linear, Titans L_M = 1); depth 2 with ``expansion`` 4 is the
    TTT-MLP / Titans memory. Weights are ``W{l}`` (heads, d_in, d_out) and ``b{l}`` (heads, 1, d_out).
    ``in_dim`` (default ``dim``) reads inputs of another width, e.g. ATLAS' polynomial features of keys.
    Initial weights ~ N(0, init_std^2), or N(0, 1 / fan_in) per layer with ``init_std=None``.
    """

    def __init__(self, num_heads: int, dim: int, *, depth: int = 1, expansion: int = 4,
                 activation: str = "gelu_tanh", bias: bool = True, residual_norm: bool = True,
                 residual: bool = False, norm_eps: float = 1e-6, init_std: float | None = 0.02,
                 in_dim: int | None = None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown fast-model activation {activation!r}; valid: {sorted(ACTIVATIONS)}")
        self.num_heads, self.dim, self.depth = num_heads, dim, depth
        self.curvature_reads_weights = depth > 1
        self.activation = activation
        self.act, self.act_backward = ACTIVATIONS[activation]
        self.max_slope = MAX_SLOPES[activation]
        self.residual_norm, self.norm_eps, self.init_std = residual_norm, norm_eps, init_std
        self.residual = residual or residual_norm
        if residual and residual_norm:
            raise ValueError("choose one wrapper: residual (x + g(x)) or residual_norm (x + LN(g(x)))")
        in_dim = dim if in_dim is None else in_dim
        if self.residual and in_dim != dim:
            raise ValueError(f"a residual fast model needs equal input and output widths (got {in_dim} -> {dim})")
        dims = [in_dim] + [dim * expansion] * (depth - 1) + [dim]
        self.weight_names = tuple(f"W{i + 1}" for i in range(depth))
        self.norm_weights = self.weight_names[1:]
        self.has_bias = bias
        for i, name in enumerate(self.weight_names):
            self.register_parameter(name, nn.Parameter(torch.empty(num_heads, dims[i], dims[i + 1])))
            if bias:
                self.register_parameter(f"b{i + 1}", nn.Parameter(torch.empty(num_heads, 1, dims[i + 1])))
        if residual_norm:
            self.norm_weight = nn.Parameter(torch.empty(num_heads, dim))
            self.norm_bias = nn.Parameter(torch.empty(num_heads, dim))

    def _tto_init(self, init) -> None:
        for i, name in enumerate(self.weight_names):
            weight = getattr(self, name)
            # init_std None: N(0, 1 / fan_in), each layer at its input's scale
            init.normal_(weight, mean=0.0, std=weight.shape[1] ** -0.5 if self.init_std is None else self.init_std)
            if self.has_bias:
                init.zeros_(getattr(self, f"b{i + 1}"))
        if self.residual_norm:
            init.ones_(self.norm_weight)
            init.zeros_(self.norm_bias)

    @property
    def param_names(self) -> tuple[str, ...]:
        """Each layer's weight and then, with biases, its bias: the keys of :meth:`initial_params`."""
        return tuple(n for i, w in enumerate(self.weight_names) for n in ((w, f"b{i + 1}") if self.has_bias else (w,)))

    def initial_params(self, batch: int) -> dict[str, torch.Tensor]:
        params = {}
        for i, name in enumerate(self.weight_names):
            params[name] = upcast(getattr(self, name)).repeat(batch, 1, 1)
            if self.has_bias:
                params[f"b{i + 1}"] = upcast(getattr(self, f"b{i + 1}")).repeat(batch, 1, 1)
        return params

    def _per_head(self, t: torch.Tensor, fn) -> torch.Tensor:
        """``fn(t, gamma, beta)`` on t (N, T, dim), N = batch * heads rows, with each row's head's
        LayerNorm gamma, beta (heads, 1, dim) broadcast over the batch (views, no tiled copies)."""
        gamma, beta = upcast(self.norm_weight)[:, None], upcast(self.norm_bias)[:, None]
        return fn(t.unflatten(0, (-1, self.num_heads)), gamma, beta).flatten(0, 1)

    def _layer_norm(self, z: torch.Tensor):
        """Per-head LN(z) = gamma * normalize(z) + beta, and what its backward needs."""
        out, saved = layer_norm(z, self.norm_eps)
        return self._per_head(out, lambda t, gamma, beta: torch.addcmul(beta, gamma, t)), saved

    def core(self, x: torch.Tensor, linear: Linear) -> torch.Tensor:
        """g(x) for x (N, T, dim) with the given linear read-out."""
        h = x
        for i, name in enumerate(self.weight_names):
            h = linear(name, h)
            if i < self.depth - 1:
                h = self.act(h)
        return h

    def wrap(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """f(x) from g(x): ``x + LN(g(x))``, ``x + g(x)`` or ``g(x)``. It holds no fast weights, so
        the engine applies it once to all read-outs instead of chunk by chunk."""
        if self.residual_norm:
            return x + self._layer_norm(h)[0]
        return x + h if self.residual else h

    def curvature_gains(self, params, inputs, bound=None, norms=None):
        """Backward through the layers: the last layer's gain is 1, or ``max |gamma|^2`` with the
        ``x + LN(g(x))`` wrapper (the LayerNorm's Jacobian at unit-RMS g: LN(g) does not change when
        g is scaled, so a step that its 1 / RMS(g) factor would call large grows g and shrinks that
        factor instead of oscillating); layer l's is ``a_s^2 ||W_{l+1}||_2^2`` times layer l+1's,
        ``a_s = max_j |activation'(z_sj)|`` over the token's pre-activations z_s of layer l (the
        Jacobian ``diag(activation'(z_s)) W_{l+1}`` has at most that norm), or the activation's largest
        slope with ``bound.token_slopes`` off. Non-finite weights (a run
        that has already diverged) count as zero here (in their Gram matrices, :func:`spectral_norm`), so the
        NaN reaches the layer's output, where ``check_finite`` names the layer, instead of stopping the
        eigensolver."""
        bound = bound or EXACT_GAINS
        first = inputs[self.weight_names[0]]
        gain = first.new_ones(first.shape[:2])
        if self.residual_norm:
            reps = first.shape[0] // self.num_heads
            gain = gain * upcast(self.norm_weight).abs().amax(-1).pow(2).repeat(reps)[:, None]
        gains = {}
        linear = self.plain_linear(params)
        for i in reversed(range(self.depth)):
            name = self.weight_names[i]
            gains[name] = gain
            if i > 0:
                if bound.token_slopes:
                    below = self.weight_names[i - 1]
                    z = linear(below, inputs[below])
                    slope = self.act_backward(torch.ones_like(z), z).abs().amax(-1).nan_to_num(0.0, 0.0, 0.0)
                else:
                    slope = self.max_slope
                gain = gain * (slope * self._norm(params, name, bound, norms)[:, None]).pow(2)
        return gains

    def plain_linear(self, params: dict[str, torch.Tensor]) -> Linear:
        """``linear`` that evaluates the layers at fixed `params`."""

        def linear(name: str, x: torch.Tensor) -> torch.Tensor:
            return torch.baddbmm(params["b" + name[1:]], x, params[name]) if self.has_bias else torch.bmm(x, params[name])

        return linear

    def forward_backward(self, params: dict, x: torch.Tensor, dloss: Callable) -> list[tuple]:
        inputs, pre = [], []
        h = x
        for i, name in enumerate(self.weight_names):
            inputs.append(h)
            z = torch.baddbmm(params["b" + name[1:]], h, params[name]) if self.has_bias else torch.bmm(h, params[name])
            pre.append(z)
            h = self.act(z) if i < self.depth - 1 else z
        if self.residual_norm:
            y, saved = self._layer_norm(h)
            g = layer_norm_backward(self._per_head(dloss(x + y), lambda t, gamma, beta: t * gamma), saved)
        else:
            g = dloss(x + h if self.residual else h)
        grads = []
        for i in reversed(range(self.depth)):
            name = self.weight_names[i]
            grads.append((name, inputs[i], g))
            if i > 0:
                g = self.act_backward(torch.bmm(g, params[name].transpose(-1, -2)), pre[i - 1])
        return grads[::-1]


class SwiGLUMemory(FastModel):
    """Per-head SwiGLU ``f(x) = (silu(x W0) * (x W2)) W1`` (LaCT's fast weights), no biases, no
    wrapper. W0, W2: (heads, dim, hidden), W1: (heads, hidden, dim), hidden = ``expansion * dim``
    unless given (``hidden``: e.g. a block MLP's intermediate size).

    Initialised as LaCT: entries ~ N(0, 1 / fan_in) times ``init_gain``."""

    weight_names = ("W0", "W2", "W1")
    norm_weights = ("W1",)

    def __init__(self, num_heads: int, dim: int, *, expansion: float = 1.0, init_gain: float = 1.0,
                 hidden: int | None = None):
        super().__init__()
        self.num_heads, self.dim, self.init_gain = num_heads, dim, init_gain
        hidden = int(dim * expansion) if hidden is None else hidden
        self.W0 = nn.Parameter(torch.empty(num_heads, dim, hidden))
        self.W2 = nn.Parameter(torch.empty(num_heads, dim, hidden))
        self.W1 = nn.Parameter(torch.empty(num_heads, hidden, dim))

    def _tto_init(self, init) -> None:
        for name in self.weight_names:
            w = getattr(self, name)
            init.normal_(w, mean=0.0, std=self.init_gain / w.shape[1] ** 0.5)

    def initial_params(self, batch: int) -> dict[str, torch.Tensor]:
        return {name: upcast(getattr(self, name)).repeat(batch, 1, 1) for name in self.weight_names}

    def core(self, x: torch.Tensor, linear: Linear) -> torch.Tensor:
        return linear("W1", F.silu(linear("W0", x)) * linear("W2", x))

    def plain_linear(self, params: dict[str, torch.Tensor]) -> Linear:
        return lambda name, x: x @ params[name]

    def curvature_gains(self, params, inputs, bound=None, norms=None):
        """With ``z0 = x W0``, ``z2 = x W2`` and ``f = (silu(z0) * z2) W1``, the Jacobians of f in the
        layers' outputs are ``I`` (W1), ``diag(silu'(z0) * z2) W1`` (W0) and ``diag(silu(z0)) W1`` (W2),
        so the gains are 1, ``a_s^2 ||W1||_2^2`` with ``a_s = max_j |silu'(z0_sj) z2_sj|`` and
        ``c_s^2 ||W1||_2^2`` with ``c_s = max_j |silu(z0_sj)|``. Without ``bound.token_slopes`` (no
        forward) a_s and c_s are bounded from the key x_s (``inputs["W0"]``) and the columns w_j of
        W0, W2: ``|z_sj| <= ||x_s|| ||w_j||``, ``|silu'| <=`` :data:`MAX_SLOPES` ["silu"] and
        ``|silu(z)| <= |z|``."""
        bound = bound or EXACT_GAINS
        x = inputs["W0"]
        if bound.token_slopes:
            gate, up = x @ params["W0"], x @ params["W2"]
            slope = ACTIVATIONS["silu"][1](up, gate).abs().amax(-1)
            level = F.silu(gate).abs().amax(-1)
        else:
            norm = x.norm(dim=-1)
            largest = lambda w: w.norm(dim=-2).amax(-1)[:, None]  # noqa: E731  (N, 1): the longest column
            slope = MAX_SLOPES["silu"] * norm * largest(params["W2"])
            level = norm * largest(params["W0"])
        out = self._norm(params, "W1", bound, norms)[:, None].pow(2)
        gains = {"W0": slope.pow(2) * out, "W2": level.pow(2) * out, "W1": torch.ones_like(slope)}
        return {name: gains[name].nan_to_num(0.0, 0.0, 0.0) for name in self.weight_names}

    def forward_backward(self, params: dict, x: torch.Tensor, dloss: Callable) -> list[tuple]:
        gate, up = x @ params["W0"], x @ params["W2"]
        act = F.silu(gate)
        hidden = act * up
        g = dloss(hidden @ params["W1"])
        dhidden = g @ params["W1"].transpose(-1, -2)
        dgate = ACTIVATIONS["silu"][1](dhidden * up, gate)
        return [("W0", x, dgate), ("W2", x, dhidden * act), ("W1", hidden, g)]


class GatedLinearMemory(FastModel):
    """Per-head "simplified SwiGLU" of ViT³: ``f(x) = (x W1) * silu(x W2)``, a SwiGLU whose output
    layer is the identity. W1, W2: (heads, dim, dim), no biases, initialised ~ trunc-normal(0, init_std^2)
    (cut at +-2)."""

    weight_names = ("W1", "W2")

    def __init__(self, num_heads: int, dim: int, *, init_std: float = 0.02):
        super().__init__()
        self.num_heads, self.dim, self.init_std = num_heads, dim, init_std
        self.W1 = nn.Parameter(torch.empty(num_heads, dim, dim))
        self.W2 = nn.Parameter(torch.empty(num_heads, dim, dim))

    def _tto_init(self, init) -> None:
        for name in self.weight_names:
            init.trunc_normal_(getattr(self, name), mean=0.0, std=self.init_std)

    def initial_params(self, batch: int) -> dict[str, torch.Tensor]:
        return {name: upcast(getattr(self, name)).repeat(batch, 1, 1) for name in self.weight_names}

    def core(self, x: torch.Tensor, linear: Linear) -> torch.Tensor:
        return linear("W1", x) * F.silu(linear("W2", x))

    def plain_linear(self, params: dict[str, torch.Tensor]) -> Linear:
        return lambda name, x: x @ params[name]

    def forward_backward(self, params: dict, x: torch.Tensor, dloss: Callable) -> list[tuple]:
        z1, z2 = x @ params["W1"], x @ params["W2"]
        gate = F.silu(z2)
        g = dloss(z1 * gate)
        return [("W1", x, g * gate), ("W2", x, ACTIVATIONS["silu"][1](g * z1, z2))]
