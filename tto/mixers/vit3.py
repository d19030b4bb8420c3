"""ViT³: "Unlocking Test-Time Training in Vision" (Han et al., arXiv:2512.01643), following the
official code (LeapLabTHU/ViTTT, ``ttt_block.py``, class ``TTT``; ``vittt/models/vittt.py``).

Non-causal test-time training: the whole image (N tokens) is one chunk. One projection
``qkv = Linear(hidden, 3 hidden + 3 d_h)`` gives two branches' queries, keys and values:

* **simplified SwiGLU** per head (``num_attention_heads`` heads of width d_h = hidden / heads):
  ``f(x) = (x W1) * silu(x W2)`` with learned initial W1, W2 (d_h x d_h, trunc-normal(0.02));
  optional 2D RoPE on its q and k (``use_rope``);
* **3x3 depthwise convolution** over the token grid, one extra head of width d_h with its own
  q, k, v: ``f(x) = conv3x3(x; W3)``, W3 (d_h, 3, 3).

Each branch takes one gradient step (``inner_lr``, 1.0) from its learned initial weights on the
dot-product loss ``l = -(scale / N) sum_n <f(k_n), v_n>`` (``inner_loss_scale`` = 9^(-1/2), the
official value), its gradient normalised ``g / (||g|| + 1)`` (over the input axis per output column;
over the 3x3 kernel per channel), and every query reads the stepped module (:class:`tto.engine.
OneStepMemory` for the SwiGLU branch). The output is ``proj(concat[SwiGLU reads, conv reads])``.
The backbone (:mod:`tto.vision`) is ViT³'s: CPE, LayerNorm, GELU MLP, mean pooling.

Differences from the official code: the inner arithmetic is float32 under any autocast (the official
runs it in the autocast dtype); the 2D RoPE rotates q and k over the whole width with the same
frequencies as the official ``RoPE`` module (used there by the hierarchical H-ViT³, which this
module does not build).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import config_error
from ..engine import DotProduct, Float32Parameters, GatedLinearMemory, Objective, OneStepMemory
from ..engine.fast_models import autocast_off, upcast
from ..layers.rope import apply_rope_interleaved, rope_2d_cos_sin
from ..reference import in_reference_mode
from ..registry import register
from ..vision import VisionConfig

VIT3_PRESETS = {
    # vittt/models/vittt.py vittt_tiny / vittt_small: patch 16 at 224, width 192 / 384, 12 layers, 6 heads, MLP 4x
    "6m": dict(hidden_size=192, intermediate_size=768, num_hidden_layers=12, num_attention_heads=6, num_labels=1000),
    "24m": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6, num_labels=1000),
    # 8x8 images (scikit-learn's digits) in 2x2 patches: a 4x4 grid
    "tiny": dict(image_size=8, patch_size=2, num_channels=1, num_labels=10),
    "tiny-rope": dict(use_rope=True),  # the conformance suite's second case: the 2D RoPE path
}


class Vit3Config(VisionConfig):
    """ViT³ fields (heads: ``num_attention_heads``; the conv branch is one more head of their width)."""

    qkv_bias: bool = True  # bias of the qkv projection
    inner_lr: float = 1.0  # the inner step size of both branches
    inner_loss_scale: float = 9 ** -0.5  # scale of the dot-product inner loss (the official 1 / sqrt(3 x 3))
    normalize_grad: bool = True  # inner gradients g -> g / (||g|| + 1) before the step
    use_rope: bool = False  # 2D RoPE on the SwiGLU branch's q and k
    fast_init_std: float = 0.02  # initial W1, W2, W3 ~ trunc-normal(0, fast_init_std^2)

    def validate(self) -> None:
        super().validate()
        if self.use_rope and self.hidden_size % 4:
            raise config_error("hidden_size", self.hidden_size, "must be a multiple of 4 with use_rope (2D RoPE pairs)")
        if self.inner_lr < 0:
            raise config_error("inner_lr", self.inner_lr, "must be >= 0")
        if self.fast_init_std <= 0:
            raise config_error("fast_init_std", self.fast_init_std, "must be > 0")


class DepthwiseConvMemory(Float32Parameters):
    """ViT³'s 3x3 depthwise-conv inner module: per channel c, ``f(x)_c = sum_ij W3[c, i, j] x_c(r+i-1, s+j-1)``
    (zero padding), one gradient step from the learned W3 on weighted per-token losses, each channel's
    3x3 gradient normalised by its norm plus one, then read with the queries.
    forward(q, k, v (B, N, d), grid, weight (float)) -> (B, N, d)."""

    def __init__(self, dim: int, objective: Objective, *, lr: float, normalize_grad: bool, init_std: float):
        super().__init__()
        self.objective, self.lr, self.normalize_grad, self.init_std = objective, lr, normalize_grad, init_std
        self.W3 = nn.Parameter(torch.empty(dim, 3, 3))

    def _tto_init(self, init) -> None:
        init.trunc_normal_(self.W3, mean=0.0, std=self.init_std)

    def forward(self, q, k, v, grid: tuple[int, int], weight: float) -> torch.Tensor:
        with autocast_off(q.device.type):
            q, k, v = upcast(q), upcast(k), upcast(v)
            if in_reference_mode():
                return self._naive(q, k, v, grid, weight)
            batch, length, dim = k.shape
            images = lambda t: t.transpose(1, 2).reshape(1, batch * dim, *grid)  # noqa: E731  one image, B*d channels
            w0 = upcast(self.W3)[:, None].repeat(batch, 1, 1, 1)  # (B*d, 1, 3, 3)
            y = F.conv2d(images(k), w0, padding=1, groups=batch * dim).reshape(batch, dim, length).transpose(1, 2)
            delta = weight * self.objective.grad(y, v, {})  # (B, N, d)
            patches = F.unfold(images(k).reshape(batch, dim, *grid), 3, padding=1).reshape(batch, dim, 9, length)
            g = torch.einsum("bckn,bnc->bck", patches, delta)  # d l / d W3 per row: (B, d, 9)
            if self.normalize_grad:
                g = g / (g.norm(dim=-1, keepdim=True) + 1.0)
            w = w0 - self.lr * g.reshape(batch * dim, 1, 3, 3)
            return F.conv2d(images(q), w, padding=1, groups=batch * dim).reshape(batch, dim, length).transpose(1, 2)

    def _naive(self, q, k, v, grid, weight) -> torch.Tensor:
        """Reference: the convolution as shifted sums of the zero-padded grid; per row and token the
        autograd gradient of its weighted loss at W3, summed; per channel normalised; one step; read."""
        rows, cols = grid

        def conv(x, w):  # x (N, d) row-major over the grid, w (d, 3, 3) -> (N, d)
            padded = F.pad(x.T.reshape(-1, rows, cols), (1, 1, 1, 1))
            return sum(w[:, i, j, None, None] * padded[:, i: i + rows, j: j + cols]
                       for i in range(3) for j in range(3)).reshape(-1, rows * cols).T

        outs = []
        for row in range(k.shape[0]):
            start = upcast(self.W3)
            start = start if start.requires_grad else start.detach().requires_grad_(True)
            total = torch.zeros_like(start)
            for t in range(k.shape[1]):
                with torch.enable_grad():
                    loss = weight * self.objective.loss(conv(k[row], start)[t], v[row, t], {})
                    total = total + torch.autograd.grad(loss, start, create_graph=True)[0]
            if self.normalize_grad:
                total = torch.stack([g / (torch.sqrt((g ** 2).sum()) + 1.0) for g in total])
            outs.append(conv(q[row], start - self.lr * total))
        return torch.stack(outs)


@register("vit3", config=Vit3Config, presets=VIT3_PRESETS, paper_sizes={"6m": 6e6, "24m": 24e6},
          paper="arXiv:2512.01643 (Han et al., 2025)")
class Vit3Mixer(nn.Module):
    """ViT³'s TTT layer: x (B, N, hidden) over a (rows x columns) grid -> (B, N, hidden)."""

    def __init__(self, config: Vit3Config, layer_idx: int):
        super().__init__()
        width, self.heads = config.hidden_size, config.num_attention_heads
        self.head_dim = width // self.heads
        self.qkv = nn.Linear(width, 3 * width + 3 * self.head_dim, bias=config.qkv_bias)
        self.swiglu = OneStepMemory(GatedLinearMemory(self.heads, self.head_dim, init_std=config.fast_init_std),
                                    DotProduct(), lr=config.inner_lr, normalize_grad=config.normalize_grad)
        self.conv = DepthwiseConvMemory(self.head_dim, DotProduct(), lr=config.inner_lr,
                                        normalize_grad=config.normalize_grad, init_std=config.fast_init_std)
        self.proj = nn.Linear(width + self.head_dim, width)
        self.loss_scale, self.use_rope, self.rope_theta = config.inner_loss_scale, config.use_rope, config.rope_theta

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, n, width = x.shape
        q1, k1, v1, q2, k2, v2 = self.qkv(x).split([width] * 3 + [self.head_dim] * 3, dim=-1)
        if self.use_rope:  # over the whole width (one "head" of the rotation)
            cos, sin = rope_2d_cos_sin(*grid, width, self.rope_theta, device=x.device,
                                       dtype=torch.promote_types(x.dtype, torch.float32))
            q1, k1 = (apply_rope_interleaved(t[:, :, None], cos, sin)[:, :, 0] for t in (q1, k1))
        heads = lambda t: t.reshape(b, n, self.heads, self.head_dim)  # noqa: E731
        weight = self.loss_scale / n  # the loss is a mean over the image's tokens
        x1 = self.swiglu(heads(q1), heads(k1), heads(v1), weight).flatten(2)
        x2 = self.conv(q2, k2, v2, grid, weight)
        return self.proj(torch.cat([x1, x2], dim=-1).to(x.dtype))
