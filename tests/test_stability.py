"""The inner loops cannot diverge: a property over the config space (tto.engine.memory's step bound).

* The step bound's inequality: one chunk of every inner optimizer, with kappa from
  :func:`stable_step_factor`, is a stable map for every curvature the bound allows, and without it
  the chunk that diverged in the pass-key run is not; products of many bounded chunk maps along
  key directions that rotate within and between chunks do not grow, where chunk maps that are
  each stable (spectral radius <= 1 per direction) do (a random Titans MAL draw diverged so); with
  each token's Hessian its key's outer product, the bound from the chunk's Gram matrix of keys
  allows larger steps than the sum of the tokens' curvatures and the products still do not grow.
* The curvature factors bound the true Gauss-Newton Hessians: ``||sum_s a_s H_s||`` by autograd
  for MLP memories of every depth, activation and bias setting is at most the factors' bound.
* Random configurations drawn from each registered type's and variant's fields (widths, heads,
  memory depth and expansion, chunk sizes, lr bounds, gate biases, every boolean and choice field)
  give finite logits and bounded fast weights on random tokens.

"Bounded": every fast-weight and momentum tensor of every memory state after the sequence has an
entry RMS of at most :data:`MAX_FAST_RMS` times max(1, the RMS of the memory's initial fast
weights). A stable memory moves its weights by O(theta |k| |v|) per token, at most linearly in the
tokens; a diverging chunk map multiplies them geometrically (x ~10 per chunk where the pass-key run
diverged: 0.5 -> 1e28 in 8 chunks), past 1e3 within a few chunks and to inf or NaN soon after.

"""

from __future__ import annotations

import dataclasses
import random
import re
from pathlib import Path

import pytest
import torch

import tto
from conftest import require_memory
from tto.engine import DecayGD, MiniBatchGD, MomentumGD, OmegaWindow, PlainGD
from tto.engine.optimizers import Coefficients
from tto.engine.optimizers import STEP_MARGIN, stable_step_factor


#: largest RMS of a fast-weight or momentum entry counted as bounded (module docstring)
MAX_FAST_RMS = 1e3
#: random configurations per type and variant, and their sequence length (several chunks of the
#: largest drawn chunk size, 32)
DRAWS = 3
RANDOM_LENGTH = 128
VOCAB = 256


# ---------------------------------------------------------------------------- the bound's inequality

#: configs/tasks/passkey.yml's Titans run at mem_max_lr 0.1 diverged at step 817: the momentum gate
#: of the heads that diverged, their theta (at the bound), the chunk length and the Gauss-Newton
#: curvature those heads reached before their weights blew up
DIVERGED = {"theta": 0.1, "eta": 0.98, "alpha": 0.018, "chunk": 8, "curvature": 1.0}


