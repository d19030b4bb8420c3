"""The memory engine against its references: the dual-form scan vs the per-token autograd loop,
hand-written backward passes vs autograd, optimizer coefficients vs their recurrences, and the
reductions to known rules (per-token GD, the delta rule); the exact chunkwise delta rule vs its
per-token recurrence.

Tolerances: fp32 with O(10) accumulated matmuls of unit-scale values gives ~1e-6 agreement; we
allow 2e-5 (absolute on outputs of scale ~1). Gradients through the inner updates are compared in
float64, where the same sums agree to ~1e-14; we allow 1e-10."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import initialization as init

import tto
from tto.engine import (ACTIVATIONS, DecayGD, DeltaRule, DotProduct, Huber, LargeChunkMemory, LpError, LqNormalization,
                        MiniBatchGD, MLPMemory, Memory, MomentumGD, MuonRetention, OmegaWindow, PlainGD, PolynomialFeatures,
                        SoftmaxRetention, SquaredError, SwiGLUMemory, naive_delta_rule, naive_large_chunk,
                        naive_memory, newton_schulz5)
from tto.engine.fast_models import flush_subnormal, layer_norm, layer_norm_backward
from tto.engine.layout import Layout
from tto.engine.muon import GRAM_ASPECT, NS5_COEFFICIENTS, NS5_MAX_GAIN
from tto.engine.memory import naive_chunk_map
from tto.engine.optimizers import NEGLIGIBLE, segsum

ATOL = 2e-5
GRAD_ATOL = 1e-10


def make_memory(depth: int, optimizer: str, chunk: int = 4, heads: int = 2, dim: int = 8, residual_norm=True,
                activation="gelu_tanh", seed=0, objective=None, retention=None, swiglu=False) -> Memory:
    """A memory of an MLP fast model of `depth` layers (or with `swiglu` a SwiGLU, the CMS levels')."""
    torch.manual_seed(seed)
    fast = SwiGLUMemory(heads, dim, expansion=2) if swiglu else MLPMemory(
        heads, dim, depth=depth, expansion=2, residual_norm=residual_norm, activation=activation, bias=retention is None)
    fast._tto_init(init)
    with torch.no_grad():  # move away from the trivial init so every term matters
        for p in fast.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    if optimizer == "gd":
        opt = MiniBatchGD(chunk)
        opt._tto_init(init)
        with torch.no_grad():
            opt.token_offset.add_(torch.randn(chunk) * 0.1)
    else:
        opt = {"momentum": MomentumGD, "decay": DecayGD, "plain": PlainGD,
               "omega-decay": lambda: OmegaWindow(DecayGD(), 3), "omega-momentum": lambda: OmegaWindow(MomentumGD(), 3),
               "omega-atlas-momentum": lambda: OmegaWindow(MomentumGD(lr_after_momentum=True), 3)}[optimizer]()
    if isinstance(retention, SoftmaxRetention):  # its initial weights are logits: keep them spread out
        with torch.no_grad():
            for p in fast.parameters():
                p.mul_(3.0)
    return Memory(fast, objective or SquaredError(1.0), opt, chunk, retention=retention)


def make_inputs(batch=3, length=11, heads=2, dim=8, optimizer="gd", seed=1, requires_grad=False, max_lr=0.5,
                dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, length, heads, dim, generator=g, dtype=dtype, requires_grad=requires_grad)
               for _ in range(3))
    gates = {"lr": torch.rand(batch, length, heads, generator=g, dtype=dtype) * max_lr}
    if optimizer != "gd":
        gates["forget"] = torch.rand(batch, length, heads, generator=g, dtype=dtype) * 0.2
    if optimizer.endswith("momentum"):
        gates["momentum"] = torch.rand(batch, length, heads, generator=g, dtype=dtype) * 0.9
    gates["omega"] = torch.rand(batch, length, heads, generator=g, dtype=dtype)  # read by OmegaWindow only
    gates["huber_delta"] = 0.5 + torch.rand(batch, length, heads, generator=g, dtype=dtype)  # read by Huber only
    return q, k, v, gates


CASES = [(d, o, n, a) for d in (1, 2) for o in ("gd", "momentum") for n in (True, False) for a in ("gelu_tanh", "silu")
         if not (d == 1 and a == "silu")]


@pytest.mark.parametrize("depth,optimizer,residual_norm,activation", CASES)
def test_scan_matches_naive(depth, optimizer, residual_norm, activation):
    mem = make_memory(depth, optimizer, residual_norm=residual_norm, activation=activation)
    # without the normalizing wrapper, large steps on |k|^2 ~ 8 diverge; keep the weights O(1)
    q, k, v, gates = make_inputs(optimizer=optimizer, max_lr=0.5 if residual_norm else 0.05)
    out = mem(q, k, v, gates)
    ref = naive_memory(mem, q, k, v, gates)[0]
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("optimizer", ["gd", "momentum"])
def test_scan_padding_and_streaming_match_naive(optimizer):
    """Left padding, and the same sequence fed in pieces (prefill + single tokens + a block
    crossing a chunk boundary), give the naive outputs and the naive committed weights."""
    mem = make_memory(2, optimizer)
    q, k, v, gates = make_inputs(optimizer=optimizer, length=13)
    mask = torch.ones(3, 13, dtype=torch.bool)
    mask[0, :3] = False
    mask[1, :6] = False
    out = mem(q, k, v, gates, mask)
    ref, _, committed = naive_memory(mem, q, k, v, gates, mask)
    torch.testing.assert_close(out * mask[..., None, None], ref, atol=ATOL, rtol=0)

    state: dict = {}
    pieces = [(0, 5), (5, 6), (6, 7), (7, 12), (12, 13)]
    outs = [mem(*(x[:, a:b] for x in (q, k, v)), {n: g[:, a:b] for n, g in gates.items()}, mask[:, a:b], state)
            for a, b in pieces]
    torch.testing.assert_close(torch.cat(outs, 1) * mask[..., None, None], ref, atol=ATOL, rtol=0)
    for row in range(3):
        for name, w in committed[row].items():
            torch.testing.assert_close(state["memory.W." + name][row], w, atol=ATOL, rtol=0)
    real = mask.sum(1)
    assert state["memory.n_pending"].tolist() == (real % mem.chunk_size).tolist()


@pytest.mark.parametrize("optimizer", ["gd", "momentum"])
def test_chunk_start_reads_match_naive(optimizer):
    """read_start: f(q_t; W_c), the weights before t's chunk, in one call, left-padded, and streamed
    in pieces (tokens of an incomplete chunk read the committed weights); gradients as the naive ones."""
    mem = make_memory(2, optimizer).double()
    q, k, v, gates = make_inputs(optimizer=optimizer, length=13, requires_grad=True, dtype=torch.float64)
    mask = torch.ones(3, 13, dtype=torch.bool)
    mask[1, :5] = False
    out, start = mem(q, k, v, gates, mask, read_start=True)
    ref, ref_start, _ = naive_memory(mem, q, k, v, gates, mask)
    keep = mask[..., None, None]
    torch.testing.assert_close(out * keep, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(start * keep, ref_start, atol=ATOL, rtol=0)
    assert (start - out).mul(keep).abs().max() > 1e-3  # the two reads differ: in-chunk writes are seen by one only
    w = torch.randn_like(start)
    fast = torch.autograd.grad((start * keep * w).sum(), [q, k, v])
    naive = torch.autograd.grad((ref_start * w).sum(), [q, k, v])
    for a, b in zip(fast, naive):
        torch.testing.assert_close(a, b, atol=GRAD_ATOL, rtol=0)
    state: dict = {}
    pieces = [(0, 3), (3, 4), (4, 11), (11, 13)]
    streamed = [mem(*(x[:, a:b] for x in (q, k, v)), {n: g[:, a:b] for n, g in gates.items()}, mask[:, a:b], state,
                    read_start=True)[1] for a, b in pieces]
    torch.testing.assert_close(torch.cat(streamed, 1) * keep, ref_start, atol=ATOL, rtol=0)


#: (optimizer, retention, SwiGLU fast model) of the start-only tests: Titans', TTT's and Moneta's steps,
#: ATLAS' window and Muon commit, a CMS level's summed gradient
START_ONLY_PARTS = [("momentum", None, False), ("gd", None, False), ("decay", LqNormalization(4.0), False),
                    ("omega-atlas-momentum", MuonRetention(), False), ("plain", None, True)]


@pytest.mark.parametrize("optimizer,retention,swiglu", START_ONLY_PARTS, ids=["titans", "ttt", "moneta", "atlas", "cms"])
def test_chunk_start_reads_alone_equal_the_full_chunk(optimizer, retention, swiglu):
    """``read_start="only"`` (no dual form: plain reads at the chunk-start weights, commits from the
    chunk-end coefficients) gives the full scan's chunk-start reads and committed weights and
    momentum, and their gradients in every input, gate and parameter, at rounding distance (float64,
    1e-12): 13 tokens in chunks of 4, rows left- and right-padded. Streamed in pieces (prefill, one
    token, blocks across chunk boundaries) it gives the naive chunk-start reads and commits."""
    mem = make_memory(2, optimizer, retention=retention, swiglu=swiglu).double()
    q, k, v, gates = make_inputs(optimizer=optimizer, length=13, requires_grad=True, dtype=torch.float64)
    for g in gates.values():
        g.requires_grad_(True)
    mask = torch.ones(3, 13, dtype=torch.bool)
    mask[1, :5] = False
    mask[2, 9:] = False
    keep = mask[..., None, None]
    full_state, only_state = {}, {}
    full = mem(q, k, v, gates, mask, full_state, read_start=True)[1] * keep
    only = mem(q, k, v, gates, mask, only_state, read_start="only") * keep
    close = dict(atol=1e-12, rtol=0)
    torch.testing.assert_close(only, full, **close)
    weights = sorted(n for n in full_state if n.startswith(("memory.W.", "memory.S.")))
    assert weights and sorted(n for n in only_state if n.startswith(("memory.W.", "memory.S."))) == weights
    for n in weights:
        torch.testing.assert_close(only_state[n], full_state[n], **close)
    leaves = [q, k, v, *gates.values(), *mem.parameters()]
    g = torch.Generator().manual_seed(2)
    w = torch.randn(full.shape, generator=g, dtype=torch.float64)
    w_state = {n: torch.randn(full_state[n].shape, generator=g, dtype=torch.float64) for n in weights}

    def grads(reads, state):
        loss = (reads * w).sum() + sum((state[n] * w_state[n]).sum() for n in weights)
        return torch.autograd.grad(loss, leaves, allow_unused=True)

    for a, b in zip(grads(only, only_state), grads(full, full_state)):
        assert (a is None) == (b is None)
        if a is not None:  # relative too: ATLAS' Newton-Schulz steps give gradients up to ~50, where the
            # two paths' different summation orders differ by up to 1.2e-12 relative (~5,000 float64 ulps
            # after five NS5 iterations and their backward) on an AVX-512 CPU
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-11)

    _, ref_start, committed = naive_memory(mem, q, k, v, gates, mask)
    state: dict = {}
    streamed = [mem(*(x[:, a:b] for x in (q, k, v)), {n: t[:, a:b] for n, t in gates.items()}, mask[:, a:b], state,
                    read_start="only") for a, b in [(0, 3), (3, 4), (4, 5), (5, 11), (11, 13)]]
    torch.testing.assert_close(torch.cat(streamed, 1) * keep, ref_start, atol=1e-9, rtol=0)
    for row in range(3):
        for name, weight in committed[row].items():
            torch.testing.assert_close(state["memory.W." + name][row], weight, atol=1e-9, rtol=0)


