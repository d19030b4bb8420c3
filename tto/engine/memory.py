"""The shared inner loop: fast model x inner objective x inner optimizer x chunking.

:class:`Memory` reads queries and writes (key, value) pairs chunk by chunk. Inside a chunk every
gradient is taken at the chunk-start weights and the queries read the updated weights through
the dual form (update-then-read: token t sees its own write)::

    z_t = decay_t * (x_t W_c + b_c) + carry_t * (x_t S_W + S_b)
          - sum_{s<=t} mix[t, s] * (x_t . x_s + 1) * delta_s

one masked (b x b) matmul per fast linear layer, never a per-token weight tensor (b x (lookback + b)
for an optimizer with a :attr:`~tto.engine.InnerOptimizer.lookback`: the Omega window's tokens from
the previous chunk are extra keys s, their gradients at this chunk's start weights). The end of the
chunk commits ``W_b`` (and the momentum) as the next chunk's start. A retention that
``reads_chunk_end`` (Moneta's normalisation) maps the weights at every chunk boundary, so the
chunk's last token reads its retained weights rather than the linear ones. On request
(``read_start=True``) the queries also read the chunk-start weights, ``f(q_t; W_c)``: retrieval
from the memory as it was before the chunk (Titans MAC's ``h_t = M*_{t-1}(q_t)``).

**Chunk-end reads** (a non-causal call, :func:`tto.engine.chunkwise.noncausal`: the whole input is
one chunk). The chunk commits as above (:meth:`Memory._commit`, then the retention) and every query
reads the committed weights, ``f(q_t; W_b)``; like chunk-start reads alone it needs no dual form,
only the chunk-end coefficients. :meth:`Memory.naive_noncausal` is :func:`naive_memory`'s commit of
one chunk of all the tokens, read by every query.

**Chunk-start reads alone** (``read_start="only"``: TNT's global memory and the Continuum Memory
System's levels, read only at their chunk-start weights, at chunks of up to thousands of tokens).
Nothing inside a chunk reads an updated weight, so the dual form is not run: a chunk's reads are
the fast model's plain forward ``f(q_t; W_c)``, and its commit takes the keys' gradients at W_c,
the step bound and the end state from the last row of the optimizer's coefficients alone
(:meth:`~tto.engine.InnerOptimizer.end_coefficients`, O(b) per chunk): no (b x b) matrix anywhere.
The commit is :meth:`Memory._chunk`'s, from the same gradients and coefficients
(:meth:`Memory._commit`); a read-only chunk (incomplete, or a decoding step) takes no gradient at all.

Padding and decoding follow the engine's layout (:mod:`tto.engine.layout`): an incomplete last
chunk is only read and kept pending. A decoding step that completes no chunk
(:meth:`Memory._read_chunk`) takes the gradients of the pending keys and the new ones at the
committed weights (the chunk's real tokens, no pad slots) and reads the new queries' rows of the
dual form; no step bound and no chunk-end weights, which only a commit needs. A pending key's
gradient at the committed weights does not change until the next commit, so the state keeps the
pending keys' gradients (the layout's ``cache.``) and each decoded token adds only its own.

**Step bound.** Because every gradient of a chunk is taken at its start weights, a chunk applies
up to (chunk length x theta) of a token's step at once, amplified by momentum (up to 1 / (1 - eta))
and by the inner loss's curvature, which grows with the keys' norms and the memory's weights; past
a threshold the chunk-to-chunk map overshoots more than it corrects and the weights grow
geometrically (Titans at 300M: reads 0.8 -> 5e7 -> inf within 150 tokens at init). So what a chunk
*commits* (its end weights and momentum) takes its gradients times a factor kappa in (0, 1]::

    W' = d W_c + c S_c - kappa sum_s m_s g_s,      S' = e S_c - kappa sum_s p_s g_s

with kappa from :func:`tto.engine.optimizers.stable_step_factor` (its gates' part computed for all chunks
before the scan, :func:`~tto.engine.optimizers.step_gates`; the whole bound so, where it reads no fast
weight: a one-layer fast model, an objective whose curvature does not read the output and no gradient
scale, as in TTT-Linear, :attr:`Memory.bound_before_scan`): the chunk map does not expand a
quadratic norm of (W, S) that does not see the key directions (``||M||_P <= 1`` with ``P x I``, P a
2 x 2 matrix of the chunk's gates: the chunks' maps cannot compound along keys that rotate from chunk
to chunk; for plain descent ``||d I - kappa sum_s m_s H_s||_2 < 1``) for the tokens' Gauss-Newton
Hessians ``H_s`` at the chunk-start weights. What the bound uses of them is one *curvature factor*
F_l (N, b, d_l) per fast layer, row s::

    F_l[s] = sqrt(objective curvature(y_s) * gain_l,s) * [x_s^(l), 1 with a bias]

(``x_s^(l)`` layer l's input, ``gain_l,s`` from :meth:`FastModel.curvature_gains`: a bound on
``||d f / d z^(l)||^2`` from the later layers' spectral norms and the token's own activation slopes),
for which ``||sum_s a_s H_s||_2 <= sum_l ||F_l^T diag(a) F_l||_2`` for every a >= 0: ``H_s = J_s^T
Lambda_s J_s`` with ``Lambda_s <= curvature(y_s) I``, layer l's part of ``J_s J_t^T`` is ``(x_s . x_t)
E_s E_t^T`` with ``||E_s||^2 <= gain_l,s``, and for a PSD Gram matrix G,
``||blockdiag(E_s) (G x I) blockdiag(E_s)^T|| <= ||diag(sqrt gain) G diag(sqrt gain)||``. Keys that
point in different directions make this the chunk's Gram matrix, not the sum of its tokens'
curvatures. The spectral norms of the later layers' weights are carried from commit to commit as upper
bounds (:meth:`Memory.carried_norms`: ``||W'||_2 <= |beta| ||W||_2 + ||W' - beta W||_F``, anchored at
the exact norm again only where the carried part passes :data:`NORM_SLACK` of a lower bound, so each is
at most 1.053 times the exact norm; kept in the decoding state, so a sequence streamed in pieces uses
the same ones). An anchor's eigensolver runs only when the exact bound reads the norm (:class:`StepNorms`):
the screens take an upper bound without it, and where they pass on every chunk (TTT-MLP, Moneta at
their bench sizes) no eigensolver runs until the call stores its state.
kappa = 1 exactly wherever the step is stable by itself, so the paper's update is
computed unchanged there; the reads inside a chunk are the
paper's in any case (a bound that depended on a chunk's later tokens would break causality), and a
read-only incomplete chunk commits nothing. kappa is differentiated with respect to the gates
(theta, eta, alpha enter it through the chunk's coefficients), not the keys' curvature factors
(detached, like a clipping norm): where the bound is active, the outer gradient sees that a larger
theta buys no larger step (kappa * theta stays at the bound) and that more momentum shrinks the step
(t_max falls with eta), instead of pushing the gates further into the region the bound cuts back.

**Muon commits need no bound.** ATLAS' commit (:class:`tto.engine.MuonRetention`) is a step along the
orthogonalised chunk-end momentum, ``W' = a W_c + eta_bar NS5(S_b)`` with ``a = prod_t alpha_t <= 1``
and ``eta_bar = sum_t (prod_{r>t} alpha_r) eta_t``. NS5 normalises its input (``X_0 = S / ||S||_F``,
singular values in [0, 1]) and maps each singular value through a fixed polynomial whose maximum on
[0, 1] is ``NS5_MAX_GAIN`` = 1.145 (:mod:`tto.engine.muon`), so for any gradients and curvature::

    ||W' - a W_c||_2 <= NS5_MAX_GAIN * eta_bar,    ||W_n||_2 <= ||W_0||_2 + NS5_MAX_GAIN * sum_{j<n} eta_bar_j

(eta_bar <= chunk x the lr gate's maximum): the weights grow at most linearly in the chunks, never
geometrically, and stay below ``NS5_MAX_GAIN max eta_bar / (1 - a)`` once ``a < 1``. The momentum is
a linear filter of gradients taken at these bounded weights and enters W only through its direction.
So such chunks commit the paper's step unscaled (kappa = 1) and the engine skips the bound.

**TTT's memories** (``x + LN(g(x))``, g linear or a two-layer tanh-GELU MLP, TTT's squared error and
mini-batch GD) run the same scan as one autograd node with the backward written out
(:mod:`tto.engine.ttt_scans`, :meth:`Memory._scans_fused`): the same values in fewer ops (TTT-Linear: a third).

:func:`naive_memory` is the slow reference: per row, per real token, gradients by autograd at the
chunk-start weights and the optimizer's per-token recurrence; the commit replays the chunk's
recurrence with the gradients times kappa, computed from the objective's autograd Hessian, the
layer inputs the naive forward records (:func:`naive_curvature`), and the chunk-end coefficients read off the optimizer's
recurrence on probes (:func:`naive_chunk_map`); a Muon commit steps from the chunk start token by token,
``M_t = alpha_t M_{t-1} + eta_t NS5(S_b)``, NS5 as written (:func:`tto.engine.muon.naive_newton_schulz`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .chunkwise import ChunkwiseMemory
from .fast_models import (EXACT_GAINS, SCREEN_GAINS, FastModel, GainBound, MLPMemory, flush_subnormal, spectral_norm,
                          spectral_norm_bound, spectral_norm_floor, upcast)
from .ttt_scans import BoundActive, linear_scan, mlp_scan
from .objectives import Objective, SquaredError
from .muon import naive_newton_schulz
from .optimizers import (Coefficients, InnerOptimizer, StepGates, bound_factor, stable_bound_factor, stable_step_factor,
                         stable_step_gates, trace_curvature)
from .retention import Retention

#: after the step bound's screens fail on a chunk, a memory skips them on its next 1, 2, 4, ... chunks
#: of the call (doubling while they keep failing, at most this many; on every chunk again once they pass):
#: where the bound is active on most chunks (Titans at chunk 8: 93%), a screen is wasted work (10% of a training
#: step). Only the cost depends on it: where a screen passes, the exact bound gives kappa = 1 too.
SCREEN_MAX_SKIPS = 16
#: the spectral norms the step bound reads are carried from commit to commit as upper bounds
#: (:meth:`Memory.carried_norms`); a row's is anchored at its exact norm again once the carried part
#: exceeds this fraction of a lower bound of the norm, so every bound used is at most
#: 1 / (1 - 2 NORM_SLACK) = 1.053 times the exact norm
NORM_SLACK = 0.025
#: what :meth:`Memory.carried_norms` keeps per row and weight name in a decoding state (``<key>.<name>``)
CARRIED_NORM_KEYS = ("exact", "scale", "slack", "floor")


def _bias_name(weight_name: str) -> str:
    return "b" + weight_name[1:]


def _gates(chunks: dict) -> dict:
    """The gates {name: (N, ...)} among a chunk's inputs {"q", "k", "v", "gate.<name>"}."""
    return {name[len("gate."):]: t for name, t in chunks.items() if name.startswith("gate.")}


