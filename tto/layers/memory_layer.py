"""The memory layer shared by Titans (Sec. 4.4) and Miras: x -> q, k, v -> memory engine -> read-out.

q, k, v are linear maps of the input, each followed by a short causal depthwise conv and SiLU; q
and k are then l2-normalised per head (``rms_qk_norm``: a learned RMSNorm instead). The engine
(:class:`tto.engine.Memory`: fast model, objective, optimizer, retention) writes (k, v) and reads
q with per-token, per-head gates, each a linear map of x. The read-out (B, T, heads x head_dim) is
normalised (RMSNorm), optionally gated by ``silu(gate_proj(x))`` (``use_gate``) and projected back
to the hidden size (``use_output_proj``).

:class:`MemoryLayerConfig` holds the fields every type built on this layer shares (Titans, Miras,
ATLAS); each paper's config subclasses it, changing defaults where the paper does. State keys: the
engine's ``<name>.*`` and the conv tails ``<name>_conv_{q,k,v}``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from typing import ClassVar

from ..cache import Context
from ..config import MemoryConfig, TTOConfig, config_error
from ..engine import ACTIVATIONS
from .conv import ShortConv


class MemoryLayerConfig(MemoryConfig):
    """Fields of the memory layer and its deep MLP memory, shared by the types built on it."""

    aliases: ClassVar[dict[str, str]] = {"num_mem_heads": "num_memory_heads"}
    choices: ClassVar[dict[str, tuple]] = {**TTOConfig.choices, "mem_activation": tuple(ACTIVATIONS)}
    positive_fields: ClassVar[tuple[str, ...]] = MemoryConfig.positive_fields + (
        "chunk_size", "mem_depth", "mem_expansion_factor")
    chunk_field: ClassVar[str] = "chunk_size"

    chunk_size: int = 16  # b: tokens per memory chunk; gradients are taken at the chunk-start weights
    mem_depth: int = 2  # layers of the memory MLP (1: a matrix memory)
    mem_expansion_factor: int = 4  # hidden width of the memory MLP, in multiples of its head width
    mem_activation: str = "silu"  # activation between the memory MLP's layers
    mem_max_lr: float = 0.1  # the inner step is mem_max_lr * sigmoid(.): its bound
    lr_gate_bias_init: float = 0.0  # initial bias of the inner-step gate (pre-sigmoid)
    # initial bias of the forget gate (pre-sigmoid; negative: remember). -4: alpha ~ 0.018 per token, so
    # a 128-token chunk keeps 10% of the weights; at 0 (alpha = 0.5) it kept 2^-128 of them: reads
    # of ~1e-30 whose products underflow to subnormal floats, which slowed a CPU MAC 4x
    forget_gate_bias_init: float = -4.0
    use_gate: bool = True  # memory output gated by silu(gate_proj(x))
    use_output_proj: bool = True  # linear projection of the memory output back to hidden_size
    rms_qk_norm: bool = False  # learned RMSNorm on memory q/k instead of the l2 norm
    scan_checkpoint_group_size: int = 0  # memory chunks per activation-checkpoint group in training (0: none)

    def validate(self) -> None:
        super().validate()
        if self.hidden_size % self.num_memory_heads:
            raise config_error("num_memory_heads", self.num_memory_heads, f"must divide hidden_size={self.hidden_size}")
        if self.scan_checkpoint_group_size < 0:
            raise config_error("scan_checkpoint_group_size", self.scan_checkpoint_group_size, "must be >= 0")


class MemoryLayer(nn.Module):
    """x (B, T, hidden) -> (B, T, hidden). ``gates`` maps each engine gate name (``lr``,
    ``forget``, ...) to its module, kept as the attribute ``<name>_gate``."""

    def __init__(self, config, memory: nn.Module, gates: dict[str, nn.Module], name: str = "memory",
                 feature_map: nn.Module | None = None):
        super().__init__()
        self.name = name
        self.num_heads = config.num_memory_heads
        self.head_dim = config.hidden_size // config.num_memory_heads
        width, inner = config.hidden_size, config.num_memory_heads * self.head_dim
        self.q_proj = nn.Linear(width, inner, bias=False)
        self.k_proj = nn.Linear(width, inner, bias=False)
        self.v_proj = nn.Linear(width, inner, bias=False)
        self.conv_q = ShortConv(inner, config.conv_kernel)
        self.conv_k = ShortConv(inner, config.conv_kernel)
        self.conv_v = ShortConv(inner, config.conv_kernel)
        norm = lambda: nn.RMSNorm(self.head_dim, eps=config.rms_norm_eps) if config.rms_qk_norm else None  # noqa: E731
        self.q_norm, self.k_norm = norm(), norm()
        self.gate_names = tuple(gates)
        for gate, module in gates.items():
            setattr(self, f"{gate}_gate", module)
        self.memory = memory
        self.feature_map = feature_map  # applied to the normalised q and k (ATLAS' polynomial features)
        self.out_norm = nn.RMSNorm(inner, eps=config.rms_norm_eps)
        self.gate_proj = nn.Linear(width, inner, bias=False) if config.use_gate else None
        self.o_proj = nn.Linear(inner, width, bias=False) if config.use_output_proj else None

    def _view(self, proj: nn.Linear, conv: ShortConv, x, ctx: Context, state, key: str) -> torch.Tensor:
        """SiLU(conv(proj(x))) per head: (B, T, heads, head_dim)."""
        h = F.silu(conv(proj(x), ctx.mask, state, f"{self.name}_{key}"))
        return h.view(*x.shape[:2], self.num_heads, self.head_dim)

    def _normalize(self, h: torch.Tensor, norm: nn.RMSNorm | None) -> torch.Tensor:
        return F.normalize(h, dim=-1) if norm is None else norm(h)

    def qkv(self, x: torch.Tensor, ctx: Context, state: dict | None):
        """q, k, v (B, T, heads, head_dim) of the memory layer."""
        q = self._normalize(self._view(self.q_proj, self.conv_q, x, ctx, state, "conv_q"), self.q_norm)
        k = self._normalize(self._view(self.k_proj, self.conv_k, x, ctx, state, "conv_k"), self.k_norm)
        v = self._view(self.v_proj, self.conv_v, x, ctx, state, "conv_v")
        if self.feature_map is not None:
            q, k = self.feature_map(q), self.feature_map(k)
        return q, k, v

    def gates(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The engine's gates {name: (B, T, heads)}."""
        return {gate: getattr(self, f"{gate}_gate")(x) for gate in self.gate_names}

    def output(self, read: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Read-outs (B, T, heads, head_dim) -> (B, T, hidden): RMSNorm, gate by x, projection."""
        out = self.out_norm(read.flatten(2))
        if self.gate_proj is not None:
            out = out * F.silu(self.gate_proj(x))
        return out if self.o_proj is None else self.o_proj(out)

    def reads(self, x: torch.Tensor, ctx: Context, state: dict | None, read_start: bool = False):
        """The engine's reads of x's queries (B, T, heads, head_dim); with ``read_start`` the pair
        (reads, reads of the chunk-start weights), as :class:`tto.engine.ChunkwiseMemory` returns them."""
        q, k, v = self.qkv(x, ctx, state)
        return self.memory(q, k, v, self.gates(x), ctx.mask, state, read_start=read_start)

    def forward(self, x: torch.Tensor, ctx: Context, state: dict | None) -> torch.Tensor:
        return self.output(self.reads(x, ctx, state), x)
