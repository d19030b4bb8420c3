"""TNT: "TNT: Improving Chunkwise Training for Test-Time Memorization" (Li, Behrouz et al.; arXiv:2511.07343).

A Titans memory layer (:mod:`tto.mixers.titans`: the same q, k, v, gates, deep MLP memory, momentum
and forgetting) whose memory is a hierarchy (Sec. 4.1, App. E):

* one **global memory** V with a large chunk C_G (``chunk_size``; the paper: 2048) over the whole
  sequence (Eq. 13): few sequential steps, large matmuls;
* N **local memories** W^(i) with small chunks C_L^(i) (``local_chunk_sizes``; {8}, {4, 8, 16, 32},
  ...), each restarted from its learned initial weights W_init^(i) every S_L tokens
  (``local_shard_size``; 0 = t mod S_L, Eq. 14). A local memory's state never crosses a shard
  boundary, so the shards are independent: in training they run side by side as rows of one batch.

Retrieval sums the memories (Eq. 15)::

    o_t = f(V_{xi(t, C_G)}, q_t) + sum_i f(W^(i)_t, M_t q_t),    M_t = sum_{tau = shard start}^{t} k_tau k_tau^T / ||k_tau||^2

the global memory read at its chunk-start weights (``global_read_start``: the engine then computes
only those reads and each chunk's commit, no dual form inside the chunk, :mod:`tto.engine.memory`),
each local memory after
its update (update-then-read, as Titans), through the **Q-K projection** M_t (``qk_projection``):
the queries projected onto the span of the shard's keys, which the memory was trained on (App. C:
a d x d running sum restarted with the local memories; in training a causal (q . k) matrix per
shard). The layer's read-out is then normalised, gated and projected as Titans'.

**Two-stage training (Sec. 4.2).** Stage 1 trains the whole model with large local chunks (fast);
stage 2 fine-tunes only the local memories (their initial weights and gates, ``*.local_memories.*``)
at smaller chunks: ``configs/tnt/`` has both recipes, stage 2 through the recipe's ``freeze``.

Differences from the paper, where it leaves a choice open:

* Eq. 7 / 15 sum the projection from the local *chunk* start, App. B and C from the shard start (the
  memory's reset); App. C is the implementation the paper describes (a state carried across
  chunks), so it is followed.
* the memories share q, k, v and the read-out; each has its own theta, eta, alpha gates (App. D
  applies Titans' gating to every memory; one set per memory lets each chunk size find its step).
* variants: LMM (the memory layer alone), MAG and MAL wire the hierarchical memory as Titans wires
  its memory; MAC is not offered (its chunk-start read h_t has no single chunk here).
* the step bound of the engine (:mod:`tto.engine.memory`) applies to every memory, as in Titans.

Caches: the global memory's state under ``memory.``, local memory i's under ``local<i>.``, the
projection's running sum ``qk_projection`` (B, heads, d, d), the conv tails. A decoding step that
starts a shard restarts the local memories and the projection of the rows it starts.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..cache import Context
from ..config import config_error
from ..engine.fast_models import upcast
from ..layers.memory_layer import MemoryLayer
from ..registry import register
from .titans import TITANS_FROM_ATTENTION, VARIANTS, TitansConfig, memory_engine

_TINY_BACKBONE_CHOICES = dict(chunk_size=4, local_chunk_sizes=[2, 3], local_shard_size=6, num_key_value_heads=1,
                              sliding_window=5, num_persistent_mem_tokens=2)
TNT_PRESETS = {
    # Sec. 5.1: Titans' 150M setting, T5's 32k vocabulary, C_G = 2048, S_L = 2048 (the efficiency runs)
    "150m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, chunk_size=2048, local_chunk_sizes=[8], local_shard_size=2048),
    # two local memories of different chunks and a 6-token shard: 13 tokens cross every boundary
    "tiny": dict(_TINY_BACKBONE_CHOICES),
    "tiny-mag": dict(_TINY_BACKBONE_CHOICES, variant="mag", qk_projection=False, global_read_start=False),
}


class TNTConfig(TitansConfig):
    """TNT fields on top of Titans' (:class:`tto.mixers.titans.TitansConfig`): ``chunk_size`` is the
    global memory's chunk C_G."""

    choices: ClassVar[dict[str, tuple]] = {**TitansConfig.choices, "variant": ("lmm", "mag", "mal")}
    positive_fields: ClassVar[tuple[str, ...]] = TitansConfig.positive_fields + ("local_shard_size",)

    chunk_size: int = 2048  # C_G: the global memory's chunk (large: few sequential steps)
    # C_L^(i): one local memory per entry, with that chunk (None: [8], the paper's main stage-1 model;
    # []: no local memory, Titans with chunk C_G)
    local_chunk_sizes: list[int] | None = None
    local_shard_size: int = 2048  # S_L: the local memories restart from their initial weights every S_L tokens
    qk_projection: bool = True  # local memories read M_t q_t, q projected onto the shard's keys (Sec. 4.1.2)
    # the global memory is read at its chunk-start weights V_{xi(t, C_G)} (Eq. 7); False: after its
    # update, as Titans reads (with no local memory and C_G = C, TNT is then Titans)
    global_read_start: bool = True

    def __post_init__(self, **kwargs):
        if self.local_chunk_sizes is None:
            self.local_chunk_sizes = [8]
        super().__post_init__(**kwargs)

    def validate(self) -> None:
        super().validate()
        for size in self.local_chunk_sizes:
            if not isinstance(size, int) or size <= 0:
                raise config_error("local_chunk_sizes", self.local_chunk_sizes, "must be positive integers")
            if self.local_shard_size % size:
                raise config_error("local_chunk_sizes", self.local_chunk_sizes,
                                   f"each must divide local_shard_size={self.local_shard_size} (a shard is whole chunks)")