class Chunk(NamedTuple):
    """One chunk's inputs to :meth:`Memory._chunk` (N = batch * heads rows, C tokens), or all chunks'
    at once with a chunk dim after N (:meth:`Memory._chunk_inputs`; :meth:`unbind` splits them)."""

    q: torch.Tensor  # (N, C, d)
    k: torch.Tensor  # (N, lookback + C, d): the optimizer's lookback tokens before the chunk, then the chunk's
    v: torch.Tensor  # (N, lookback + C, d)
    #: (N, C, lookback + C): mix * (q . k [+ 1]), the first layer's dual-form term; None with chunk-start
    #: reads alone (``read_start="only"``), whose coefficients are then the chunk-end row alone
    mixed_qk: torch.Tensor | None
    coefficients: Coefficients
    #: the step bound's part from the gates alone (:func:`tto.engine.optimizers.step_gates`), computed for all
    #: chunks at once; None for a retention that steps along the momentum (no bound)
    step_gates: StepGates | None
    #: the step bound kappa (N,) itself where it does not read the weights (:attr:`Memory.bound_before_scan`),
    #: computed for all chunks at once; else None
    kappa: torch.Tensor | None
    objective_gates: dict  # {name: (N, C)}
    active: torch.Tensor  # (N,) the row has a real token in this chunk

    def unbind(self) -> list["Chunk"]:
        """Each chunk's inputs from those of all chunks (leading dims (N, n)), as views: indexing
        ``t[:, i]`` instead would make every chunk's backward write a zero tensor of the whole
        sequence's size."""
        n = self.active.shape[1]

        def split(field):
            if field is None:
                return [None] * n
            if isinstance(field, dict):
                return [dict(zip(field, parts)) for parts in zip(*(t.unbind(1) for t in field.values()))] or [{}] * n
            return field.unbind() if isinstance(field, (Coefficients, StepGates)) else field.unbind(1)

        return [Chunk(*fields) for fields in zip(*(split(field) for field in self))]


