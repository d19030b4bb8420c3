"""TTT-E2E's inner loop (arXiv 2512.23675): the prime MLPs of the last blocks learn the context by
the model's own next-token loss, one SGD step per mini-batch of b tokens.

Unlike the memory mixers' per-layer loops this one is model-level: the loss of a mini-batch is the
cross-entropy of the full model's logits, so a step needs every suffix block, the final norm and
the LM head. The backbone runs the blocks below the first prime layer as usual and hands the rest to
:func:`run_suffix`, which for each mini-batch in order

1. runs the suffix blocks on it with the prime weights adapted on all earlier mini-batches, every
   attention window carried across mini-batches with its autograd graph (apply),
2. then takes the gradient of the mini-batch's mean next-token cross-entropy with respect to the
   prime weights, clips it to a global norm over all prime layers and steps (update).

With grad enabled (training) the steps keep their graph (``create_graph``), so the LM loss of the
outputs is the meta-learning objective: each mini-batch scored under weights adapted on the ones
before it, differentiated through the inner steps. Each row has its own prime weights. Mini-batches
are aligned on token positions (a mini-batch starts at each real token whose position is a multiple
of b), so padding does not move them; a row's step happens when the token after its mini-batch
arrives (that token is the mini-batch's last target).

Decoding continues a sequence across calls through the layers' cache states: the adapted weights
(``prime.*``, (B, out, in)), the suffix attention windows and the first suffix block's inputs of
each row's unfinished mini-batch (``e2e.*``). A call re-runs that unfinished mini-batch with the new
tokens when a row steps in that call, so the step sees the whole mini-batch with its graph; other
calls read their tokens against the cached windows. Decoding thus re-reads b tokens of the suffix
once per b tokens (exact; not the paper's decode kernel). A call in which no row steps, outside
autograd (decoding between two steps: :func:`_read_between_steps`), needs no graph and no loss: its
tokens read the stored prime weights, and the windows and the unfinished mini-batch grow in place
(:func:`tto.cache.appended`), so its cost does not grow with the window.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from ..cache import Context, appended
from ..layers.mlp import SwiGLU
from .chunkwise import Float32Parameters
from .fast_models import autocast_off, upcast

#: cache keys of a prime layer's adapted weights, in the order SwiGLU.forward takes them
PRIME_KEYS = ("prime.gate_proj", "prime.up_proj", "prime.down_proj")
#: cache keys (first suffix layer) of each row's unfinished mini-batch: suffix inputs, token ids,
#: real-token mask, positions, and the number of trailing slots that belong to it per row
PENDING_KEYS = ("e2e.h", "e2e.ids", "e2e.mask", "e2e.pos")
PENDING_COUNT = "e2e.count"


class PrimeMLP(Float32Parameters, SwiGLU):
    """A prime SwiGLU MLP: its weights are the inner loop's initial weights, so they stay float32
    under a bf16 cast like every memory's, and it reads in float32 (float64 for float64 inputs) with
    autocast off: x (B, T, hidden) -> (B, T, hidden) in x's dtype, the (adapted) weights' gradients float32."""

    def forward(self, x, weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
        with autocast_off(x.device.type):
            return super().forward(upcast(x), weights).to(x.dtype)


@dataclass(frozen=True)
class InnerLoop:
    """mini_batch_size: tokens per inner step (b); lr: SGD step size of the prime weights (0: the
    SWA transformer); grad_clip: global norm the inner gradient is clipped to, per row over all prime
    layers (None: no clipping); remat: under grad, keep only each mini-batch's inputs for the
    backward and recompute the rest (torch.utils.checkpoint), as the official per-mini-batch remat."""

    mini_batch_size: int
    lr: float
    grad_clip: float | None
    remat: bool = True


def _matrix(linear: nn.Module) -> torch.Tensor:
    """The (out, in) matrix a bias-free linear map computes, as its map of the identity: the weight
    itself for nn.Linear (exactly), base plus adapter for a peft LoRA-wrapped one. Outside autocast,
    so the adapted weights start, step and are cached in the weights' dtype (float32 at least: a
    :class:`PrimeMLP`'s)."""
    weight = linear.weight
    with autocast_off(weight.device.type):
        return linear(torch.eye(weight.shape[1], dtype=weight.dtype, device=weight.device)).T