def project_queries(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor | None,
                    carry: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The Q-K projection of one shard piece: ``M_t q_t`` with ``M_t = carry + sum_{s <= t, real}
    k_s k_s^T / ||k_s||^2``. q, k (B, T, H, d) in the inner dtype, `valid` (B, T) or None, `carry`
    (B, H, d, d) or None (the shard starts here). Returns (M_t q_t (B, T, H, d), M at the end)."""
    scaled = k / k.square().sum(-1, keepdim=True).clamp_min(torch.finfo(k.dtype).tiny)  # k / ||k||^2
    if valid is not None:
        scaled = scaled * valid[:, :, None, None]
    causal = torch.ones(q.shape[1], q.shape[1], dtype=torch.bool, device=q.device).tril()
    scores = torch.einsum("bthd,bshd->bhts", q, k).masked_fill(~causal, 0.0)
    out = torch.einsum("bhts,bshd->bthd", scores, scaled)
    end = torch.einsum("bshd,bshe->bhde", scaled, k)
    if carry is not None:
        out = out + torch.einsum("bhde,bthe->bthd", carry, q)
        end = end + carry
    return out, end


class LocalMemory(nn.Module):
    """A local memory W^(i): Titans' engine with chunk C_L^(i) (state prefix ``local<i>.``) and its
    own theta, eta, alpha gates."""

    def __init__(self, config: TNTConfig, chunk_size: int, index: int):
        super().__init__()
        self.memory, gates = memory_engine(config, chunk_size, state_prefix=f"local{index}")
        self.gates = nn.ModuleDict(gates)

    def forward(self, q, k, v, x, mask, state):
        return self.memory(q, k, v, {name: gate(x) for name, gate in self.gates.items()}, mask, state)


class HierarchicalMemory(MemoryLayer):
    """Titans' memory layer with TNT's global + local memories (module docstring):
    x (B, T, hidden) -> (B, T, hidden)."""

    def __init__(self, config: TNTConfig):
        super().__init__(config, *memory_engine(config, config.chunk_size))  # the global memory V
        self.local_memories = nn.ModuleList(LocalMemory(config, size, i) for i, size in enumerate(config.local_chunk_sizes))
        self.shard = config.local_shard_size
        self.qk_projection = config.qk_projection
        self.global_read_start = config.global_read_start

    def reads(self, x: torch.Tensor, ctx: Context, state: dict | None, read_start: bool = False) -> torch.Tensor:
        if read_start:
            raise ValueError("TNT's memory has no single chunk-start read (Titans MAC is not a TNT variant)")
        q, k, v = self.qkv(x, ctx, state)
        if self.global_read_start:
            out = self.memory(q, k, v, self.gates(x), ctx.mask, state, read_start="only")
        else:
            out = self.memory(q, k, v, self.gates(x), ctx.mask, state)
        if not self.local_memories:
            return out
        if state is None:
            local = self._by_shards(q, k, v, x, ctx.mask)
        else:
            local = self._by_segments(q, k, v, x, ctx, state)
        return out + local.to(out.dtype)

    def _local(self, q, k, v, x, mask, state, carry):
        """The local memories' summed reads of one stretch that lies within one shard per row,
        and the projection's running sum at its end."""
        queries, end = q, None
        if self.qk_projection:
            queries, end = project_queries(upcast(q), upcast(k), mask, carry)
        return sum(local(queries, k, v, x, mask, state) for local in self.local_memories), end

    def _by_shards(self, q, k, v, x, mask):
        """Whole sequences (no state): each row's real tokens from position 0 (moved to the front
        when the row is padded), cut into shards of S_L that run as rows of one batch."""
        batch, length = q.shape[:2]
        order = None
        if mask is not None:  # real tokens first, in their order: position p at slot p
            order = torch.sort((~mask.bool()).to(torch.int8), dim=1, stable=True).indices
            gather = lambda t: t.gather(1, order.view(*order.shape, *[1] * (t.dim() - 2)).expand_as(t))  # noqa: E731
            q, k, v, x, mask = gather(q), gather(k), gather(v), gather(x), gather(mask.bool())
        shards = -(-length // self.shard)
        pad = shards * self.shard - length
        if pad and mask is None:
            mask = torch.ones(batch, length, dtype=torch.bool, device=q.device)

        def as_shards(t):  # (B, T, ...) -> (B * shards, S_L, ...), pads at the end
            t = torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) if pad else t
            return t.reshape(batch * shards, self.shard, *t.shape[2:])

        out, _ = self._local(*(as_shards(t) for t in (q, k, v, x)), None if mask is None else as_shards(mask), None,
                             None)
        out = out.reshape(batch, shards * self.shard, *out.shape[2:])[:, :length]
        if order is None:
            return out
        return torch.empty_like(out).scatter_(1, order.view(*order.shape, 1, 1).expand_as(out), out)

    def _by_segments(self, q, k, v, x, ctx: Context, state: dict):
        """With a state (streaming, decoding): the call is cut where any row starts a shard; each
        such row's local memories and projection restart there."""
        real = torch.ones(q.shape[:2], dtype=torch.bool, device=q.device) if ctx.mask is None else ctx.mask.bool()
        starts = real & (ctx.positions % self.shard == 0)
        cuts = sorted({0, *torch.nonzero(starts.any(0)).flatten().tolist()})
        outs = []
        for lo, hi in zip(cuts, cuts[1:] + [q.shape[1]]):
            rows = starts[:, lo]
            for local in self.local_memories:
                local.memory.restart_rows(state, rows)
            carry = state.get("qk_projection")
            if carry is not None:
                carry = carry.masked_fill(rows[:, None, None, None], 0.0)
            mask = None if ctx.mask is None else real[:, lo:hi]
            out, end = self._local(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], x[:, lo:hi], mask, state, carry)
            if end is not None:
                state["qk_projection"] = end.detach()
            outs.append(out)
        return torch.cat(outs, dim=1)


@register("tnt", config=TNTConfig, presets=TNT_PRESETS, paper_sizes={"150m": 150e6},
          paper="arXiv:2511.07343 (Li, Behrouz et al., 2025)", from_attention=TITANS_FROM_ATTENTION)
class TNTMixer(nn.Module):
    """TNT mixer: x (B, T, hidden) -> (B, T, hidden), Titans' `variant` wiring around the
    hierarchical memory."""

    def __init__(self, config: TNTConfig, layer_idx: int):
        super().__init__()
        self.wiring = VARIANTS[config.variant](config, memory=HierarchicalMemory)

    def forward(self, x: torch.Tensor, ctx: Context, state: dict | None = None) -> torch.Tensor:
        return self.wiring(x, ctx, state)