class Memory(ChunkwiseMemory):
    """A fast model trained online by an inner optimizer, chunk by chunk (see module docstring).

    forward(q, k, v, gates, mask, state, read_start) as :class:`ChunkwiseMemory`'s, with q, k, v
    (B, T, H, d) and gates {name: (B, T, H)}: the optimizer's and the objective's.
    """

    reads_chunk_start = True
    skips_updated_reads = True
    causal_only = None

    def __init__(self, fast_model: FastModel, objective: Objective, optimizer: InnerOptimizer,
                 chunk_size: int, checkpoint_group: int = 0, state_prefix: str = "memory",
                 retention: Retention | None = None):
        super().__init__()
        self.fast = fast_model
        self.objective = objective
        self.optimizer = optimizer
        self.retention = retention or Retention()
        self.has_retention = retention is not None
        if retention is not None and set(self.param_names()) != set(fast_model.weight_names):
            raise ValueError(f"{type(retention).__name__} acts on weight matrices; use a fast model without biases")
        if self.retention.steps_along_momentum and not optimizer.has_momentum:
            raise ValueError(f"{type(retention).__name__} steps along the momentum; use an optimizer with momentum")
        self.chunk_size = chunk_size
        self.checkpoint_group = checkpoint_group
        self.prefix = state_prefix + "."
        self.has_momentum = optimizer.has_momentum
        self.lookback = optimizer.lookback
        if self.lookback:
            self.lookback_names = ("k", "v", *("gate." + n for n in optimizer.lookback_gates + objective.gate_names))
        #: the step bound reads the gates and the keys alone (a one-layer fast model, an objective whose
        #: curvature does not read the output, no gradient scale from the weights): it is computed for all
        #: chunks at once before the scan, the same kappa as chunk by chunk
        self.bound_before_scan = not (fast_model.curvature_reads_weights or objective.curvature_reads_output
                                      or self.retention.scales_gradients or self.retention.steps_along_momentum)
        #: TTT's memories (``x + LN(g(x))`` with biases, g linear or a tanh-GELU MLP of two layers, TTT's squared
        #: error, no momentum, lookback or retention): their scans can run as one autograd node (:meth:`_scans_fused`)
        self.ttt_memory = (isinstance(fast_model, MLPMemory) and fast_model.has_bias and fast_model.residual_norm
                           and (fast_model.depth == 1 or (fast_model.depth == 2 and fast_model.activation == "gelu_tanh"))
                           and type(objective) is SquaredError and objective.scale == 1.0 and not optimizer.has_momentum
                           and not optimizer.lookback and retention is None)
        #: the fast weights whose spectral norms the step bound reads and carries (:meth:`carried_norms`)
        self.norm_names = () if (self.bound_before_scan or self.retention.steps_along_momentum) else fast_model.norm_weights
        #: (chunks left on which the step bound skips its screens, the last such count) in the current
        #: call: SCREEN_MAX_SKIPS
        self._screen_schedule = (0, 0)

    def param_names(self) -> list[str]:
        return list(self.fast.param_names)

    def initial_weights(self, tokens):
        params = self.retention.start(self.fast.initial_params(tokens["q"].shape[0]))
        momentum = {n: torch.zeros_like(w) for n, w in params.items()} if self.has_momentum else None
        return params, momentum

    def naive(self, q, k, v, gates, mask, read_start):
        out, start, _ = naive_memory(self, q, k, v, gates, mask)
        return (out, start) if read_start else out

    def naive_noncausal(self, q, k, v, gates):
        _, _, committed = naive_memory(self, q, k, v, gates, chunk_size=q.shape[1])
        reads = [self.fast.apply(upcast(q[row]).transpose(0, 1), self.fast.plain_linear(weights)).transpose(0, 1)
                 for row, weights in enumerate(committed)]
        return torch.stack(reads)

    # ------------------------------------------------------------------ the scan
    def _chunk_inputs(self, params, chunks, valid, start_only: bool) -> Chunk:
        """The :class:`Chunk` of all chunks at once (fields (N, n, ...)) from `chunks` {"q", "k", "v",
        "gate.<name>"} (N, n, C, ...); with `start_only` the chunk-end coefficients and no dual-form term."""
        chunks = self._with_lookback(chunks, dim=2)
        queries, keys, values = chunks["q"], chunks["k"], chunks["v"]
        gates = _gates(chunks)
        if start_only:
            coef = self.optimizer.end_coefficients(gates, valid).without_negligible()
            mixed = None
        else:
            coef = self.optimizer.coefficients(gates, valid).without_negligible()
            # the first layer reads the raw queries and writes the raw keys: its (mix * (q.k + 1)) term
            # does not depend on the weights, so it is built for all chunks at once
            mixed = coef.mix * self._first_layer_qk(params, queries, keys)
        bound = kappa = None
        if self.bound_before_scan:
            kappa = self._bound_before_scan(params, keys, values, gates, self._step_gates(coef))
        elif not self.retention.steps_along_momentum:
            bound = self._step_gates(coef)
        objective_gates = {name: gates[name] for name in self.objective.gate_names}
        return Chunk(queries, keys, values, mixed, coef, bound, kappa, objective_gates, valid.any(-1))

    def _bound_before_scan(self, params, keys, values, gates, bound: StepGates) -> torch.Tensor:
        """kappa (N, n) of all chunks (:attr:`bound_before_scan`) from their keys and values (N, n, lookback + C, d),
        gates {name: (N, n, lookback + C)} and gates' part `bound`: the chunks' tokens flattened into one
        sequence, whose curvature factors are every chunk's (per token, from the key and the gates alone)."""
        tokens = lambda t: t.flatten(1, 2)  # noqa: E731
        inputs = [(self.fast.weight_names[0], tokens(keys), None)]
        objective_gates = {name: tokens(gates[name]) for name in self.objective.gate_names}
        values = tokens(values)  # the objective's curvature does not read the output: the values stand in for it

        def factors(gain_bound):
            return [f.unflatten(1, keys.shape[1:3]) for f in
                    self.curvature_factors(params, inputs, values, values, objective_gates, None, gain_bound)]

        return self._step_bound(bound, factors)

    @staticmethod
    def _step_gates(c: Coefficients) -> StepGates:
        """The step bound's gates part (N, n) of the chunk-end coefficients of all chunks `c` (N, n, ...)."""
        decay = c.decay[..., -1] if c.decay is not None else torch.ones_like(c.mix[..., -1, 0])
        carry = c.carry[..., -1] if c.carry is not None else None
        return stable_step_gates(decay, carry, c.s_decay, c.mix[..., -1, :], c.s_mix)

    def _with_lookback(self, chunks: dict, dim: int) -> dict:
        """`chunks` with the keys, values and their gates preceded (along `dim`) by the optimizer's
        lookback tokens before the chunk (``prev.<name>``)."""
        return {**chunks, **{name: torch.cat([chunks["prev." + name], chunks[name]], dim) for name in self.lookback_names}}

    def _first_layer_qk(self, params, q, k) -> torch.Tensor:
        """``q . k [+ 1 with a bias]`` (..., C_q, C) for q (..., C_q, d), k (..., C, d): the first
        layer's dual-form attention (one bmm over the flattened leading dims)."""
        qk = torch.bmm(q.flatten(0, -3), k.flatten(0, -3).transpose(-1, -2)).view(*q.shape[:-1], k.shape[-2])
        return qk + 1.0 if _bias_name(self.fast.weight_names[0]) in params else qk

    def _scan(self, params, momentum, carried, chunks, valid, n_commit, read_start):
        n = valid.shape[1]
        queries = chunks["q"]
        # each call starts the screens' schedule afresh: a recomputation of the whole call (a checkpointed
        # layer) then takes the branches of its forward, as checkpoint needs (the same saved tensors)
        self._screen_schedule = (0, 0)
        inputs = self._chunk_inputs(params, chunks, valid, read_start in ("only", "end"))
        if n_commit:
            carried = self.carried_norms(params, carried)
        result = None
        if self._scans_fused(inputs, read_start):
            step_gates = None if self.fast.depth == 1 else inputs.step_gates.unbind()
            try:
                result = self._in_groups(n, params, momentum, carried, lambda p, m, c, lo, hi, schedule: self._fused_part(
                    p, c, inputs, step_gates, lo, hi, n_commit, schedule))
            except BoundActive:  # TTT-MLP's bound is active: the chunk steps instead (_fused_part)
                self._screen_schedule = (0, 0)
        if result is None:
            chunk_list = inputs.unbind()
            result = self._in_groups(n, params, momentum, carried, lambda p, m, c, lo, hi, schedule: self._chunks(
                p, m, c, chunk_list[lo:hi], n_commit - lo, read_start, schedule))
        reads, params, momentum, carried = result  # g(q) (N, n, [2,] C, d); f(q) = wrap(q, g(q)) holds no fast weights
        if n_commit and self.norm_names:  # the state keeps the norms, not the anchors
            carried = {key: t for key, t in self.exact_norms(carried).items() if key.split(".")[0] in CARRIED_NORM_KEYS}
        x = queries[:, :, None].expand(-1, -1, 2, -1, -1) if read_start is True else queries
        reads = self.fast.wrap(x.flatten(1, -2), reads.flatten(1, -2)).view(reads.shape)
        return reads, params, momentum, carried

    def _scans_fused(self, inputs: Chunk, read_start: bool | str) -> bool:
        """Whether this scan can run as one autograd node per checkpoint group (:mod:`tto.engine.ttt_scans`):
        a TTT memory (:attr:`ttt_memory`), reads of the updated weights alone, an optimizer whose
        coefficients are its mix alone (no decay, no momentum), the step not compiled, and a linear
        memory's step bound computed before the scan."""
        c = inputs.coefficients
        return (self.ttt_memory and read_start is False and self._compiled_chunk is None and c.decay is None
                and c.carry is None and (self.fast.depth > 1 or inputs.kappa is not None))

    def _in_groups(self, n: int, params, momentum, carried: dict, step) -> tuple:
        """``step(params, momentum, carried, lo, hi, screen_schedule)`` -> (reads, params, momentum, carried) of
        chunks lo..hi-1, over the n chunks in checkpoint groups (:attr:`checkpoint_group`, in training) or at
        once: (all reads, params, momentum, carried). A group's recomputation in the backward takes the
        screens' schedule its forward started with, so it takes the branches of its forward."""
        group = self.checkpoint_group if (self.checkpoint_group > 0 and torch.is_grad_enabled() and self.training) else n
        outs = []
        for lo in range(0, n, group):
            hi = min(n, lo + group)
            run = lambda p, m, c, lo=lo, hi=hi, schedule=self._screen_schedule: step(p, m, c, lo, hi, schedule)  # noqa: E731
            out, params, momentum, carried = (checkpoint(run, params, momentum, carried, use_reentrant=False)
                                              if group < n else run(params, momentum, carried))
            outs.append(out)
        return torch.cat(outs, dim=1), params, momentum, carried

    def _fused_part(self, params, carried: dict, inputs: Chunk, step_gates: list | None, lo: int, hi: int,
                    n_commit: int, screen_schedule: tuple[int, int]) -> tuple:
        """Chunks lo..hi-1 of `inputs` (all chunks') from `params` and the `carried` norms, by
        :func:`~tto.engine.ttt_scans.linear_scan` or :func:`~tto.engine.ttt_scans.mlp_scan`, the first `n_commit`
        of all chunks committing: (reads g(q) (N, hi - lo, C, d), params, None (no momentum), carried), the same
        values as :meth:`_chunks`. TTT-MLP's step bound is computed chunk by chunk as there (`step_gates`: its
        gates' part per chunk); where it is active (kappa < 1) its gradient in the gates is not part of the
        fused backward, so :class:`~tto.engine.ttt_scans.BoundActive` propagates and the caller runs the chunk
        steps instead."""
        self._screen_schedule = screen_schedule
        fast, part = self.fast, slice(lo, hi)
        commits = min(max(n_commit - lo, 0), hi - lo)
        rows = params["W1"].shape[0] // fast.num_heads
        gamma, beta = (upcast(p).repeat(rows, 1)[:, None] for p in (fast.norm_weight, fast.norm_bias))
        mix, q, k, v = inputs.coefficients.mix[:, part], inputs.q[:, part], inputs.k[:, part], inputs.v[:, part]
        if fast.depth == 1:
            end = inputs.kappa[:, part, None] * mix[..., -1, :]
            reads, w, b = linear_scan(params["W1"], params["b1"], q, k, v, inputs.mixed_qk[:, part], end, gamma, beta,
                                      fast.norm_eps, commits)
            return reads, {"W1": w, "b1": b}, None, carried
        gates = {name: t[:, part] for name, t in inputs.objective_gates.items()}
        bound = _ChunkBound(self, carried, v, gates, step_gates[part])
        reads, *weights = mlp_scan(*(params[n] for n in ("W1", "b1", "W2", "b2")), q, k, v, inputs.mixed_qk[:, part], mix,
                                   gamma, beta, fast.norm_eps, commits, bound)
        return reads, dict(zip(("W1", "b1", "W2", "b2"), weights)), None, bound.carried

    def _chunks(self, params, momentum, carried: dict, chunks: list[Chunk], n_commit: int, read_start: bool | str,
                screen_schedule: tuple[int, int]):
        """Run consecutive chunks; the first `n_commit` of them update the weights. Read-outs
        (N, chunks, C, d), or (N, chunks, 2, C, d) with the chunk-start reads second
        (``read_start=True``), or the chunk-start reads alone (N, chunks, C, d) with "only", or the
        reads of the weights each chunk commits with "end"; the end params, momentum and carried
        norms (:meth:`carried_norms`). The step bound's screens start from `screen_schedule`
        (:data:`SCREEN_MAX_SKIPS`)."""
        self._screen_schedule = screen_schedule
        outs = []
        for i, chunk in enumerate(chunks):
            norms = StepNorms(self, carried) if i < n_commit and self.norm_names else None
            if read_start in ("only", "end"):  # no read inside the chunk: the start (end) weights' reads, the commit
                out = self.fast.core(chunk.q, self.fast.plain_linear(params)) if read_start == "only" else None
                if i < n_commit:
                    new_params, new_momentum = self._commit(params, momentum, chunk.k, chunk.v, chunk.coefficients,
                                                            chunk.step_gates, chunk.kappa, chunk.objective_gates, norms)
            else:
                out, new_params, new_momentum = self.step(params, momentum, chunk.q, chunk.k, chunk.v, chunk.mixed_qk,
                                                          chunk.coefficients, chunk.step_gates, chunk.kappa,
                                                          chunk.objective_gates, norms)
                if read_start:
                    out = torch.stack([out, self.fast.core(chunk.q, self.fast.plain_linear(params))], dim=1)
            if i < n_commit:
                if self.has_retention:
                    decay = chunk.coefficients.decay
                    new_params = self.retention.commit(params, new_params, None if decay is None else decay[:, -1],
                                                       chunk.active, new_momentum, chunk.coefficients.step)
                new_params, momentum = flush_subnormal(new_params), flush_subnormal(new_momentum)
                if self.norm_names:
                    carried = self.carried_norms(new_params, self._carry_norms(params, new_params, norms.carried))
                params = new_params
            if out is None:  # "end": the committed weights
                out = self.fast.core(chunk.q, self.fast.plain_linear(params))
            outs.append(out)
        return torch.stack(outs, dim=1), params, momentum, carried

    def carried_norms(self, params: dict, carried: dict) -> dict:
        """The carried values at `params`, the weights before a commit, for each weight whose spectral norm the
        step bound reads (:attr:`norm_names`), each (N,) and named ``<key>.<name>``: the bound
        ``b = scale * exact + slack >= ||W||_2`` (:func:`norm_bound`), with ``exact`` the exact norm of the
        weights at the row's last anchor (NaN while not yet computed), ``scale`` the product of the commits'
        factors |beta| since and ``slack`` the part carried across those commits (:meth:`_carry_norms`);
        ``floor`` a lower bound of the anchor's norm (:func:`~tto.engine.fast_models.spectral_norm_floor`).
        Within a call also ``anchor.<name>``, the anchor's weights, and ``upper.<name>``, an upper bound of
        their norm for the screens while ``exact`` is not computed (:class:`StepNorms`): the row's carried
        bound when it was anchored, or :func:`~tto.engine.fast_models.spectral_norm_bound` without one.

        The exact norm is at least ``scale * exact - slack`` (the same inequalities the other way), so a row
        whose slack stays within :data:`NORM_SLACK` of ``scale * floor + slack <= b`` has
        ``b <= ||W||_2 / (1 - 2 NORM_SLACK)``. The other rows, and those not known (a new sequence, a
        restarted row: NaN), are anchored here: scale 1, slack 0, their exact norm computed when the exact
        bound first reads it (:meth:`exact_norms`). The floor, not the exact norm, decides, so that no
        eigensolver runs to decide."""
        out = dict(carried)
        uppers = StepNorms(self, carried).upper() if all("slack." + n in carried for n in self.norm_names) else {}
        for name in self.norm_names:
            weights = params[name].detach()
            floor = spectral_norm_floor(weights)
            if "slack." + name in carried:
                scale, slack = carried["scale." + name], carried["slack." + name]
                stale = ~(slack <= NORM_SLACK * (scale * carried["floor." + name] + slack))  # NaN compares False
                upper = uppers[name]
                if not torch.compiler.is_compiling() and bool(torch.isnan(upper).any()):  # rows not known
                    upper = torch.where(torch.isnan(upper), spectral_norm_bound(weights), upper)
            else:  # a call without a state: every row anchors here
                stale = torch.ones_like(floor, dtype=torch.bool)
                upper = spectral_norm_bound(weights)
            anchored = {"exact": torch.full_like(floor, float("nan")), "scale": torch.ones_like(floor),
                        "slack": torch.zeros_like(floor), "floor": floor, "upper": upper}
            for key, value in anchored.items():
                old = carried.get(key + "." + name)
                out[key + "." + name] = value if old is None else torch.where(stale, value, old)
            anchor = carried.get("anchor." + name, weights)
            out["anchor." + name] = torch.where(stale[:, None, None], weights, anchor)
        return out

    def exact_norms(self, carried: dict) -> dict:
        """`carried` (:meth:`carried_norms`) with the exact norm of every row's anchor: the eigensolver
        (:func:`~tto.engine.fast_models.spectral_norm`) on the rows not yet computed alone."""
        out = dict(carried)
        for name in self.norm_names:
            exact, anchor = carried["exact." + name], carried["anchor." + name]
            pending = torch.isnan(exact)
            if torch.compiler.is_compiling():  # no branch on a value: every row's
                exact = torch.where(pending, spectral_norm(anchor), exact)
            elif bool(pending.all()):
                exact = spectral_norm(anchor)
            elif bool(pending.any()):
                exact = exact.masked_scatter(pending, spectral_norm(anchor[pending]))
            out["exact." + name] = exact
        return out

    def _carry_norms(self, before: dict, after: dict, carried: dict) -> dict:
        """The carried values of `after`, the weights a commit leaves, from those of `before`: for any
        scalar beta, ``||W'||_2 <= |beta| ||W||_2 + ||W' - beta W||_2 <= |beta| ||W||_2 + ||W' - beta W||_F``
        (the triangle inequality; the Frobenius norm bounds the spectral one), with beta the least-squares
        ``<W', W>_F / ||W||_F^2`` (a forget gate's decay, momentum and the update leave W' close to a multiple
        of W): the scale takes the factor |beta|, the slack the same and the last term."""
        out = dict(carried)
        for name in self.norm_names:
            w, new = before[name].detach(), after[name].detach()
            beta = (w * new).sum((-2, -1)) / w.pow(2).sum((-2, -1)).clamp_min(torch.finfo(w.dtype).tiny)
            rest = torch.linalg.matrix_norm(new - beta[:, None, None] * w)
            out["scale." + name] = beta.abs() * carried["scale." + name]
            out["slack." + name] = beta.abs() * carried["slack." + name] + rest
        return out

    def reads_pending(self, read_start):
        return read_start != "only"

    def _read_chunk(self, params, momentum, chunk, valid, first, read_start, cache=None):
        """Reads of the queries from `first` on: the chunk's keys' gradients at the committed
        weights and the dual form's rows of those queries; no step bound, no commit. A key's
        gradient depends on its own key, value and gates only, so the `cache` keeps the pending
        keys' ones (``<weight>.x``, ``<weight>.delta``: layer input and output gradient) and a call
        takes only its new keys' gradients. With ``read_start="only"``: the plain reads of the
        committed weights, no gradient (the cache is left empty)."""
        if read_start == "only":
            if cache is not None:
                cache.clear()
            q = chunk["q"][:, first:]
            return self.fast.apply(q, self.fast.plain_linear(params))
        chunk = self._with_lookback(chunk, dim=1)
        gates = _gates(chunk)
        coef = self.optimizer.read_coefficients(gates, valid, first).without_negligible()
        k, q = chunk["k"], chunk["q"][:, first:]
        start = first if cache else 0
        grads, _ = self._gradients(params, k[:, start:], chunk["v"][:, start:],
                                   {n: gates[n][:, start:] for n in self.objective.gate_names})
        if cache:
            grads = [(name, torch.cat([cache[name + ".x"], x], 1), torch.cat([cache[name + ".delta"], delta], 1))
                     for name, x, delta in grads]
        if cache is not None:
            cache.update({f"{name}.{part}": t for name, x, delta in grads for part, t in (("x", x), ("delta", delta))})
        scale = self.retention.grad_scale(params)
        if scale is not None:
            grads = [(name, x, delta * scale[name]) for name, x, delta in grads]
        out = self._read(params, momentum, grads, q, coef.mix * self._first_layer_qk(params, q, k), coef)
        if read_start:
            out = torch.stack([out, self.fast.core(q, self.fast.plain_linear(params))], dim=1)
            return self.fast.wrap(q[:, None].expand(-1, 2, -1, -1).flatten(1, -2), out.flatten(1, -2)).view(out.shape)
        return self.fast.wrap(q, out)

    def _gradients(self, params, k, v, objective_gates: dict) -> tuple[list, torch.Tensor]:
        """The chunk's keys' (name, layer input, output gradient) per fast layer at `params`, and
        the fast model's outputs y (N, C, d)."""
        outputs = []

        def dloss(y):
            outputs.append(y)
            return self.objective.grad(y, v, objective_gates)

        grads = self.fast.forward_backward(params, k, dloss)
        return grads, outputs[0]

    def _read(self, params, momentum, grads: list, q, mixed_qk, c: Coefficients) -> torch.Tensor:
        """Read-outs g(q) (N, C_q, d) of queries q (N, C_q, d) through the dual form: the weights
        `params` (and momentum) at the chunk start, the keys' `grads` (N, C, ...) per layer, the
        queries' rows of `mixed_qk` (N, C_q, C) and of the coefficients `c`."""
        by_name = {name: (x, delta) for name, x, delta in grads}

        def read(name: str, xq: torch.Tensor) -> torch.Tensor:
            x, delta = by_name[name]
            bias = _bias_name(name)
            z = torch.baddbmm(params[bias], xq, params[name]) if bias in params else torch.bmm(xq, params[name])
            if xq is q:
                mixed = mixed_qk
            else:
                att = torch.bmm(xq, x.transpose(-1, -2))
                mixed = c.mix * (att + 1.0 if bias in params else att)
            if c.decay is not None:
                z = c.decay[..., None] * z
            if c.carry is not None:
                s = torch.bmm(xq, momentum[name])
                if bias in params:
                    s = s + momentum[bias]
                z = z + c.carry[..., None] * s
            return torch.baddbmm(z, mixed, delta, alpha=-1.0)

        return self.fast.core(q, read)

    def _chunk(self, params, momentum, q, k, v, mixed_qk, c: Coefficients, bound: StepGates | None,
               kappa: torch.Tensor | None, objective_gates: dict, norms: StepNorms | None = None):
        """Read-outs g(q) of one chunk and the weights (and momentum) at its end, before retention. A
        retention that steps along the momentum (Muon) replaces the end weights: they are not
        computed (the start weights stand in for them) and the momentum takes no step bound. `norms`: the
        step bound's spectral norms at the start weights (:class:`StepNorms`)."""
        grads, kappa = self._scaled_gradients(params, k, v, c, bound, kappa, objective_gates, norms)
        out = self._read(params, momentum, grads, q, mixed_qk, c)
        if not self.retention.reads_chunk_end:
            new_params, new_momentum = self._end_state(params, momentum, grads, c, kappa)
            return out, new_params, new_momentum
        # the chunk's last token reads the retained weights of its own (unbounded) linear steps; the
        # commit takes kappa of those steps: the end state is affine in kappa, so it is the blend
        # kappa * (linear end) + (1 - kappa) * (start weights and momentum carried to the chunk end)
        linear_params, linear_momentum = self._end_state(params, momentum, grads, c, torch.ones_like(kappa))
        decay = None if c.decay is None else c.decay[:, -1]
        last = self.fast.core(q[:, -1:], self.fast.plain_linear(self.retention.chunk_end(params, linear_params, decay)))
        out = torch.cat([out[:, :-1], last], dim=1)
        carried_params, carried_momentum = self._carried(params, momentum, c)
        weight = kappa[:, None, None]
        blend = lambda carried, linear: {p: torch.lerp(carried[p], linear[p], weight) for p in linear}  # noqa: E731
        return out, blend(carried_params, linear_params), (
            None if momentum is None else blend(carried_momentum, linear_momentum))

    def _scaled_gradients(self, params, k, v, c: Coefficients, bound: StepGates | None, kappa: torch.Tensor | None,
                          objective_gates: dict, norms: StepNorms | None) -> tuple[list, torch.Tensor]:
        """The chunk's keys' gradients at its start weights `params` as :meth:`_gradients` gives them,
        times the retention's gradient scale, and the step bound kappa (N,) of its commit: `kappa` where
        it was computed before the scan, else from the gates' part `bound` (1 for a retention that steps
        along the momentum)."""
        grads, y = self._gradients(params, k, v, objective_gates)
        scale = self.retention.grad_scale(params)
        if self.retention.steps_along_momentum:
            kappa = torch.ones_like(c.s_decay)
        elif kappa is None:
            kappa = self._step_bound(bound, lambda gain_bound: self.curvature_factors(params, grads, y, v, objective_gates,
                                                                                      scale, gain_bound, norms))
        if scale is not None:
            grads = [(name, x, delta * scale[name]) for name, x, delta in grads]
        return grads, kappa

    def _commit(self, params, momentum, k, v, c: Coefficients, bound: StepGates | None, kappa: torch.Tensor | None,
                objective_gates: dict, norms: StepNorms | None = None) -> tuple:
        """What :meth:`_chunk` commits, without its reads: the chunk's end weights and momentum, before
        retention, from the chunk-end coefficients `c` alone (mix (N, 1, lookback + C), decay and
        carry (N, 1)). With a retention that reads the chunk end, :meth:`_chunk`'s blend of the
        carried and the linear end state by kappa is this end state at kappa (it is affine in kappa)."""
        grads, kappa = self._scaled_gradients(params, k, v, c, bound, kappa, objective_gates, norms)
        return self._end_state(params, momentum, grads, c, kappa)

    def _carried(self, params, momentum, c: Coefficients) -> tuple:
        """The start weights and momentum carried to the chunk end without its gradients:
        ``d W_c + c S_c`` and ``e S_c`` (new tensors)."""
        new_params = {}
        for p, w in params.items():
            w = c.decay[:, -1, None, None] * w if c.decay is not None else w.clone()
            new_params[p] = w if momentum is None else w.addcmul_(c.carry[:, -1, None, None], momentum[p])
        new_momentum = None if momentum is None else {p: c.s_decay[:, None, None] * s for p, s in momentum.items()}
        return new_params, new_momentum

    def _end_state(self, params, momentum, grads: list, c: Coefficients, kappa: torch.Tensor) -> tuple:
        """The chunk's end weights and momentum from its gradients times kappa (N,), before retention:
        ``W' = d W_c + c S_c - kappa sum_s m_s g_s``, ``S' = e S_c - kappa sum_s p_s g_s``. A retention
        that steps along the momentum gets the start weights instead of W' (it commits from S')."""
        along_momentum = self.retention.steps_along_momentum
        if along_momentum:
            new_params, new_momentum = dict(params), {p: c.s_decay[:, None, None] * s for p, s in momentum.items()}
        else:
            new_params, new_momentum = self._carried(params, momentum, c)
        end = kappa[:, None, None] * c.mix[:, -1, :, None]  # (N, b, 1): weight of each token's gradient in W_b
        for name, x, delta in grads:
            lefts = {name: x.transpose(-1, -2)}
            if _bias_name(name) in params:
                lefts[_bias_name(name)] = torch.ones_like(end.transpose(-1, -2))
            if momentum is not None:
                s_step = (kappa[:, None] * c.s_mix)[..., None] * delta
                for p, left in lefts.items():
                    new_momentum[p].baddbmm_(left, s_step, alpha=-1.0)
            if not along_momentum:
                step = end * delta
                for p, left in lefts.items():
                    new_params[p].baddbmm_(left, step, alpha=-1.0)
        return new_params, new_momentum

    def curvature_factors(self, params, grads, y, v, objective_gates, scale,
                          gain_bound: GainBound = EXACT_GAINS, norms: StepNorms | None = None) -> list[torch.Tensor]:
        """The chunk's curvature factors F_l (N, b, d_l [+ 1 with a bias]), one per fast layer, at the
        chunk-start weights `params` (module docstring): ``sqrt(objective curvature * gain) *
        [x^(l), 1]`` per token, so that ``||sum_s a_s H_s|| <= sum_l ||F_l^T diag(a) F_l||`` for the
        tokens' Gauss-Newton Hessians H_s and any a >= 0. `grads` as :meth:`FastModel.forward_backward`
        returns them, y the fast model's outputs; `gain_bound` how :meth:`FastModel.curvature_gains` bounds the
        later layers (a screen's :data:`~tto.engine.fast_models.SCREEN_GAINS` give factors that bound these), with
        the carried spectral norms `norms` where given (:class:`StepNorms`: upper bounds for a screen, the
        carried bounds for the exact gains)."""
        inputs = {name: x.detach() for name, x, _ in grads}
        if norms is not None:
            norms = norms.exact() if gain_bound is EXACT_GAINS else norms.upper()
        gains = self.fast.curvature_gains({n: w.detach() for n, w in params.items()}, inputs, gain_bound, norms)
        curvature = self.objective.curvature(y.detach(), v, objective_gates)  # (N, b)
        factors = []
        for name, x in inputs.items():
            if _bias_name(name) in params:
                x = torch.cat([x, torch.ones_like(x[..., :1])], -1)
            gain = gains[name] if scale is None else gains[name] * scale[name][:, :1, 0]
            factors.append((curvature * gain).sqrt()[..., None] * x)
        return factors

    def _step_bound(self, bound: StepGates, factors) -> torch.Tensor:
        """The factor kappa (N,) on the gradients the chunk commits (module docstring), or (N, n) of all
        chunks at once: :func:`stable_bound_factor` of the gates' part `bound`, computed for all chunks
        before the scan, and the curvature factors ``factors(gain_bound)`` (:meth:`curvature_factors` with
        those gains). Differentiated with respect to the gates, not the curvature factors (module
        docstring).

        First screens from matrix products and elementwise work alone, cheapest first: the same bound
        with upper bounds of the curvature (:data:`~tto.engine.fast_models.SCREEN_GAINS` in the gains,
        :func:`trace_curvature` for the eigenvalues). Where one already gives kappa = 1 for every row, so
        does the exact bound (kappa falls as the curvature grows), and its eigensolvers are skipped: kappa
        is the constant 1, without a gradient, as the exact bound's would be. After a chunk whose screens
        all fail, the next chunks skip them (:data:`SCREEN_MAX_SKIPS`). (Not under ``torch.compile``,
        whose graph cannot branch on a screen's outcome: it always runs the exact bound.)"""
        with torch.no_grad():
            if not torch.compiler.is_compiling():
                skips, backoff = self._screen_schedule
                if skips > 0:
                    self._screen_schedule = (skips - 1, backoff)
                else:
                    for screen in SCREEN_GAINS:
                        if bool((bound_factor(bound, factors(screen), curvature=trace_curvature) >= 1.0).all()):
                            self._screen_schedule = (0, 0)
                            return torch.ones_like(bound.inverse_t[0])
                    backoff = min(max(1, 2 * backoff), SCREEN_MAX_SKIPS)
                    self._screen_schedule = (backoff, backoff)
            exact = factors(EXACT_GAINS)
        return stable_bound_factor(bound, exact)