def _initial_weights(blocks, states, batch: int) -> list[list[list[torch.Tensor]]]:
    """Per layer, per (gate, up, down): one tensor per row (out, in), each its own autograd node:
    views of the prime MLP's matrices (a new sequence), or of the weights adapted so far (the cache)."""
    weights = []
    for block, state in zip(blocks, states or [None] * len(blocks)):
        if state is not None and PRIME_KEYS[0] in state:
            stored = [state[key] for key in PRIME_KEYS]
        else:
            params = [_matrix(m) for m in (block.prime.gate_proj, block.prime.up_proj, block.prime.down_proj)]
            stored = [p.unsqueeze(0).expand(batch, *p.shape) for p in params]
        rows = [list(w.unbind(0)) for w in stored]
        weights.append([[r if r.requires_grad and torch.is_grad_enabled() else r.detach().requires_grad_()
                         for r in layer] for layer in rows])
    return weights


def _stacked(layer: list[list[torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.stack(rows) for rows in layer)


def _step(weights, loss, rows: list[int], loop: InnerLoop, create_graph: bool):
    """One SGD step of the prime weights of `rows` on their losses `loss` (B,) (each row's own
    weights get the gradient of its own loss only); returns the new weights."""
    inputs = [per_row[r] for layer in weights for per_row in layer for r in rows]
    # rows whose mini-batch continues may still need this graph (rows start mini-batches at different slots)
    grads = torch.autograd.grad(loss[rows].sum(), inputs, create_graph=create_graph, retain_graph=True)
    new = [[list(per_row) for per_row in layer] for layer in weights]
    for i, r in enumerate(rows):
        g = grads[i :: len(rows)]
        scale = 1.0
        if loop.grad_clip is not None:
            norm = torch.sqrt(sum((x * x).sum() for x in g))
            scale = loop.grad_clip / norm.clamp_min(loop.grad_clip)
        for k, per_row in enumerate(per_row for layer in new for per_row in layer):
            step = loop.lr * scale * g[k]
            per_row[r] = per_row[r] - step if create_graph else (per_row[r] - step).detach().requires_grad_()
    return new


KV_KEYS = ("k", "v", "pos", "valid")


def _mini_batch(blocks, seg: Context, head, check, has_kv: list[bool], n_targets: int, ending: list[int],
                loop: InnerLoop, create_graph: bool, x, targets, ok, loss_sum, count, *tensors):
    """Apply, then update, over one segment x (B, n, hidden) of the slots between mini-batch starts.

    The suffix blocks run with the per-row prime weights and the attention windows in `tensors`
    (B x 3 per block, then 4 per block that has a window); the next-token cross-entropy of the first
    `n_targets` slots (masked by `ok`) is added to each row's running sum `loss_sum` (B,); the rows in
    `ending`, whose mini-batch ends with this segment, take an SGD step on their mean loss (sum /
    `count`, the mini-batch's targets) and restart their sum. Returns the output, the sums, the
    weights and every block's window. With `create_graph` the outer gradient will differentiate the
    inner one, so the attention runs in SDPA's math kernel (the fused kernels have no double backward)."""
    batch, n_blocks = x.shape[0], len(blocks)
    flat, kv = tensors[: 3 * batch * n_blocks], list(tensors[3 * batch * n_blocks :])
    weights = [[list(flat[(3 * i + j) * batch : (3 * i + j + 1) * batch]) for j in range(3)] for i in range(n_blocks)]
    out_kv = []
    with sdpa_kernel(SDPBackend.MATH) if create_graph else contextlib.nullcontext():
        for i, block in enumerate(blocks):
            state = dict(zip(KV_KEYS, [kv.pop(0) for _ in KV_KEYS])) if has_kv[i] else {}
            x = block(x, seg, state, prime_weights=_stacked(weights[i]))
            check(x, i)
            out_kv += [state[key] for key in KV_KEYS]
    ce = F.cross_entropy(head(x[:, :n_targets]).flatten(0, 1), targets.flatten(), reduction="none")
    loss_sum = loss_sum + (ce.view(ok.shape) * ok).sum(1)
    if ending:
        weights = _step(weights, loss_sum / count.clamp_min(1), ending, loop, create_graph)
        restart = torch.zeros_like(loss_sum, dtype=torch.bool)
        restart[ending] = True
        loss_sum = torch.where(restart, 0.0, loss_sum)
    return x, loss_sum, *[w for layer in weights for per_row in layer for w in per_row], *out_kv


def run_suffix(blocks: Sequence[nn.Module], h: torch.Tensor, ctx: Context, input_ids: torch.Tensor,
               states: list[dict] | None, head: Callable[[torch.Tensor], torch.Tensor], loop: InnerLoop,
               check: Callable[[torch.Tensor, int], None]) -> torch.Tensor:
    """The suffix blocks (those from the first prime layer up) over h (B, T, hidden), their prime
    MLPs adapting on `input_ids` (B, T) as described above; `head` maps hidden states to logits
    (final norm and LM head). `states`: the suffix layers' cache dicts (None: no cache); `check(x, i)`
    is called on suffix block i's output. Returns the last block's output (B, T, hidden)."""
    b = loop.mini_batch_size
    batch, t = input_ids.shape
    dev = h.device
    mask = ctx.mask if ctx.mask is not None else torch.ones(batch, t, dtype=torch.bool, device=dev)
    create_graph = torch.is_grad_enabled()
    first = states[0] if states is not None else {}

    # the unfinished mini-batch of each row (its last `pending` slots), re-read in front of the new tokens
    n_old = first[PENDING_KEYS[0]].shape[1] if PENDING_KEYS[0] in first else 0
    pending = first.get(PENDING_COUNT, torch.zeros(batch, dtype=torch.long, device=dev))
    if int(pending.max()) > b:
        raise ValueError(f"a row's unfinished mini-batch spans {int(pending.max())} slots > mini_batch_size={b}: "
                         "the cache continues a sequence with padding inside (pad on the left, before the first call)")
    new_starts = mask & (ctx.positions % b == 0)  # (B, t): a row's mini-batch starts here
    if (not create_graph and not bool(new_starts.any()) and states is not None
            and all(PRIME_KEYS[0] in state for state in states)):
        return _read_between_steps(blocks, h, ctx, input_ids, mask, states, check, b, pending)
    if n_old:
        old_h, old_ids, old_mask, old_pos = (first[key] for key in PENDING_KEYS)
        mine = torch.arange(n_old, device=dev)[None, :] >= (n_old - pending)[:, None]
        hx = torch.cat([old_h.to(h.dtype), h], 1)
        ids = torch.cat([old_ids, input_ids], 1)
        mask_x = torch.cat([old_mask & mine, mask], 1)
        pos = torch.cat([old_pos, ctx.positions], 1)
    else:
        hx, ids, mask_x, pos = h, input_ids, mask, ctx.positions
    total = n_old + t

    starts = F.pad(new_starts, (n_old, 0))  # (B, total); the unfinished mini-batches' own starts were stepped before
    # a call in which no row steps reads its new tokens against the cached windows as they are (the
    # unfinished mini-batches' slots there were computed with the current weights); one in which a
    # row steps re-reads them, so the step differentiates the whole mini-batch
    reread = n_old if bool(starts.any()) else 0
    local, kept = [], []
    for state in states or [None] * len(blocks):
        if state is None or "k" not in state:
            local.append({})
            kept.append(None)
            continue
        valid = state.get("valid")
        valid = valid if valid is not None else torch.ones_like(state["pos"], dtype=torch.bool)
        slots = valid.shape[1]
        fresh = torch.arange(slots, device=dev)[None, :] >= (slots - (pending if reread else torch.zeros_like(pending)))[:, None]
        local.append({"k": state["k"], "v": state["v"], "pos": state["pos"], "valid": valid & ~fresh})
        kept.append({"k": state["k"], "v": state["v"], "pos": state["pos"], "valid": valid})
    cuts = sorted({n_old - reread, *starts.any(0).nonzero().flatten().tolist(), total})
    target_ok = torch.zeros_like(mask_x)
    target_ok[:, :-1] = mask_x[:, :-1] & mask_x[:, 1:]

    weights = _initial_weights(blocks, states, batch)
    flat = [w for layer in weights for per_row in layer for w in per_row]
    loss_sum = torch.zeros(batch, dtype=torch.float32 if h.dtype in (torch.float16, torch.bfloat16) else h.dtype,
                           device=dev)
    count = torch.zeros(batch, dtype=torch.long, device=dev)
    outputs, new_kv = [], [[] for _ in blocks]
    for a, z in zip(cuts, cuts[1:]):
        seg = Context(mask=mask_x[:, a:z], positions=pos[:, a:z], differentiable_state=True)
        hi = min(z, total - 1)  # slots of the segment whose target is known
        ok = target_ok[:, a:hi]
        count = count + ok.sum(1)
        # rows whose next mini-batch starts at z, with targets in theirs, step now
        ending = (starts[:, z] & (count > 0)).nonzero().flatten().tolist() if z < total else []
        run = functools.partial(_mini_batch, blocks, seg, head, check, [bool(st) for st in local], hi - a, ending,
                                loop, create_graph)
        kv = [st[key] for st in local if st for key in KV_KEYS]
        args = (hx[:, a:z], ids[:, a + 1 : hi + 1], ok, loss_sum, count, *flat, *kv)
        with torch.enable_grad():  # the inner step needs a graph even when the caller has none
            # per-mini-batch rematerialisation: only the segment's inputs are kept for the backward
            x, loss_sum, *rest = checkpoint(run, *args, use_reentrant=False) if loop.remat and create_graph else run(*args)
        if z < total:
            count = torch.where(starts[:, z], 0, count)
        flat, kv = rest[: len(flat)], rest[len(flat) :]
        local = [dict(zip(KV_KEYS, kv[i * 4 : i * 4 + 4])) for i in range(len(blocks))]
        new = z - max(a, n_old)
        if new > 0:
            for i, st in enumerate(local):
                new_kv[i].append({"k": st["k"][:, :, -new:], "v": st["v"][:, :, -new:],
                                  "pos": st["pos"][:, -new:], "valid": st["valid"][:, -new:]})
        outputs.append(x if create_graph else x.detach())
    weights = [[list(flat[(3 * i + j) * batch : (3 * i + j + 1) * batch]) for j in range(3)] for i in range(len(blocks))]
    out = torch.cat(outputs, 1)[:, reread:]

    if states is not None:
        _store(blocks, states, weights, kept, new_kv, starts, n_old, hx, ids, mask_x, pos, pending)
    return out


def _read_between_steps(blocks, h, ctx: Context, input_ids, mask, states: list[dict], check, b: int,
                        pending: torch.Tensor) -> torch.Tensor:
    """A call in which no row steps, outside autograd (decoding between two steps): the suffix blocks
    read h (B, t, hidden) with the stored prime weights against the cached windows, which grow in
    place, and the new slots join each row's unfinished mini-batch in place. No loss is taken: the
    call that ends the mini-batch re-reads it with its graph. `pending` (B,): each row's slots of its
    unfinished mini-batch before the call. Returns the last block's output."""
    seg = Context(mask=ctx.mask, positions=ctx.positions)  # a state without graph: windows grow in place
    x = h
    for i, (block, state) in enumerate(zip(blocks, states)):
        kv = {key: state[key] for key in KV_KEYS if key in state}
        x = block(x, seg, kv, prime_weights=tuple(state[key] for key in PRIME_KEYS))
        check(x, i)
        state.update(kv)
    first = states[0]
    count = torch.where(pending > 0, pending + h.shape[1], 0)  # slots since each row's last mini-batch start
    n = int(count.max())
    for key, new in zip(PENDING_KEYS, (h, input_ids, mask, ctx.positions)):
        joined = appended(first.get(key), new, 1, b)
        first[key] = joined.narrow(1, joined.shape[1] - n, n)
    first[PENDING_COUNT] = count
    return x


def _store(blocks, states, weights, kept, new_kv, starts, n_old, hx, ids, mask_x, pos, pending) -> None:
    """Write the adapted weights, the attention windows grown by the new slots and each row's
    unfinished mini-batch into the cache states (detached)."""
    total = hx.shape[1]
    dev = hx.device
    for state, layer, old, new, block in zip(states, weights, kept, new_kv, blocks):
        for key, rows in zip(PRIME_KEYS, layer):
            state[key] = torch.stack(rows).detach()
        pieces = ([old] if old is not None else []) + new
        keep = block.mixer.max_cached  # the window (k - 1) plus an unfinished mini-batch (up to b)
        for key, dim in (("k", 2), ("v", 2), ("pos", 1), ("valid", 1)):
            joined = torch.cat([p[key] for p in pieces], dim)
            if keep is not None:  # None: full attention keeps every slot
                joined = joined.narrow(dim, max(0, joined.shape[dim] - keep), min(keep, joined.shape[dim]))
            state[key] = joined.detach()
    # slots since each row's last mini-batch start (an old start lies n_old - count before the new tokens)
    slot = torch.arange(total, device=dev)
    old_start = torch.where(pending > 0, n_old - pending, -1)
    last_start = torch.where(starts, slot, -1).amax(1).maximum(old_start)
    count = torch.where(last_start >= 0, total - last_start, 0)
    n = int(count.max())
    first_state = states[0]
    for key, value in zip(PENDING_KEYS, (hx, ids, mask_x, pos)):
        first_state[key] = value[:, total - n:].detach()
    first_state[PENDING_COUNT] = count