def test_chunk_start_reads_alone_build_no_chunk_by_chunk_matrix():
    """Forward and backward of ``read_start="only"`` make no (C x C) tensor (the dual form's), while
    the full scan does: a chunk of C = 20 tokens, wider than the fast layers' inputs (8, 16; the step
    bound's Gram matrices are the smaller of (C x C) and (width x width))."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.square = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dim() >= 2 and tuple(t.shape[-2:]) == (20, 20):
                    self.square += 1
            return out

    mem = make_memory(2, "momentum", chunk=20)
    q, k, v, gates = make_inputs(optimizer="momentum", length=50, requires_grad=True)
    for read_start, squares in (("only", False), (True, True)):
        with Shapes() as shapes:
            reads = mem(q, k, v, gates, read_start=read_start)
            reads = reads[1] if read_start is True else reads
            reads.square().sum().backward()
        assert (shapes.square > 0) == squares


@pytest.mark.parametrize("optimizer", ["gd", "momentum"])
def test_scan_gradients_match_naive(optimizer):
    """Outer gradients (inputs, gates and the learned initial weights) flow through the inner
    updates identically in the fast and the naive form."""
    mem = make_memory(2, optimizer).double()
    q, k, v, gates = make_inputs(optimizer=optimizer, requires_grad=True, dtype=torch.float64)
    for g in gates.values():
        g.requires_grad_(True)
    leaves = [q, k, v, *gates.values(), *mem.parameters()]
    w = torch.randn(3, 11, 2, 8, dtype=torch.float64)
    fast = torch.autograd.grad((mem(q, k, v, gates) * w).sum(), leaves, allow_unused=True)
    naive = torch.autograd.grad((naive_memory(mem, q, k, v, gates)[0] * w).sum(), leaves, allow_unused=True)
    for a, b in zip(fast, naive):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=GRAD_ATOL, rtol=0)


@pytest.mark.parametrize("optimizer", ["gd", "momentum"])
@pytest.mark.parametrize("depth", [1, 2])
def test_step_bound_gradients_match_naive(depth, optimizer, monkeypatch):
    """Where the step bound scales a commit (kappa < 1), its factor is differentiated with respect to the
    gates in the fast and the naive form alike; without that term the gate gradients would differ. (At
    depth 1 the fast form bounds all chunks before the scan, at depth 2 chunk by chunk.)"""
    import tto.engine.memory as memory_module

    mem = make_memory(depth, optimizer).double()
    q, k, v, gates = make_inputs(optimizer=optimizer, requires_grad=True, dtype=torch.float64, max_lr=20.0)
    for g in gates.values():
        g.requires_grad_(True)
    leaves = [q, k, v, *gates.values(), *mem.parameters()]
    w = torch.randn(3, 11, 2, 8, dtype=torch.float64)
    bound, kappas = memory_module.stable_bound_factor, []

    def recording(*args, detach=False):
        kappa = bound(*args)
        kappas.append(kappa.detach())
        return kappa.detach() if detach else kappa

    def gradients(detach=False):
        monkeypatch.setattr(memory_module, "stable_bound_factor", lambda *a: recording(*a, detach=detach))
        fast = torch.autograd.grad((mem(q, k, v, gates) * w).sum(), leaves, allow_unused=True)
        naive = torch.autograd.grad((naive_memory(mem, q, k, v, gates)[0] * w).sum(), leaves, allow_unused=True)
        return fast, naive

    fast, naive = gradients()
    assert min(x.min() for x in kappas) < 0.5  # the bound is active on these inputs
    for a, b in zip(fast, naive):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=GRAD_ATOL, rtol=0)
    detached, _ = gradients(detach=True)
    assert (fast[3] - detached[3]).abs().max() > 1e-3  # the lr gate's gradient includes kappa's


def partly_bounded_run(mem, optimizer: str, read_start=False, chunks: int = 6):
    """A run() -> (outputs, committed fast weights and momentum, gradients of a weighted sum of both in
    every input, gate and parameter) of `mem` on float64 inputs of `chunks` chunks of 4 tokens whose inner
    lr scales chunk by chunk from 1e-3 to 2: the step bound inactive on some chunks and active on others."""
    length = 4 * chunks
    q, k, v, gates = make_inputs(optimizer=optimizer, length=length, requires_grad=True, dtype=torch.float64,
                                 max_lr=2.0)
    with torch.no_grad():
        gates["lr"].mul_(torch.logspace(-3, 0, chunks, dtype=torch.float64).repeat_interleave(4)[None, :, None])
    for g in gates.values():
        g.requires_grad_(True)
    leaves = [q, k, v, *gates.values(), *mem.parameters()]
    w = torch.randn(3, length, 2, 8, dtype=torch.float64)

    def run():
        state: dict = {}
        out = mem(q, k, v, gates, None, state, read_start=read_start)
        weights = {n: t for n, t in state.items() if n.startswith(("memory.W.", "memory.S."))}
        loss = (out * w).sum() + sum(t.sum() for t in weights.values())
        return out, weights, torch.autograd.grad(loss, leaves, allow_unused=True)

    return run


def assert_same_run(a, b, **close):
    """Two :func:`partly_bounded_run` results equal: bit for bit, or to `close` (assert_close's tolerances)."""
    def same(x, y):
        if close:
            torch.testing.assert_close(x, y, **close)
        else:
            assert torch.equal(x, y)

    same(a[0], b[0])
    assert a[1].keys() == b[1].keys()
    for n in a[1]:
        same(a[1][n], b[1][n])
    for x, y in zip(a[2], b[2]):
        assert (x is None) == (y is None)
        if x is not None:
            same(x, y)


@pytest.mark.parametrize("optimizer", ["gd", "momentum", "decay", "omega-momentum"])
def test_step_bound_screen_changes_nothing(optimizer, monkeypatch):
    """The step bound's screen (upper bounds of the curvature from matrix products; where they give
    kappa = 1 for a chunk, the eigensolvers are skipped) gives bit for bit the outputs, fast-weight
    state and gradients of the exact bound run on every chunk, at inner lrs where the bound is inactive
    on some chunks and active on others; the screen both skips and falls through on these inputs."""
    import tto.engine.memory as memory_module

    mem = make_memory(2, optimizer).double()
    mem.ttt_memory = False  # the chunk steps' count of exact bounds (a fused TTT-MLP scan that meets kappa < 1 reruns them)
    run = partly_bounded_run(mem, optimizer)
    exact_calls = []
    bound = memory_module.stable_bound_factor
    monkeypatch.setattr(memory_module, "stable_bound_factor", lambda *a: exact_calls.append(1) or bound(*a))
    screened = run()
    screened_exact = len(exact_calls)
    exact_calls.clear()
    monkeypatch.setattr(memory_module, "trace_curvature", lambda factors, weights: torch.full(weights.shape[:-1], math.inf,
                                                                                               dtype=weights.dtype))
    exact = run()
    assert 0 < screened_exact < len(exact_calls) == 6  # the screen skipped some chunks, not all
    assert_same_run(screened, exact)


def test_failing_screens_are_skipped_on_the_next_chunks(monkeypatch):
    """Where the step bound is active on every chunk, the screens fail each time they run: after a failure
    the memory skips them on the next 1, 2, 4, ... chunks of the call (6 chunks: tried on chunks 0, 2 and
    5; a second call starts afresh), and the run is bit for bit the one that tries them on every chunk;
    where they pass, every chunk tries them."""
    import tto.engine.memory as memory_module

    mem = make_memory(2, "momentum").double()
    run = partly_bounded_run(mem, "momentum")
    screens = []
    trace = memory_module.trace_curvature
    monkeypatch.setattr(memory_module, "trace_curvature", lambda *a: screens.append(1) or trace(*a) * 1e9)
    skipping = run()
    assert len(screens) == 3 * len(memory_module.SCREEN_GAINS)
    screens.clear()
    assert_same_run(run(), skipping)
    assert len(screens) == 3 * len(memory_module.SCREEN_GAINS)
    limit = memory_module.SCREEN_MAX_SKIPS
    monkeypatch.setattr(memory_module, "SCREEN_MAX_SKIPS", 0)
    screens.clear()
    assert_same_run(run(), skipping)
    assert len(screens) == 6 * len(memory_module.SCREEN_GAINS)
    monkeypatch.setattr(memory_module, "SCREEN_MAX_SKIPS", limit)
    monkeypatch.setattr(memory_module, "trace_curvature", lambda *a: screens.append(1) or trace(*a) * 0)
    screens.clear()
    run()
    assert len(screens) == 6  # each chunk's first screen passes


@pytest.mark.parametrize("where", ["groups", "call"])
def test_checkpoints_repeat_the_screens_schedule(where):
    """A checkpointed recomputation in the backward takes the step bound's branches of its forward, as
    checkpoint needs: a group of chunks starts from the screens' schedule its forward started with (not
    the one the later groups left), a whole call (a checkpointed layer) from a fresh one. The inner lr
    rises chunk by chunk (the screens pass on the first chunk and fail on later ones); groups of 3 chunks,
    or the call under ``torch.utils.checkpoint``, give the run without checkpoints."""
    mem = make_memory(2, "momentum").double()
    # 5 chunks: the screens pass on the first, fail on the second and fourth, and the call ends with a
    # skip pending, which a recomputation that went on from there would apply to the first chunk
    run = partly_bounded_run(mem, "momentum", chunks=5)
    forward = mem.forward
    if where == "groups":
        mem.checkpoint_group = 3
        checkpointed = run()
        mem.checkpoint_group = 0
    else:  # a layer in training: no cache state (a recomputation would start from the state its forward wrote)
        stateless = lambda *a, **k: forward(*a[:5], None, *a[6:], **k)  # noqa: E731
        mem.forward = lambda *a, **k: torch.utils.checkpoint.checkpoint(stateless, *a, use_reentrant=False, **k)
        checkpointed = run()
        mem.forward = stateless
    assert_same_run(checkpointed, run())


@pytest.mark.parametrize("optimizer", ["gd", "momentum", "decay", "omega-momentum"])
@pytest.mark.parametrize("read_start", [False, "only"])
def test_step_bound_before_the_scan_equals_it_chunk_by_chunk(optimizer, read_start, monkeypatch):
    """A one-layer memory with a squared error (TTT-Linear's) bounds all chunks at once before the scan,
    from the keys and gates alone; chunk by chunk (``bound_before_scan`` off) the same kappa gives the same
    outputs, committed state and gradients (float64, 1e-12: only the order of the eigensolver's batch
    differs), at inner lrs where the bound is active on some chunks and not on others. A two-layer
    memory's bound reads its weights (the second layer's norm, the first's activations) and stays in
    the scan."""
    import tto.engine.memory as memory_module

    assert not make_memory(2, optimizer).bound_before_scan
    mem = make_memory(1, optimizer).double()
    assert mem.bound_before_scan
    run = partly_bounded_run(mem, optimizer, read_start)
    kappas = []
    bound = memory_module.stable_bound_factor
    monkeypatch.setattr(memory_module, "stable_bound_factor", lambda *a: kappas.append(bound(*a)) or kappas[-1])
    before = run()
    assert len(kappas) == 1 and kappas[0].shape == (6, 6)  # one call for the 6 rows' 6 chunks
    assert (kappas[0] < 0.9).any() and (kappas[0] == 1).any()  # the bound is active on some chunks only
    kappas.clear()
    mem.bound_before_scan = False
    by_chunk = run()
    assert 1 < len(kappas) <= 6  # chunk by chunk: the exact bound on each chunk the screen does not skip
    assert_same_run(before, by_chunk, atol=1e-12, rtol=1e-12)


#: memory depth, optimizer, largest inner lr (the step bound is active on some chunks at 2.0, on none at 0.05 with
#: mini-batch GD and 0.01 with plain GD, which sums the chunk's gradients instead of averaging them)
TTT_SCAN_CASES = {"linear": (1, "gd", 2.0), "linear-plain": (1, "plain", 2.0), "mlp": (2, "gd", 0.05),
                  "mlp-plain": (2, "plain", 0.01), "mlp-bound-active": (2, "gd", 2.0)}


@pytest.mark.parametrize("group", [0, 2])
@pytest.mark.parametrize("case", sorted(TTT_SCAN_CASES))
def test_ttt_scans_equal_the_chunk_steps(case, group, monkeypatch):
    """TTT-Linear's and TTT-MLP's memories run their scans as one autograd node with a hand-written backward
    (:mod:`tto.engine.ttt_scans`); the generic chunk steps (``ttt_memory`` off) give the same reads, committed
    weights and gradients of every input, gate and parameter (float64, 1e-12), with a padded row, an
    incomplete last chunk (read, not committed) and a weight row that stays zero (the subnormal flush's zero
    gradient there), in one node or in checkpointed groups of 2 chunks. TTT-Linear's bound (before the scan)
    is active on some chunks; where TTT-MLP's (chunk by chunk) is, its scan gives way to the chunk steps."""
    import tto.engine.memory as memory_module

    depth, optimizer, max_lr = TTT_SCAN_CASES[case]
    mem = make_memory(depth, optimizer).double()
    mem.checkpoint_group = group
    assert mem.ttt_memory
    with torch.no_grad():
        mem.fast.W1[:, 0] = 0.0
    q, k, v, gates = make_inputs(optimizer=optimizer, length=23, dtype=torch.float64, max_lr=max_lr)
    with torch.no_grad():
        k[..., 0] = 0.0  # no update reaches W1's first row: it stays 0
        gates["lr"].mul_(torch.logspace(-3, 0, 23, dtype=torch.float64)[None, :, None])
    leaves = [t.requires_grad_() for t in (q, k, v, *gates.values())] + list(mem.parameters())
    mask = torch.ones(3, 23, dtype=torch.bool)
    mask[1, :5] = False
    w = torch.randn(3, 23, 2, 8, dtype=torch.float64)
    name = "linear_scan" if depth == 1 else "mlp_scan"
    scan, bound, calls, kappas = getattr(memory_module, name), memory_module.stable_bound_factor, [], []

    def recording(*args):
        calls.append([args[4 if depth == 1 else 6].shape[1], args[10 if depth == 1 else 12], False])
        out = scan(*args)
        calls[-1][2] = True  # ran to the end
        return out

    monkeypatch.setattr(memory_module, name, recording)
    monkeypatch.setattr(memory_module, "stable_bound_factor", lambda *a: kappas.append(bound(*a)) or kappas[-1])

    def run():
        state: dict = {}
        out = mem(q, k, v, gates, mask, state)
        weights = {n: t for n, t in state.items() if n.startswith("memory.W.")}
        loss = (out * w * mask[..., None, None]).sum() + sum((t * t).sum() for t in weights.values())
        return out, weights, torch.autograd.grad(loss, leaves, allow_unused=True)

    fused = run()
    active = any(bool((kappa < 1).any()) for kappa in kappas)
    assert active == (max_lr > 1)
    if group == 0:
        assert len(calls) == 1 and calls[0][1] < calls[0][0]  # (chunks, committed): the last chunk is only read
        assert calls[0][2] == (depth == 1 or not active)  # TTT-MLP's scan stops at its first bounded chunk
    else:  # 3 groups, run again in the backward where the scan ran to the end
        assert [c[:2] for c in calls[:3]] == [[2, 2], [2, 2], [2, 1]] or (depth == 2 and active)
    assert (fused[1]["memory.W.W1"][..., 0, :] == 0).all()
    calls.clear()
    mem.ttt_memory = False
    steps = run()
    assert not calls
    assert_same_run(fused, steps, atol=1e-12, rtol=1e-12)


def test_gelu_tanh_second_derivative_is_autograds():
    from tto.engine.ttt_scans import _gelu_tanh_second

    z = torch.linspace(-6, 6, 1001, dtype=torch.float64, requires_grad=True)
    (first,) = torch.autograd.grad(F.gelu(z, approximate="tanh").sum(), z, create_graph=True)
    (second,) = torch.autograd.grad(first.sum(), z)
    torch.testing.assert_close(_gelu_tanh_second(z.detach()), second, atol=1e-13, rtol=0)  # values up to 0.8


class _NoBound:
    """A step bound that never bounds (kappa = 1), for :func:`~tto.engine.ttt_scans.mlp_scan` alone."""

    def __call__(self, i, params, grads, y):
        return torch.ones(y.shape[0], dtype=y.dtype)

    def committed(self, before, after):
        pass


@pytest.mark.parametrize("depth", [1, 2])
def test_ttt_scans_backward_is_the_derivative_of_their_forward(depth):
    """The hand-written backward passes against finite differences (``torch.autograd.gradcheck``, float64),
    with a chunk after the committed ones that is only read."""
    from tto.engine.ttt_scans import linear_scan, mlp_scan

    g = torch.Generator().manual_seed(0)
    rows, chunks, size, dim, hidden = 2, 3, 4, 5, 6

    def rand(*shape, scale=1.0, shift=0.0):
        return (shift + torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_()

    mix = lambda: (torch.tril(torch.rand(rows, chunks, size, size, generator=g, dtype=torch.float64)) * 0.3).requires_grad_()  # noqa: E731
    tokens = [rand(rows, chunks, size, dim) for _ in range(3)]
    norm = [rand(rows, 1, dim, scale=0.2, shift=1.0), rand(rows, 1, dim, scale=0.1)]
    if depth == 1:
        inputs = (rand(rows, dim, dim, scale=0.3), rand(rows, 1, dim, scale=0.1), *tokens, mix(),
                  rand(rows, chunks, size, scale=0.1, shift=0.2), *norm)
        assert torch.autograd.gradcheck(lambda *x: linear_scan(*x, 1e-6, 2), inputs)
    else:
        inputs = (rand(rows, dim, hidden, scale=0.4), rand(rows, 1, hidden, scale=0.1), rand(rows, hidden, dim, scale=0.3),
                  rand(rows, 1, dim, scale=0.1), *tokens, mix(), mix(), *norm)
        assert torch.autograd.gradcheck(lambda *x: mlp_scan(*x, 1e-6, 2, _NoBound()), inputs)


def test_checkpoint_groups_do_not_change_results():
    mem = make_memory(2, "momentum")
    q, k, v, gates = make_inputs(optimizer="momentum", length=17, requires_grad=True)
    out = mem(q, k, v, gates)
    g1 = torch.autograd.grad(out.square().sum(), [q, *mem.parameters()])
    mem.checkpoint_group = 2
    out2 = mem(q, k, v, gates)
    g2 = torch.autograd.grad(out2.square().sum(), [q, *mem.parameters()])
    torch.testing.assert_close(out, out2, atol=0, rtol=0)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


NORM_CASES = {"titans": (False, "momentum"), "forgetting": (False, "decay"), "cms": (True, "plain")}


def long_bounded_inputs(optimizer: str, chunks: int = 24, max_lr: float = 2.0):
    """float64 inputs of `chunks` chunks of 4 tokens, at inner lrs where the step bound is active."""
    return make_inputs(optimizer=optimizer, length=4 * chunks, dtype=torch.float64, max_lr=max_lr)


def carried_bounds(state: dict, name: str) -> torch.Tensor:
    """The step bound's carried upper bound of ``||W_name||_2`` (batch, heads) that a decoding state holds."""
    from tto.engine.memory import norm_bound

    prefix = "memory.carried."
    return norm_bound({key[len(prefix):]: t for key, t in state.items() if key.startswith(prefix)}, name)


@pytest.mark.parametrize("case", sorted(NORM_CASES))
def test_carried_spectral_norms_bound_the_exact_ones_within_the_slack(case, monkeypatch):
    """After every commit the state's carried spectral norms (the step bound's, for the fast model's later
    layers) are upper bounds of the exact norms of the committed weights, at most 1 / (1 - 2 NORM_SLACK)
    times them; the eigensolver runs on the rows whose carried norm got too loose, fewer than half the
    rows of all commits (each call here commits one chunk and stores its state, so the anchors' norms are
    computed in every call)."""
    import tto.engine.memory as memory_module
    from tto.engine.fast_models import spectral_norm

    swiglu, optimizer = NORM_CASES[case]
    rows = []  # rows whose norm the eigensolver computes, per call
    monkeypatch.setattr(memory_module, "spectral_norm", lambda w: rows.append(w.shape[0]) or spectral_norm(w))
    mem = make_memory(2, optimizer, swiglu=swiglu).double()
    # small steps and weak forgetting: the weights change by a little per commit, so the norms carry over
    # several (forgetting 0.2 per token would replace most of the weights every few chunks)
    q, k, v, gates = long_bounded_inputs(optimizer, max_lr=1e-3)
    if "forget" in gates:
        gates["forget"] = gates["forget"] * 0.01
    state: dict = {}
    for lo in range(0, q.shape[1], 4):
        mem(q[:, lo:lo + 4], k[:, lo:lo + 4], v[:, lo:lo + 4], {n: g[:, lo:lo + 4] for n, g in gates.items()}, None, state)
        for name in mem.norm_names:
            exact = torch.linalg.matrix_norm(state["memory.W." + name], ord=2)
            carried = carried_bounds(state, name)
            assert bool((carried >= exact * (1 - 1e-12)).all()), (lo, name)
            assert bool((carried <= exact / (1 - 2 * memory_module.NORM_SLACK) + 1e-12).all()), (lo, name)
    n_rows, commits = q.shape[0] * q.shape[2], q.shape[1] // 4
    assert mem.norm_names and n_rows < sum(rows) < n_rows * commits / 2, rows


def whole_streamed_and_naive_agree(mem, q, k, v, gates) -> torch.Tensor:
    """Assert that one call, chunk-by-chunk calls (4 tokens each, the carried values through the state) and
    the naive reference give the same outputs and committed weights (float64 rounding); the call's outputs."""
    whole = mem(q, k, v, gates)
    state: dict = {}
    pieces = [mem(q[:, lo:lo + 4], k[:, lo:lo + 4], v[:, lo:lo + 4], {n: g[:, lo:lo + 4] for n, g in gates.items()},
                  None, state) for lo in range(0, q.shape[1], 4)]
    naive, _, committed = naive_memory(mem, q, k, v, gates)
    torch.testing.assert_close(torch.cat(pieces, 1), whole, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(naive, whole, atol=1e-10, rtol=1e-10)
    for row in range(q.shape[0]):
        for name, w in committed[row].items():
            torch.testing.assert_close(state["memory.W." + name][row], w, atol=1e-10, rtol=1e-10)
    return whole


@pytest.mark.parametrize("case", sorted(NORM_CASES))
def test_carried_spectral_norms_stream_and_match_naive(case, monkeypatch):
    """With the step bound active, one call, chunk-by-chunk calls (the carried norms through the state)
    and the naive reference (its own carried norms, an SVD for the exact ones) give the same outputs and
    committed weights; recomputing every norm exactly (NORM_SLACK = 0) gives different ones, so the
    carried norms are what these runs use, and the naive reference follows that too. (The steps that make
    the bound active move these small weights by more than the default slack per commit: a large slack
    keeps the norms carried for several commits.)"""
    import tto.engine.memory as memory_module

    monkeypatch.setattr(memory_module, "NORM_SLACK", 0.4)
    swiglu, optimizer = NORM_CASES[case]
    mem = make_memory(2, optimizer, swiglu=swiglu).double()
    q, k, v, gates = long_bounded_inputs(optimizer)

    carried = whole_streamed_and_naive_agree(mem, q, k, v, gates)
    monkeypatch.setattr(memory_module, "NORM_SLACK", 0.0)
    exact = whole_streamed_and_naive_agree(mem, q, k, v, gates)
    assert (carried - exact).abs().max() > 1e-6


@pytest.mark.parametrize("case", sorted(NORM_CASES))
def test_anchor_norms_wait_for_the_exact_bound_and_match_naive(case, monkeypatch):
    """An anchor's exact norm is computed when the exact bound first reads it, not when the row is
    anchored: over chunks whose screens all pass (small inner lrs) no eigensolver runs, and once the lrs
    grow and the bound is active, the norms anchored chunks earlier give the same outputs and weights as
    the naive reference (its norms computed at every anchor) and as the same sequence streamed chunk by
    chunk (the anchors' norms computed at every call's end)."""
    import tto.engine.memory as memory_module
    from tto.engine.fast_models import spectral_norm

    calls = []
    monkeypatch.setattr(memory_module, "spectral_norm", lambda w: calls.append(w.shape[0]) or spectral_norm(w))
    swiglu, optimizer = NORM_CASES[case]
    mem = make_memory(2, optimizer, swiglu=swiglu).double()
    q, k, v, gates = long_bounded_inputs(optimizer, chunks=16)
    quiet = 8  # chunks of small lrs, then the bound's
    gates["lr"][:, :4 * quiet] *= 1e-6
    slack = memory_module.NORM_SLACK
    monkeypatch.setattr(memory_module, "NORM_SLACK", 0.0)  # every commit anchors anew
    mem(q[:, :4 * quiet], k[:, :4 * quiet], v[:, :4 * quiet], {n: g[:, :4 * quiet] for n, g in gates.items()})
    assert len(calls) == len(mem.norm_names), calls  # the state's norms at the call's end, nothing before
    monkeypatch.setattr(memory_module, "NORM_SLACK", slack)

    whole_streamed_and_naive_agree(mem, q, k, v, gates)


def test_a_restarted_row_recomputes_its_carried_norms():
    """restart_rows marks the restarted rows' carried values unknown (NaN), the others keep theirs; the
    next commit anchors the restarted row at the exact norm of its weights."""
    mem = make_memory(2, "momentum").double()
    q, k, v, gates = long_bounded_inputs("momentum", chunks=3)
    state: dict = {}
    mem(q[:, :8], k[:, :8], v[:, :8], {n: g[:, :8] for n, g in gates.items()}, None, state)
    keys = [key for key in state if key.startswith("memory.carried.")]
    before = {key: state[key].clone() for key in keys}
    mem.restart_rows(state, torch.tensor([False, True, False]))
    for key in keys:
        assert torch.isnan(state[key][1]).all() and torch.equal(state[key][[0, 2]], before[key][[0, 2]]), key
    mem(q[:, 8:], k[:, 8:], v[:, 8:], {n: g[:, 8:] for n, g in gates.items()}, None, state)
    norm = carried_bounds(state, "W2")
    assert torch.isfinite(norm).all()
    exact = torch.linalg.matrix_norm(state["memory.W.W2"][1], ord=2)
    torch.testing.assert_close(norm[1], exact, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_max_slope_bounds_the_activation_slope_tightly(name):
    """:data:`MAX_SLOPES` (the step bound's screen) is at least ``|activation'(z)|`` on a grid of spacing
    1e-5 over [-20, 20] (both slopes settle to 0 or 1 outside it) and within 1e-3 of its maximum."""
    from tto.engine.fast_models import MAX_SLOPES

    assert sorted(MAX_SLOPES) == sorted(ACTIVATIONS)
    z = torch.linspace(-20, 20, 4_000_001, dtype=torch.float64)
    slope = ACTIVATIONS[name][1](torch.ones_like(z), z).abs().max().item()
    assert slope <= MAX_SLOPES[name] < slope + 1e-3


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_backward_matches_autograd(name):
    fn, backward = ACTIVATIONS[name]
    z = torch.linspace(-4, 4, 101, dtype=torch.float64).requires_grad_(True)
    g = torch.randn(101, dtype=torch.float64)
    (auto,) = torch.autograd.grad((fn(z) * g).sum(), z, create_graph=True)
    mine = backward(g, z)
    torch.testing.assert_close(mine, auto, atol=1e-10, rtol=1e-10)
    # outer gradients differentiate the inner backward once more
    w = torch.randn(101, dtype=torch.float64)
    second = [torch.autograd.grad((y * w).sum(), z, allow_unused=True)[0] if y.requires_grad else None
              for y in (mine, auto)]
    second = [torch.zeros_like(z) if s is None else s for s in second]  # relu: identically zero
    torch.testing.assert_close(second[0], second[1], atol=1e-10, rtol=1e-10)


def test_layer_norm_backward_matches_autograd_twice():
    """The fused LN backward and its own derivative (needed for outer gradients) match autograd."""
    z = torch.randn(4, 5, 16, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(4, 5, 16, dtype=torch.float64, requires_grad=True)
    out, saved = layer_norm(z, 1e-6)
    torch.testing.assert_close(out, torch.nn.functional.layer_norm(z, (16,), eps=1e-6))
    (auto,) = torch.autograd.grad((torch.nn.functional.layer_norm(z, (16,), eps=1e-6) * dout).sum(), z,
                                  create_graph=True)
    fused = layer_norm_backward(dout, saved)
    torch.testing.assert_close(fused, auto)
    w = torch.randn(4, 5, 16, dtype=torch.float64)
    second_auto = torch.autograd.grad((auto * w).sum(), [z, dout])
    second_fused = torch.autograd.grad((fused * w).sum(), [z, dout])
    for a, b in zip(second_fused, second_auto):
        torch.testing.assert_close(a, b)


def test_segsum_is_sum_over_interval():
    x = torch.randn(2, 6, dtype=torch.float64)
    out = segsum(x)
    for i in range(6):
        for j in range(6):
            expect = x[:, j + 1 : i + 1].sum(-1) if j <= i else torch.full((2,), float("-inf"), dtype=torch.float64)
            torch.testing.assert_close(out[:, i, j], expect)


def test_segsum_keeps_short_intervals_exact_in_float32():
    """Late in a long chunk the partial sums are large (here down to -2560); an interval's sum must
    still be float32-accurate, so that exp(segsum), the decay coefficients, is right to ~1e-7.
    (A float32 difference of two partial sums is off by up to ~1e-4 there; a float64 difference
    is accurate but gives NaN for a gate of exactly 0 or 1, log = -inf.)"""
    x = -20 * torch.rand(3, 128, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = torch.exp(segsum(x))  # float64
    torch.testing.assert_close(torch.exp(segsum(x.float())), exact.float(), atol=1e-6, rtol=0)


def test_momentum_coefficients_match_recurrence():
    """Unrolled chunk coefficients equal stepping S and W token by token (scalar weights)."""
    g = torch.Generator().manual_seed(3)
    b = 6
    gates = {"lr": torch.rand(1, 1, b, generator=g), "momentum": torch.rand(1, 1, b, generator=g),
             "forget": torch.rand(1, 1, b, generator=g) * 0.5}
    valid = torch.tensor([[[True, True, False, True, True, True]]])
    c = MomentumGD().coefficients(gates, valid)
    grads, w0, s0 = torch.randn(b, generator=g, dtype=torch.float32), 0.7, -0.3
    w, s = torch.tensor(w0), torch.tensor(s0)
    for t in range(b):
        if valid[0, 0, t]:
            s = gates["momentum"][0, 0, t] * s - gates["lr"][0, 0, t] * grads[t]
            w = (1 - gates["forget"][0, 0, t]) * w + s
        unrolled = c.decay[0, 0, t] * w0 + c.carry[0, 0, t] * s0 - (c.mix[0, 0, t] * grads).sum()
        torch.testing.assert_close(unrolled, w, atol=1e-6, rtol=0)
    torch.testing.assert_close(c.s_decay[0, 0] * s0 - (c.s_mix[0, 0] * grads).sum(), s, atol=1e-6, rtol=0)




def _optimizer(name: str, chunk: int, seed: int = 0):
    """An inner optimizer by `make_memory`'s name, float64 (TTT's position offsets moved off 0)."""
    return make_memory(1, name, chunk=chunk, seed=seed).optimizer.double()


def _chunk_gates(shape: tuple, lookback: int, seed: int, spread: dict | None = None) -> dict:
    """Gates (..., b) in float64, uniform in [0, 1] or in `spread` {name: (low, high)}; ``omega`` (...,
    lookback + b)."""
    g = torch.Generator().manual_seed(seed)
    spread = spread or {}
    gates = {}
    for name in ("lr", "momentum", "forget", "omega"):
        low, high = spread.get(name, (0.0, 1.0))
        width = shape[-1] + (lookback if name == "omega" else 0)
        gates[name] = low + (high - low) * torch.rand(*shape[:-1], width, generator=g, dtype=torch.float64)
    return gates


END_OPTIMIZERS = ["gd", "plain", "decay", "momentum", "omega-decay", "omega-momentum", "omega-atlas-momentum"]


@pytest.mark.parametrize("name", END_OPTIMIZERS)
def test_read_coefficients_are_the_later_rows(name):
    """The rows a decoding step reads (from token `first` on, computed alone where the optimizer can)
    are those rows of the full coefficients, exactly, with pad slots and without."""
    b, heads = 7, 3
    opt = _optimizer(name, b)
    gates = _chunk_gates((heads, b), opt.lookback, seed=6)
    padded = torch.rand(heads, b, generator=torch.Generator().manual_seed(7)) > 0.3
    for valid in (padded, torch.ones_like(padded)):
        for first in range(b):
            full, read = opt.coefficients(gates, valid).rows(first), opt.read_coefficients(gates, valid, first)
            for a, r in zip(full._fields(), read._fields()):
                assert (a is None) == (r is None)
                if a is not None:
                    assert torch.equal(r, a)


@pytest.mark.parametrize("name", END_OPTIMIZERS)
def test_end_coefficients_are_the_last_row(name):
    """Each optimizer's chunk-end row, computed alone in O(b), is the last row of its full
    coefficients (with pad slots) and, without pads, the chunk map its per-token recurrence gives
    (float64: both at rounding distance, 1e-12)."""
    b, heads = 7, 3
    opt = _optimizer(name, b)
    gates = _chunk_gates((heads, 2, b), opt.lookback, seed=4)
    padded = torch.rand(heads, 2, b, generator=torch.Generator().manual_seed(5)) > 0.3
    for valid in (padded, torch.ones_like(padded)):
        full, end = opt.coefficients(gates, valid).rows(b - 1), opt.end_coefficients(gates, valid)
        for a, e in zip(full._fields(), end._fields()):
            assert (a is None) == (e is None)
            if a is not None:
                assert a.shape == e.shape
                torch.testing.assert_close(e, a, atol=1e-12, rtol=0)
    # the per-token recurrence of one chunk (the second), all tokens real, lookback tokens from the first
    lookback = opt.lookback
    token = lambda t: {n: g[:, 1, t + (lookback if n == "omega" else 0)] for n, g in gates.items()}  # noqa: E731
    earlier = [{"omega": gates["omega"][:, 1, i]} for i in range(lookback)]
    decay, carry, s_decay, mix, s_mix = naive_chunk_map(opt, [token(t) for t in range(b)], heads, torch.float64, earlier)
    close = dict(atol=1e-12, rtol=0)
    torch.testing.assert_close(end.mix[:, 1, 0], mix, **close)
    torch.testing.assert_close(end.decay[:, 1, 0] if end.decay is not None else torch.ones_like(decay), decay, **close)
    if opt.has_momentum:
        torch.testing.assert_close(end.carry[:, 1, 0], carry, **close)
        torch.testing.assert_close(end.s_decay[:, 1], s_decay, **close)
        torch.testing.assert_close(end.s_mix[:, 1], s_mix, **close)


#: gates of a 2048-token chunk: a long memory (momentum and retention near 1: products of thousands
#: of gates stay O(1)), one that forgets within a few tokens (products underflow; the momentum gates'
#: log sum reaches -11000), and gates spread over [0, 1] (that sum reaches -2000)
LONG_CHUNK_GATES = {
    "near-1": {"momentum": (1 - 2e-3, 1.0), "forget": (0.0, 2e-3), "lr": (0.0, 1e-2)},
    "near-0": {"momentum": (0.0, 1e-2), "forget": (1 - 1e-2, 1.0), "lr": (0.0, 1.0)},
    "spread": {},
}


@pytest.mark.parametrize("lr_after_momentum", [False, True], ids=["titans", "atlas"])
@pytest.mark.parametrize("case", sorted(LONG_CHUNK_GATES))
def test_end_coefficients_keep_float32_precision_over_a_long_chunk(case, lr_after_momentum):
    """Over a 2048-token chunk the float32 chunk-end coefficients of momentum with forgetting match
    the float64 per-token recurrence (on the same float32 gates) to 1e-5 relative: every entry is a
    sum of non-negative products of gates, formed by at most two doubling scans of log2(b) = 11
    multiplications and additions each, about 44 roundings of 2^-24 = 6e-8: within ~3e-6 (2e-6
    seen); products below float32's normal range (1.2e-38) keep only absolute
    precision, and the engine zeroes everything below NEGLIGIBLE anyway. (Products taken as
    differences of float32 cumulative log sums are off by ~1e-4 relative once those sums reach
    -2000: 1e-4 to 1e-3 here.)"""
    b, heads = 2048, 2
    opt = MomentumGD(lr_after_momentum)
    gates = {n: g.float() for n, g in _chunk_gates((heads, 1, b), 0, seed=6, spread=LONG_CHUNK_GATES[case]).items()}
    end = opt.end_coefficients(gates, torch.ones(heads, 1, b, dtype=torch.bool))
    reference = naive_chunk_map(opt, [{n: g[:, 0, t].double() for n, g in gates.items()} for t in range(b)], heads,
                                torch.float64)
    decay, carry, s_decay, mix, s_mix = reference
    close = dict(rtol=1e-5, atol=10 * torch.finfo(torch.float32).tiny)
    for got, want in [(end.decay[:, 0, 0], decay), (end.carry[:, 0, 0], carry), (end.s_decay[:, 0], s_decay),
                      (end.mix[:, 0, 0], mix), (end.s_mix[:, 0], s_mix)]:
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, **close)
    assert (mix > 1e-3).any()  # terms that matter

def test_negligible_coefficients_are_zero_not_subnormal():
    """Products of forget gates over a long chunk underflow (0.5^128 = 3e-39, a subnormal float that
    CPUs process slowly): such coefficients become exactly 0, every other one is unchanged."""
    b = 128
    gates = {"lr": torch.full((1, 1, b), 0.5), "momentum": torch.full((1, 1, b), 0.9),
             "forget": torch.full((1, 1, b), 0.5)}
    raw = MomentumGD().coefficients(gates, torch.ones(1, 1, b, dtype=torch.bool))
    assert (raw.decay.abs() < torch.finfo(torch.float32).tiny).any()  # the case this guards against
    kept = raw.without_negligible()
    for before, after in zip(*(((c.mix, c.decay, c.carry, c.s_decay, c.s_mix)) for c in (raw, kept))):
        small = before.abs() < NEGLIGIBLE
        assert (after[small] == 0).all()
        assert torch.equal(after[~small], before[~small])
    # decay_i = 0.5^(i+1): kept up to 0.5^63, zero from 0.5^65 (0.5^64 = NEGLIGIBLE up to rounding)
    assert (kept.decay[0, 0, :63] > 0).all() and (kept.decay[0, 0, 64:] == 0).all()

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_flush_subnormal_zeroes_only_the_entries_below_the_square_root_of_the_smallest_normal(dtype):
    tiny = torch.finfo(dtype).tiny
    w = torch.tensor([tiny / 4, -tiny * 2, tiny ** 0.5 / 2, -(tiny ** 0.5) * 2, 0.3, -5.0, float("nan"), float("inf")],
                     dtype=dtype)
    got = flush_subnormal({"W": w})["W"]
    assert torch.equal(got[:3], torch.zeros(3, dtype=dtype))
    assert torch.equal(got[3:6], w[3:6])
    assert got[6].isnan() and got[7] == float("inf")


def test_weights_that_decay_towards_zero_are_stored_as_zero_not_subnormal():
    """A forget gate that keeps shrinking weights no update refreshes (lr 0) would leave them
    subnormal (0.1^40 of their initial size after 40 tokens), which a CPU multiplies slowly: the
    committed weights hold exact zeros instead."""
    mem = make_memory(2, "decay")
    q, k, v, gates = make_inputs(length=40, optimizer="decay")
    gates["lr"].zero_()
    gates["forget"].fill_(0.9)
    state = {}
    mem(q, k, v, gates, state=state)
    weights = {n: t for n, t in state.items() if n.startswith("memory.W.")}
    initial = mem.fast.initial_params(1)
    assert weights and all(initial[n.split(".")[-1]].abs().max() * 0.1 ** 40 < torch.finfo(torch.float32).tiny
                           for n in weights)  # without the flush: subnormal or zero
    assert all(torch.equal(w, torch.zeros_like(w)) for w in weights.values())


def test_chunk_one_gd_is_per_token_gradient_descent():
    """Chunk size 1: every token takes a plain GD step (eta = 1) before it is read."""
    mem = make_memory(1, "gd", chunk=1, residual_norm=False)
    with torch.no_grad():
        mem.optimizer.token_offset.zero_()
    # steps lr * (|k|^2 + 1) <= 1, inside the engine's step bound (at 0.5 they would overshoot)
    q, k, v, gates = make_inputs(batch=1, length=5, heads=1, optimizer="gd", max_lr=0.05)
    mem.fast = MLPMemory(1, 8, depth=1, residual_norm=False)
    mem.fast._tto_init(init)
    out = mem(q, k, v, gates)
    W, b = mem.fast.W1[0].detach().clone(), mem.fast.b1[0].detach().clone()
    for t in range(5):
        kt, vt, lr = k[0, t, 0], v[0, t, 0], gates["lr"][0, t, 0]
        err = kt @ W + b[0] - vt
        W, b = W - lr * torch.outer(kt, err), b - lr * err
        torch.testing.assert_close(out[0, t, 0], q[0, t, 0] @ W + b[0], atol=1e-6, rtol=0)


def test_linear_memory_chunk_one_is_delta_rule():
    """Linear memory, no momentum or forgetting, chunk 1, loss ||Wk - v||^2 (scale 2):
    the delta rule S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T with beta = 2 * lr."""
    torch.manual_seed(0)
    fast = MLPMemory(1, 6, depth=1, bias=False, residual_norm=False)
    fast._tto_init(init)
    mem = Memory(fast, SquaredError(2.0), MomentumGD(), chunk_size=1)
    # beta * |k|^2 < 1 (|k|^2 ~ 6 here): contractive, and inside the engine's step bound
    q, k, v, gates = make_inputs(batch=1, length=7, heads=1, dim=6, optimizer="momentum", max_lr=0.05)
    gates["momentum"].zero_()
    gates["forget"].zero_()
    out = mem(q, k, v, gates)
    S = fast.W1[0].detach().clone()
    for t in range(7):
        beta = 2 * gates["lr"][0, t, 0]
        kt, vt = k[0, t, 0], v[0, t, 0]
        S = S + beta * torch.outer(kt, vt - S.T @ kt)
        torch.testing.assert_close(out[0, t, 0], S.T @ q[0, t, 0], atol=1e-5, rtol=0)


def test_zero_lr_reads_initial_weights():
    mem = make_memory(2, "momentum")
    q, k, v, gates = make_inputs(optimizer="momentum")
    gates["lr"].zero_()
    out = mem(q, k, v, gates)
    params = mem.fast.initial_params(1)
    expect = torch.stack([mem.fast.apply(q[i].transpose(0, 1), mem.fast.plain_linear(params)).transpose(0, 1)
                          for i in range(3)])
    # forgetting still shrinks the initial weights, so compare with forget = 0
    gates["forget"].zero_()
    torch.testing.assert_close(mem(q, k, v, gates), expect, atol=1e-6, rtol=0)
    assert out.shape == expect.shape


def test_inner_state_is_float32_under_bf16_autocast():
    mem = make_memory(2, "momentum")
    q, k, v, gates = make_inputs(optimizer="momentum")
    state: dict = {}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mem(q.bfloat16(), k.bfloat16(), v.bfloat16(), gates, state=state)
    assert out.dtype == torch.bfloat16
    fast_weights = [t for key, t in state.items() if ".W." in key or ".S." in key]
    assert fast_weights and all(t.dtype == torch.float32 for t in fast_weights)


# ---------------------------------------------------------------------------- delta rule


def delta_inputs(batch=2, length=13, heads=2, dk=6, dv=5, decay=True, seed=0, dtype=torch.float64, max_beta=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, length, heads, dk, generator=g, dtype=dtype)
    k = torch.nn.functional.normalize(torch.randn(batch, length, heads, dk, generator=g, dtype=dtype), dim=-1)
    v = torch.randn(batch, length, heads, dv, generator=g, dtype=dtype)
    beta = max_beta * torch.rand(batch, length, heads, generator=g, dtype=dtype)
    log_decay = -torch.rand(batch, length, heads, generator=g, dtype=dtype) if decay else torch.zeros_like(beta)
    s0 = torch.randn(batch, heads, dk, dv, generator=g, dtype=dtype)
    return [t.requires_grad_(True) for t in (q, k, v, beta, log_decay, s0)]


def delta_scan(chunk, q, k, v, beta, log_decay, s0):
    """The delta rule's chunkwise scan from the state s0 (B, H, d_k, d_v) over every token of
    q, k, v: (outputs (B, T, H, d_v), final state)."""
    memory = DeltaRule(chunk)
    heads = q.shape[2]
    layout = Layout.build(None, q.shape[1], q.shape[0], chunk, q.device, commit_incomplete=True)
    chunks = {n: layout.chunks(t) for n, t in {"q": q, "k": k, "v": v, "gate.lr": beta, "gate.log_decay": log_decay}.items()}
    reads, params, *_ = memory._scan({"S": s0.flatten(0, 1)}, None, {}, chunks, layout.chunk_valid(heads), layout.n_commit,
                                     False)
    return layout.tokens(reads), params["S"].unflatten(0, (q.shape[0], heads))


@pytest.mark.parametrize("chunk", [1, 4, 5, 16])
@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("max_beta", [1.0, 2.0], ids=["beta<1", "neg-eigval"])
def test_chunkwise_delta_rule_matches_recurrence(chunk, decay, max_beta):
    """Outputs, final state and the gradients of all inputs (initial state included), float64:
    the chunkwise form is exact, so they agree to rounding (1e-10) at any chunk size, also with
    beta up to 2 (negative eigenvalues of the transition)."""
    inputs = delta_inputs(decay=decay, max_beta=max_beta)
    out, state = delta_scan(chunk, *inputs)
    ref_out, ref_state = naive_delta_rule(*inputs)
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=0)
    torch.testing.assert_close(state, ref_state, atol=1e-10, rtol=0)
    probe = [torch.randn_like(out), torch.randn_like(state)]
    loss = lambda o, s: (o * probe[0]).sum() + (s * probe[1]).sum()  # noqa: E731
    grads = torch.autograd.grad(loss(out, state), inputs)
    ref_grads = torch.autograd.grad(loss(ref_out, ref_state), inputs)
    for name, g, r in zip(["q", "k", "v", "beta", "log_decay", "s0"], grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("chunk", [3, 8, 64])
def test_delta_rule_padding_and_streaming_match_recurrence(chunk):
    """Through the engine's layout (float64): left padding and any split of the sequence into calls
    give the recurrence's outputs at the real tokens and its final state (nothing pending); at
    chunk 64 every call is shorter than a chunk and runs one chunk of its own length (decoding: one
    token, no padding to 64)."""
    q, k, v, beta, log_decay, _ = (t.detach() for t in delta_inputs(length=11))
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, :4] = False
    s0 = torch.zeros(2, 2, 6, 5, dtype=torch.float64)
    masked = mask[..., None]
    ref, ref_state = naive_delta_rule(q, k, v, beta * masked, log_decay * masked, s0)
    memory, gates = DeltaRule(chunk), {"lr": beta, "log_decay": log_decay}
    torch.testing.assert_close(memory(q, k, v, gates, mask) * mask[..., None, None], ref * mask[..., None, None],
                               atol=1e-12, rtol=0)
    for cuts in ([0, 11], [0, 5, 6, 11], list(range(12))):
        state: dict = {}
        outs = [memory(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], {n: g[:, lo:hi] for n, g in gates.items()},
                       mask[:, lo:hi], state) for lo, hi in zip(cuts, cuts[1:])]
        torch.testing.assert_close(torch.cat(outs, 1) * mask[..., None, None], ref * mask[..., None, None], atol=1e-12, rtol=0)
        torch.testing.assert_close(state["memory.W.S"], ref_state, atol=1e-12, rtol=0)
        assert int(state["memory.n_pending"].max()) == 0


def test_delta_rule_step_is_gradient_descent_after_decay():
    """One token of the recurrence = decay the state, then one GD step of size beta on
    1/2 ||S^T k - v||^2 at the decayed state, the gradient taken by autograd."""
    q, k, v, beta, log_decay, s0 = (t.detach() for t in delta_inputs(length=1))
    decayed = (log_decay[:, 0].exp()[..., None, None] * s0).requires_grad_(True)
    loss = 0.5 * ((decayed.transpose(-1, -2) @ k[:, 0, :, :, None])[..., 0] - v[:, 0]).pow(2).sum()
    expect = decayed - beta[:, 0][..., None, None] * torch.autograd.grad(loss, decayed)[0]
    out, state = naive_delta_rule(q, k, v, beta, log_decay, s0)
    torch.testing.assert_close(state, expect, atol=1e-12, rtol=0)
    torch.testing.assert_close(out[:, 0], (expect.transpose(-1, -2) @ q[:, 0, :, :, None])[..., 0], atol=1e-12, rtol=0)


def test_delta_rule_without_decay_is_the_chunk_one_memory():
    """DeltaNet is the general engine at chunk 1 with a linear memory (zero init), no momentum or
    forgetting and the unhalved loss ||S^T k - v||^2 at lr = beta / 2: two engines, one rule."""
    q, k, v, beta, _, _ = (t.detach().float() for t in delta_inputs(batch=1, heads=1, dk=6, dv=6))
    fast = MLPMemory(1, 6, depth=1, bias=False, residual_norm=False)
    with torch.no_grad():
        fast.W1.zero_()
    memory = Memory(fast, SquaredError(2.0), MomentumGD(), chunk_size=1)
    zeros = torch.zeros_like(beta)
    general = memory(q, k, v, {"lr": beta / 2, "momentum": zeros, "forget": zeros})
    torch.testing.assert_close(DeltaRule(4)(q, k, v, {"lr": beta}), general, atol=1e-5, rtol=0)


def test_delta_rule_zero_beta_and_pads_keep_the_state():
    q, k, v, beta, log_decay, _ = (t.detach() for t in delta_inputs())
    memory, state = DeltaRule(4), {}
    memory(q, k, v, {"lr": beta, "log_decay": log_decay}, state=state)  # some state S != 0
    s = state["memory.W.S"].clone()
    memory(q, k, v, {"lr": torch.zeros_like(beta), "log_decay": torch.zeros_like(beta)}, state=state)
    torch.testing.assert_close(state["memory.W.S"], s, atol=0, rtol=0)
    mask = torch.zeros(q.shape[:2], dtype=torch.bool)
    memory(q, k, v, {"lr": beta, "log_decay": log_decay}, mask=mask, state=state)
    torch.testing.assert_close(state["memory.W.S"], s, atol=0, rtol=0)


def test_delta_rule_overwrites_orthonormal_keys():
    """beta = 1 with orthonormal keys stores each pair exactly: reading k_j returns v_j, even when
    a key is rewritten with a new value."""
    dk, dv = 8, 3
    keys = torch.linalg.qr(torch.randn(dk, dk))[0].T  # rows orthonormal
    order = [0, 1, 2, 3, 1]  # key 1 is written twice: the second value must win
    k = keys[order][None, :, None]
    v = torch.randn(1, len(order), 1, dv)
    state: dict = {}
    DeltaRule(2)(k, k, v, {"lr": torch.ones(1, len(order), 1)}, state=state)
    read = keys[:4] @ state["memory.W.S"][0, 0]
    torch.testing.assert_close(read, v[0, [0, 4, 2, 3], 0], atol=1e-5, rtol=0)  # float32 state


# ---------------------------------------------------------------------------- Miras' parts


@pytest.mark.parametrize("objective", [SquaredError(2.0), DotProduct(), LpError(3.0), LpError(3.0, eps=1e-3), LpError(1.5, eps=1e-2),
                                       Huber()], ids=["l2", "dot", "l3", "l3-smooth", "l1.5-smooth", "huber"])
def test_objective_gradient_is_autograd_of_its_loss(objective):
    g = torch.Generator().manual_seed(0)
    y = torch.randn(4, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(4, 5, 8, generator=g, dtype=torch.float64)
    gates = {"huber_delta": 0.7 + 0.6 * torch.rand(4, 5, generator=g, dtype=torch.float64)}
    if isinstance(objective, Huber):  # both regimes present
        rms = (y - v).detach().pow(2).mean(-1).sqrt()
        assert (rms <= gates["huber_delta"]).any() and (rms > gates["huber_delta"]).any()
    expect = torch.autograd.grad(objective.loss(y, v, gates).sum(), y)[0]
    torch.testing.assert_close(objective.grad(y, v, gates), expect, atol=1e-12, rtol=1e-12)


def test_decay_gd_coefficients_match_recurrence():
    g = torch.Generator().manual_seed(4)
    b = 6
    gates = {"lr": torch.rand(1, 1, b, generator=g), "forget": torch.rand(1, 1, b, generator=g) * 0.5}
    valid = torch.tensor([[[True, False, True, True, True, True]]])
    c = DecayGD().coefficients(gates, valid)
    grads, w0 = torch.randn(b, generator=g), 0.7
    w = torch.tensor(w0)
    for t in range(b):
        if valid[0, 0, t]:
            w = (1 - gates["forget"][0, 0, t]) * w - gates["lr"][0, 0, t] * grads[t]
        torch.testing.assert_close(c.decay[0, 0, t] * w0 - (c.mix[0, 0, t] * grads).sum(), w, atol=1e-6, rtol=0)


def test_decay_gd_is_momentum_gd_without_momentum():
    """In float64: the two take their step bound from different branches of its formula (without momentum,
    and with momentum gates at 0), which agree to rounding, ~1e-7 of the outputs in float32."""
    q, k, v, gates = make_inputs(optimizer="decay", dtype=torch.float64)
    decay, momentum = make_memory(2, "decay").double(), make_memory(2, "momentum").double()
    torch.testing.assert_close(decay(q, k, v, gates), momentum(q, k, v, {**gates, "momentum": torch.zeros_like(gates["lr"])}),
                               atol=1e-12, rtol=0)


def test_lq_normalization_is_the_accumulator_rule():
    """Moneta: from an accumulator A_c, reading W_c = A_c / ||A_c||_q^(q-2), one chunk of linear
    steps on A (gradients g at W_c) renormalised at the end equals the retention's chunk_end of
    the engine's steps on W with its gradient scale, with no A stored."""
    g = torch.Generator().manual_seed(5)
    q_norm, keep = 4.0, torch.tensor([0.8, 0.9])
    a_c = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    step = 0.1 * torch.randn(2, 3, 5, generator=g, dtype=torch.float64)  # sum_s c_s g_s
    norm = lambda a: a.abs().pow(q_norm).sum((-2, -1), keepdim=True).pow(1 / q_norm)  # noqa: E731
    w_c = a_c / norm(a_c).pow(q_norm - 2)
    a_b = keep[:, None, None] * a_c - step
    expect = a_b / norm(a_b).pow(q_norm - 2)
    retention = LqNormalization(q_norm)
    w_b = keep[:, None, None] * w_c - retention.grad_scale({"W": w_c})["W"] * step
    torch.testing.assert_close(retention.chunk_end({"W": w_c}, {"W": w_b}, keep)["W"], expect, atol=1e-12, rtol=0)


def test_lq_normalization_floor_bounds_the_read_weights_and_is_inactive_above_it():
    """Moneta's floor on ||A||_q: a chunk end that shrinks A (keep 1e-3) below min_norm reads
    ``W = min_norm A / ||A|| / min_norm^(q-2)`` (||W||_4 = 1 / min_norm), where the paper's formula
    gives ||W||_4 = 1 / ||A|| (1e3 times larger); a chunk end above the floor is the paper's."""
    g = torch.Generator().manual_seed(6)
    q_norm, min_norm = 4.0, 0.1
    norm = lambda a: a.abs().pow(q_norm).sum((-2, -1), keepdim=True).pow(1 / q_norm)  # noqa: E731
    a_c = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    w_c = a_c / norm(a_c).pow(q_norm - 2)
    floored, paper = LqNormalization(q_norm, min_norm), LqNormalization(q_norm)
    for keep, below in ((torch.tensor([1e-3, 1e-3], dtype=torch.float64), True), (torch.tensor([0.9, 0.8], dtype=torch.float64), False)):
        a_b = keep[:, None, None] * a_c
        w_b = keep[:, None, None] * w_c
        out = floored.chunk_end({"W": w_c}, {"W": w_b}, keep)["W"]
        if below:
            assert (norm(a_b) < min_norm).all()
            torch.testing.assert_close(out, min_norm * a_b / norm(a_b) / min_norm ** (q_norm - 2), atol=1e-12, rtol=0)
            torch.testing.assert_close(norm(out).flatten(), torch.full((2,), 1 / min_norm, dtype=torch.float64), atol=1e-9, rtol=0)
        else:
            torch.testing.assert_close(out, paper.chunk_end({"W": w_c}, {"W": w_b}, keep)["W"], atol=0, rtol=0)
            torch.testing.assert_close(out, a_b / norm(a_b).pow(q_norm - 2), atol=1e-12, rtol=0)


@pytest.mark.parametrize("chunk", [1, 4])
def test_moneta_normalises_at_chunk_boundaries(chunk, step_factors):
    """Moneta as Miras writes it with its parallel training's normalisation at chunk boundaries,
    transcribed per head: ``A_t = (1 - alpha_t) A_{t-1} - eta_t grad`` of ``||M(k_t) - v_t||_3^3`` at
    the chunk-start weights W_c, reads ``A_t / ||A_c||_4^2`` inside a chunk and the normalised
    ``W_b = A_b / ||A_b||_4^2`` at its last token; at chunk 1 this is the online rule with
    ``W_t = A_t / ||A_t||_4^2`` at every token. The memory is ``x + LN(W2 gelu(W1 x))``; float64.
    The engine's former reads (the chunk-start normaliser at the last token too) differ by 0.12
    (chunk 1) and 0.56 (chunk 4) here. The steps are
    small (eta <= 5e-6) so that the step bound leaves the commits alone: this random memory's l_3
    curvature through its LayerNorm needs kappa ~0.1 already at 5e-5; the gradients still move the
    reads by ~1e-6, far above the tolerance."""
    mem = make_memory(2, "decay", chunk=chunk, objective=LpError(3.0), retention=LqNormalization(4.0)).double()
    q, k, v, gates = make_inputs(batch=2, length=9, optimizer="decay", max_lr=5e-6, dtype=torch.float64)
    out = mem(q, k, v, gates)
    assert step_factors and all((f == 1).all() for f in step_factors)  # the bound leaves every commit alone

    fast = mem.fast
    norm = lambda a: a.abs().pow(4).sum().pow(0.25)  # noqa: E731

    def memory(x, w1, w2, head):
        h = F.gelu(x @ w1, approximate="tanh") @ w2
        h = (h - h.mean()) / (h.var(unbiased=False) + fast.norm_eps).sqrt()
        return x + fast.norm_weight[head].double() * h + fast.norm_bias[head].double()

    for row in range(2):
        for head in range(2):
            w = [fast.W1[head].double().detach(), fast.W2[head].double().detach()]
            a = [x / norm(x) ** 2 for x in w]  # ||W|| = 1 / ||A|| at q = 4, so A = W / ||W||^2
            for t in range(9):
                if t % chunk == 0:
                    start, n_c = [x.clone().requires_grad_(True) for x in w], [norm(x) ** 2 for x in a]
                loss = (memory(k[row, t, head], *start, head) - v[row, t, head]).abs().pow(3).sum()
                grads = torch.autograd.grad(loss, start)
                forget, lr = gates["forget"][row, t, head], gates["lr"][row, t, head]
                a = [(1 - forget) * x - lr * g for x, g in zip(a, grads)]
                if t % chunk == chunk - 1:  # a boundary: normalise
                    w = [x / norm(x) ** 2 for x in a]
                    read = w
                else:
                    read = [x / n for x, n in zip(a, n_c)]
                torch.testing.assert_close(out[row, t, head], memory(q[row, t, head], *read, head).detach(),
                                           atol=1e-12, rtol=0)


def test_softmax_retention_is_the_mirror_descent_step():
    """Memora: the chunk end applies the accumulated step in log space, scale * softmax(keep * log(W_c
    / scale) - step / scale): rows stay positive and sum to scale."""
    g = torch.Generator().manual_seed(6)
    scale, keep = 4.0, torch.tensor([0.9, 0.7])
    retention = SoftmaxRetention(scale)
    w_c = retention.start({"W": torch.randn(2, 3, 5, generator=g, dtype=torch.float64)})["W"]
    step = 0.1 * torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    out = retention.chunk_end({"W": w_c}, {"W": keep[:, None, None] * w_c - step}, keep)["W"]
    logits = keep[:, None, None] * torch.log(w_c / scale) - step / scale
    torch.testing.assert_close(out, scale * logits.exp() / logits.exp().sum(-1, keepdim=True), atol=1e-12, rtol=0)
    torch.testing.assert_close(out.sum(-1), torch.full((2, 3), scale, dtype=torch.float64), atol=1e-12, rtol=0)


def call_and_stream_match(mem, q, k, v, gates, mask, ref, atol: float) -> dict:
    """One call, and the same 13 tokens streamed in pieces (a prefill, a single token, a block
    crossing chunk boundaries), give `ref` at the real tokens. Returns the streamed state."""
    keep = mask[..., None, None]
    torch.testing.assert_close(mem(q, k, v, gates, mask) * keep, ref, atol=atol, rtol=0)
    state: dict = {}
    streamed = [mem(*(x[:, a:b] for x in (q, k, v)), {n: t[:, a:b] for n, t in gates.items()}, mask[:, a:b], state)
                for a, b in [(0, 3), (3, 4), (4, 11), (11, 13)]]
    torch.testing.assert_close(torch.cat(streamed, 1) * keep, ref, atol=atol, rtol=0)
    return state


#: (optimizer, objective, retention): Miras' Moneta, Yaad, Memora and ATLAS' OmegaNet, ATLAS
SCAN_PARTS = [("decay", LpError(3.0, eps=1e-6), LqNormalization(4.0)), ("decay", Huber(), None),
              ("decay", SquaredError(1.0), SoftmaxRetention(2.0)), ("omega-decay", SquaredError(2.0), None),
              ("omega-atlas-momentum", SquaredError(2.0), MuonRetention())]


@pytest.mark.parametrize("optimizer,objective,retention", SCAN_PARTS,
                         ids=["moneta", "yaad", "memora", "omeganet", "atlas"])
def test_composed_scan_matches_naive(optimizer, objective, retention):
    """Objectives with gates, the Omega window and chunk-boundary retentions: outputs (padded and
    streamed), committed weights and outer gradients of the dual-form scan equal the naive loop's.
    In float64: the l_q norms, log-softmax and Newton-Schulz steps amplify float32 rounding to ~1e-4
    over a few chunks, which would hide a real error of that size; float64 keeps the two forms at
    rounding distance (< 1e-9)."""
    mem = make_memory(2, optimizer, objective=objective, retention=retention).double()
    q, k, v, gates = make_inputs(optimizer=optimizer, length=13)
    q, k, v = (x.double().requires_grad_(True) for x in (q, k, v))
    gates = {n: g.double() for n, g in gates.items()}
    mask = torch.ones(3, 13, dtype=torch.bool)
    mask[1, :5] = False
    keep = mask[..., None, None]
    close = dict(atol=1e-9, rtol=0)
    ref, _, committed = naive_memory(mem, q, k, v, gates, mask)
    state = call_and_stream_match(mem, q, k, v, gates, mask, ref, atol=1e-9)
    for row in range(3):
        for name, w in committed[row].items():
            torch.testing.assert_close(state["memory.W." + name][row], w, **close)
    w = torch.randn_like(ref)
    fast = torch.autograd.grad((mem(q, k, v, gates, mask) * keep * w).sum(), [q, k, v, *mem.parameters()])
    naive = torch.autograd.grad((ref * w).sum(), [q, k, v, *mem.parameters()])
    for a, b in zip(fast, naive):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-8)


# ---------------------------------------------------------------------------- LaCT's parts


def test_swiglu_backward_matches_autograd():
    torch.manual_seed(0)
    fast = SwiGLUMemory(2, 6, expansion=2.0)
    fast._tto_init(init)
    params = {n: w.detach().double().requires_grad_(True) for n, w in fast.initial_params(1).items()}
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    probe = torch.randn(2, 5, 6, dtype=torch.float64)
    loss = (fast.apply(x, fast.plain_linear(params)) * probe).sum()
    expect = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    for name, inp, delta in fast.forward_backward(params, x, lambda y: probe):
        torch.testing.assert_close(inp.transpose(-1, -2) @ delta, expect[name], atol=1e-12, rtol=0)


def test_newton_schulz_orthogonalises():
    """NS5 keeps the singular vectors and maps every singular value into about [0.7, 1.2]
    (LaCT's quintic coefficients), for wide and tall matrices and singular values over 2 decades (5 steps cannot lift much smaller ones)."""
    g = torch.Generator().manual_seed(0)
    for shape in [(3, 8, 24), (3, 24, 8)]:
        u, _, vh = torch.linalg.svd(torch.randn(*shape, generator=g, dtype=torch.float64), full_matrices=False)
        s = torch.logspace(0, -2, u.shape[-1], dtype=torch.float64).expand(3, -1)
        out = newton_schulz5(u @ torch.diag_embed(s) @ vh)
        core = u.transpose(-1, -2) @ out @ vh.transpose(-1, -2)  # diagonal if the singular vectors are kept
        diag = torch.diagonal(core, dim1=-2, dim2=-1)
        torch.testing.assert_close(core, torch.diag_embed(diag), atol=1e-10, rtol=0)
        assert diag.min() > 0.6 and diag.max() < 1.25, diag


@pytest.mark.parametrize("shape", [(2, 8, 40), (2, 40, 8), (2, 8, 12)], ids=["wide", "tall", "near-square"])
def test_newton_schulz_equals_the_plain_iteration(shape):
    """Whether it iterates on the matrix or (long side >= GRAM_ASPECT x short) on its Gram matrix,
    NS5 equals the textbook iteration X <- aX + (bA + cA^2)X, A = XX^T, written out here: outputs
    and gradients, float64."""
    assert (max(shape[1:]) >= GRAM_ASPECT * min(shape[1:])) == (shape != (2, 8, 12))  # both paths run
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64, requires_grad=True)

    def plain(m):
        x = m.transpose(-1, -2) if m.shape[-2] > m.shape[-1] else m
        x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
        for a, b, c in NS5_COEFFICIENTS:
            x = a * x + (b * (x @ x.transpose(-1, -2)) + c * (x @ x.transpose(-1, -2)) @ (x @ x.transpose(-1, -2))) @ x
        return x.transpose(-1, -2) if m.shape[-2] > m.shape[-1] else x

    out, ref = newton_schulz5(g), plain(g)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    probe = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad((out * probe).sum(), g)[0],
                               torch.autograd.grad((ref * probe).sum(), g)[0], atol=1e-10, rtol=0)


def make_large_chunk(momentum=True, muon=True, weight_norm=True, chunk=4):
    torch.manual_seed(0)
    fast = SwiGLUMemory(2, 6, expansion=1.0, init_gain=0.5)
    fast._tto_init(init)
    return LargeChunkMemory(fast, DotProduct(), chunk, use_momentum=momentum, use_muon=muon,
                            weight_norm=weight_norm).double()


def large_chunk_inputs(batch=3, length=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, length, 2, 6, generator=g, dtype=torch.float64) for _ in range(3))
    gates = {"lr": 0.3 * torch.rand(batch, length, 2, 3, generator=g, dtype=torch.float64),
             "momentum": torch.rand(batch, length, 2, generator=g, dtype=torch.float64)}
    return q, k, v, gates