def norm_bound(carried: dict, name: str) -> torch.Tensor:
    """The carried upper bound (N,) of ``||W_name||_2`` (:meth:`Memory.carried_norms`): ``scale * exact + slack``,
    NaN where the anchor's exact norm is not yet computed."""
    return carried["scale." + name] * carried["exact." + name] + carried["slack." + name]


class StepNorms:
    """The spectral norms a chunk's step bound reads at its start weights, from the `carried` values
    (:meth:`Memory.carried_norms`): :meth:`upper` for the screens, with the anchor's upper bound where its
    exact norm is not yet computed (no eigensolver), and :meth:`exact`, the carried bounds, which computes
    those first (:meth:`Memory.exact_norms`; :attr:`carried` then holds them, for the next commits)."""

    def __init__(self, memory: Memory, carried: dict):
        self.memory, self.carried = memory, carried

    def upper(self) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.memory.norm_names:
            exact = self.carried["exact." + name]
            anchor = torch.where(torch.isnan(exact), self.carried.get("upper." + name, exact), exact)
            out[name] = self.carried["scale." + name] * anchor + self.carried["slack." + name]
        return out

    def exact(self) -> dict[str, torch.Tensor]:
        self.carried = self.memory.exact_norms(self.carried)
        return {name: norm_bound(self.carried, name) for name in self.memory.norm_names}


