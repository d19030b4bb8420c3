"""Large-chunk, apply-then-update memory (LaCT: "Test-Time Training Done Right", arXiv:2505.23884).

Tokens are cut into chunks of ``chunk_size`` (thousands in LaCT). Chunk i's queries read the
weights ``W_i`` left by the chunks before it; then the chunk's gradients, all taken at ``W_i``,
update every fast weight once::

    U_i = - sum_t lr_t^(W) grad_W l(f(k_t; W_i), v_t)      each weight W its own per-token lr
    U_i <- U_i + mean_t(momentum_t) U_{i-1}                 momentum (optional)
    U_i <- NS5(U_i)                                         Muon: Newton-Schulz orthogonalisation (optional)
    W_{i+1} = W_i + U_i, each column rescaled to its norm in the initial weights (weight norm, optional)

so a chunk costs a few large batched matmuls and no (chunk x chunk) term. Within a chunk the
memory is not causal by itself: LaCT pairs it with sliding-window attention.

Padding and decoding share :class:`tto.engine.memory.Layout` with :class:`tto.engine.Memory`: real
tokens are laid out so that complete chunks end together, an incomplete last chunk is only read
and kept pending until a later call completes it. :func:`naive_large_chunk` is the reference:
per row and token, autograd gradients accumulated over each chunk, then the same chunk update.
"""

from __future__ import annotations

import torch

from ..reference import in_reference_mode
from .chunkwise import ChunkwiseMemory
from .fast_models import FastModel, inner
from .memory import Layout, heads_first, load_state, prepend_pending, store_state
from .muon import newton_schulz5
from .objectives import Objective


def chunk_update(params: dict, update: dict, previous: dict | None, momentum: torch.Tensor | None,
                 norms: dict | None, muon: bool) -> tuple[dict, dict]:
    """Apply one chunk's summed update: momentum (mean gate (N,)), Muon, weight norm (column norms
    of the initial weights, (N, 1, d_out)). Returns (new params, the update kept for momentum)."""
    if momentum is not None:
        update = {n: u + momentum[:, None, None] * previous[n] for n, u in update.items()}
    step = {n: newton_schulz5(u) for n, u in update.items()} if muon else update
    new = {n: params[n] + step[n] for n in params}
    if norms is not None:
        new = {n: w * (norms[n] / w.norm(dim=-2, keepdim=True)) for n, w in new.items()}
    return new, update