@pytest.mark.parametrize("momentum,muon,weight_norm", [(True, True, True), (True, False, False), (False, True, False),
                                                       (False, False, True)])
def test_large_chunk_matches_naive(momentum, muon, weight_norm):
    """Apply-then-update chunks vs per-token autograd gradients summed per chunk (float64): one
    call, left padding, streamed pieces (decoding reads only), and outer gradients."""
    mem = make_large_chunk(momentum, muon, weight_norm)
    q, k, v, gates = large_chunk_inputs()
    q.requires_grad_(True)
    mask = torch.ones(3, 13, dtype=torch.bool)
    mask[1, :5] = False
    keep = mask[..., None, None]
    ref = naive_large_chunk(mem, q, k, v, gates, mask)
    call_and_stream_match(mem, q, k, v, gates, mask, ref, atol=1e-10)
    w = torch.randn_like(ref)
    leaves = [q, *mem.parameters()]
    fast = torch.autograd.grad((mem(q, k, v, gates, mask) * keep * w).sum(), leaves)
    naive = torch.autograd.grad((ref * w).sum(), leaves)
    for a, b in zip(fast, naive):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("engine,read_start", [("large_chunk", False), ("memory", "only"), ("memory", False)])
def test_decoding_writes_the_pending_tokens_in_place(engine, read_start):
    """Token by token without a mask (the decoding path: new tokens join the pending ones): the
    reads equal one call's, and within a chunk every pending-token tensor of the state stays in one
    buffer (same storage, its first slots unchanged), so a step copies its own token, not the
    chunk's. A commit lays the chunk out anew."""
    chunk = 8
    if engine == "large_chunk":
        mem = make_large_chunk(chunk=chunk)
        q, k, v, gates = large_chunk_inputs(length=21)
    else:
        mem = make_memory(2, "momentum", chunk=chunk).double()
        q, k, v, gates = make_inputs(optimizer="momentum", length=21, dtype=torch.float64)
    whole = mem(q, k, v, gates, read_start=read_start)
    state, reads, buffers = {}, [], []
    for t in range(21):
        reads.append(mem(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], {n: g[:, t:t + 1] for n, g in gates.items()},
                         state=state, read_start=read_start))
        pending = {n[len("memory.pending."):]: x for n, x in state.items() if n.startswith("memory.pending.")}
        assert set(pending) >= {"q", "k", "v"} and pending["q"].shape[1] == (t + 1) % chunk
        buffers.append({n: x.untyped_storage().data_ptr() for n, x in pending.items()})
        if pending["q"].shape[1] > 1:  # a token joined the pending ones: the same buffers, earlier slots kept
            assert buffers[-1] == buffers[-2]
            torch.testing.assert_close(pending["k"][:, :-1], k[:, t + 1 - pending["k"].shape[1]:t], atol=0, rtol=0)
    torch.testing.assert_close(torch.cat(reads, 1), whole, atol=1e-10, rtol=0)