class _ChunkBound:
    """A fused scan's step bound (:func:`~tto.engine.ttt_scans.mlp_scan`): chunk i's kappa (N,) from the
    memory's own screens and exact bound at its start weights, as :meth:`Memory._chunks` computes it,
    raising :class:`~tto.engine.ttt_scans.BoundActive` where it is below 1; the carried spectral norms
    follow each commit. `values` (N, n, C, d), the objective's `gates` {name: (N, n, C)} and the gates'
    parts of the bound `step_gates` (one per chunk) are those of the chunks the scan runs."""

    def __init__(self, memory: Memory, carried: dict, values: torch.Tensor, gates: dict, step_gates: list):
        self.memory, self.carried, self.values, self.gates, self.step_gates = memory, carried, values, gates, step_gates

    def __call__(self, i: int, params: dict, grads: list, y: torch.Tensor) -> torch.Tensor:
        memory = self.memory
        norms = StepNorms(memory, self.carried) if memory.norm_names else None
        gates = {name: t[:, i] for name, t in self.gates.items()}
        kappa = memory._step_bound(self.step_gates[i], lambda gain_bound: memory.curvature_factors(
            params, grads, y, self.values[:, i], gates, None, gain_bound, norms))
        if norms is not None:
            self.carried = norms.carried
        if not bool((kappa >= 1.0).all()):
            raise BoundActive
        return kappa

    def committed(self, before: dict, after: dict) -> None:
        if self.memory.norm_names:
            self.carried = self.memory.carried_norms(after, self.memory._carry_norms(before, after, self.carried))


