"""ViT³ (arXiv:2512.01643): its layer against a transcription of the paper's (official code's)
equations, and the invariants of its non-causal inner step. The registry-wide image invariants
(fast path == naive reference, save/load, ...) are in tests/test_conformance.py."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tto

#: initializer_range 1 gives q, k, v of scale ~sqrt(width), whose inner gradients have norms ~1: the
#: regime where the normalisation g / (||g|| + 1) matters (at the 0.02 of training, ||g|| << 1)
SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, initializer_range=1.0)
GRID = (4, 4)  # the tiny preset: 8x8 images in 2x2 patches


def mixer(seed: int = 0, **fields):
    """Layer 0's mixer of a float64 tiny vit3 model (initialised as the model initialises it)."""
    torch.manual_seed(seed)
    config = tto.build_config("vit3", preset="tiny", **SIZES, **fields)
    return tto.get("vit3").model_class(config).double().model.layers[0].mixer


def tokens(batch=2, seed=1):
    return torch.randn(batch, GRID[0] * GRID[1], SIZES["hidden_size"], dtype=torch.float64,
                       generator=torch.Generator().manual_seed(seed))


def transcription(m, x, *, lr=1.0, scale=9 ** -0.5, rope_theta=None):
    """The ViT³ layer written from the official ``TTT.forward`` equations, independently of tto's
    engine: the closed-form gradients of the simplified SwiGLU (hand-derived, as the paper), the conv
    gradient as nine shifted products, the 2D RoPE as complex rotations."""
    b, n, c = x.shape
    heads, d = m.heads, c // m.heads
    rows, cols = GRID
    q1, k1, v1, q2, k2, v2 = (x @ m.qkv.weight.T + m.qkv.bias).split([c, c, c, d, d, d], dim=-1)
    if rope_theta is not None:  # pairs (2i, 2i+1) of the whole width; the first c/4 by row, the rest by column
        quarter = c // 4
        freqs = rope_theta ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
        r, s = torch.arange(n) // cols, torch.arange(n) % cols
        angles = torch.cat([r[:, None] * freqs, s[:, None] * freqs], dim=-1)  # (n, c/2)
        turn = torch.polar(torch.ones_like(angles), angles)
        q1, k1 = (torch.view_as_real(torch.view_as_complex(t.reshape(b, n, c // 2, 2)) * turn).flatten(-2) for t in (q1, k1))
    per_head = lambda t: t.reshape(b, n, heads, d).transpose(1, 2)  # noqa: E731  (b, heads, n, d)
    q1, k1, v1 = per_head(q1), per_head(k1), per_head(v1)
    w1, w2 = m.swiglu.fast.W1, m.swiglu.fast.W2
    z1, z2 = k1 @ w1, k1 @ w2
    sig = torch.sigmoid(z2)
    e = -v1 / n * scale
    g1 = k1.transpose(-1, -2) @ (e * z2 * sig)
    g2 = k1.transpose(-1, -2) @ (e * z1 * sig * (1 + z2 * (1 - sig)))
    g1, g2 = g1 / (g1.norm(dim=-2, keepdim=True) + 1), g2 / (g2.norm(dim=-2, keepdim=True) + 1)
    w1, w2 = w1 - lr * g1, w2 - lr * g2
    x1 = ((q1 @ w1) * F.silu(q1 @ w2)).transpose(1, 2).reshape(b, n, c)

    grid = lambda t: t.transpose(1, 2).reshape(b, d, rows, cols)  # noqa: E731
    k2, e2 = F.pad(grid(k2), (1, 1, 1, 1)), -grid(v2) / n * scale
    g3 = torch.stack([(k2[:, :, i: i + rows, j: j + cols] * e2).sum((-2, -1)) for i in range(3) for j in range(3)], -1)
    g3 = g3 / (g3.norm(dim=-1, keepdim=True) + 1)
    w3 = m.conv.W3.reshape(1, d, 9) - lr * g3  # (b, d, 9)
    x2 = torch.cat([F.conv2d(grid(q2)[i: i + 1], w3[i].reshape(d, 1, 3, 3), padding=1, groups=d) for i in range(b)])
    x2 = x2.reshape(b, d, n).transpose(1, 2)
    return torch.cat([x1, x2], dim=-1) @ m.proj.weight.T + m.proj.bias


@pytest.mark.parametrize("rope", [False, True])
def test_layer_matches_the_papers_equations(rope):
    m, x = mixer(use_rope=rope), tokens()
    with torch.no_grad():
        torch.testing.assert_close(m(x, GRID), transcription(m, x, rope_theta=m.rope_theta if rope else None),
                                   atol=1e-12, rtol=0)


def test_inner_lr_zero_is_a_fixed_gated_mlp_of_q():
    """lr = 0: the SwiGLU branch is ``(q W1) * silu(q W2)`` and the conv branch ``conv3x3(q; W3)``
    with the learned initial weights, whatever the keys and values."""
    m, x = mixer(inner_lr=0.0), tokens()
    b, n, c = x.shape
    d = c // m.heads
    q1, _, _, q2, _, _ = (x @ m.qkv.weight.T + m.qkv.bias).split([c, c, c, d, d, d], dim=-1)
    q1 = q1.reshape(b, n, m.heads, d)
    x1 = torch.einsum("bnhd,hde->bnhe", q1, m.swiglu.fast.W1) * F.silu(torch.einsum("bnhd,hde->bnhe", q1, m.swiglu.fast.W2))
    x2 = F.conv2d(q2.transpose(1, 2).reshape(b, d, *GRID), m.conv.W3[:, None], padding=1, groups=d).flatten(2).transpose(1, 2)
    expected = torch.cat([x1.flatten(2), x2], -1) @ m.proj.weight.T + m.proj.bias
    with torch.no_grad():
        torch.testing.assert_close(m(x, GRID), expected, atol=1e-12, rtol=0)
        big = 30 * x  # lr = 1 learns from the keys and values: large enough ones change the reads visibly
        stepped = mixer()(big, GRID)
        assert (m(big, GRID) - stepped).abs().max() > 0.05 * stepped.abs().max()


@pytest.mark.parametrize("rope", [False, True])
def test_swiglu_branch_is_permutation_equivariant_without_rope(rope):
    """Without RoPE the SwiGLU branch sees the image as a set: permuting the tokens permutes its
    reads. 2D RoPE makes it depend on the positions (and the conv branch always does)."""
    m, x = mixer(use_rope=rope), tokens()
    perm = torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(3))

    def swiglu_reads(x):
        b, n, c = x.shape
        q, k, v = m.qkv(x)[..., : 3 * c].chunk(3, dim=-1)
        if rope:
            from tto.layers.rope import apply_rope_interleaved, rope_2d_cos_sin

            cos, sin = rope_2d_cos_sin(*GRID, c, m.rope_theta, dtype=torch.float64)
            q, k = (apply_rope_interleaved(t[:, :, None], cos, sin)[:, :, 0] for t in (q, k))
        heads = lambda t: t.reshape(b, n, m.heads, -1)  # noqa: E731
        return m.swiglu(heads(q), heads(k), heads(v), 1.0 / n)

    with torch.no_grad():
        reads = swiglu_reads(x)
        gap = (swiglu_reads(x[:, perm]) - reads[:, perm]).abs().max()
        conv_qkv = m.qkv(x)[..., -3 * m.head_dim:].chunk(3, -1)
        conv_reads = m.conv(*conv_qkv, GRID, 1.0)
        conv_gap = (m.conv(*(t[:, perm] for t in conv_qkv), GRID, 1.0) - conv_reads[:, perm]).abs().max()
    assert conv_gap > 0.1 * conv_reads.abs().max()
    if rope:
        assert gap > 0.1 * reads.abs().max()
    else:
        assert gap < 1e-10 * reads.abs().max()



# ---------------------------------------------------------------------------- training from YAML

ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = ROOT / "configs" / "vision" / "vit3_tiny.yml"


def test_train_on_builtin_digits(tmp_path):
    """train.py's pipeline on scikit-learn's digits from the tiny recipe: a few dozen steps lower the
    loss, the eval reports top-1, and the saved model loads through AutoModelForImageClassification."""
    from transformers import AutoModelForImageClassification

    from tto.training import build_trainer, load_recipe, run

    recipe = load_recipe(TINY_RECIPE, [f"training_args.output_dir={tmp_path}", "training_args.max_steps=60",
                                       "training_args.logging_steps=20"])
    trainer, _ = build_trainer(recipe)
    metrics = run(trainer)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]  # means over 20 steps of 32 images
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    # from ln(10) = 2.30 at initialization (2.36, 2.27, 2.21 at seed 0); a step's noise is ~0.03
    assert losses[0] > losses[1] > losses[2] and losses[2] < losses[0] - 0.1, losses
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and math.isfinite(metrics["eval_loss"])
    model = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert type(model) is tto.get("vit3").model_class and model.config.num_labels == 10


def test_train_on_an_imagefolder(tmp_path):
    """A ``datasets`` imagefolder directory (<dir>/<label>/<file>): colour PNGs of another size are
    resized and averaged to the model's one channel; the labels are the folder names."""
    from PIL import Image

    from tto.training import build_trainer, load_recipe, run

    rng = np.random.default_rng(0)
    for label in ("a", "b", "c"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(tmp_path / "data" / label / f"{i}.png")
    recipe = load_recipe(TINY_RECIPE, [f"training_args.output_dir={tmp_path / 'out'}", "training_args.max_steps=2",
                                       f"dataset.name={tmp_path / 'data'}", "dataset.eval_fraction=0.25"])
    trainer, _ = build_trainer(recipe)
    assert trainer.model.config.num_labels == 3
    batch = trainer.train_dataset[:2]
    assert batch["pixel_values"][0].shape == (1, 8, 8)
    metrics = run(trainer)
    assert math.isfinite(metrics["train_loss"]) and "eval_accuracy" in metrics


@pytest.mark.parametrize("recipe", ["vit3_t_6m.yml", "vit3_s_24m.yml"])
def test_paper_scale_recipes_build_at_the_papers_size(recipe):
    """ViT³-T and -S recipes name a size preset and build (with their own fields) within 10% of the
    paper's 6M and 24M parameters."""
    from tto.training import load_recipe

    model = load_recipe(ROOT / "configs" / "vision" / recipe).model
    target = tto.get("vit3").paper_sizes[model["preset"]]
    with torch.device("meta"):
        count = sum(p.numel() for p in tto.get("vit3").model_class(
            tto.build_config("vit3", **{k: v for k, v in model.items() if k != "type"})).parameters())
    assert abs(count - target) / target < 0.10, f"{count / 1e6:.2f}M parameters, the paper's {target / 1e6:.0f}M"


def test_infer_refuses_image_types(capsys):
    """infer.py writes text: an image type is one clear line, naming the language-model types."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("infer_cli", ROOT / "infer.py")
    infer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(infer)
    with pytest.raises(SystemExit) as stop:
        infer.parse_args(["--config-type", "vit3", "--prompt", "x"])
    assert stop.value.code == 2
    assert "'vit3' is an image-classification model" in capsys.readouterr().err
