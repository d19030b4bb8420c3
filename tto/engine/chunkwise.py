"""The engine base every memory shares (:class:`ChunkwiseMemory`): the dtype / autocast /
reference switch, the chunked layout of the tokens with padding and pending tokens
(:mod:`tto.engine.layout`), the decoding state, the scan over chunks through one step
(``_chunk``, optionally compiled), float32 parameters, and statistics of the inner loop for
monitoring (:meth:`ChunkwiseMemory.inner_stats`). An engine plugs in what a chunk does: its
initial fast weights, its scan and its naive reference.

Float32 (:class:`Float32Parameters`): a memory's parameters (the fast model's initial weights, its
LayerNorm, the inner optimizer's; TTT-E2E's prime MLPs) stay float32 when the model is cast to a
lower precision (``model.to(torch.bfloat16)``, ``.half()``; loading with
``from_pretrained(dtype=torch.bfloat16)`` keeps them float32 too), and the engines run their inner
arithmetic in float32 with autocast off. bf16 fast weights drift: a
bf16 state lost the float32 run's result within 10,000 updates (``tests/test_finetune.py``).

Non-causal calls (:func:`noncausal`): inside the context every engine call reads its tokens as one
whole chunk, bidirectionally. The chunk's update is computed from all its keys and values (for
:class:`tto.engine.Memory`: its own commit from the gradients at the start weights, with its
optimizer, gates, step bound and retention) and every query reads the committed, chunk-end weights.
This is how a causal memory type runs as an image mixer (:mod:`tto.mixers.memory_vit`). An engine
that has no such commit says why in :attr:`ChunkwiseMemory.causal_only` and refuses the call."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..reference import in_reference_mode
from .fast_models import autocast_off, upcast
from .layout import (Layout, append_pending, detached, heads_first, load_cache, load_state, prepend_pending, store_state,
                     store_weights, tokens_first)


#: graphs ``torch.compile`` may keep for one step function: every engine configuration (fast model,
#: optimizer, objective), grad mode and shape family adds one, and all instances of an engine share
#: the function; past dynamo's default limit (8) the remaining calls would run eager
RECOMPILE_LIMIT = 64


_NONCAUSAL = False


@contextmanager
def noncausal() -> Iterator[None]:
    """Every engine call inside reads its tokens as one chunk, each query at the chunk-end weights
    (module docstring); calls take no mask, state or chunk-start reads."""
    global _NONCAUSAL
    previous, _NONCAUSAL = _NONCAUSAL, True
    try:
        yield
    finally:
        _NONCAUSAL = previous


def in_noncausal_mode() -> bool:
    return _NONCAUSAL


def _tokens(x, shape: tuple, index):
    """A forward argument (or a dict of them) with its token tensors, those whose leading dims are
    `shape` (B, T), indexed by ``t[index]``; other values as they are."""
    if isinstance(x, dict):
        return {n: _tokens(t, shape, index) for n, t in x.items()}
    is_tokens = isinstance(x, torch.Tensor) and x.dim() >= 2 and tuple(x.shape[:2]) == tuple(shape)
    return x[index] if is_tokens else x


class Float32Parameters(nn.Module):
    """A module holding inner-loop (fast-weight) parameters: module casts (``.to``, ``.half``,
    ``.bfloat16``, ...) move its parameters and buffers to their new device but never below float32
    (float64 stays float64), and ``TTOPreTrainedModel`` loads them float32 under any ``dtype``."""

    def _apply(self, fn, recurse=True):
        def keep_float32(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if out.is_floating_point() and torch.finfo(out.dtype).bits < 32:
                return t.to(device=out.device, dtype=torch.promote_types(t.dtype, torch.float32))
            return out

        return super()._apply(keep_float32, recurse)


class ChunkwiseMemory(Float32Parameters):
    """Base class of the memory engines (module docstring).

    forward(q, k, v (B, T, H, d), gates {name: (B, T, H, ...)}, mask (B, T) or None, state,
    read_start) -> reads (B, T, H, d_v); with ``read_start=True`` the pair (reads, reads of the
    chunk-start weights); with ``read_start="only"`` the chunk-start reads alone (an engine that
    :attr:`skips_updated_reads` then computes no read of the updated weights). Inner arithmetic runs in float32 (float64 for float64 inputs), autocast
    off; under :func:`tto.reference.reference_mode` the engine's naive reference runs instead.

    A subclass sets ``chunk_size``, ``prefix`` (its state keys' prefix) and ``has_momentum``, and
    defines :meth:`param_names`, :meth:`initial_weights`, :meth:`_scan` (calling :attr:`step`, its
    ``_chunk``, per chunk), :meth:`naive` and, unless it ``commits_incomplete_chunk``,
    :meth:`_read_chunk` (a call that completes no chunk, e.g. decoding one token).
    """

    chunk_size: int
    prefix: str
    has_momentum: bool = False
    #: every token takes an exact step (the delta rule): an incomplete last chunk commits, with its
    #: pad slots as identity steps, and nothing is kept pending
    commits_incomplete_chunk: bool = False
    #: the scan can also return the reads of the chunk-start weights (``read_start``)
    reads_chunk_start: bool = False
    #: with ``read_start="only"`` the scan and the read-only chunks get "only" and return the
    #: chunk-start reads alone (B * H, n, C, d_v), computing only those and the commits; an engine
    #: without it computes both reads (``read_start=True``) and the updated ones are dropped
    skips_updated_reads: bool = False
    #: tokens before each chunk that its step also reads (ATLAS' Omega window), and which of the
    #: token tensors: the chunks then hold ``prev.<name>`` (B * H, n, lookback, ...) beside them, and
    #: the state keeps the last ``lookback`` tokens of the committed chunks (``window.<name>``)
    lookback: int = 0
    lookback_names: tuple[str, ...] = ()
    #: why the engine cannot run non-causally (:func:`noncausal`), or None when it can: it then
    #: defines :meth:`naive_noncausal` and its :meth:`_scan` takes ``read_start="end"``
    causal_only: str | None = ("only the shared chunkwise engine (tto.engine.Memory) commits a whole chunk from the "
                               "gradients at its start weights, which the non-causal read needs")

    def __init__(self):
        super().__init__()
        self._compiled_chunk = None

    def compile_step(self) -> None:
        """Run every chunk's step through ``torch.compile``: its elementwise work fuses into a few
        kernels. Each new input shape, dtype or grad mode compiles once."""
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        self._compiled_chunk = torch.compile(self._chunk)

    @property
    def step(self):
        """The per-chunk step: ``_chunk``, compiled after :meth:`compile_step`."""
        return self._compiled_chunk or self._chunk

    # ------------------------------------------------------------------ what an engine plugs in
    def param_names(self) -> list[str]:
        """Names of the fast weights (the state's ``W.<name>`` keys)."""
        raise NotImplementedError

    def initial_weights(self, tokens: dict) -> tuple[dict, dict | None]:
        """Fast weights (and momentum, or None) at the start of a sequence, (B * H, ...) each, for
        `tokens` {"q", "k", "v": (B, T, H, d)} in the inner dtype."""
        raise NotImplementedError

    def _scan(self, params: dict, momentum: dict | None, carried: dict, chunks: dict, valid: torch.Tensor,
              n_commit: int, read_start: bool | str) -> tuple[torch.Tensor, dict, dict | None, dict]:
        """Run all chunks: `chunks` {"q", "k", "v", "gate.<name>"} (B * H, n, C, ...), `valid`
        (B * H, n, C); the first `n_commit` chunks update the weights, the rest are only read.
        `carried`: the values the engine carries from commit to commit beside the weights ({name:
        (B * H,)}, empty for a new sequence; :mod:`tto.engine.layout`). Returns (reads (B * H, n, C,
        d_v), or (B * H, n, 2, C, d_v) with the chunk-start reads second, the committed params,
        momentum, carried values). ``read_start="end"`` (a non-causal call, engines without
        :attr:`causal_only`): each chunk's queries read the weights it commits."""
        raise NotImplementedError

    def _read_chunk(self, params: dict, momentum: dict | None, chunk: dict, valid: torch.Tensor, first: int,
                    read_start: bool | str, cache: dict | None = None) -> torch.Tensor:
        """The reads of one read-only chunk's slots from `first` on (the earlier ones are pending
        tokens already read): `chunk` {"q", "k", "v", "gate.<name>"} (B * H, L, ...), `valid`
        (B * H, L). Returns (B * H, L - first, d_v), or (B * H, 2, L - first, d_v) with the
        chunk-start reads second. Nothing is committed.

        `cache` (when the chunk's slots are the pending tokens, all real, then the new ones): a dict
        of per-slot values (B * H, slots, ...) that depend only on their own slot's tokens and the
        committed weights. It holds what this method put in it at the previous call of this chunk,
        for the slots before `first` (empty at the chunk's first call, or when the state was
        written otherwise); on return it holds them for all L slots, or nothing, and the next call
        gets them back."""
        raise NotImplementedError

    def reads_pending(self, read_start: bool | str) -> bool:
        """Whether a read-only chunk's reads of its new queries depend on its pending tokens (the
        dual form reads weights updated by them); when not, a decoding step takes the new tokens
        alone and its cost does not grow with the pending ones."""
        return True

    def naive(self, q, k, v, gates: dict, mask: torch.Tensor | None, read_start: bool):
        """The slow reference of the whole forward (no state): reads (B, T, H, d_v), or the pair
        with ``read_start``. It shares no update code with the scan."""
        raise NotImplementedError

    def naive_noncausal(self, q, k, v, gates: dict) -> torch.Tensor:
        """The slow reference of a non-causal call: reads (B, T, H, d_v) of the weights committed
        after one chunk of all T tokens."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the pipeline
    def forward(self, q, k, v, gates: dict[str, torch.Tensor], mask: torch.Tensor | None = None,
                state: dict | None = None, read_start: bool | str = False):
        if read_start not in (False, True, "only"):
            raise ValueError(f"read_start must be False, True or 'only', not {read_start!r}")
        if read_start and not self.reads_chunk_start:
            raise ValueError(f"{type(self).__name__} has no chunk-start reads (read_start={read_start!r})")
        out_dtype = q.dtype
        only = read_start == "only"
        if in_noncausal_mode():  # under autocast the float32 reads, as the image types' memories return them
            self._check_noncausal(mask, state, read_start)
            autocast = torch.is_autocast_enabled(q.device.type)
            with autocast_off(q.device.type):
                reads = self.naive_noncausal(q, k, v, gates) if in_reference_mode() else self._whole(q, k, v, gates)
            return reads if autocast else reads.to(out_dtype)
        with autocast_off(q.device.type):
            if in_reference_mode():
                if state is not None:
                    raise RuntimeError("the naive reference does not keep a decoding state")
                reads = self.naive(q, k, v, gates, mask, bool(read_start))
            else:
                reads = self._pipeline(q, k, v, gates, mask, state,
                                       True if only and not self.skips_updated_reads else read_start)
        if only and isinstance(reads, tuple):
            reads = reads[1]
        return tuple(r.to(out_dtype) for r in reads) if isinstance(reads, tuple) else reads.to(out_dtype)

    def _check_noncausal(self, mask, state, read_start) -> None:
        name = type(self).__name__
        if self.causal_only is not None:
            raise ValueError(f"{name} cannot run non-causally: {self.causal_only}")
        if read_start:
            raise ValueError(f"{name}: a non-causal call has no chunk-start reads (read_start={read_start!r}): its one "
                             "chunk starts at the initial weights, which do not depend on the tokens")
        if mask is not None or state is not None:
            raise ValueError(f"{name}: a non-causal call reads whole sequences, with no padding mask and no state")

    def _whole(self, q, k, v, gates) -> torch.Tensor:
        """A non-causal call: all T tokens as one committed chunk, read at its end (``read_start="end"``).
        Reads (B, T, H, d_v)."""
        batch, total, heads = q.shape[:3]
        tokens = {"q": upcast(q), "k": upcast(k), "v": upcast(v), **{"gate." + n: upcast(g) for n, g in gates.items()}}
        params, momentum = self.initial_weights(tokens)
        earlier = {n: tokens[n].new_zeros(batch, self.lookback, *tokens[n].shape[2:]) for n in self.lookback_names}
        layout = Layout.build(None, total, batch, total, q.device)
        chunks, _ = self._chunked(layout, tokens, earlier)
        reads, *_ = self._scan(params, momentum, {}, chunks, layout.chunk_valid(heads), layout.n_commit, "end")
        return layout.tokens(reads)

    def _pipeline(self, q, k, v, gates, mask, state, read_start: bool | str):
        """Load the state, put its pending tokens in front, lay the tokens out in chunks, scan,
        scatter the reads back to the new tokens and store the state. The pair of reads with
        ``read_start=True``, one tensor otherwise."""
        batch, new_len, heads = q.shape[:3]
        tokens = {"q": upcast(q), "k": upcast(k), "v": upcast(v), **{"gate." + n: upcast(g) for n, g in gates.items()}}
        loaded = load_state(state, self.prefix, self.param_names(), self.has_momentum)
        valid = mask
        if loaded is None:
            params, momentum = self.initial_weights(tokens)
            earlier = {n: tokens[n].new_zeros(batch, self.lookback, *tokens[n].shape[2:]) for n in self.lookback_names}
            carried, pending, n_pending = {}, {}, None
        else:
            params, momentum, carried, pending, n_pending = loaded
        held = pending["q"].shape[1] if pending else 0
        if (mask is None and not self.commits_incomplete_chunk and not self.lookback_names
                and held + new_len < self.chunk_size and (n_pending is None or bool((n_pending == held).all()))):
            return self._append(params, momentum, tokens, pending, state, read_start, loaded is None)
        if loaded is not None:
            tokens, valid = prepend_pending(tokens, pending, n_pending, mask)
            earlier = {n: state[self.prefix + "window." + n] for n in self.lookback_names}
        total = tokens["q"].shape[1]
        # an engine of exact steps gives the same outputs at any chunk size: a short call (decoding one
        # token) runs one chunk of its own length instead of padding to a whole chunk
        chunk_size = max(1, min(self.chunk_size, total)) if self.commits_incomplete_chunk else self.chunk_size
        layout = Layout.build(valid, total, batch, chunk_size, q.device, self.commits_incomplete_chunk)
        if layout.n_chunks == 0:  # every token a pad: nothing to read or write
            reads = tokens["v"].new_zeros(batch * heads, 0, *([2] if read_start is True else []), chunk_size,
                                          tokens["v"].shape[-1])
        elif layout.n_commit == 0:  # a decoding step: one read-only chunk, at its real length, new tokens read
            layout = layout.read_only()
            first = 0 if loaded is None else int(n_pending.min())  # slots of pending tokens in every row
            chunks, earlier = self._chunked(layout, tokens, earlier)
            chunk = {name: t[:, 0] for name, t in chunks.items()}
            reads = self._read_chunk(params, momentum, chunk, layout.chunk_valid(heads)[:, 0], first, read_start)
            reads = F.pad(reads, (0, 0, first, 0))[:, None]
        else:
            chunks, earlier = self._chunked(layout, tokens, earlier)
            reads, params, momentum, carried = self._scan(params, momentum, carried, chunks, layout.chunk_valid(heads),
                                                          layout.n_commit, read_start)
        if state is not None:
            store_state(state, self.prefix, heads, params, momentum, carried, tokens, layout,
                        0 if self.commits_incomplete_chunk else self.chunk_size)
            state.update({self.prefix + "window." + n: detached(t) for n, t in earlier.items()})
        if read_start is True:
            return tuple(layout.tokens(r)[:, total - new_len:] for r in reads.unbind(2))
        return layout.tokens(reads)[:, total - new_len:]

    def _chunked(self, layout: Layout, tokens: dict, earlier: dict) -> tuple[dict, dict]:
        """The tokens in chunks (B * H, n, C, ...), with the :attr:`lookback` slots before each chunk
        as ``prev.<name>``, and the tokens before the first uncommitted chunk (the next `earlier`)."""
        chunks = {name: layout.chunks(t) for name, t in tokens.items()}
        after = {}
        for name, t in earlier.items():
            chunks["prev." + name], after[name] = layout.lookback(tokens[name], t)
        return chunks, after

    def _append(self, params, momentum, tokens: dict, pending: dict, state: dict | None, read_start: bool | str,
                new: bool):
        """A call that completes no chunk and follows no pending tokens but real ones (decoding one
        token without a mask): the layout is the identity, so its chunk is the pending tokens and
        then the new ones, of which only the new ones are read (by the new queries alone where the
        reads do not depend on the pending tokens: :meth:`reads_pending`). The new tokens join the
        pending ones in place (:func:`tto.cache.appended`); the committed weights stay in the
        state as they are (a `new` sequence stores its initial ones), and so do the engine's
        per-token values of the pending tokens (``cache.``)."""
        batch, new_len, heads = tokens["q"].shape[:3]
        if pending and self.reads_pending(read_start):
            held = pending["q"].shape[1]
            chunk = {n: heads_first(torch.cat([pending[n], t], dim=1)) for n, t in tokens.items()}
        else:
            held, chunk = 0, {n: heads_first(t) for n, t in tokens.items()}
        valid = torch.ones(chunk["q"].shape[:2], dtype=torch.bool, device=chunk["q"].device)
        cache = load_cache(state, self.prefix)
        reads = self._read_chunk(params, momentum, chunk, valid, held, read_start, cache)
        if state is not None:
            if new:
                store_weights(state, self.prefix, heads, params, momentum, {})  # nothing carried before a commit
            append_pending(state, self.prefix, heads, tokens, cache, self.chunk_size)
        if read_start is True:
            return tuple(tokens_first(r, batch) for r in reads.unbind(1))
        return tokens_first(reads, batch)

    def restart_rows(self, state: dict, rows: torch.Tensor) -> None:
        """Rows `rows` (B,) bool of `state` continue as new sequences: their fast weights go back to
        the initial ones and their momentum to zero (TNT's local memories at a shard boundary), their
        carried values to NaN (not known). Only where those rows hold no pending real tokens (a chunk
        boundary of theirs); the pending tokens' cached values are dropped. A state without this
        engine's entries is left alone."""
        loaded = load_state(state, self.prefix, self.param_names(), self.has_momentum)
        if loaded is None or not bool(rows.any()):
            return
        params, momentum, carried, pending, n_pending = loaded
        if bool((n_pending[rows] > 0).any()):
            raise ValueError("restart_rows: a restarted row still holds pending tokens (not at a chunk boundary)")
        heads = state[self.prefix + "W." + self.param_names()[0]].shape[1]
        start, start_momentum = self.initial_weights(pending)
        restart = rows.repeat_interleave(heads)
        keep = lambda fresh, old: torch.where(restart.view(-1, *[1] * (old.dim() - 1)), fresh, old)  # noqa: E731
        store_weights(state, self.prefix, heads, {n: keep(start[n], p) for n, p in params.items()},
                      None if momentum is None else {n: keep(start_momentum[n], m) for n, m in momentum.items()},
                      {n: keep(torch.full_like(c, float("nan")), c) for n, c in carried.items()})
        for n, t in pending.items():
            state[self.prefix + "pending." + n] = t
        state[self.prefix + "n_pending"] = n_pending

    # ------------------------------------------------------------------ monitoring
    # Statistics from the engine's own parts; the normal forward pays nothing for them.
    def fast_weights(self, state: dict, call: dict) -> tuple[dict, dict | None]:
        """The committed fast weights (and momentum, or None) that `state` holds, or the initial ones
        when it holds none; tensors (batch * heads, ...). `call`: the forward's arguments by name."""
        loaded = load_state(state, self.prefix, self.param_names(), self.has_momentum)
        if loaded is None:
            return self.initial_weights({n: upcast(call[n]) for n in ("q", "k", "v")})
        return loaded[:2]

    def inner_loss(self, params: dict, call: dict) -> torch.Tensor:
        """Per-token inner loss (batch * heads, T) of the keys and values of `call` at `params`: the
        engine's objective on its fast model's outputs."""
        k, v = heads_first(call["k"]), heads_first(call["v"])
        gates = {n: heads_first(call["gates"][n]) for n in self.objective.gate_names}
        return self.objective.loss(self.fast.apply(k, self.fast.plain_linear(params)), v, gates)

    def gate_values(self, call: dict) -> dict[str, torch.Tensor]:
        """The gates of `call` by the engine's names (``lr``: theta, ``momentum``: eta, ``forget``:
        alpha, ...), each (B, T, heads, ...)."""
        return call["gates"]

    def inner_stats(self, args: tuple, kwargs: dict) -> dict[str, float]:
        """Statistics of the inner loop on one forward call's inputs (as a forward pre-hook sees them),
        replayed chunk by chunk without gradients:

        - ``loss_before`` / ``loss_after``: mean inner loss of each committed chunk's real tokens at
          the weights before / after that chunk's update (the update should lower it); absent
          when no chunk is complete. With padding each row is replayed alone, on its real tokens:
          the engine's chunks of that row;
        - ``weight_norm`` / ``momentum_norm``: Frobenius norm of all fast weights (momentum)
          after the sequence, mean over batch and heads;
        - ``<gate>_gate``: mean of each gate over the real tokens (``lr_gate``, ``momentum_gate``,
          ``forget_gate``, ...).

        Costs about one forward of the layer; meant for log steps only.
        """
        call = inspect.signature(self.forward).bind(*args, **kwargs).arguments
        call.pop("state", None)
        mask = call.pop("mask", None)
        with torch.no_grad():
            if mask is None or bool(mask.all()):
                replays = [self._replay(call)]
            else:  # each row alone, its real tokens only: the engine's chunks of that row
                replays = [self._replay(_tokens(call, call["q"].shape[:2], (slice(r, r + 1), mask[r].bool())))
                           for r in range(mask.shape[0])]
            before, after, count = (sum(r[i] for r in replays) for i in range(3))
            stats = {"loss_before": before / count, "loss_after": after / count} if count > 0 else {}  # else no chunk was committed
            stats["weight_norm"] = torch.cat([r[3] for r in replays]).mean()
            if replays[0][4] is not None:
                stats["momentum_norm"] = torch.cat([r[4] for r in replays]).mean()
            for name, gate in self.gate_values(call).items():
                stats[f"{name}_gate"] = upcast(gate).mean() if mask is None else upcast(gate)[mask.bool()].mean()
        return {n: float(v) for n, v in stats.items()}

    def _replay(self, call: dict) -> tuple:
        """Run `call` (no padding) chunk by chunk through the engine with a state: (sum of the inner
        losses of the committed chunks' tokens before their update, the same after it, their number,
        per (batch * head) norm of the final fast weights, of the final momentum or None)."""
        q = call["q"]
        length, heads = q.shape[1], q.shape[2]
        state, totals = {}, torch.zeros(3, dtype=torch.float64, device=q.device)
        for lo in range(0, length - self.chunk_size + 1, self.chunk_size):  # the committed chunks
            part = _tokens(call, q.shape[:2], (slice(None), slice(lo, lo + self.chunk_size)))
            loss_before = self.inner_loss(self.fast_weights(state, part)[0], part).sum()
            self.forward(**part, state=state)
            loss_after = self.inner_loss(self.fast_weights(state, part)[0], part).sum()
            totals += torch.stack([loss_before.double(), loss_after.double(),
                                   torch.tensor(q.shape[0] * heads * self.chunk_size, device=q.device).double()])
        params, momentum = self.fast_weights(state, call)
        norm = lambda d: torch.stack([upcast(w).flatten(1).pow(2).sum(1) for w in d.values()]).sum(0).sqrt()  # noqa: E731
        return (*totals, norm(params), None if momentum is None else norm(momentum))