def naive_chunk_map(optimizer: InnerOptimizer, token_gates: list[dict], heads: int, dtype,
                    earlier_gates: list[dict] = ()) -> tuple:
    """The chunk-end coefficients of `optimizer` over one chunk of tokens with these gates (after
    `earlier_gates`, those of the lookback tokens before the chunk), read off its per-token recurrence
    run on probes: a scalar weight per probe, one probe per token (lookback tokens first) whose
    gradient is 1 at that token and 0 elsewhere, one starting at W = 1 and one at S = 1. Returns
    (decay, carry, s_decay, mix, s_mix) as :func:`stable_step_factor` takes them (carry, s_decay,
    s_mix None without momentum)."""
    e, b = len(earlier_gates), len(token_gates)
    width = e + b
    start = torch.zeros(heads, 1, width + 2, dtype=dtype)
    start[..., width] = 1.0
    state = optimizer.naive_init({"probe": start})
    if optimizer.has_momentum:
        state["S"]["probe"] = torch.zeros_like(start)
        state["S"]["probe"][..., width + 1] = 1.0

    def unit(i):
        grad = torch.zeros_like(start)
        grad[..., i] = 1.0
        return {"probe": grad}

    if e:
        optimizer.naive_chunk_start(state, [unit(i) for i in range(e)], list(earlier_gates))
    for t, gates in enumerate(token_gates):
        optimizer.naive_step(state, unit(e + t), gates, t)
    optimizer.naive_chunk_end(state)
    w = state["W"]["probe"][:, 0]
    if not optimizer.has_momentum:
        return w[:, width], None, None, -w[:, :width], None
    s = state["S"]["probe"][:, 0]
    return w[:, width], w[:, width + 1], s[:, width + 1], -w[:, :width], -s[:, :width]


