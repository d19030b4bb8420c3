"""Large-chunk, apply-then-update memory (LaCT: "Test-Time Training Done Right", arXiv:2505.23884).

Tokens are cut into chunks of ``chunk_size`` (thousands in LaCT). Chunk i's queries read the
weights ``W_i`` left by the chunks before it; then the chunk's gradients, all taken at ``W_i``,
update every fast weight once::

    S_i = mean_t(momentum_t) S_{i-1} - sum_t lr_t^(W) grad_W l(f(k_t; W_i), v_t)   (momentum S optional)
    W_{i+1} = W_i + NS5(S_i)                     Muon: Newton-Schulz orthogonalisation (optional)
    W_{i+1}[:, j] <- W_{i+1}[:, j] ||W_0[:, j]|| / ||W_{i+1}[:, j]||     weight norm (optional)

each weight W with its own per-token lr. The momentum ``S`` is the optimizer's running update
before Muon (the state's ``S.<name>``, as every engine's momentum). Muon is ATLAS' part,
:meth:`tto.engine.MuonRetention.orthogonalize` (applied to S itself: recovering S as
``W_{i+1} - W_i`` would cost its precision relative to W), and the weight norm is the chunk-end
retention :class:`tto.engine.retention.WeightNorm`. A chunk costs a few large batched matmuls and
no (chunk x chunk) term. Within a chunk the memory is not causal by itself: LaCT pairs it with
sliding-window attention.

The engine base (:class:`tto.engine.chunkwise.ChunkwiseMemory`) lays the tokens out (an
incomplete last chunk is only read and kept pending), keeps the state and runs the scan. A
decoding step that completes no chunk reads only its new queries, at the committed weights.
:func:`naive_large_chunk` is the reference, written from the equations above: per row and token,
autograd gradients summed over each chunk, then momentum, a plain Newton-Schulz iteration and the
column rescaling, none of it shared with the fast path.
"""

from __future__ import annotations

import torch

from .chunkwise import ChunkwiseMemory
from .fast_models import FastModel, upcast
from .muon import naive_newton_schulz
from .objectives import Objective
from .retention import MuonRetention, Retention, WeightNorm


class LargeChunkMemory(ChunkwiseMemory):
    """forward(q, k, v, gates, mask, state) -> reads (B, T, H, d). gates: ``lr`` (B, T, H, n_weights),
    one inner lr per fast weight in ``fast.weight_names`` order, and ``momentum`` (B, T, H) when
    ``use_momentum``. State keys ``<prefix>.W.*``, ``<prefix>.S.*`` (momentum), pending tokens."""

    def __init__(self, fast: FastModel, objective: Objective, chunk_size: int, *, use_momentum: bool,
                 use_muon: bool, weight_norm: bool, state_prefix: str = "memory"):
        super().__init__()
        self.fast, self.objective, self.chunk_size = fast, objective, chunk_size
        self.has_momentum, self.use_muon, self.weight_norm = use_momentum, use_muon, weight_norm
        self.muon = MuonRetention() if use_muon else None
        self.retention = WeightNorm(fast) if weight_norm else Retention()
        self.prefix = state_prefix + "."

    def param_names(self):
        return list(self.fast.weight_names)

    def initial_weights(self, tokens):
        params = self.fast.initial_params(tokens["q"].shape[0])
        return params, ({n: torch.zeros_like(w) for n, w in params.items()} if self.has_momentum else None)

    def naive(self, q, k, v, gates, mask, read_start):
        return naive_large_chunk(self, q, k, v, gates, mask)

    # ------------------------------------------------------------------ the scan
    def _scan(self, params, momentum, carried, chunks, valid, n_commit, read_start):
        lr = chunks["gate.lr"]  # (N, n, C, n_weights), 0 at pad slots
        mean_gate = None
        if self.has_momentum:  # each chunk's mean momentum gate over its real tokens (N, n)
            mean_gate = chunks["gate.momentum"].sum(-1) / valid.sum(-1).clamp_min(1)
        reads = []
        for i, (q, k, v, active) in enumerate(zip(*(chunks[n].unbind(1) for n in ("q", "k", "v")),
                                                   valid.any(-1).unbind(1))):
            reads.append(self.fast.apply(q, self.fast.plain_linear(params)))
            if i < n_commit:  # the incomplete last chunk is only read
                step = self.step(params, momentum, k, v, lr[:, i], None if mean_gate is None else mean_gate[:, i])
                momentum = step if self.has_momentum else None
                if self.muon is not None:
                    step = {n: self.muon.orthogonalize(s) for n, s in step.items()}
                params = self.retention.commit(params, {n: params[n] + s for n, s in step.items()}, None, active)
        return torch.stack(reads, dim=1), params, momentum, carried

    def reads_pending(self, read_start):
        return False  # every token reads the chunk-start weights

    def _read_chunk(self, params, momentum, chunk, valid, first, read_start, cache=None):
        """A read-only chunk's reads depend on its queries and the committed weights only (nothing
        to cache)."""
        return self.fast.apply(chunk["q"][:, first:], self.fast.plain_linear(params))

    def _chunk(self, params, momentum, k, v, lr, mean_gate):
        """One committed chunk's linear step from W_i (N, ...): S_i, the update before Muon."""
        names = self.fast.weight_names
        grads = self.fast.forward_backward(params, k, lambda y: self.objective.grad(y, v, {}))
        step = {name: -x.transpose(-1, -2) @ (lr[:, :, names.index(name), None] * delta) for name, x, delta in grads}
        if momentum is None:
            return step
        return {n: torch.addcmul(s, mean_gate[:, None, None], momentum[n]) for n, s in step.items()}


