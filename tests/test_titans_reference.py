"""Titans' neural memory against an independent transcription of titans-pytorch's ``NeuralMemory``
update (lucidrains/titans-pytorch, ``titans_pytorch/neural_memory.py``) at ``chunk_size=1``.

There, ``store_memories`` takes every token's gradient of ``adaptive_lr * mean((M(k) - v)^2)`` at the
weights of the current TTT batch's start (``batch_size`` tokens; the gradients of a whole call at
one set of weights), scans the momentum ``S_t = eta_t S_{t-1} - grad_t`` and the forgetting
``W_t = (1 - alpha_t) W_{t-1} + S_t`` token by token (``AssocScan``; ``remove_prev=False`` keeps the
previous weights first, so after the one-slot left pad of ``retrieve_memories`` token t reads the
weights after its own write); the next batch starts from the last ``W``. The gates are linear maps
of the memory's input: ``adaptive_lr = max_lr * sigmoid``, ``eta``, ``alpha`` sigmoids. tto's
memory at chunk b equals titans-pytorch at chunk_size 1, batch_size b.

What is not compared: the views. titans-pytorch feeds its memory ``RMSNorm(x)`` through plain
linear q/k/v maps; tto's memory layer follows the paper's Sec. 4.4 (short convs, SiLU, l2-normalised
q and k), so q, k, v come from tto's layer and the comparison starts there (the gates are computed
here from x and tto's gate parameters). Nor the read-out's output norm, gate and projection, nor
``mem_residual_norm`` (titans-pytorch's ``ResidualNorm`` LayerNorm gain is a fast weight, trained
by the inner loop; tto's is an outer parameter).
"""

import pytest
import torch
import torch.nn.functional as F

import tto
from tto.cache import Context


def titans_pytorch_memory(layer, x, q, k, v, batch_size: int) -> torch.Tensor:
    """Read-outs (B, T, H, d) of NeuralMemory(chunk_size=1, batch_size, per-head weights, MemoryMLP
    with GELU, no residual norm), for x (B, T, width), q, k, v (B, T, H, d)."""
    fast = layer.memory.fast
    names = list(fast.weight_names)  # MemoryMLP.weights, each [dim_in, dim_out] per head
    b, t, heads, d = q.shape

    def gate(g, scale):  # Linear(dim, heads) then sigmoid (times max_lr for the adaptive step)
        return scale * torch.sigmoid(x @ g.weight.T + g.bias)  # (B, T, H)

    theta = gate(layer.lr_gate, layer.lr_gate.scale)  # default_adaptive_step_transform
    eta = gate(layer.momentum_gate, 1.0)  # to_momentum
    alpha = gate(layer.forget_gate, 1.0)  # to_decay_factor

    def memory_mlp(weights, h):  # h (B, H, d); x @ W, GELU between layers (exact GELU)
        for i, name in enumerate(names):
            if i > 0:
                h = F.gelu(h)
            h = (h[..., None, :] @ weights[name])[..., 0, :]
        return h

    W = {n: getattr(fast, n).detach().expand(b, *getattr(fast, n).shape) for n in names}  # init_weights
    S = {n: torch.zeros_like(w) for n, w in W.items()}  # init_momentum
    batch_start = W
    out = []
    for i in range(t):
        if i % batch_size == 0:
            batch_start = W  # weights = last_update at each batch boundary
        leaves = {n: w.detach().requires_grad_(True) for n, w in batch_start.items()}
        loss = (memory_mlp(leaves, k[:, i]) - v[:, i]).pow(2).mean(-1)  # default_loss_fn
        grads = torch.autograd.grad((loss * theta[:, i]).sum(), [leaves[n] for n in names])
        for n, g in zip(names, grads):
            S[n] = eta[:, i, :, None, None] * S[n] - g  # surprise = -grad; momentum scan
            W = {**W, n: (1 - alpha[:, i, :, None, None]) * W[n] + S[n]}  # decay scan
        out.append(memory_mlp(W, q[:, i]))  # retrieve with the weights after token i
    return torch.stack(out, 1)


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("depth", [1, 2])
def test_memory_matches_a_transcription_of_titans_pytorch(chunk, depth, step_factors):
    """Float64, 11 tokens (at chunk 3: three batches and a partial one): tto's memory with
    ``mem_loss_scale = 2 / head_dim`` (titans-pytorch's mean over features instead of the paper's
    sum) and exact GELU equals the transcription to 1e-12 (measured 1e-16; reads up to 0.1-0.2). Gates and
    fast weights are random and the inner step large (max lr 1, titans-pytorch's default): the
    written values change the reads by 15-60%. Every step is one tto's step bound leaves alone
    (factor 1, checked); with momentum gates near 1 or steps 3x larger it scales commits, and tto
    departs from titans-pytorch there on purpose (README, "Stable inner loops")."""
    torch.manual_seed(0)
    config = tto.build_config("titans", preset="tiny", variant="lmm", vocab_size=32, torch_dtype="float64",
                              chunk_size=chunk, mem_depth=depth, mem_activation="gelu", mem_residual_norm=False,
                              mem_max_lr=1.0, num_memory_heads=4)
    head_dim = config.hidden_size // config.num_memory_heads
    config.mem_loss_scale = 2.0 / head_dim
    layer = tto.get("titans").model_class(config).double().model.layers[0].mixer.wiring.memory
    with torch.no_grad():
        # theta around 0.9, eta around 0.27, alpha around 0.12, each varying from token to token
        for g, bias in ((layer.lr_gate, 2.0), (layer.momentum_gate, -1.0), (layer.forget_gate, -2.0)):
            g.weight.normal_(0.0, 0.05)
            g.bias.normal_(bias, 0.5)
        for name in layer.memory.fast.weight_names:
            w = getattr(layer.memory.fast, name)
            w.normal_(0.0, 0.5 / w.shape[-2] ** 0.5)
    x = torch.randn(2, 11, config.hidden_size, dtype=torch.float64)
    ctx = Context(mask=None, positions=torch.arange(x.shape[1]).expand(x.shape[0], -1))
    q, k, v = layer.qkv(x, ctx, None)
    ours = layer.memory(q, k, v, layer.gates(x), None, None)
    assert step_factors and all(bool((f == 1).all()) for f in step_factors)
    ref = titans_pytorch_memory(layer, x, q, k, v, batch_size=chunk)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=0)
    frozen = titans_pytorch_memory(layer, x, q, k, 0 * v, batch_size=chunk)
    assert (ref - frozen).abs().max() > 0.1 * ref.abs().max()  # what is written matters