def naive_curvature(memory: Memory, start: dict, x: torch.Tensor, v: torch.Tensor, gates: dict,
                    scale: dict | None, norms: dict | None = None) -> list[torch.Tensor]:
    """Curvature factors of the step bound for one token x, v (heads, 1, d) at the chunk-start
    weights, one (heads, d_l) per layer: the layer's input [with a 1 for a bias] times the square root
    of the objective's curvature (the top eigenvalue of its autograd Hessian in the output) and the
    fast model's gain, with the spectral norms `norms` {name: (heads,)}."""
    fast, inputs = memory.fast, {}
    plain = fast.plain_linear({n: w.detach() for n, w in start.items()})

    def recording(name, h):
        inputs[name] = h
        return plain(name, h)

    y = fast.apply(x, recording).detach()
    gains = fast.curvature_gains({n: w.detach() for n, w in start.items()}, inputs, None, norms)
    top = []
    for head in range(y.shape[0]):
        head_gates = {n: g[head: head + 1, None] for n, g in gates.items()}
        def loss(yh, head=head, head_gates=head_gates):
            return memory.objective.loss(yh[None, None], v[head: head + 1], head_gates).sum()

        top.append(torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, y[head, 0]))[-1].clamp_min(0.0))
    factors = []
    for name, h in inputs.items():
        gain = gains[name][:, 0] * (1.0 if scale is None else scale[name].detach()[:, 0, 0])
        row = h[:, 0] if _bias_name(name) not in start else F.pad(h[:, 0], (0, 1), value=1.0)
        factors.append((torch.stack(top) * gain).sqrt()[:, None] * row)
    return factors