def chunk_map(c, kappa: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """One chunk's map (W, S) -> (W', S') per row (N, 2, 2), every gradient at the chunk-start W with
    token curvatures h (N, b): ``W' = (d - kappa sum m_s h_s) W + c S``, ``S' = -kappa sum p_s h_s W + e S``."""
    decay = c.decay[:, 0, -1] if c.decay is not None else torch.ones_like(kappa)
    a = kappa * (c.mix[:, 0, -1] * h).sum(-1)
    if c.carry is None:
        return torch.stack([torch.stack([decay - a, torch.zeros_like(a)], -1), torch.zeros(len(a), 2, dtype=a.dtype)], -2)
    b = kappa * (c.s_mix[:, 0] * h).sum(-1)
    return torch.stack([torch.stack([decay - a, c.carry[:, 0, -1]], -1), torch.stack([-b, c.s_decay[:, 0]], -1)], -2)


def kappa_of(c, curvature: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
    """kappa for token curvature bounds (N, b): with `keys` (N, b, dim) the Hessians are known to be
    ``curvature_s k_s k_s^T`` (curvature factors sqrt(curvature_s) k_s, keys of unit norm), without
    them they may be any ``0 <= H_s <= curvature_s I`` (one factor column: every key parallel)."""
    decay = c.decay[:, 0, -1] if c.decay is not None else torch.ones_like(curvature[:, 0])
    carry = c.carry[:, 0, -1] if c.carry is not None else None
    s_decay = c.s_decay[:, 0] if c.s_decay is not None else None
    s_mix = c.s_mix[:, 0] if c.s_mix is not None else None
    factor = curvature.sqrt()[..., None] * (keys if keys is not None else 1.0)
    return stable_step_factor(decay, carry, s_decay, c.mix[:, 0, -1], s_mix, [factor])


def radius(m: torch.Tensor) -> torch.Tensor:
    return torch.linalg.eigvals(m).abs().amax(-1)


OPTIMIZERS = {"momentum": MomentumGD, "decay": DecayGD, "plain": PlainGD, "minibatch": lambda: MiniBatchGD(8),
              "omega-momentum": lambda: OmegaWindow(MomentumGD(), 3)}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_bounded_chunk_map_is_stable_for_every_allowed_curvature(optimizer):
    """Random gates (momentum up to 0.999, steps up to 10) and token curvature bounds L_s up to 1e3:
    at h_s = L_s the bounded chunk map's spectral radius is below 1 (the unbounded one's above 2
    on some rows, and the bound is active on most rows), and at curvatures h_s drawn inside
    [0, L_s] (and at the box's corners) it is at most 1."""
    g = torch.Generator().manual_seed(0)
    n, b = 4000, 8
    gates = {"lr": 10 * torch.rand(n, 1, b, generator=g, dtype=torch.float64) ** 3,
             "momentum": 1 - torch.rand(n, 1, b, generator=g, dtype=torch.float64) ** 4,
             "forget": 0.2 * torch.rand(n, 1, b, generator=g, dtype=torch.float64) ** 2,
             "omega": torch.rand(n, 1, b, generator=g, dtype=torch.float64)}
    gates["momentum"] = gates["momentum"].clamp_max(0.999)
    opt = OPTIMIZERS[optimizer]()
    if isinstance(opt, MiniBatchGD):
        opt.token_offset.data = torch.rand(b, generator=g)
    c = opt.coefficients(gates, torch.ones(n, 1, b, dtype=torch.bool))
    bound = 1e3 * torch.rand(n, b, generator=g, dtype=torch.float64) ** 3
    kappa = kappa_of(c, bound)
    assert (kappa < 1).float().mean() > 0.5
    assert radius(chunk_map(c, torch.ones_like(kappa), bound)).max() > 2  # unbounded, these chunks diverge
    assert radius(chunk_map(c, kappa, bound)).max() < 1
    # inside the box the map does not expand (radius 1 only where it is the identity: h = 0, no forgetting)
    for h in (bound * torch.rand(n, b, generator=g, dtype=torch.float64), bound * (torch.rand(n, b, generator=g) < 0.5)):
        assert radius(chunk_map(c, kappa, h)).max() <= 1 + 1e-9


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_step_gates_of_all_chunks_at_once_equal_them_chunk_by_chunk(optimizer):
    """The engine computes the bound's gates part for all chunks before the scan (leading dims (N, n)),
    the reference one chunk at a time (N,): the same token weights, 1 / t_max, valid-P and step masks,
    and so the same kappa, on random gates (some tokens padded: no step) where the bound is active on
    some chunks and not on others."""
    from tto.engine.memory import Memory
    from tto.engine.optimizers import bound_factor, step_gates

    g = torch.Generator().manual_seed(1)
    rows, n, b = 64, 5, 8
    gates = {"lr": 10 * torch.rand(rows, n, b, generator=g, dtype=torch.float64) ** 3,
             "momentum": (1 - torch.rand(rows, n, b, generator=g, dtype=torch.float64) ** 4).clamp_max(0.999),
             "forget": 0.2 * torch.rand(rows, n, b, generator=g, dtype=torch.float64) ** 2,
             "omega": torch.rand(rows, n, b, generator=g, dtype=torch.float64)}
    opt = OPTIMIZERS[optimizer]()
    valid = torch.rand(rows, n, b, generator=g) < 0.9
    c = opt.coefficients(gates, valid)
    scale = 10 ** (5 * torch.rand(rows, n, 1, 1, generator=g, dtype=torch.float64) - 4)  # curvatures over decades
    factors = [scale * torch.randn(rows, n, c.mix.shape[-1], 3, generator=g, dtype=torch.float64)]
    together = Memory._step_gates(c).unbind()
    kappas = []
    for i, chunk in enumerate(together):
        decay = c.decay[:, i, -1] if c.decay is not None else torch.ones(rows, dtype=torch.float64)
        alone = step_gates(decay, None if c.carry is None else c.carry[:, i, -1],
                           None if c.s_decay is None else c.s_decay[:, i], c.mix[:, i, -1],
                           None if c.s_mix is None else c.s_mix[:, i])
        for a, b_ in zip(chunk, alone):
            torch.testing.assert_close(a, b_, rtol=1e-14, atol=0)
        kappa = bound_factor(chunk, [factors[0][:, i]])
        torch.testing.assert_close(kappa, bound_factor(alone, [factors[0][:, i]]), rtol=1e-14, atol=0)
        kappas.append(kappa)
    kappas = torch.stack(kappas)
    assert (kappas < 1).any() and (kappas == 1).any()


def test_diverged_pass_key_chunk_is_unstable_without_the_bound_and_stable_with_it():
    """The chunk where the pass-key run diverged (Titans, mem_max_lr 0.1): spectral radius > 1 at
    kappa = 1, < 1 with the bound, and the bound leaves a chunk with a small enough step alone
    (theta 1e-4: at momentum 0.98 the non-expansion for rotating keys allows theta up to ~7e-4)."""
    gates = {name: torch.full((1, 1, DIVERGED["chunk"]), DIVERGED[key], dtype=torch.float64)
             for name, key in (("lr", "theta"), ("momentum", "eta"), ("forget", "alpha"))}
    c = MomentumGD().coefficients(gates, torch.ones(1, 1, DIVERGED["chunk"], dtype=torch.bool))
    h = torch.full((1, DIVERGED["chunk"]), DIVERGED["curvature"], dtype=torch.float64)
    assert radius(chunk_map(c, torch.ones(1, dtype=torch.float64), h)).item() > 1.5
    kappa = kappa_of(c, h)
    assert kappa.item() < 1 and radius(chunk_map(c, kappa, h)).item() < 1
    small = MomentumGD().coefficients({**gates, "lr": gates["lr"] / 1000}, torch.ones(1, 1, DIVERGED["chunk"], dtype=torch.bool))
    assert kappa_of(small, h).item() == 1.0
    # without momentum the bound is the plain-descent step: kappa * sum(m_s L_s) = STEP_MARGIN * (1 + decay)
    plain = DecayGD().coefficients({"lr": gates["lr"], "forget": gates["forget"]}, torch.ones(1, 1, 8, dtype=torch.bool))
    kappa = kappa_of(plain, 100 * h)
    total = kappa * (plain.mix[:, 0, -1] * 100 * h).sum(-1)
    torch.testing.assert_close(total, STEP_MARGIN * (1 + plain.decay[:, 0, -1]), rtol=1e-12, atol=0)


def spectral_kappa(c, bound: torch.Tensor) -> float:
    """The largest kappa (on a log grid) at which one chunk's map (one row) has spectral radius <= 1
    at every curvature in [0, bound] (per direction, as Jury's conditions): stable chunk by chunk.
    The map depends on kappa * h only, so kappa is stable iff every kappa' <= kappa is at h = bound."""
    grid = torch.logspace(-8, 0, 801, dtype=torch.float64)
    rows = Coefficients(*(None if t is None else t.expand(len(grid), *t.shape[1:])
                          for t in (c.mix, c.decay, c.carry, c.s_decay, c.s_mix)))
    stable = radius(chunk_map(rows, grid, bound.expand(len(grid), -1))) <= 1 + 1e-12
    return grid[stable.long().cumprod(0).sum() - 1].item()


def run_rotating(c, kappa: torch.Tensor, bound: torch.Tensor, dim: int, chunks: int, seed: int) -> torch.Tensor:
    """|(W, S)| after `chunks` chunk maps with random token Hessians ``H_s = L_s U diag(1, u...) U^T``
    (U a fresh random rotation of R^dim per token and chunk: the directions change within and
    between chunks and the maps do not commute), relative to the start; rows (N,) as in `c`."""
    g = torch.Generator().manual_seed(seed)
    n, b = bound.shape
    d = c.decay[:, 0, -1] if c.decay is not None else torch.ones(n, dtype=torch.float64)
    w, s = torch.randn(n, dim, generator=g, dtype=torch.float64), torch.randn(n, dim, generator=g, dtype=torch.float64)
    start = (w.square().sum(-1) + s.square().sum(-1)).sqrt()
    for _ in range(chunks):
        u = torch.linalg.qr(torch.randn(n, b, dim, dim, generator=g, dtype=torch.float64))[0]
        eig = torch.rand(n, b, dim, generator=g, dtype=torch.float64)
        eig[..., 0] = 1.0
        h = (u * (eig * bound[..., None])[..., None, :]) @ u.transpose(-1, -2)  # (n, b, dim, dim)
        hw = (h @ w[:, None, :, None])[..., 0]  # (n, b, dim)
        step = kappa[:, None] * (c.mix[:, 0, -1, :, None] * hw).sum(1)
        momentum_step = kappa[:, None] * (c.s_mix[:, 0, :, None] * hw).sum(1)
        w, s = d[:, None] * w + c.carry[:, 0, -1, None] * s - step, c.s_decay[:, 0, None] * s - momentum_step
    return (w.square().sum(-1) + s.square().sum(-1)).sqrt() / start


def test_known_rotating_case_grows_chunk_by_chunk_stable_and_not_with_the_bound():
    """titans-mal-1's inner loop (momentum 0.99, no forgetting, chunk 1, theta 4.4, curvature 16: a
    linear memory with RMS-normalised 8-wide keys): at the largest per-direction stable kappa the
    product of 2000 chunk maps along random key directions of R^3 grows past 1e6 (to inf), with the
    bound it does not grow; and the docstring's Lyapunov function for this case,
    V = (W + gamma S)^2 + nu^2 S^2 with gamma = eta / (1 - eta), nu^2 = eta / (1 - eta)^2, never
    increases from chunk to chunk."""
    eta, theta, bound = 0.99, 4.4, torch.full((1, 1), 16.0, dtype=torch.float64)
    gates = {"lr": torch.full((1, 1, 1), theta, dtype=torch.float64), "momentum": torch.full((1, 1, 1), eta, dtype=torch.float64),
             "forget": torch.zeros(1, 1, 1, dtype=torch.float64)}
    c = MomentumGD().coefficients(gates, torch.ones(1, 1, 1, dtype=torch.bool))
    kappa = kappa_of(c, bound)
    # the closed form of the docstring: theta L kappa = STEP_MARGIN * 2 (1 - eta)^2 / (1 + eta)
    torch.testing.assert_close(theta * 16.0 * kappa, torch.tensor([STEP_MARGIN * 2 * (1 - eta) ** 2 / (1 + eta)],
                                                                dtype=torch.float64), rtol=1e-9, atol=0)
    per_direction = torch.tensor([spectral_kappa(c, bound)], dtype=torch.float64)
    assert per_direction > 100 * kappa
    assert not run_rotating(c, per_direction, bound, dim=3, chunks=2000, seed=0).item() < 1e6
    assert run_rotating(c, kappa, bound, dim=3, chunks=2000, seed=0).item() <= 1.0
    gamma, nu2 = eta / (1 - eta), eta / (1 - eta) ** 2
    g = torch.Generator().manual_seed(1)
    w, s = torch.randn(3, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    for _ in range(500):
        u = torch.nn.functional.normalize(torch.randn(3, generator=g, dtype=torch.float64), dim=0)
        h = 16.0 * torch.rand((), generator=g, dtype=torch.float64) * torch.outer(u, u)
        before = (w + gamma * s).square().sum() + nu2 * s.square().sum()
        step = kappa * theta * (h @ w)
        w, s = w + eta * s - step, eta * s - step
        assert (w + gamma * s).square().sum() + nu2 * s.square().sum() <= before * (1 + 1e-12)


@pytest.mark.parametrize("optimizer", ["momentum", "omega-momentum"])
@pytest.mark.parametrize("dim", [2, 4])
def test_products_of_bounded_chunks_along_rotating_directions_do_not_grow(optimizer, dim):
    """Random gates (momentum up to 0.999) and curvature bounds, chunks of 4 tokens, each token's
    Hessian a random rotation: the bounded maps' product over 600 chunks stays bounded (within the
    P-norm's conditioning of the start: below 1e3 here) and does not grow from the first 300 chunks
    to the next 300."""
    g = torch.Generator().manual_seed(dim)
    n, b = 300, 4
    gates = {"lr": 10 * torch.rand(n, 1, b, generator=g, dtype=torch.float64) ** 3,
             "momentum": (1 - torch.rand(n, 1, b, generator=g, dtype=torch.float64) ** 4).clamp_max(0.999),
             "forget": 0.2 * torch.rand(n, 1, b, generator=g, dtype=torch.float64) ** 2 * (torch.rand(n, 1, 1, generator=g) < 0.5),
             "omega": torch.rand(n, 1, b, generator=g, dtype=torch.float64)}
    c = OPTIMIZERS[optimizer]().coefficients(gates, torch.ones(n, 1, b, dtype=torch.bool))
    bound = 100 * torch.rand(n, b, generator=g, dtype=torch.float64) ** 3
    kappa = kappa_of(c, bound)
    assert (kappa < 1).float().mean() > 0.9
    first = run_rotating(c, kappa, bound, dim, chunks=300, seed=dim)
    both = run_rotating(c, kappa, bound, dim, chunks=600, seed=dim)
    assert first.max() < 1e3 and both.max() < 1e3
    assert (both <= first.clamp_min(1.0) * 1.01).all()


def test_products_of_bounded_chunks_with_key_hessians_do_not_grow():
    """Each token's Hessian ``L k_s k_s^T`` with a unit key k_s of R^8, fresh keys every chunk of 4
    tokens, random momentum gates up to 0.99 (at 0.999 without forgetting the (W, S) norm still moves
    within the Lyapunov norm's conditioning after 600 chunks): kappa from the chunk's key Gram matrix is at least that from the
    summed curvatures, at most the chunk length times it (orthogonal keys), larger where the bound
    is active (by 1.26x in the median here), and the product of 600 bounded chunk maps still does not
    grow."""
    g = torch.Generator().manual_seed(7)
    n, b, dim, chunks = 300, 4, 8, 600
    gates = {"lr": 10 * torch.rand(n, 1, b, generator=g, dtype=torch.float64) ** 3,
             "momentum": (1 - torch.rand(n, 1, b, generator=g, dtype=torch.float64) ** 4).clamp_max(0.99),
             "forget": 0.2 * torch.rand(n, 1, b, generator=g, dtype=torch.float64) ** 2 * (torch.rand(n, 1, 1, generator=g) < 0.5)}
    c = MomentumGD().coefficients(gates, torch.ones(n, 1, b, dtype=torch.bool))
    bound = (100 * torch.rand(n, 1, generator=g, dtype=torch.float64) ** 3).expand(n, b)  # equal |k|: keys of one width
    d = c.decay[:, 0, -1]
    w, s = torch.randn(n, dim, generator=g, dtype=torch.float64), torch.randn(n, dim, generator=g, dtype=torch.float64)
    start = (w.square().sum(-1) + s.square().sum(-1)).sqrt()
    for i in range(chunks):
        keys = torch.nn.functional.normalize(torch.randn(n, b, dim, generator=g, dtype=torch.float64), dim=-1)
        kappa = kappa_of(c, bound, keys)
        if i == 0:
            summed = kappa_of(c, bound)
            assert (kappa >= summed * (1 - 1e-12)).all() and (kappa <= b * summed * (1 + 1e-9)).all()
            active = summed < 0.5
            gain = kappa[active] / summed[active]
            assert active.float().mean() > 0.5 and gain.median() > 1.2 and gain.max() > 1.5
        hw = bound[..., None] * keys * (keys * w[:, None]).sum(-1, keepdim=True)  # H_s w, (n, b, dim)
        step = kappa[:, None] * (c.mix[:, 0, -1, :, None] * hw).sum(1)
        momentum_step = kappa[:, None] * (c.s_mix[:, 0, :, None] * hw).sum(1)
        w, s = d[:, None] * w + c.carry[:, 0, -1, None] * s - step, c.s_decay[:, 0, None] * s - momentum_step
        if i == chunks // 2 - 1:
            first = (w.square().sum(-1) + s.square().sum(-1)).sqrt() / start
    both = (w.square().sum(-1) + s.square().sum(-1)).sqrt() / start
    assert first.max() < 1e3 and both.max() < 1e3
    assert (both <= first.clamp_min(1.0) * 1.01).all()


@pytest.mark.parametrize("shape", [(5, 256, 64), (5, 64, 256), (5, 7, 7)])
def test_spectral_norm_and_its_bound(shape):
    """:func:`spectral_norm` is ``||W||_2`` (float64 rounding); :func:`spectral_norm_bound` is at least it and
    at most ``rank^(1/2^(k+1))`` times it (k squarings: ``lambda_max(G) <= (tr G^(2^k))^(1/2^k)``), the
    worst case reached by an identity (all singular values equal) and 1 by a rank-one W."""
    from tto.engine.fast_models import NORM_BOUND_SQUARINGS, spectral_norm, spectral_norm_bound

    torch.manual_seed(0)
    w = torch.randn(shape, dtype=torch.float64) * torch.logspace(-3, 1, shape[0], dtype=torch.float64)[:, None, None]
    exact = torch.linalg.matrix_norm(w, ord=2)
    torch.testing.assert_close(spectral_norm(w), exact, rtol=1e-12, atol=0)
    worst = min(shape[1:]) ** (1 / 2 ** (NORM_BOUND_SQUARINGS + 1))
    ratio = spectral_norm_bound(w) / exact
    assert (ratio >= 1 - 1e-12).all() and (ratio <= worst * (1 + 1e-12)).all()
    eye = torch.eye(shape[1], shape[2], dtype=torch.float64).expand(2, -1, -1) * 3.0
    torch.testing.assert_close(spectral_norm_bound(eye), torch.full((2,), 3.0 * worst, dtype=torch.float64))
    rank_one = torch.randn(2, shape[1], 1, dtype=torch.float64) @ torch.randn(2, 1, shape[2], dtype=torch.float64)
    torch.testing.assert_close(spectral_norm_bound(rank_one), torch.linalg.matrix_norm(rank_one, ord=2), rtol=1e-12, atol=0)
    zero = torch.zeros(2, *shape[1:], dtype=torch.float64)
    assert torch.equal(spectral_norm_bound(zero), torch.zeros(2, dtype=torch.float64))


def test_spectral_norm_at_extreme_scales_and_on_flushed_weights():
    """In float32, :func:`spectral_norm` is ``||W||_2`` (to float32 rounding) for weights whose Gram
    matrix would overflow (1e20) or underflow (1e-21), and for the two fast weights (of a
    self-modifying HOPE whose forget gate had shrunk them to ~1e-19 and flushed most entries to
    zero) on whose Gram matrices float32's eigensolver failed to converge: the first unscaled, the
    second scaled to unit entries."""
    from tto.engine.fast_models import spectral_norm

    torch.manual_seed(0)
    for scale in (1e20, 1e-21):
        w = torch.randn(3, 256, 64) * scale
        exact = torch.linalg.matrix_norm(w.double(), ord=2)
        torch.testing.assert_close(spectral_norm(w).double(), exact, rtol=1e-5, atol=0)
    stored = torch.load(Path(__file__).parent / "data" / "flushed_fast_weights.pt")
    flushed = torch.sparse_coo_tensor(stored["indices"].long(), stored["values"], stored["shape"],
                                      check_invariants=True).to_dense()
    exact = torch.linalg.matrix_norm(flushed.double(), ord=2)
    torch.testing.assert_close(spectral_norm(flushed).double(), exact, rtol=1e-5, atol=0)

def test_trace_curvature_bounds_the_curvature_norm():
    """:func:`trace_curvature` is at least :func:`curvature_norm` for any factors and weights (negative weights
    count as zero in both) and equals it when a chunk's keys are parallel."""
    from tto.engine.optimizers import curvature_norm, trace_curvature

    torch.manual_seed(0)
    for b, d in [(16, 64), (16, 4), (3, 3)]:
        factors = [torch.randn(6, b, d, dtype=torch.float64), torch.randn(6, b, d + 1, dtype=torch.float64)]
        weights = torch.randn(2, 6, b, dtype=torch.float64)
        assert (trace_curvature(factors, weights) >= curvature_norm(factors, weights) * (1 - 1e-12)).all()
        parallel = [torch.randn(6, b, 1, dtype=torch.float64) * torch.randn(6, 1, d, dtype=torch.float64)]
        torch.testing.assert_close(trace_curvature(parallel, weights), curvature_norm(parallel, weights),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("b,d", [(8, 64), (8, 3), (5, 5)])
def test_step_bound_closed_form_gradient_equals_autograd(b, d):
    """The engine's kappa (:func:`stable_bound_factor`) is differentiated in closed form from the
    eigenvectors; autograd through :func:`curvature_norm`'s eigensolver and :func:`bound_factor` gives the
    same kappa and the same gradients in the token weights and inverse_t (float64, 1e-10: eigenvector
    sensitivities), in the b x b (b <= d) and the d x d form, with zero weights (tokens at an end of the
    momentum split, tokens that do not step) and rows where kappa is 1 (gradient 0)."""
    from tto.engine.optimizers import StepGates, bound_factor, curvature_norm, curvature_norm_slopes, stable_bound_factor

    torch.manual_seed(b * d)
    rows = 6
    factors = [torch.randn(rows, b, d, dtype=torch.float64), torch.randn(rows, b, d + 1, dtype=torch.float64) * 0.5]
    weights = torch.rand(2, rows, b, dtype=torch.float64) * torch.logspace(-2, 0.5, rows, dtype=torch.float64)[:, None]
    weights[0, :, 0] = 0.0
    weights[1, :, -1] = 0.0
    weights[:, 2, 1:3] = 0.0
    inverse_t = torch.rand(2, rows, dtype=torch.float64) + 0.1
    steps = torch.ones(rows, b, dtype=torch.bool)
    bounded = torch.ones(rows, dtype=torch.bool)
    weights.requires_grad_(True)
    inverse_t.requires_grad_(True)
    gates = StepGates(weights, inverse_t, bounded, steps)
    fast = stable_bound_factor(gates, factors)
    plain = bound_factor(gates, factors, curvature=curvature_norm)
    torch.testing.assert_close(fast, plain, rtol=1e-12, atol=0)
    assert (fast < 0.5).any() and (fast == 1).any()  # both branches of min(1, .)
    seed = torch.randn(rows, dtype=torch.float64)
    for a, e in zip(torch.autograd.grad(fast, (weights, inverse_t), seed),
                    torch.autograd.grad(plain, (weights, inverse_t), seed)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
    norms, slopes = curvature_norm_slopes(factors, weights.detach())
    torch.testing.assert_close(norms, curvature_norm(factors, weights.detach()), rtol=1e-12, atol=0)
    assert slopes.abs().max() > 0 and (slopes[0, :, 0] == 0).all() == (b <= d)  # b x b: 0 at zero weights


@pytest.mark.parametrize("depth,bias,activation", [(1, True, "gelu_tanh"), (2, False, "silu"), (2, True, "gelu_tanh"),
                                                   (3, True, "relu"), (3, False, "gelu"), (2, False, "swiglu")])
def test_curvature_factors_bound_the_gauss_newton_hessian(depth, bias, activation):
    """An MLP memory's chunk (6 tokens, 2 heads of width 4, weights of unit scale; "swiglu": the CMS
    levels' SwiGLU memory, three weights, no biases): the largest
    eigenvalue of ``sum_s a_s H_s``, H_s the token's Gauss-Newton Hessian of the unhalved squared
    error in all fast weights by autograd, is at most the bound of the engine's curvature factors,
    for one-hot, uniform and random weightings a; the bound is not vacuous (within 30x), and its
    last layer alone (what a bound that dropped the earlier layers' terms would give) is exceeded. The
    step bound's screens (looser gains) give factors whose per-token norms are at least these."""
    from tto.engine import MLPMemory, Memory, SquaredError, SwiGLUMemory
    from tto.engine.fast_models import SCREEN_GAINS
    from tto.engine.optimizers import curvature_norm

    torch.manual_seed(depth)
    heads, dim, b = 2, 4, 6
    fast = (SwiGLUMemory(heads, dim, expansion=2) if activation == "swiglu" else
            MLPMemory(heads, dim, depth=depth, expansion=2, activation=activation, bias=bias, residual_norm=False)).double()
    for p in fast.parameters():
        torch.nn.init.normal_(p, std=0.6)
    memory = Memory(fast, SquaredError(2.0), MomentumGD(), b)
    params = fast.initial_params(1)
    k, v = torch.randn(heads, b, dim, dtype=torch.float64), torch.randn(heads, b, dim, dtype=torch.float64)
    outputs = []

    def dloss(y):
        outputs.append(y)
        return memory.objective.grad(y, v)

    grads = fast.forward_backward(params, k, dloss)
    factors = memory.curvature_factors(params, grads, outputs[0], v, {}, None)
    for screen in SCREEN_GAINS:  # a screen needs each token's factor norms to bound the exact ones
        for loose, exact in zip(memory.curvature_factors(params, grads, outputs[0], v, {}, None, screen), factors):
            assert (loose.square().sum(-1) >= exact.square().sum(-1) * (1 - 1e-12)).all()
    names = list(params)
    jac = torch.func.jacrev(lambda *w: fast.apply(k, fast.plain_linear(dict(zip(names, w)))), argnums=tuple(range(len(names))))(
        *params.values())
    # J[h, s]: (dim out, all weights of head h)
    j = torch.cat([jac_n[torch.arange(heads), :, :, torch.arange(heads)].flatten(3) for jac_n in jac], -1)
    weightings = [torch.eye(b, dtype=torch.float64)[i].expand(heads, b) for i in range(b)]
    weightings += [torch.ones(heads, b, dtype=torch.float64)] + [torch.rand(heads, b, dtype=torch.float64) for _ in range(8)]
    ratios, last_only_exceeded = [], False
    for a in weightings:
        hessian = 2.0 * torch.einsum("hs,hsop,hsoq->hpq", a, j, j)  # sum_s a_s H_s, H_s = 2 J_s^T J_s
        exact = torch.linalg.eigvalsh(hessian)[:, -1]
        bound = curvature_norm(factors, a)
        assert (exact <= bound * (1 + 1e-9)).all()
        ratios.append(bound / exact)
        last_only_exceeded |= bool((exact > curvature_norm(factors[-1:], a) * (1 + 1e-6)).any())
    assert torch.stack(ratios).max() < 30
    assert last_only_exceeded == (depth > 1)


# ---------------------------------------------------------------------------- models over the config space

def fast_states(cache) -> dict[str, torch.Tensor]:
    """Every fast-weight (``.W.``) and momentum (``.S.``) tensor of a model's cache."""
    return {f"{i}:{k}": v for i, state in enumerate(cache.states) for k, v in state.items()
            if (".W." in k or ".S." in k) and torch.is_tensor(v)}


def check_finite_and_bounded(model, length: int, batch: int = 1, seed: int = 0) -> None:
    bound = MAX_FAST_RMS * max(1.0, initial_fast_rms(model))
    x = torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = model(x, use_cache=True)
    assert torch.isfinite(out.logits).all(), "non-finite logits"
    for name, w in fast_states(out.past_key_values).items():
        rms = w.double().pow(2).mean().sqrt().item()
        assert rms <= bound, f"{name}: fast-weight RMS {rms:.3g} > {bound:.3g}"


def initial_fast_rms(model) -> float:
    """Largest RMS of a memory's initial fast weights (tto.engine.FastModel.initial_params)."""
    from tto.engine import FastModel

    rms = [w.pow(2).mean().sqrt().item() for m in model.modules() if isinstance(m, FastModel)
           for w in m.initial_params(1).values()]
    return max(rms, default=0.0)


#: per field name (shared by the types that have it), how to draw a value; every bool field is drawn
#: as a coin and every field with a fixed set of choices (except the variant) from that set
def _log_uniform(lo: float, hi: float):
    return lambda r: lo * (hi / lo) ** r.random()


DRAWN = {
    "hidden_size": lambda r: r.choice([32, 64, 128]),
    "num_hidden_layers": lambda r: r.choice([1, 2]),
    "num_attention_heads": lambda r: r.choice([1, 2, 4]),
    "num_memory_heads": lambda r: r.choice([1, 2, 4, 8]),
    "chunk_size": lambda r: r.choice([1, 2, 4, 8, 16, 32]),
    "mini_batch_size": lambda r: r.choice([1, 2, 4, 8, 16, 32]),
    "lact_chunk_size": lambda r: r.choice([1, 4, 16, 32]),
    "window_size": lambda r: r.choice([4, 16, None]),
    "mem_depth": lambda r: r.choice([1, 2, 3]),
    "mem_expansion_factor": lambda r: r.choice([1, 2, 4]),
    "inter_multi": lambda r: r.choice([0.5, 1.0, 2.0]),
    "omega_window": lambda r: r.choice([1, 2, 4]),
    "poly_degree": lambda r: r.choice([1, 2]),
    "mem_max_lr": _log_uniform(1e-3, 10.0),
    "ttt_base_lr": _log_uniform(1e-2, 10.0),
    "base_lr": _log_uniform(1e-4, 1.0),
    "lr_gate_bias_init": lambda r: r.uniform(-6, 6),
    "momentum_gate_bias_init": lambda r: r.uniform(-6, 6),
    "forget_gate_bias_init": lambda r: r.uniform(-10, 2),
    "omega_gate_bias_init": lambda r: r.uniform(-6, 6),
    "lp_p": lambda r: r.uniform(1.5, 4.0),
    "expand_v": lambda r: r.choice([0.5, 1.0, 2.0]),
    "local_chunk_sizes": lambda r: r.choice([[], [1], [2], [2, 4], [8]]),
    "local_shard_size": lambda r: r.choice([4, 8, 16]),
    # mlp_type "cms" (a field of every language model's config): None is valid only with "swiglu"
    # (and hope's default levels)
    "cms_periods": lambda r: r.choice([None, [4], [8, 32], [2, None, 16]]),
    "cms_max_lr": _log_uniform(1e-3, 10.0),
}


def draw_model(name: str, variant: str | None, seed: int):
    """A model of a random valid configuration of `name` (redrawn until the config class and the
    model accept it)."""
    entry = tto.get(name)
    cls = entry.config_class
    fixed = dict(entry.variant_configs())[variant] if variant else {}
    r = random.Random(f"{name}-{variant}-{seed}")
    for _ in range(100):
        values = dict(vocab_size=VOCAB, intermediate_size=64, **fixed)
        for f in dataclasses.fields(cls):
            if f.name in values:
                continue
            if f.name in DRAWN:
                values[f.name] = DRAWN[f.name](r)
            elif f.type in (bool, "bool"):
                values[f.name] = r.random() < 0.5
            elif f.name in cls.choices and f.name != "variant":
                values[f.name] = r.choice(cls.choices[f.name])
        values.pop("layer_mixers", None)
        try:
            torch.manual_seed(seed)
            return entry.model_class(tto.build_config(name, **values)).eval()
        except ValueError:
            continue
    raise AssertionError(f"no valid random configuration of {name} in 100 draws")


RANDOM_CASES = [pytest.param(name, variant, seed, id=f"{name}-{variant or ''}-{seed}")
                for name, variants in tto.available().items() for variant in (variants or (None,))
                for seed in range(DRAWS)]


@pytest.mark.parametrize("name,variant,seed", RANDOM_CASES)
def test_random_configs_stay_finite_and_bounded(name, variant, seed):
    check_finite_and_bounded(draw_model(name, variant, seed), RANDOM_LENGTH, batch=2, seed=seed)


# ---------------------------------------------------------------------------- presets and recipes at full size

ROOT = Path(__file__).resolve().parents[1]
#: a size preset's name ("125m", "1.3b"); the other presets ("tiny", ...) set chunk and head
#: choices for tiny widths (tests/test_conformance.py builds them there)
SIZE_PRESET = re.compile(r"\d+(\.\d+)?[mb]")
#: real-size runs: tokens per sequence, two chunks of the memory's chunk length up to this cap
#: (LaCT's 2048-token chunks are read, not updated, within it; the conformance suite tests its update)
MAX_FULL_SIZE_TOKENS = 64
#: models above this many parameters are marked slow (every full-size case runs in the one-at-a-time group)
FULL_SIZE_PARAMETERS = 400_000_000
#: float32 weights, and beside them one short no-grad forward, the interpreter and torch
FORWARD_BYTES_PER_PARAMETER = 4
FORWARD_MARGIN_BYTES = 2 * 2**30
#: the config fields that set a memory's chunk length
CHUNK_FIELDS = ("chunk_size", "mini_batch_size", "lact_chunk_size")


def recipe_models() -> list[tuple[str, str, dict]]:
    """(id, type, model fields with the vocabulary) of every recipe in configs/*.yml, configs/tiny
    and configs/tasks (the task recipes once per registered type, as their comments run them)."""
    from tto.data import load_tokenizer
    from tto.training import load_recipe

    found = []
    paths = [p for folder in ("", "tiny", "tasks") for p in sorted((ROOT / "configs" / folder).glob("*.yml"))]
    for path in paths:
        types = sorted(tto.available()) if path.parent.name == "tasks" else [None]
        for name in types:
            recipe = load_recipe(path, [f"model.type={name}"] if name else [])
            fields = {k: v for k, v in recipe.model.items() if k != "type"}
            if "vocab_size" not in fields:  # the recipe's (built-in) tokenizer sets it, as in train.py
                fields["vocab_size"] = len(load_tokenizer(recipe.tokenizer))
            found.append((f"{path.relative_to(ROOT / 'configs')}" + (f":{name}" if name else ""), recipe.model["type"], fields))
    return found


def full_size_cases() -> list:
    """Every size preset of every language-model type and every recipe, as pytest params (large ones
    marked); the image types' presets are built by tests/test_train.py's size check."""
    cases = [(f"{e.name}-{preset}", e.name, {"preset": preset}) for e in tto.registry.entries()
             if e.task == "causal-lm" for preset in e.presets if SIZE_PRESET.fullmatch(preset)]
    cases += recipe_models()
    params = []
    for case_id, name, fields in cases:
        with torch.device("meta"):
            n = sum(p.numel() for p in tto.get(name).model_class(tto.build_config(name, **fields)).parameters())
        # all in one group, so no two run at once and none beside a full-size training (up to 16 GB)
        marks = [pytest.mark.xdist_group("full_size")] + ([pytest.mark.slow] if n > FULL_SIZE_PARAMETERS else [])
        params.append(pytest.param(name, fields, n, id=case_id, marks=marks))
    return params


@pytest.mark.parametrize("name,fields,parameters", full_size_cases())
def test_presets_and_recipes_stay_finite_and_bounded_at_full_size(name, fields, parameters):
    """Every size preset and every recipe, at its real width and depth: finite logits and bounded
    fast weights on two chunks of random tokens (batch 1)."""
    require_memory(FORWARD_BYTES_PER_PARAMETER * parameters + FORWARD_MARGIN_BYTES, f"{name} ({parameters / 1e6:.0f}M parameters)")
    torch.manual_seed(0)
    model = tto.get(name).model_class(tto.build_config(name, **fields)).eval()
    chunk = max(getattr(model.config, f, 1) or 1 for f in CHUNK_FIELDS)
    check_finite_and_bounded(model, min(2 * chunk, MAX_FULL_SIZE_TOKENS))
