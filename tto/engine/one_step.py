"""Non-causal one-step memory (ViT³: "Unlocking Test-Time Training in Vision", arXiv:2512.01643).

The whole sequence (an image's N tokens) is one chunk, read after its own update: from the learned
initial weights ``W_0``, one gradient step on every (k_n, v_n) pair, each token's loss weighted by
``weight`` (ViT³: ``scale / N``, the mean over tokens)::

    g   = weight sum_n grad_W l(f(k_n; W_0), v_n)      one outer product x^T delta per linear layer
    g  <- g / (||g|| + 1)                                gradient normalisation (optional): the norm of
                                                         each output column over the input axis
    W_1 = W_0 - lr g
    o_n = f(q_n; W_1)                                    every query reads the updated weights

No mask, no momentum, no decay, no state carried between calls: a token's output depends on every
token (bidirectional). The fast path back-propagates the objective's gradient by hand
(:meth:`FastModel.forward_backward`) in one batched matmul per layer; :func:`naive_one_step` is the
reference: per row and token, autograd gradients summed, normalised column by column, sharing no
update code with the fast path. Inner arithmetic is float32 (float64 for a float64 model).
"""

from __future__ import annotations

import torch

from ..reference import in_reference_mode
from .chunkwise import Float32Parameters
from .fast_models import FastModel, autocast_off, upcast
from .objectives import Objective


class OneStepMemory(Float32Parameters):
    """forward(q, k, v, weight) -> reads (B, T, H, d); q, k, v (B, T, H, d), weight: the loss weight
    of every token (a float). ``lr``: the inner step size; ``normalize_grad``: g / (||g|| + 1)."""

    def __init__(self, fast: FastModel, objective: Objective, *, lr: float, normalize_grad: bool):
        super().__init__()
        self.fast, self.objective, self.lr, self.normalize_grad = fast, objective, lr, normalize_grad

    def forward(self, q, k, v, weight) -> torch.Tensor:
        with autocast_off(q.device.type):
            if in_reference_mode():
                return naive_one_step(self, q, k, v, weight)
            return self._step_and_read(q, k, v, weight)

    def _step_and_read(self, q, k, v, weight) -> torch.Tensor:
        batch, length, heads = q.shape[:3]
        rows = lambda t: upcast(t).transpose(1, 2).reshape(batch * heads, length, -1)  # noqa: E731  (N, T, d)
        q, k, v = rows(q), rows(k), rows(v)
        params = self.fast.initial_params(batch)
        grads = self.fast.forward_backward(params, k, lambda y: weight * self.objective.grad(y, v, {}))
        for name, x, delta in grads:
            g = x.transpose(-1, -2) @ delta
            if self.normalize_grad:
                g = g / (g.norm(dim=-2, keepdim=True) + 1.0)
            params[name] = params[name] - self.lr * g
        out = self.fast.apply(q, self.fast.plain_linear(params))
        return out.reshape(batch, heads, length, -1).transpose(1, 2)


def naive_one_step(memory: OneStepMemory, q, k, v, weight) -> torch.Tensor:
    """Reference for :class:`OneStepMemory` from its equations: per row and head, the autograd
    gradient of each token's weighted loss at the initial weights, summed; each column divided by its
    norm plus one; one step; every query read at the stepped weights. Returns (B, T, H, d)."""
    fast = memory.fast
    batch, length, heads = q.shape[:3]
    initial = fast.initial_params(1)
    outs = upcast(q.new_zeros(batch, length, heads, v.shape[-1]))
    for row in range(batch):
        for head in range(heads):
            start = {n: w[head: head + 1] for n, w in initial.items()}
            start = {n: w if w.requires_grad else w.detach().requires_grad_(True) for n, w in start.items()}
            total = {n: torch.zeros_like(w) for n, w in start.items()}
            for t in range(length):
                with torch.enable_grad():
                    y = fast.apply(upcast(k[row, t, head])[None, None], fast.plain_linear(start))
                    loss = weight * memory.objective.loss(y, upcast(v[row, t, head])[None, None], {}).sum()
                    grads = torch.autograd.grad(loss, [start[n] for n in fast.weight_names], create_graph=True)
                for name, g in zip(fast.weight_names, grads):
                    total[name] = total[name] + g
            stepped = {}
            for name, g in total.items():
                columns = [g[..., j] / (torch.sqrt((g[..., j] ** 2).sum()) + 1.0) if memory.normalize_grad else g[..., j]
                           for j in range(g.shape[-1])]
                stepped[name] = start[name] - memory.lr * torch.stack(columns, dim=-1)
            for t in range(length):
                outs[row, t, head] = fast.apply(upcast(q[row, t, head])[None, None], fast.plain_linear(stepped))[0, 0]
    return outs