def test_large_chunk_reads_chunk_start_weights_and_keeps_norms():
    """A chunk's outputs do not depend on its own keys/values (apply-then-update), the first chunk
    reads the initial weights, and with weight norm every column keeps its initial norm."""
    mem = make_large_chunk()
    q, k, v, gates = large_chunk_inputs(batch=1, length=8)
    out = mem(q, k, v, gates)
    k2, v2 = k.clone(), v.clone()
    k2[:, 4:], v2[:, 4:] = torch.randn(1, 4, 2, 6, dtype=torch.float64), torch.randn(1, 4, 2, 6, dtype=torch.float64)
    torch.testing.assert_close(mem(q, k2, v2, gates), out, atol=0, rtol=0)
    initial = mem.fast.initial_params(1)
    torch.testing.assert_close(out[0, :4].transpose(0, 1), mem.fast.apply(q[0, :4].transpose(0, 1),
                               mem.fast.plain_linear(initial)), atol=1e-12, rtol=0)
    state: dict = {}
    mem(q, k, v, gates, state=state)
    for name, w in initial.items():
        after = state["memory.W." + name][0]
        assert (after - w).abs().max() > 1e-3  # the weights moved
        torch.testing.assert_close(after.norm(dim=-2), w.norm(dim=-2), atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------- ATLAS' parts


def test_omega_window_coefficients_match_windowed_recurrence():
    """mix @ band equals stepping the wrapped optimizer with g~_t = sum_{t-c<i<=t} gamma_i g_i."""
    g = torch.Generator().manual_seed(7)
    b, window = 6, 3
    gates = {"lr": torch.rand(1, 1, b, generator=g), "forget": torch.rand(1, 1, b, generator=g) * 0.5,
             "momentum": torch.rand(1, 1, b, generator=g), "omega": torch.rand(1, 1, b, generator=g)}
    valid = torch.ones(1, 1, b, dtype=torch.bool)
    c = OmegaWindow(MomentumGD(), window).coefficients(gates, valid)
    grads, w, s = torch.randn(b, generator=g), torch.tensor(0.7), torch.tensor(-0.3)
    w0, s0 = w.clone(), s.clone()
    for t in range(b):
        windowed = sum(gates["omega"][0, 0, i] * grads[i] for i in range(max(0, t - window + 1), t + 1))
        s = gates["momentum"][0, 0, t] * s - gates["lr"][0, 0, t] * windowed
        w = (1 - gates["forget"][0, 0, t]) * w + s
        unrolled = c.decay[0, 0, t] * w0 + c.carry[0, 0, t] * s0 - (c.mix[0, 0, t] * grads).sum()
        torch.testing.assert_close(unrolled, w, atol=1e-6, rtol=0)
    torch.testing.assert_close(c.s_decay[0, 0] * s0 - (c.s_mix[0, 0] * grads).sum(), s, atol=1e-6, rtol=0)


def test_omega_window_of_one_is_the_wrapped_optimizer():
    q, k, v, gates = make_inputs(optimizer="momentum")
    plain, windowed = make_memory(2, "momentum"), make_memory(2, "momentum")
    windowed.optimizer = OmegaWindow(windowed.optimizer, 1)
    torch.testing.assert_close(windowed(q, k, v, {**gates, "omega": torch.ones_like(gates["lr"])}),
                               plain(q, k, v, gates), atol=1e-6, rtol=0)


def test_polynomial_features_are_a_taylor_kernel():
    """<phi(q), phi(k)> = sum_i a_i^2 (q.k)^i for learned a; at init, the Taylor polynomial of exp."""
    features = PolynomialFeatures(5, 3).double()
    features._tto_init(init)
    q, k = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    dot = (q * k).sum(-1)
    taylor = sum(dot**i / math.factorial(i) for i in range(4))
    torch.testing.assert_close((features(q) * features(k)).sum(-1), taylor, atol=1e-12, rtol=0)
    with torch.no_grad():
        features.coefficients.copy_(torch.tensor([0.5, -1.0, 2.0, 0.3], dtype=torch.float64))
    expect = sum(a**2 * dot**i for i, a in enumerate([0.5, -1.0, 2.0, 0.3]))
    torch.testing.assert_close((features(q) * features(k)).sum(-1), expect, atol=1e-12, rtol=0)
    assert features(q).shape[-1] == features.out_dim == 1 + 5 + 15 + 35


@pytest.mark.parametrize("dim,degree", [(5, 3), (6, 4), (64, 2), (1, 3), (3, 1)])
def test_polynomial_features_fast_equals_naive(dim, degree):
    """The monomials built degree by degree from slices are the reference's gathered products, in
    the same order (a saved memory's first-layer rows are per monomial), and so are the gradients
    in x and in the coefficients (float64: a monomial is a product of at most 4 factors)."""
    features = PolynomialFeatures(dim, degree).double()
    with torch.no_grad():
        features.coefficients.normal_()
    x = torch.randn(3, 7, dim, dtype=torch.float64, requires_grad=True)
    fast, naive = features._features(x), features.naive(x)
    assert fast.shape[-1] == features.out_dim
    torch.testing.assert_close(fast, naive, atol=1e-12, rtol=0)
    w = torch.randn_like(fast)
    for g, r in zip(torch.autograd.grad((fast * w).sum(), (x, features.coefficients)),
                    torch.autograd.grad((naive * w).sum(), (x, features.coefficients))):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=0)


