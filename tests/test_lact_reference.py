"""The LaCT layer against an independent transcription of the official layer.

``LaCTSWIGLULayer.forward`` (a1600012888/LaCT, ``lact_llm/lact_model/layer_lact_swiglu.py``) with
``block_causal_lact_swiglu`` and ``zeropower_via_newtonschulz5`` (``ttt_operation.py``) and fla's
``RotaryEmbedding`` / ``RMSNorm`` is written out here in the official layout (fast weights
``[b * heads, out, in]``, the official hand-written SwiGLU backward, its loop over chunks), sharing
no code with tto's layer but its parameters. Where tto departs from the official code on purpose
(its docstring's differences) the transcription takes tto's choice as a named, commented argument.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import tto
from tto.cache import Context

#: Muon's Newton-Schulz coefficients as the official zeropower_via_newtonschulz5 lists them
NS_STEPS = [(4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
            (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012)]


def fla_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """fla's RotaryEmbedding (rotate-half, angles and cos/sin in float32) on x (B, T, H, d), positions 0..T-1."""
    t, d = x.shape[1], x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    freqs = torch.outer(torch.arange(t, dtype=torch.float32), inv_freq)
    cos, sin = torch.cos(freqs).to(x.dtype)[:, None], torch.sin(freqs).to(x.dtype)[:, None]
    cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def newton_schulz(G: torch.Tensor) -> torch.Tensor:
    """zeropower_via_newtonschulz5 on G (b, d, d'), in G's dtype (the official casts to bfloat16 first:
    tto's documented difference, Newton-Schulz in the inner dtype)."""
    X = G.transpose(1, 2) if G.size(1) > G.size(2) else G
    X = X / (X.norm(dim=(1, 2), keepdim=True) + 1e-7)
    for a, b, c in NS_STEPS:
        A = X @ X.transpose(1, 2)
        X = a * X + (b * A + c * A @ A) @ X
    return X.transpose(1, 2) if G.size(1) > G.size(2) else X


def block_causal_lact_swiglu(w0, w1, w2, q, k, v, lr0, lr1, lr2, chunk_size, use_muon, momentum, weight_norm,
                             weight_norm_eps):
    """The official chunk loop: w0, w2 (b, d_h, d_in), w1 (b, d_out, d_h), q, k, v (b, l, d), lrs (b, l, 1),
    momentum (b, l, 1) or None. Chunk i's queries read the weights before its update; the trailing
    (complete or partial) chunk is only read. ``weight_norm`` is the official behaviour (always on);
    ``weight_norm_eps`` its 1e-5 (tto: 0, documented)."""
    w0_norm, w1_norm, w2_norm = (w.norm(dim=2, keepdim=True) for w in (w0, w1, w2))
    m0, m1, m2 = torch.zeros_like(w0), torch.zeros_like(w1), torch.zeros_like(w2)
    q, v = q.transpose(1, 2), v.transpose(1, 2)
    output = torch.zeros_like(v)
    e = 0
    seq_len = k.shape[1]

    def apply(s, e):
        output[:, :, s:e] = w1 @ (F.silu(w0 @ q[:, :, s:e]) * (w2 @ q[:, :, s:e]))

    for s in range(0, seq_len - chunk_size, chunk_size):
        e = s + chunk_size
        ki, vi = k[:, s:e], v[:, :, s:e]
        apply(s, e)
        gate_before_act = w0 @ ki.transpose(1, 2)
        hidden_before_mul = w2 @ ki.transpose(1, 2)
        hidden = F.silu(gate_before_act) * hidden_before_mul
        dhidden = w1.transpose(1, 2) @ vi
        dhidden_before_mul = dhidden * F.silu(gate_before_act)
        dgate = dhidden * hidden_before_mul
        sig = torch.sigmoid(gate_before_act)
        dgate_before_act = dgate * sig * (1 + gate_before_act * (1 - sig))  # silu_backprop
        dw1 = vi @ (hidden.transpose(1, 2) * lr1[:, s:e])
        dw0 = dgate_before_act @ (ki * lr0[:, s:e])
        dw2 = dhidden_before_mul @ (ki * lr2[:, s:e])
        if momentum is not None:
            m_i = momentum[:, s:e].mean(dim=1, keepdim=True)
            dw0, dw1, dw2 = dw0 + m0 * m_i, dw1 + m1 * m_i, dw2 + m2 * m_i
            m0, m1, m2 = dw0, dw1, dw2
        if use_muon:
            dw0, dw1, dw2 = newton_schulz(dw0), newton_schulz(dw1), newton_schulz(dw2)
        w0, w1, w2 = w0 + dw0, w1 + dw1, w2 + dw2
        if weight_norm:
            w0 = w0 / (w0.norm(dim=2, keepdim=True) + weight_norm_eps) * w0_norm
            w1 = w1 / (w1.norm(dim=2, keepdim=True) + weight_norm_eps) * w1_norm
            w2 = w2 / (w2.norm(dim=2, keepdim=True) + weight_norm_eps) * w2_norm
    apply(e, seq_len)
    return output.transpose(1, 2)


