"""Causal softmax attention (SDPA) with RoPE, grouped-query heads, an optional sliding window or
fixed segments, an optional prefix of learned persistent tokens, and a KV cache that stays bounded
by the window or segment when one is set."""

from __future__ import annotations

import bisect

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import Context, appended
from ..reference import in_reference_mode
from .rope import apply_rope, rope_cos_sin

#: a bounded look-back (window or segment) of R slots is evaluated in query blocks of R / this many
#: slots, each over its own slots and the R before it: SDPA computes every (query, key) pair of a
#: block, masked or not, so a block of R / n queries costs (1 + 1 / n) R per query where the whole
#: look-back needs R (blocks of R slots, n = 1, would cost twice that)
QUERY_BLOCKS_PER_LOOKBACK = 4


def attention_mask(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    k_valid: torch.Tensor | None,
    n_cached: int,
    window: int | None,
    segment: int | None = None,
    q_slots: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Boolean (B, 1, T, S) mask: key slot s is visible to query t when it is not after t (slot
    order), is a real token, lies within `window` positions and in the same `segment` (positions //
    segment). The queries are the new slots (the S - n_cached after the cached ones) or, with
    `q_slots` (T,), the new slots of these indices. None when plain causal suffices."""
    b, t = q_pos.shape
    s = k_pos.shape[1]
    # no key out of the window's reach (a call no longer than it): causality alone. Checked for calls of
    # several queries, where the causal path saves half the work; one query's mask row costs nothing,
    # and decoding then reads no value back from the device
    if window is not None and t > 1 and bool(q_pos.max() - k_pos.min() < window):
        window = None
    if k_valid is None and window is None and segment is None and q_slots is None:
        if n_cached == 0:
            return None  # is_causal path
        if t == 1:
            return torch.ones(b, 1, 1, s, dtype=torch.bool, device=q_pos.device)
    q_slot = (torch.arange(t, device=q_pos.device) if q_slots is None else q_slots)[:, None] + n_cached
    allowed = (torch.arange(s, device=q_pos.device)[None, :] <= q_slot)[None]  # (1, T, S)
    if k_valid is not None:
        allowed = allowed & k_valid[:, None, :]
    if window is not None:
        allowed = allowed & (q_pos[:, :, None] - k_pos[:, None, :] < window)
    if segment is not None:
        allowed = allowed & (q_pos[:, :, None] // segment == k_pos[:, None, :] // segment)
    # a pad query may see nothing; let it see everything so softmax stays finite (its output is unused)
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    return allowed[:, None]


def naive_attention(q, k, v, q_pos, k_pos, k_valid, n_cached: int, window: int | None,
                    n_prefix: int = 0, segment: int | None = None, q_slots: range | None = None) -> torch.Tensor:
    """Reference softmax attention with the mask spelled out, one query at a time (query t is new
    slot ``q_slots[t]``, default t)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = torch.zeros_like(q)
    for t in range(q.shape[2]):
        for row in range(q.shape[0]):
            keep = torch.arange(k.shape[2] - n_prefix) <= n_cached + (t if q_slots is None else q_slots[t])
            if k_valid is not None:
                keep &= k_valid[row].cpu()
            if window is not None:
                keep &= (q_pos[row, t] - k_pos[row]).cpu() < window
            if segment is not None:
                keep &= (q_pos[row, t] // segment == k_pos[row] // segment).cpu()
            if not keep.any():
                keep[:] = True
            keep = torch.cat([torch.ones(n_prefix, dtype=torch.bool), keep])
            scores = (k[row][:, keep] @ q[row, :, t, :, None])[..., 0] / q.shape[-1] ** 0.5
            out[row, :, t] = (scores.softmax(-1)[..., None] * v[row][:, keep]).sum(1)
    return out


class Attention(nn.Module):
    """Multi-head causal attention: q/k/v projections, RoPE, SDPA, output projection.

    x: (B, T, hidden) -> (B, T, hidden). With a state dict, keys/values/positions of past tokens are
    kept in it: the last ``max_cached`` slots (default: ``window - 1`` under a sliding window,
    ``segment - 1`` with segments, else all). ``segment``: tokens attend only within their segment
    of positions (``position // segment``). ``qk_norm`` RMS-normalizes q and k per head. Persistent tokens
    P (N_p, hidden), learned here (``num_persistent``), are prepended to the keys and values (without
    RoPE: they have no position) and visible to every query; they are never cached or evicted. ``queries`` (a slice of the T slots) makes only those slots
    queries: every slot is still a key and value, and the output has the selected slots only.
    """

    def __init__(self, config, window: int | None = None, qk_norm: bool = False, num_persistent: int = 0,
                 segment: int | None = None, max_cached: int | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.rope_theta = config.head_dim, config.rope_theta
        self.segment = segment
        self.window = None if segment is not None else (window if window is not None else config.sliding_window)
        bound = self.window if segment is None else segment
        self.max_cached = max_cached if max_cached is not None else (None if bound is None else bound - 1)
        width, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(width, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(width, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(width, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, width, bias=bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=config.rms_norm_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=config.rms_norm_eps) if qk_norm else nn.Identity()
        self.persistent = nn.Parameter(torch.empty(num_persistent, width)) if num_persistent else None
        self.persistent_std = config.initializer_range

    def _tto_init(self, init) -> None:
        if self.persistent is not None:
            init.normal_(self.persistent, mean=0.0, std=self.persistent_std)

    def forward(self, x: torch.Tensor, ctx: Context, state: dict | None = None,
                queries: slice | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        xq = x if queries is None else x[:, queries]
        q = self.q_norm(self.q_proj(xq).view(b, xq.shape[1], self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        prefix = None
        if self.persistent is not None:
            n = self.persistent.shape[0]
            pk = self.k_norm(self.k_proj(self.persistent).view(n, self.num_kv_heads, self.head_dim)).transpose(0, 1)
            pv = self.v_proj(self.persistent).view(n, self.num_kv_heads, self.head_dim).transpose(0, 1)
            prefix = (pk.expand(b, -1, -1, -1).to(k.dtype), pv.expand(b, -1, -1, -1).to(v.dtype))
        return self.o_proj(self.attend(q, k, v, ctx, state, prefix, queries))

    def _join(self, old: torch.Tensor, new: torch.Tensor, dim: int) -> torch.Tensor:
        """The cache `old` then the new slots, in place in the cache's buffer (:func:`tto.cache.appended`)
        of twice the cached slots under a window (a copy every ``max_cached`` tokens), else 1.5x the
        slots (a copy each time the cache grows by half)."""
        total = old.shape[dim] + new.shape[dim]
        return appended(old, new, dim, 2 * self.max_cached if self.max_cached is not None else total + total // 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Context, state: dict | None = None,
               prefix: tuple[torch.Tensor, torch.Tensor] | None = None, queries: slice | None = None) -> torch.Tensor:
        """The attention itself, for projected q (B, T_q, H, E) and k, v (B, T, H_kv, E) before RoPE:
        RoPE, the KV cache in `state`, the mask, SDPA. ``prefix``: persistent (keys, values)
        (B, H_kv, N_p, E); ``queries``: the slots of q among the T (default: all, T_q = T).
        Returns (B, T_q, H * E), before the output projection."""
        b, t = q.shape[0], k.shape[1]
        slots = range(t)[queries] if queries is not None else None
        cos, sin = rope_cos_sin(ctx.positions, self.head_dim, self.rope_theta)
        q_pos = ctx.positions if queries is None else ctx.positions[:, queries]
        q_rope = (cos, sin) if queries is None else (cos[:, queries], sin[:, queries])
        q, k = apply_rope(q, *q_rope).transpose(1, 2), apply_rope(k, cos, sin).transpose(1, 2)
        v = v.transpose(1, 2)
        k_pos, valid = ctx.positions, ctx.mask
        n_cached = 0
        if state is not None and "k" in state:
            n_cached = state["k"].shape[2]
            join = self._join if not ctx.differentiable_state and not torch.is_grad_enabled() else \
                lambda old, new, dim: torch.cat([old, new], dim=dim)
            k, v, k_pos = join(state["k"], k, 2), join(state["v"], v, 2), join(state["pos"], k_pos, 1)
            if valid is not None or state.get("valid") is not None:
                old = state.get("valid")
                old = old if old is not None else torch.ones_like(state["pos"], dtype=torch.bool)
                new = valid if valid is not None else torch.ones_like(ctx.positions, dtype=torch.bool)
                valid = join(old, new, 1)
        if state is not None:
            keep = k.shape[2] if self.max_cached is None else min(k.shape[2], self.max_cached)
            kept_k, kept_v = k[:, :, k.shape[2] - keep :], v[:, :, v.shape[2] - keep :]
            state["k"], state["v"] = (kept_k, kept_v) if ctx.differentiable_state else (kept_k.detach(), kept_v.detach())
            state["pos"] = k_pos[:, k_pos.shape[1] - keep :]
            state["valid"] = None if valid is None else valid[:, valid.shape[1] - keep :]
        if in_reference_mode():
            n_prefix = 0 if prefix is None else prefix[0].shape[2]
            if prefix is not None:
                k, v = torch.cat([prefix[0], k], dim=2), torch.cat([prefix[1], v], dim=2)
            o = naive_attention(q, k, v, q_pos, k_pos, valid, n_cached, self.window, n_prefix, self.segment, slots)
        else:
            # A bounded look-back (window or segment) of max_cached + 1 slots is evaluated in query
            # blocks of `step` slots that see only their own slots and the `back` blocks before them
            # (the cached slots counting as block -1), which hold at least the look-back: cost linear in
            # the length. Pieces come from split, whose backward is one cat: slicing the full tensor per
            # block would make every block's backward write a zero tensor of the whole sequence's size.
            if self.max_cached is None or n_cached + t <= self.max_cached + 1:  # one block reaches every key
                step, back = t, 1
            else:
                step = -(-(self.max_cached + 1) // QUERY_BLOCKS_PER_LOOKBACK)
                back = -(-(self.max_cached + 1) // step)
            sizes = [n_cached] + [min(step, t - lo) for lo in range(0, t, step)]
            k_pieces, v_pieces, kpos_pieces = k.split(sizes, 2), v.split(sizes, 2), k_pos.split(sizes, 1)
            valid_pieces = [None] * len(sizes) if valid is None else valid.split(sizes, 1)
            # the queries among block i's own slots [lo, lo + step), and their slots among them
            starts = range(0, t, step)
            if slots is None:
                q_sizes, block_slots = sizes[1:], [None] * len(starts)
            else:
                ends = [bisect.bisect_left(slots, lo) for lo in starts] + [len(slots)]
                q_sizes = [z - a for a, z in zip(ends, ends[1:])]
                block_slots = [torch.tensor(slots[a:z], device=q.device) - lo
                               for lo, a, z in zip(starts, ends, ends[1:])]

            def keys(i: int, whole: torch.Tensor, pieces: tuple, dim: int) -> torch.Tensor:
                """Block i's keys: the `back` pieces before its own, then its own; with one block
                (decoding) all of them."""
                return whole if len(sizes) == 2 else torch.cat(pieces[max(0, i + 1 - back): i + 2], dim)

            blocks = []
            for i, (q_block, q_pos_block) in enumerate(zip(q.split(q_sizes, 2), q_pos.split(q_sizes, 1))):
                before = sum(sizes[max(0, i + 1 - back): i + 1])  # key slots in front of the block's own
                blocks.append(self._sdpa(q_block, keys(i, k, k_pieces, 2), keys(i, v, v_pieces, 2), q_pos_block,
                                         keys(i, k_pos, kpos_pieces, 1),
                                         None if valid is None else keys(i, valid, valid_pieces, 1), before, prefix,
                                         block_slots[i]))
            o = torch.cat(blocks, dim=2)
        return o.transpose(1, 2).reshape(b, o.shape[2], self.num_heads * self.head_dim)

    def _sdpa(self, q, k, v, q_pos, k_pos, valid, n_cached: int, prefix, q_slots=None) -> torch.Tensor:
        """SDPA of queries (B, H, T, E) over keys (B, H_kv, S, E) of which the first `n_cached`
        precede the queries' slots, with the persistent (keys, values) prefix in front, visible to
        every query."""
        mask = attention_mask(q_pos, k_pos, valid, n_cached, self.window, self.segment, q_slots)
        gqa = self.num_kv_heads != self.num_heads
        if prefix is None:
            if mask is None:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        if q.shape[2] == 1:
            return self._one_query(q, k, v, mask, prefix)
        n_prefix = prefix[0].shape[2]
        k, v = torch.cat([prefix[0], k], dim=2), torch.cat([prefix[1], v], dim=2)
        if mask is None:
            # the persistent slots open a causal attention whose first n_prefix queries (zeros) are
            # dropped: query n_prefix + t sees them and slots <= t, at the causal path's cost
            q = torch.cat([q.new_zeros(*q.shape[:2], n_prefix, q.shape[3]), q], dim=2)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)[:, :, n_prefix:]
        front = mask.new_ones(*mask.shape[:-1], n_prefix)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.cat([front, mask], dim=-1), enable_gqa=gqa)

    def _one_query(self, q, k, v, mask, prefix) -> torch.Tensor:
        """One query slot (decoding) over the persistent prefix and the keys: their scores side by side
        instead of keys and values joined behind the prefix (a copy of the whole window per call).
        q (B, H, 1, E), k, v (B, H_kv, S, E), mask (B or 1, 1, 1, S) or None -> (B, H, 1, E)."""
        b, heads, _, dim = q.shape
        q = q.reshape(b, self.num_kv_heads, heads // self.num_kv_heads, dim) * dim ** -0.5  # query heads of each kv head
        scores = q @ k.transpose(-1, -2)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.cat([q @ prefix[0].transpose(-1, -2), scores], dim=-1).softmax(-1)
        n_prefix = prefix[0].shape[2]
        out = weights[..., :n_prefix] @ prefix[1] + weights[..., n_prefix:] @ v
        return out.view(b, heads, 1, dim)
