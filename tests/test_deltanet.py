"""DeltaNet and Gated DeltaNet layers against an independent transcription of fla's layer equations.

The engine's chunkwise delta rule is checked against its per-token recurrence in test_engine; here the
whole layer (views, short convs, fla's l2norm with its eps, beta and the Mamba2 decay, the recurrence,
the per-head output norm, the output gate) is written out token by token from fla's
``fla/layers/delta_net.py`` / ``gated_deltanet.py`` and ``fla/ops/delta_rule/naive.py``, sharing no code
with the layer but its parameters.
"""

import pytest
import torch
import torch.nn.functional as F

import tto
from tto.cache import Context


def causal_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Depthwise causal conv, one output per token: y_t = sum_j w_j x_{t-k+1+j}; x (B, T, C), weight (C, 1, k)."""
    k = weight.shape[-1]
    padded = F.pad(x, (0, 0, k - 1, 0))
    return torch.stack([(padded[:, t : t + k] * weight[:, 0].T).sum(1) for t in range(x.shape[1])], 1)


def fla_layer(layer, x: torch.Tensor, eps: float) -> torch.Tensor:
    """fla's layer, token by token: S_t = a_t (S_{t-1} - beta_t k_t (k_t^T S_{t-1})) + beta_t k_t v_t^T."""
    heads, dk, dv = layer.num_heads, layer.head_k_dim, layer.head_v_dim

    def view(proj, conv, dim):
        return F.silu(causal_conv(x @ proj.weight.T, conv.weight)).unflatten(-1, (heads, dim))

    def l2norm(t):  # fla.modules.l2norm: x / sqrt(sum x^2 + eps)
        return t / (t.pow(2).sum(-1, keepdim=True) + eps).sqrt()

    q, k = l2norm(view(layer.q_proj, layer.conv_q, dk)), l2norm(view(layer.k_proj, layer.conv_k, dk))
    v = view(layer.v_proj, layer.conv_v, dv)
    beta = layer.lr_gate.scale * torch.sigmoid(x @ layer.lr_gate.weight.T + layer.lr_gate.bias)
    if hasattr(layer, "forget_gate"):
        g = layer.forget_gate
        decay = torch.exp(-g.A_log.exp() * F.softplus(x @ g.weight.T + g.dt_bias))
    else:
        decay = torch.ones_like(beta)
    S = x.new_zeros(x.shape[0], heads, dk, dv)
    out = []
    for t in range(x.shape[1]):
        kt, vt, bt = k[:, t], v[:, t], beta[:, t, :, None]
        S = decay[:, t, :, None, None] * S
        S = S + (bt * (vt - torch.einsum("bhk,bhkv->bhv", kt, S)))[:, :, None, :] * kt[..., None]
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * dk**-0.5, S))
    o = torch.stack(out, 1)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + layer.out_norm.eps) * layer.out_norm.weight
    o = o.flatten(2)
    if layer.g_proj is not None:
        o = o * F.silu(x @ layer.g_proj.weight.T)
    return o @ layer.o_proj.weight.T


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet"])
def test_layer_matches_a_transcription_of_fla(name):
    """Float64, 3 chunks plus a partial one: the chunkwise layer equals the per-token transcription to
    1e-12 (rounding only). Small keys near zero (scaled by 1e-3) make the l2norm's eps matter: with
    F.normalize's clamp instead of fla's eps the outputs differ by far more than the tolerance."""
    torch.manual_seed(0)
    config = tto.build_config(name, preset="tiny", vocab_size=32, torch_dtype="float64")
    model = tto.get(name).model_class(config).double()
    layer = model.model.layers[0].mixer
    with torch.no_grad():
        layer.k_proj.weight.mul_(1e-3)
    x = torch.randn(2, 3 * config.chunk_size + 2, config.hidden_size, dtype=torch.float64)
    ours = layer(x, Context(mask=None, positions=torch.arange(x.shape[1]).expand(x.shape[0], -1)))
    torch.testing.assert_close(ours, fla_layer(layer, x, config.qk_norm_eps), atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet"])
def test_short_convs_start_as_fla_initialises_them(name):
    """fla's models initialise every nn.Conv1d (its ShortConvolution) with N(0, initializer_range)."""
    torch.manual_seed(0)
    config = tto.build_config(name, hidden_size=256, num_attention_heads=2, num_memory_heads=2, vocab_size=32, num_hidden_layers=1)
    layer = tto.get(name).model_class(config).model.layers[0].mixer
    weights = torch.cat([c.weight.flatten() for c in (layer.conv_q, layer.conv_k, layer.conv_v)])
    # 3 x 256 x 4 = 3072 draws: the sample std is within 5% of the target with overwhelming probability,
    # while torch's default (kaiming uniform, bound 1/sqrt(kernel)) has std 0.29 = 14x larger
    assert abs(weights.std().item() / config.initializer_range - 1) < 0.05
    assert abs(weights.mean().item()) < 0.1 * config.initializer_range