def saved_for_backward(fn, *args) -> list[torch.Tensor]:
    """The tensors autograd keeps for the backward pass of fn(*args), as its pack hook sees them."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn(*args)
    return saved


def test_polynomial_features_keep_only_their_input_for_backward():
    """phi(x) is out_dim / dim wider than x (2145 / 64 for ATLAS 340m): its backward recomputes the
    monomials from x instead of keeping them (degree 2 kept 3 x out_dim floats per token, 0.5 GB per
    layer at 512 tokens), and the gradients are those of the monomials kept."""
    features = PolynomialFeatures(6, 3).double()
    features._tto_init(init)
    x = torch.randn(2, 7, 3, 6, dtype=torch.float64, requires_grad=True)
    kept = sum(t.numel() for t in saved_for_backward(features, x))
    assert kept <= x.numel(), f"{kept} elements kept for the backward of phi, {x.numel()} in its input"
    w = torch.randn(2, 7, 3, features.out_dim, dtype=torch.float64)
    grads = torch.autograd.grad((features(x) * w).sum(), (x, features.coefficients))
    direct = torch.autograd.grad((features._features(x) * w).sum(), (x, features.coefficients))
    for g, d in zip(grads, direct):
        torch.testing.assert_close(g, d, atol=1e-12, rtol=0)


def test_atlas_keeps_no_tensor_wider_than_its_features_for_backward():
    """Training ATLAS keeps, per layer, nothing larger than phi(k) of the sequence with each chunk's
    keys preceded by the window's lookback (omega_window - 1 tokens of the chunk before): (chunk +
    lookback) / chunk x tokens x heads x out_dim; no per-token x window or per-token x weight tensor,
    no monomial factors per degree."""
    config = tto.build_config("atlas", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_memory_heads=2, chunk_size=4, omega_window=3,
                              scan_checkpoint_group_size=2)
    torch.manual_seed(0)
    model = tto.get("atlas").model_class(config).train()
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    features = model.model.layers[0].mixer.memory.feature_map
    largest = max(t.numel() for t in saved_for_backward(lambda: model(input_ids=ids, labels=ids)))
    lookback_keys = (config.chunk_size + config.omega_window - 1) / config.chunk_size
    assert largest <= lookback_keys * ids.numel() * config.num_memory_heads * features.out_dim, largest


def test_muon_retention_steps_along_the_orthogonalised_momentum():
    """The commit is keep W_c + step NS5(S_b): the step has the momentum's singular vectors and
    singular values step x [0.6, NS5_MAX_GAIN]; a chunk without a step (step 0) commits keep W_c."""
    g = torch.Generator().manual_seed(8)
    start = torch.randn(2, 6, 10, generator=g, dtype=torch.float64)
    momentum = 0.01 * torch.randn(2, 6, 10, generator=g, dtype=torch.float64)
    keep, size = torch.tensor([0.9, 1.0], dtype=torch.float64), torch.tensor([0.03, 0.2], dtype=torch.float64)
    out = MuonRetention().chunk_end({"W": start}, {"W": start}, keep, {"W": momentum}, size)["W"]
    applied = (out - keep[:, None, None] * start) / size[:, None, None]
    u, sv, vh = torch.linalg.svd(momentum, full_matrices=False)
    core = u.transpose(-1, -2) @ applied @ vh.transpose(-1, -2)
    torch.testing.assert_close(core, torch.diag_embed(torch.diagonal(core, dim1=-2, dim2=-1)), atol=1e-10, rtol=0)
    assert torch.linalg.svdvals(applied).min() > 0.6 and torch.linalg.svdvals(applied).max() <= NS5_MAX_GAIN
    same = MuonRetention().chunk_end({"W": start}, {"W": start}, keep, {"W": momentum}, torch.zeros(2).double())["W"]
    torch.testing.assert_close(same, keep[:, None, None] * start, atol=0, rtol=0)


def test_ns5_max_gain_is_the_largest_singular_value_ns5_outputs():
    """NS5_MAX_GAIN is the maximum over [0, 1] of the five iterations' polynomials composed (what
    NS5 does to each singular value of X_0 = G / ||G||_F), and matrices whose singular values sit
    at the maximiser come out at that gain."""
    x = torch.linspace(0, 1, 1_000_001, dtype=torch.float64)
    y = x
    for a, b, c in NS5_COEFFICIENTS:
        y = a * y + b * y**3 + c * y**5
    assert NS5_MAX_GAIN - 1e-4 < y.max() <= NS5_MAX_GAIN
    u, _, vh = torch.linalg.svd(torch.randn(8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    s = torch.full((8,), float(x[y.argmax()]), dtype=torch.float64)
    s[0] = (1 - 7 * s[1] ** 2).sqrt()  # ||X_0||_F = 1: X_0 is its own normalisation
    out = newton_schulz5(u @ torch.diag(s) @ vh)
    torch.testing.assert_close(torch.linalg.svdvals(out).max(), y.max(), atol=1e-9, rtol=0)


def atlas_memory(chunk: int, window: int, lr_after_momentum: bool = True) -> Memory:
    """ATLAS' engine parts (float64): a 2-layer MLP memory without biases or wrapper, squared error,
    the Omega window over the momentum optimizer, Muon at the chunk ends."""
    torch.manual_seed(0)
    fast = MLPMemory(2, 6, depth=2, expansion=2, residual_norm=False, bias=False)
    fast._tto_init(init)
    with torch.no_grad():
        for p in fast.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    optimizer = OmegaWindow(MomentumGD(lr_after_momentum=lr_after_momentum), window)
    return Memory(fast, SquaredError(2.0), optimizer, chunk, retention=MuonRetention()).double()


@pytest.mark.parametrize("lr_after_momentum", [True, False], ids=["atlas", "lr-inside-momentum"])
def test_atlas_eta_scales_the_committed_step(lr_after_momentum):
    """eta_t acts after the orthogonalisation (M_t = alpha_t M_{t-1} - eta_t NS5(S_t)): eta / 100 makes
    every committed step (W_b - keep W_c) exactly 100 x smaller. With eta inside the momentum
    (S_t = theta_t S_{t-1} - eta_t g_t, the former order) NS5 normalises it away: the step does not change.
    One chunk from the initial weights: the gradients, and with them the momentum's direction, do not
    depend on eta."""
    mem = atlas_memory(chunk=4, window=2, lr_after_momentum=lr_after_momentum)
    q, k, v, gates = make_inputs(batch=2, length=4, heads=2, dim=6, optimizer="momentum", max_lr=0.05, dtype=torch.float64)
    keep = (1 - gates["forget"]).prod(1).flatten()[:, None, None]  # (B * H, 1, 1)
    start = mem.fast.initial_params(2)
    steps = []
    for scale in (1.0, 0.01):
        state: dict = {}
        mem(q, k, v, {**gates, "lr": scale * gates["lr"]}, state=state)
        steps.append({n: state["memory.W." + n].flatten(0, 1) - keep * w for n, w in start.items()})
    for name in start:
        ratio = steps[1][name].norm() / steps[0][name].norm()
        if lr_after_momentum:
            torch.testing.assert_close(steps[1][name], 0.01 * steps[0][name], atol=1e-12, rtol=0)
        else:
            assert abs(ratio - 1) < 1e-4, ratio  # 1 but for NS5's eps in X_0 = G / (||G|| + eps)


def paper_atlas(fast, q, k, v, gates, window: int):
    """ATLAS' per-token rule as the paper writes it, per row and head: ``g_t = grad sum_{i=t-c+1..t}
    gamma_i ||M_{t-1}(k_i) - v_i||^2`` (autograd), ``S_t = theta_t S_{t-1} + g_t``, ``M_t = alpha_t M_{t-1}
    - eta_t NS5(S_t)`` (alpha_t = 1 - forget_t, NS5 written out). Returns the reads M_{t-1}(q_t)
    (B, T, H, d) and per row the final weights."""
    def ns5(g):
        x = g.T if g.shape[0] > g.shape[1] else g
        x = x / (x.norm() + 1e-7)
        for a, b, c in NS5_COEFFICIENTS:
            x = a * x + b * (x @ x.T) @ x + c * (x @ x.T) @ (x @ x.T) @ x
        return x.T if g.shape[0] > g.shape[1] else x

    reads, finals = torch.zeros_like(v), []
    for row in range(q.shape[0]):
        m = {n: w.detach() for n, w in fast.initial_params(1).items()}
        s = {n: torch.zeros_like(w) for n, w in m.items()}
        for t in range(q.shape[1]):
            reads[row, t] = fast.apply(q[row, t][:, None], fast.plain_linear(m))[:, 0]
            leaves = {n: w.clone().requires_grad_(True) for n, w in m.items()}
            loss = sum((gates["omega"][row, i] * (fast.apply(k[row, i][:, None], fast.plain_linear(leaves))[:, 0]
                                                   - v[row, i]).pow(2).sum(-1)).sum()
                       for i in range(max(0, t - window + 1), t + 1))
            g = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
            theta, eta, alpha = (x[row, t][:, None, None] for x in (gates["momentum"], gates["lr"], 1 - gates["forget"]))
            s = {n: theta * s[n] + g[n] for n in m}
            m = {n: alpha * m[n] - eta * torch.stack([ns5(h) for h in s[n]]) for n in m}
        finals.append(m)
    return reads, finals


@pytest.mark.parametrize("window", [1, 3])
def test_atlas_at_chunk_one_is_the_papers_per_token_rule(window):
    """At chunk_size 1 chunk-level Muon is per-token Muon and the Omega window reaches back over the
    previous chunks: the weights each token reads before its step (read_start) and the final weights
    equal a transcription of the paper's per-token equations, float64 to 1e-10; token t's step uses
    tokens t-1, t-2 (the same transcription with the window cut to the token alone differs)."""
    mem = atlas_memory(chunk=1, window=window)
    q, k, v, gates = make_inputs(batch=2, length=7, heads=2, dim=6, optimizer="momentum", max_lr=0.1, dtype=torch.float64)
    state: dict = {}
    _, start = mem(q, k, v, gates, state=state, read_start=True)
    reads, finals = paper_atlas(mem.fast, q, k, v, gates, window)
    torch.testing.assert_close(start, reads, atol=1e-10, rtol=0)
    for row, final in enumerate(finals):
        for name, w in final.items():
            torch.testing.assert_close(state["memory.W." + name][row], w, atol=1e-10, rtol=0)
    if window > 1:
        online, _ = paper_atlas(mem.fast, q, k, v, gates, 1)
        assert (online - reads).abs().max() > 1e-3


def test_muon_pad_chunks_commit_nothing_in_either_direction():
    """A left-padded row's pad chunks commit the identity step (Muon's commit: keep 1 and step 0 at
    their rows): its reads, committed weights, and the gradients of its real tokens' inputs equal
    those of the row alone, float64. The memory is phi-wide as ATLAS' (24 x 6: NS5 in Gram form),
    and the pads fill two whole chunks and part of a third."""
    torch.manual_seed(0)
    fast = MLPMemory(2, 6, depth=1, bias=False, residual_norm=False, in_dim=24)
    fast._tto_init(init)
    assert 24 >= GRAM_ASPECT * 6
    mem = Memory(fast, SquaredError(2.0), OmegaWindow(MomentumGD(lr_after_momentum=True), 2), 2,
                 retention=MuonRetention()).double()
    g = torch.Generator().manual_seed(3)
    length, pads = 12, 5
    q, k = (torch.randn(2, length, 2, 24, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, length, 2, 6, generator=g, dtype=torch.float64)
    gates = {name: torch.rand(2, length, 2, generator=g, dtype=torch.float64) * scale
             for name, scale in (("lr", 0.05), ("forget", 0.2), ("momentum", 0.9), ("omega", 1.0))}
    mask = torch.ones(2, length, dtype=torch.bool)
    mask[1, :pads] = False
    probe = torch.randn(length - pads, 2, 6, generator=g, dtype=torch.float64)

    def run(row_inputs, row_mask, real):
        leaves = [t.clone().requires_grad_(True) for t in row_inputs]
        q_, k_, v_, *gate_values = leaves
        state: dict = {}
        out = mem(q_, k_, v_, dict(zip(gates, gate_values)), row_mask, state)
        grads = torch.autograd.grad((out[-1, real] * probe).sum(), leaves)
        return out[-1, real], {n: w[-1] for n, w in state.items() if n.startswith("memory.W.")}, [t[-1, real] for t in grads]

    inputs = [q, k, v, *gates.values()]
    padded = run(inputs, mask, slice(pads, None))
    alone = run([t[1:, pads:] for t in inputs], None, slice(None))
    torch.testing.assert_close(padded[0], alone[0], atol=1e-12, rtol=0)
    for name, w in alone[1].items():
        torch.testing.assert_close(padded[1][name], w, atol=1e-12, rtol=0)
    for got, want in zip(padded[2], alone[2]):
        torch.testing.assert_close(got, want, atol=1e-11, rtol=0)


def test_decoding_reads_only_new_tokens_without_padding_or_commit_work():
    """Token by token, a call that completes no chunk runs no step bound, reads the new query only
    and takes only the new key's gradient (the pending keys' ones stay in the state from the calls
    that brought them; a state whose pending tokens came otherwise, with a commit, has none, and the
    next call takes them all, at the chunk's real length, no pad slots); the outputs stay the naive
    ones. LaCT reads the new query alone."""
    mem = make_memory(2, "momentum")
    q, k, v, gates = make_inputs(optimizer="momentum", length=11)
    ref = naive_memory(mem, q, k, v, gates)[0]
    keys, bounds, reads = [], [], []
    forward_backward, step_bound, read = mem.fast.forward_backward, mem._step_bound, mem._read
    mem.fast.forward_backward = lambda params, x, dloss: keys.append(x.shape[1]) or forward_backward(params, x, dloss)
    mem._step_bound = lambda *a: bounds.append(1) or step_bound(*a)
    mem._read = lambda params, momentum, grads, xq, *a: reads.append(xq.shape[1]) or read(params, momentum, grads, xq, *a)
    state: dict = {}
    outs = [mem(*(x[:, t:t + 1] for x in (q, k, v)), {n: g[:, t:t + 1] for n, g in gates.items()}, state=state)
            for t in range(11)]
    torch.testing.assert_close(torch.cat(outs, 1), ref, atol=ATOL, rtol=0)
    assert keys == [1 if t % 4 < 3 else 4 for t in range(11)]  # chunk 4: the whole chunk when it completes
    assert len(bounds) == 11 // 4  # only the commits
    assert reads == [1 if t % 4 < 3 else 4 for t in range(11)]
    keys.clear()
    state = {}
    outs = [mem(*(x[:, a:b] for x in (q, k, v)), {n: g[:, a:b] for n, g in gates.items()}, state=state)
            for a, b in [(0, 5), *[(t, t + 1) for t in range(5, 11)]]]
    torch.testing.assert_close(torch.cat(outs, 1), ref, atol=ATOL, rtol=0)
    assert keys == [4, 4, 2, 1, 4, 1, 1, 1]  # the first call's chunks (committed, read), then token by token

    lact = make_large_chunk()
    q, k, v, gates = large_chunk_inputs(length=11)
    ref = naive_large_chunk(lact, q, k, v, gates)
    applied, apply = [], lact.fast.apply
    lact.fast.apply = lambda x, linear: applied.append(x.shape[1]) or apply(x, linear)
    state = {}
    outs = [lact(*(x[:, t:t + 1] for x in (q, k, v)), {n: g[:, t:t + 1] for n, g in gates.items()}, state=state)
            for t in range(11)]
    torch.testing.assert_close(torch.cat(outs, 1), ref, atol=1e-10, rtol=0)
    assert applied == [1 if t % 4 < 3 else 4 for t in range(11)]  # a completed chunk reads its 4 queries
