"""TTT-Linear and TTT-MLP layers against an independent transcription of the official layer.

The official ``TTTBase.forward`` (test-time-training/ttt-lm-pytorch, ``ttt.py``) with its
``TTTLinear`` / ``TTTMLP.ttt`` is written out here in the primal form: explicit fast weights per
mini-batch, per-token gradients at the mini-batch's start weights taken by autograd (not the
official fused LayerNorm / GELU backward, nor tto's), ``W_t = W_0 - token_eta_t sum_{s<=t} lr_s grad_s``
read by token t, the next mini-batch starting from its last token's weights. It shares no code with
tto's layer but its parameters (official names in the comments: see tto.convert_official_ttt).
"""

import pytest
import torch
import torch.nn.functional as F

import tto
from tto.cache import Context


def official_conv(x: torch.Tensor, conv) -> torch.Tensor:
    """The official ``nn.Conv1d(padding=k-1, groups=C)(x)[..., :T]`` on x (B, T, C), with conv's weight (C, 1, k), bias (C,)."""
    k, t = conv.weight.shape[-1], x.shape[1]
    return F.conv1d(x.transpose(1, 2), conv.weight, conv.bias, padding=k - 1, groups=x.shape[-1])[..., :t].transpose(1, 2)


def official_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """permute_qk, apply_rotary_pos_emb (rotate_half), undo_permute_qk of the official code; x (B, H, T, d).
    The official RotaryEmbedding computes the angles, cos and sin in float32 whatever x's dtype."""
    b, h, t, d = x.shape
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    freqs = positions[:, :, None].float() * inv_freq  # (B, T, d/2)
    emb = torch.cat([freqs, freqs], -1)[:, None]
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    x = x.reshape(b, h, t, d // 2, 2).transpose(3, 4).reshape(b, h, t, d)  # permute_qk
    rotated = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)  # rotate_half
    x = x * cos + rotated * sin
    return x.reshape(b, h, t, 2, d // 2).transpose(3, 4).reshape(b, h, t, d)  # undo_permute_qk


def official_ln(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
    """ln_fwd: biased variance, eps inside the sqrt."""
    mu = x.mean(-1, keepdim=True)
    return gamma * (x - mu) / (x.var(-1, keepdim=True, unbiased=False) + eps).sqrt() + beta


def official_ttt_layer(layer, x: torch.Tensor, layer_type: str) -> torch.Tensor:
    """The official layer's output for x (B, T, width), T any length (full mini-batches, then a partial one)."""
    fast, opt = layer.memory.fast, layer.memory.optimizer
    b, t, width = x.shape
    heads, d, mb = layer.num_heads, layer.head_dim, layer.mini_batch_size
    eps = fast.norm_eps  # ln_fwd / ln_fused_l2_bwd default eps=1e-6, which tto's ttt_norm_eps defaults to

    # get_qkv_projections
    if layer.k_proj is None:  # share_qk: conv_q and conv_k both over q_proj(x)
        xq = x @ layer.q_proj.weight.T
        XQ, XK = official_conv(xq, layer.conv_q), official_conv(xq, layer.conv_k)
    else:
        XQ, XK = x @ layer.q_proj.weight.T, x @ layer.k_proj.weight.T
    XV = x @ layer.v_proj.weight.T

    def split(y):  # [B, L, C] -> [B, nh, L, f]
        return y.reshape(b, t, heads, d).transpose(1, 2)

    positions = torch.arange(t).expand(b, t) % mb  # position_ids % mini_batch_size
    XQ, XK, XV = official_rope(split(XQ), positions, layer.rope_theta), official_rope(split(XK), positions, layer.rope_theta), split(XV)

    # get_eta: ttt_lr_eta (per token, per head) and token_eta (per position in the mini-batch)
    lr = torch.sigmoid(torch.einsum("blc,hc->bhl", x, layer.lr_gate_weight) + layer.lr_gate_bias[:, None])  # learnable_ttt_lr_weight/bias
    lr = layer.base_lr * lr / d
    token_eta = (1.0 / torch.arange(1, mb + 1, dtype=torch.float64) + opt.token_offset).clamp_min(0.0)  # learnable_token_idx

    gamma, beta = fast.norm_weight, fast.norm_bias  # ttt_norm_weight/bias [nh, f]
    names = ["W1", "b1"] + (["W2", "b2"] if layer_type == "mlp" else [])

    def g(params, z):  # the fast model without the residual and LN, params [B, nh, ...], z [B, nh, f]
        h = z[..., None, :] @ params["W1"] + params["b1"]
        if layer_type == "mlp":
            h = F.gelu(h, approximate="tanh") @ params["W2"] + params["b2"]
        return h[..., 0, :]

    def token_grads(params, k, v):
        """Gradient of 1/2 ||LN(g(k)) - (v - k)||^2 (the official reconstruction target) for every (B, nh)."""
        leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        loss = 0.5 * (official_ln(g(leaves, k), gamma, beta, eps) - (v - k)).pow(2).sum()
        return dict(zip(names, torch.autograd.grad(loss, [leaves[n] for n in names]), strict=True))

    params = {n: getattr(fast, n).detach().expand(b, *getattr(fast, n).shape) for n in names}
    out = []
    for start in range(0, t, mb):
        stop = min(start + mb, t)  # the remainder is a mini-batch of L % mini_batch_size tokens
        W0 = params
        G = {n: torch.zeros_like(p) for n, p in W0.items()}
        for i, s in enumerate(range(start, stop)):
            grads = token_grads(W0, XK[:, :, s], XV[:, :, s])
            G = {n: G[n] + lr[:, :, s, None, None] * grads[n] for n in names}
            params = {n: W0[n] - token_eta[i] * G[n] for n in names}  # W_bar of token i
            q = XQ[:, :, s]
            out.append(q + official_ln(g(params, q), gamma, beta, eps))  # XQW = XQ + LN(Z_bar)
    z = torch.stack(out, 2).transpose(1, 2).reshape(b, t, width)

    z = F.layer_norm(z, (width,), layer.post_norm.weight, layer.post_norm.bias, 1e-6)  # post_norm, eps 1e-6
    if layer.g_proj is not None:  # apply_gate
        z = F.gelu(x @ layer.g_proj.weight.T, approximate="tanh") * z
    return z @ layer.o_proj.weight.T


@pytest.mark.parametrize("mamba", [False, True], ids=["llama", "mamba"])
@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_layer_matches_a_transcription_of_the_official_layer(layer_type, mamba, step_factors):
    """Float64, 3 mini-batches plus a partial one of 2: tto's dual form equals the primal-form
    transcription up to rounding (1e-12 on outputs of size ~1; the two differ by ~1e-15). Every
    parameter is random (the learned position offsets with one clamped at 0, the fast LN's affine,
    the lr gate's bias, the conv biases) so each enters, and the inner steps move the outputs by as
    much as their size (checked against a frozen memory). The steps are ones tto's step bound leaves
    alone (every factor 1, checked): where it scales a commit tto departs from the official layer
    on purpose (its docstring's differences)."""
    torch.manual_seed(0)
    fields = dict(share_qk=True, use_gate=True) if mamba else {}
    config = tto.build_config("ttt", preset="tiny", vocab_size=32, torch_dtype="float64", ttt_layer_type=layer_type,
                              **fields)
    layer = tto.get("ttt").model_class(config).double().model.layers[0].mixer
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * (0.05 if p.dim() > 1 else 0.5))
        layer.memory.optimizer.token_offset[1] = -0.8  # 1/2 - 0.8 < 0: the clamp
        layer.memory.fast.norm_weight.add_(1.0)
        layer.post_norm.weight.add_(1.0)
    mb = config.mini_batch_size
    x = torch.randn(2, 3 * mb + 2, config.hidden_size, dtype=torch.float64)
    ctx = Context(mask=None, positions=torch.arange(x.shape[1]).expand(x.shape[0], -1))
    ours = layer(x, ctx)
    assert step_factors and all(bool((k == 1).all()) for k in step_factors)
    torch.testing.assert_close(ours, official_ttt_layer(layer, x, layer_type), atol=1e-12, rtol=0)
    layer.base_lr = 0.0
    assert (ours - layer(x, ctx)).abs().max() > 0.5 * ours.abs().max()  # the inner loop matters
