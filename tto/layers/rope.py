"""Rotary position embedding (RoPE), rotate-half convention as in Llama."""

from __future__ import annotations

import torch


def rope_cos_sin(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, T, dim) in float32 for integer `positions` (B, T)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim))
    freqs = positions.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, D) by cos/sin (B, T, D)."""
    cos, sin = cos[:, :, None, :].to(x.dtype), sin[:, :, None, :].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def interleaved_rope_tables(cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (B, T, D) as from :func:`rope_cos_sin` as the tables of :func:`rotate_interleaved` in
    `dtype`: the cosine of each pair (B, T, 1, D / 2, 1) and its signed sines (-sin, sin)
    (B, T, 1, D / 2, 2). They depend on the positions alone, so one pair serves every layer."""
    half = cos.shape[-1] // 2
    cos, sin = cos[:, :, None, :half, None].to(dtype), sin[:, :, None, :half, None].to(dtype)
    return cos, torch.cat((-sin, sin), dim=-1)


def rotate_interleaved(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) by frequency i (the GPT-J / JAX convention, used by
    TTT's reference): ``(x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)``. x (..., B, T, H, D), any
    leading dims (e.g. q and k stacked); the tables from :func:`interleaved_rope_tables`."""
    pairs = x.unflatten(-1, (cos.shape[-2], 2))
    return (pairs * cos + pairs.flip(-1) * signed_sin).flatten(-2)


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """:func:`rotate_interleaved` of x (..., B, T, H, D) by cos/sin (B, T, D) as from :func:`rope_cos_sin`."""
    return rotate_interleaved(x, *interleaved_rope_tables(cos, sin, x.dtype))


def rope_2d_cos_sin(height: int, width: int, dim: int, theta: float, device=None,
                    dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """2D RoPE of a (height x width) grid of tokens (row-major) for :func:`apply_rope_interleaved`:
    cos, sin (1, height * width, dim) in `dtype`. Of the dim / 2 channel pairs, the first dim / 4 turn
    by the token's row and the last dim / 4 by its column, pair k of each half at frequency
    ``theta^(-k / (dim / 4))`` (ViT³'s RoPE; dim a multiple of 4)."""
    quarter = dim // 4
    inv_freq = 1.0 / (theta ** (torch.arange(quarter, device=device, dtype=dtype) / quarter))
    rows, cols = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    angles = torch.cat([rows.reshape(-1, 1) * inv_freq, cols.reshape(-1, 1) * inv_freq], dim=-1)  # (N, dim / 2)
    emb = torch.cat((angles, angles), dim=-1)[None]
    return emb.cos(), emb.sin()