def naive_large_chunk(memory: LargeChunkMemory, q, k, v, gates, mask=None):
    """Reference for :class:`LargeChunkMemory` from its equations: per row, chunks of its real
    tokens; each token reads the chunk-start weights; a complete chunk sums the autograd gradients
    of its tokens' losses times their lrs, adds the momentum, orthogonalises (Muon) and rescales
    the columns (weight norm), per head. Returns outputs (B, T, H, d)."""
    fast, size, names = memory.fast, memory.chunk_size, memory.fast.weight_names
    batch, length, heads = q.shape[:3]
    outs = upcast(q.new_zeros(batch, length, heads, v.shape[-1]))
    initial = fast.initial_params(1)
    for row in range(batch):
        idx = (torch.arange(length) if mask is None else mask[row].nonzero()[:, 0]).tolist()
        weights = dict(initial)
        momentum = {n: torch.zeros_like(w) for n, w in weights.items()}
        for lo in range(0, len(idx), size):
            tokens = idx[lo: lo + size]
            start = {n: w if w.requires_grad else w.detach().requires_grad_(True) for n, w in weights.items()}
            for t in tokens:
                outs[row, t] = fast.apply(upcast(q[row, t])[:, None], fast.plain_linear(start))[:, 0]
            if len(tokens) < size:
                break
            descent = {n: torch.zeros_like(w) for n, w in start.items()}
            for t in tokens:
                with torch.enable_grad():
                    y = fast.apply(upcast(k[row, t])[:, None], fast.plain_linear(start))
                    loss = memory.objective.loss(y, upcast(v[row, t])[:, None], {}).sum()
                    grad = torch.autograd.grad(loss, [start[n] for n in names], create_graph=True)
                for j, name in enumerate(names):
                    descent[name] = descent[name] - upcast(gates["lr"][row, t, :, j])[:, None, None] * grad[j]
            if memory.has_momentum:
                mean_gate = upcast(gates["momentum"][row, tokens]).mean(0)[:, None, None]
                momentum = {n: mean_gate * momentum[n] + descent[n] for n in names}
                descent = momentum
            weights = {}
            for name in names:
                step = torch.stack([naive_newton_schulz(s) for s in descent[name]]) if memory.use_muon else descent[name]
                w = start[name] + step
                if memory.weight_norm:
                    w = torch.stack([w[h] * initial[name][h].norm(dim=0) / w[h].norm(dim=0) for h in range(heads)])
                weights[name] = w
    return outs