def official_lact_layer(layer, config, x: torch.Tensor) -> torch.Tensor:
    """The official layer's output for x (B, T, hidden), with tto's parameters under the official names."""
    b, t, width = x.shape
    attn = layer.attention
    heads, head_dim = config.num_attention_heads, config.head_dim
    nh = config.num_memory_heads

    # qkv: one Linear whose rows are tto's q_proj, k_proj, v_proj
    qkv_weight = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    q, k, v = (x @ qkv_weight.T).chunk(3, dim=-1)
    if config.attn_qk_norm:
        # the official RMSNorm(hidden_size) normalises the whole width; tto's per attention head (documented)
        per_head = lambda y, norm: rms_norm(y.unflatten(-1, (heads, head_dim)), norm.weight, norm.eps).flatten(2)  # noqa: E731
        q, k = per_head(q, layer.q_norm), per_head(k, layer.k_norm)
    # _rescale_qk: qk_scale, qk_offset (hidden, 2) in the official; tto stores them as (2, hidden)
    fast_q, fast_k, fast_v = q * layer.qk_scale[0] + layer.qk_offset[0], k * layer.qk_scale[1] + layer.qk_offset[1], v

    # window attention: flash_attn_func(causal=True, window_size=(window_size - 1, 0)), scale 1/sqrt(head_dim)
    qh, kh = fla_rope(q.unflatten(-1, (heads, head_dim)), config.rope_theta), fla_rope(k.unflatten(-1, (heads, head_dim)), config.rope_theta)
    vh = v.unflatten(-1, (heads, head_dim))
    scores = torch.einsum("bihd,bjhd->bhij", qh, kh) / math.sqrt(head_dim)
    i, j = torch.arange(t)[:, None], torch.arange(t)[None]
    visible = (j <= i) & (i - j <= config.window_size - 1)
    o = torch.einsum("bhij,bjhd->bihd", scores.masked_fill(~visible, float("-inf")).softmax(-1), vh).reshape(b, t, width)

    def to_fw(y):  # "b s (n_h d) -> (b n_h) s d"
        return y.reshape(b, t, nh, -1).transpose(1, 2).reshape(b * nh, t, -1)

    def from_fw(y):
        return y.reshape(b, nh, t, -1).transpose(1, 2).reshape(b, t, -1)

    fast_q, fast_k, fast_v = to_fw(fast_q), to_fw(fast_k), to_fw(fast_v)
    if config.qkv_silu:
        fast_q, fast_k, fast_v = F.silu(fast_q), F.silu(fast_k), F.silu(fast_v)
    l2_norm = lambda y: y / (y.norm(dim=-1, keepdim=True) + 1e-5)  # noqa: E731
    fast_q, fast_k = l2_norm(fast_q), l2_norm(fast_k)
    if not config.ttt_nope:  # the attention's RoPE on the attention's head layout
        rope = lambda y: to_fw(fla_rope(from_fw(y).unflatten(-1, (heads, head_dim)), config.rope_theta).flatten(2))  # noqa: E731
        fast_q, fast_k = rope(fast_q), rope(fast_k)

    # fast weights: official w0, w2 [nh, d_h, d_in] and w1 [nh, d_out, d_h] are tto's W0, W2, W1 transposed
    fast = layer.memory.fast
    w0, w2, w1 = (getattr(fast, n).transpose(1, 2).repeat(b, 1, 1) for n in ("W0", "W2", "W1"))

    # lr_proj: per head (lr for w0, w1, w2); tto's lr_gate rows per head are in its weight order (W0, W2, W1)
    lr_weight = layer.lr_gate.weight.view(nh, 3, width)[:, [0, 2, 1]].reshape(3 * nh, width)
    lr_bias = layer.lr_gate.bias.view(nh, 3)[:, [0, 2, 1]].reshape(3 * nh)
    base_lr = config.base_lr
    lr = F.softplus(x @ lr_weight.T + lr_bias + (base_lr + math.log(-math.expm1(-base_lr))))  # inv_softplus
    lr0, lr1, lr2 = lr.reshape(b, t, nh, 3).transpose(1, 2).reshape(b * nh, t, 3).chunk(3, dim=-1)
    momentum = None
    if config.use_momentum:  # momentum_proj: Linear + Sigmoid
        momentum = to_fw(torch.sigmoid(x @ layer.momentum_gate.weight.T + layer.momentum_gate.bias))

    fw_x = block_causal_lact_swiglu(w0, w1, w2, fast_q, fast_k, fast_v, lr0, lr1, lr2, config.lact_chunk_size,
                                    config.use_muon, momentum, weight_norm=config.weight_norm,
                                    weight_norm_eps=0.0)  # tto's weight norm has no epsilon (documented)
    ttt = rms_norm(fw_x, layer.ttt_norm.weight, layer.ttt_norm.eps)  # fla RMSNorm eps: norm_eps (1e-5, the default rms_norm_eps)
    if config.learnable_ttt_scale:
        ttt = ttt * to_fw(F.silu(x @ layer.ttt_scale_proj.weight.T + layer.ttt_scale_proj.bias))
    return (o + from_fw(ttt)) @ attn.o_proj.weight.T