def naive_memory(memory: Memory, q, k, v, gates, mask=None, chunk_size: int | None = None):
    """Slow reference for :class:`Memory`: per row, per real token, autograd gradients at the
    chunk-start weights and the optimizer's per-token recurrence, the retention at chunk ends; an
    optimizer with a lookback (the Omega window) starts each chunk from the gradients of the row's
    tokens before it, at the chunk's start weights. Chunks of `chunk_size` tokens (None: the memory's).
    Returns (outputs (B, T, H, d), reads of the chunk-start weights (B, T, H, d), per row the
    weights committed after its last complete chunk)."""
    fast, opt, retention = memory.fast, memory.optimizer, memory.retention
    b = chunk_size or memory.chunk_size
    batch, length, heads = q.shape[:3]
    outs = upcast(q.new_zeros(batch, length, heads, v.shape[-1]))
    starts = torch.zeros_like(outs)
    committed = []

    def gradient(start, row, t):
        """Token t's (gradients at `start`, gates, curvature factors of the step bound)."""
        kt, vt = (upcast(x[row, t])[:, None, :] for x in (k, v))
        token_gates = {n: upcast(g[row, t]) for n, g in gates.items()}
        with torch.enable_grad():
            y = fast.apply(kt, fast.plain_linear(start))
            loss = memory.objective.loss(y, vt, {n: g[:, None] for n, g in token_gates.items()}).sum()
            g = torch.autograd.grad(loss, list(start.values()), create_graph=True)
        grads = dict(zip(start.keys(), g))
        scale = retention.grad_scale(start)
        if scale is not None:
            grads = {n: grad * scale[n] for n, grad in grads.items()}
        curvature = naive_curvature(memory, start, kt.detach(), vt.detach(), {n: g.detach() for n, g in token_gates.items()},
                                    scale, {n: bound for n, (bound, _, _) in norms.items()} if norms else None)
        return grads, token_gates, [f.detach() for f in curvature]

    def exact_norm(w):
        return torch.stack([torch.linalg.matrix_norm(head.detach(), ord=2) for head in w])

    def longest_row_or_column(w):
        return torch.stack([max(torch.linalg.vector_norm(head.detach(), dim=0).max(),
                                torch.linalg.vector_norm(head.detach(), dim=1).max()) for head in w])

    for row in range(batch):
        idx = (torch.arange(length) if mask is None else mask[row].nonzero()[:, 0]).tolist()
        state = opt.naive_init(retention.start(fast.initial_params(1)))
        row_out, start, keep, last_commit = [], None, None, dict(state["W"])
        norms = {}  # name -> (upper bound of the spectral norm (heads,), floor, carried part): Memory.carried_norms
        for j, t in enumerate(idx):
            pos = j % b
            if pos == 0:
                start = {n: w if w.requires_grad else w.detach().requires_grad_(True) for n, w in state["W"].items()}
                for name in memory.norm_names:  # exact where never known or carried past NORM_SLACK of the floor
                    exact, floor = exact_norm(start[name]), longest_row_or_column(start[name])
                    bound, low, slack = norms.get(name, (exact, floor, torch.full_like(exact, float("nan"))))
                    stale = ~(slack <= NORM_SLACK * (low + slack))
                    norms[name] = (torch.where(stale, exact, bound), torch.where(stale, floor, low),
                                   torch.where(stale, 0.0, slack))
                keep = torch.ones(heads, dtype=outs.dtype)
                earlier = [gradient(start, row, i) for i in idx[max(0, j - opt.lookback): j]]
                if earlier:
                    opt.naive_chunk_start(state, [g for g, _, _ in earlier], [g for _, g, _ in earlier])
                chunk_start = {key: (dict(x) if isinstance(x, dict) else list(x) if isinstance(x, list) else x)
                               for key, x in state.items()}
                written = []
            grads, token_gates, curvature = gradient(start, row, t)
            read = opt.naive_step(state, grads, token_gates, pos)
            written.append((grads, token_gates, curvature))
            if "forget" in token_gates:
                keep = keep * (1 - token_gates["forget"])
            if pos == b - 1 and retention.reads_chunk_end:
                read = retention.chunk_end(start, read, keep if "forget" in token_gates else None)
            qt = upcast(q[row, t])[:, None, :]
            row_out.append((t, fast.apply(qt, fast.plain_linear(read))[:, 0], fast.apply(qt, fast.plain_linear(start))[:, 0]))
            if pos == b - 1 and retention.steps_along_momentum:
                # ATLAS' Muon, M_t = alpha_t M_{t-1} - eta_t NS5(S_t) token by token from the chunk start,
                # with the chunk-end momentum's NS5(S_b) for every NS5(S_t) (S: the negated momentum)
                direction = {n: torch.stack([naive_newton_schulz(m) for m in s]) for n, s in state["S"].items()}
                weights = dict(start)
                for _, token_gates, _ in written:
                    alpha, eta = 1 - token_gates["forget"][:, None, None], token_gates["lr"][:, None, None]
                    weights = {n: alpha * w + eta * direction[n] for n, w in weights.items()}
                opt.naive_chunk_end(state)
                state["W"] = weights
                last_commit = dict(weights)
            elif pos == b - 1:
                # the commit: the chunk's recurrence again from its start, gradients times the step bound
                coefficients = naive_chunk_map(opt, [g for _, g, _ in written], heads, outs.dtype,
                                               [g for _, g, _ in earlier])
                kappa = stable_step_factor(*coefficients, [torch.stack(f, 1) for f in zip(*(c for *_, c in earlier + written))])
                state = chunk_start
                scaled = lambda grads, kappa=kappa: {n: kappa[:, None, None] * g for n, g in grads.items()}  # noqa: E731
                if earlier:
                    opt.naive_chunk_start(state, [scaled(g) for g, _, _ in earlier], [g for _, g, _ in earlier])
                for r, (grads, token_gates, _) in enumerate(written):
                    opt.naive_step(state, scaled(grads), token_gates, r)
                opt.naive_chunk_end(state)
                state["W"] = retention.chunk_end(start, state["W"], keep if "forget" in token_gates else None)
                last_commit = dict(state["W"])
                for name, (bound, low, slack) in norms.items():  # ||W'|| <= |beta| ||W|| + ||W' - beta W||_F
                    w, new = start[name].detach(), state["W"][name].detach()
                    beta = torch.stack([(a * c).sum() / (a * a).sum() if (a * a).sum() > 0 else a.new_zeros(())
                                        for a, c in zip(w, new)])
                    rest = torch.stack([torch.linalg.norm(c - s * a) for a, c, s in zip(w, new, beta)])
                    norms[name] = (beta.abs() * bound + rest, beta.abs() * low, beta.abs() * slack + rest)
        for t, o, o_start in row_out:
            outs[row, t], starts[row, t] = o, o_start
        committed.append(last_commit)
    return outs, starts, committed