class LargeChunkMemory(ChunkwiseMemory):
    """forward(q, k, v, gates, mask, state) -> reads (B, T, H, d). gates: ``lr`` (B, T, H, n_weights),
    one inner lr per fast weight in ``fast.weight_names`` order, and ``momentum`` (B, T, H) when
    ``use_momentum``. State keys ``<prefix>.W.*``, ``<prefix>.S.*`` (last update), pending tokens."""

    def __init__(self, fast: FastModel, objective: Objective, chunk_size: int, *, use_momentum: bool,
                 use_muon: bool, weight_norm: bool, state_prefix: str = "memory"):
        super().__init__()
        self.fast, self.objective, self.chunk_size = fast, objective, chunk_size
        self.use_momentum, self.use_muon, self.weight_norm = use_momentum, use_muon, weight_norm
        self.prefix = state_prefix + "."

    def _chunk(self, params, previous, q, k, v, lr, momentum, norms):
        """One committed chunk: the reads of W_i (N, c, d), then W_{i+1} and the update kept for momentum."""
        read = self.fast.apply(q, self.fast.plain_linear(params))
        names = self.fast.weight_names
        grads = self.fast.forward_backward(params, k, lambda y: self.objective.grad(y, v, {}))
        update = {name: -x.transpose(-1, -2) @ (lr[:, :, names.index(name), None] * delta) for name, x, delta in grads}
        return read, *chunk_update(params, update, previous, momentum, norms, self.use_muon)

    # ------------------------------------------------------------------ monitoring (ChunkwiseMemory.inner_stats)
    def fast_weights(self, state, call):
        batch = call["q"].shape[0]
        loaded = load_state(state, self.prefix, batch, self.fast.weight_names, self.use_momentum)
        return (self.fast.initial_params(batch), None) if loaded is None else loaded[:2]

    def inner_loss(self, params, call):
        k, v = heads_first(call["k"]), heads_first(call["v"])
        return self.objective.loss(self.fast.apply(k, self.fast.plain_linear(params)), v, {})

    def gate_values(self, call):
        return call["gates"]

    def _norms(self, params: dict) -> dict | None:
        return {n: w.norm(dim=-2, keepdim=True) for n, w in params.items()} if self.weight_norm else None

    def forward(self, q, k, v, gates: dict, mask=None, state: dict | None = None):
        out_dtype = q.dtype
        with torch.autocast(device_type=q.device.type, enabled=False):
            if in_reference_mode():
                if state is not None:
                    raise RuntimeError("the naive reference does not keep a decoding state")
                out = naive_large_chunk(self, q, k, v, gates, mask)
            else:
                out = self._forward(q, k, v, gates, mask, state)
        return out.to(out_dtype)

    def _forward(self, q, k, v, gates, mask, state):
        batch, new_len, heads = q.shape[:3]
        c, names = self.chunk_size, self.fast.weight_names
        tokens = {"q": inner(q), "k": inner(k), "v": inner(v), **{"gate." + n: inner(g) for n, g in gates.items()}}
        initial = self.fast.initial_params(batch)
        norms = self._norms(initial)
        params, previous, valid = initial, None, mask
        loaded = load_state(state, self.prefix, batch, names, self.use_momentum)
        if loaded is not None:
            params, previous, pending, n_pending = loaded
            tokens, valid = prepend_pending(tokens, pending, n_pending, mask)
        elif self.use_momentum:
            previous = {n: torch.zeros_like(w) for n, w in params.items()}
        total = tokens["q"].shape[1]
        layout = Layout.build(valid, total, batch, c, q.device)
        n = layout.length // c

        def chunked(x):  # (B, T, H, ...) -> (B*H, n, c, ...)
            x = layout.gather(x).transpose(1, 2)
            return x.reshape(batch * heads, n, c, *x.shape[3:])

        slot_valid = layout.valid[:, None].expand(batch, heads, layout.length).reshape(batch * heads, n, c)
        Q, K, V = chunked(tokens["q"]), chunked(tokens["k"]), chunked(tokens["v"])
        lr = chunked(tokens["gate.lr"]) * slot_valid[..., None]
        momentum = chunked(tokens["gate.momentum"]) if self.use_momentum else None
        if momentum is not None:  # each chunk's mean momentum gate over its real tokens (N, n)
            momentum = (momentum * slot_valid).sum(-1) / slot_valid.sum(-1).clamp_min(1)
        reads = []
        for i in range(n):
            if i < layout.n_commit:
                read, params, previous = self.step(params, previous, Q[:, i], K[:, i], V[:, i], lr[:, i],
                                              None if momentum is None else momentum[:, i], norms)
            else:  # the incomplete last chunk is only read
                read = self.fast.apply(Q[:, i], self.fast.plain_linear(params))
            reads.append(read)
        out = torch.stack(reads, 1).reshape(batch, heads, layout.length, -1).transpose(1, 2)
        out = layout.scatter(out)[:, total - new_len:]
        if state is not None:
            store_state(state, self.prefix, heads, params, previous, tokens, layout, c)
        return out


def naive_large_chunk(memory: LargeChunkMemory, q, k, v, gates, mask=None):
    """Reference for :class:`LargeChunkMemory`: per row, chunks of its real tokens; each token reads
    the chunk-start weights; autograd gradients of each token's loss, weighted by its lrs and summed
    over the chunk, then :func:`chunk_update`. Returns outputs (B, T, H, d)."""
    fast, c, names = memory.fast, memory.chunk_size, memory.fast.weight_names
    batch, length, heads = q.shape[:3]
    outs = inner(q.new_zeros(batch, length, heads, v.shape[-1]))
    for row in range(batch):
        idx = (torch.arange(length) if mask is None else mask[row].nonzero()[:, 0]).tolist()
        params = fast.initial_params(1)
        norms = memory._norms(params)
        previous = {n: torch.zeros_like(w) for n, w in params.items()} if memory.use_momentum else None
        for lo in range(0, len(idx), c):
            chunk = idx[lo: lo + c]
            start = {n: w if w.requires_grad else w.detach().requires_grad_(True) for n, w in params.items()}
            for t in chunk:
                outs[row, t] = fast.apply(inner(q[row, t])[:, None], fast.plain_linear(start))[:, 0]
            if len(chunk) < c:
                break
            update = {n: torch.zeros_like(w) for n, w in start.items()}
            for t in chunk:
                with torch.enable_grad():
                    y = fast.apply(inner(k[row, t])[:, None], fast.plain_linear(start))
                    loss = memory.objective.loss(y, inner(v[row, t])[:, None], {}).sum()
                    g = torch.autograd.grad(loss, [start[n] for n in names], create_graph=True)
                for j, name in enumerate(names):
                    update[name] = update[name] - inner(gates["lr"][row, t, :, j])[:, None, None] * g[j]
            mean = inner(gates["momentum"][row, chunk]).mean(0) if memory.use_momentum else None
            params, previous = chunk_update(start, update, previous, mean, norms, memory.use_muon)
    return outs