@pytest.mark.parametrize("preset, fields", [("tiny", {}), ("tiny-muon", {}), ("tiny", dict(use_muon=True)),
                                            ("tiny", dict(attn_qk_norm=True))],
                         ids=["momentum-weightnorm", "muon-nope", "muon-momentum-weightnorm", "attn-qk-norm"])
def test_layer_matches_a_transcription_of_the_official_layer(preset, fields):
    """Float64, 3 chunks plus a partial one of 2, outputs up to ~80: equal to 1e-12 without Muon
    (measured 6e-14), to 1e-10 with it (measured 1e-12 to 5e-12: tto orthogonalises the transposed
    matrix, and the five Newton-Schulz polynomials, slopes up to a = 4 near zero, amplify that
    rounding). Every parameter is random (the q/k norms' and output norm's weights, the q/k affine,
    the gates' biases) so each enters; the inner lr is large (base lr 0.3): the fast weights end
    15-130% of their norm away from their start. With F.normalize's clamp instead of the official
    l2_norm's eps the outputs differ by 1e-5 to 3e-4."""
    torch.manual_seed(0)
    config = tto.build_config("lact", preset=preset, vocab_size=32, torch_dtype="float64", base_lr=0.3, **fields)
    layer = tto.get("lact").model_class(config).double().model.layers[0].mixer
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if not name.startswith("memory."):
                p.copy_(torch.randn_like(p) * (0.15 if p.dim() > 1 else 0.5) + (1.0 if "norm" in name or "scale" in name else 0.0))
    x = torch.randn(2, 3 * config.lact_chunk_size + 2, config.hidden_size, dtype=torch.float64)
    ctx = Context(mask=None, positions=torch.arange(x.shape[1]).expand(x.shape[0], -1))
    ours = layer(x, ctx)
    tolerance = 1e-10 if config.use_muon else 1e-12
    torch.testing.assert_close(ours, official_lact_layer(layer, config, x), atol=tolerance, rtol=0)
