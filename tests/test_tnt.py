"""TNT's own invariants (arXiv:2511.07343; the conformance suite covers what every type must do):
without local memories and with C_G = C it is Titans; the local memories restart from their initial
weights at every shard boundary and never see an earlier shard; the Q-K projection is the running
sum of the shard's k k^T / ||k||^2."""

import json

import pytest
import torch

import tto
from tto.cache import Context
from tto.mixers.tnt import HierarchicalMemory, project_queries

SIZES = dict(vocab_size=64, num_hidden_layers=2)


def build(seed=0, **fields):
    torch.manual_seed(seed)
    return tto.get("tnt").model_class(tto.build_config("tnt", preset="tiny", **SIZES, **fields)).eval()


def tokens(length, batch=2, seed=1):
    return torch.randint(0, SIZES["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", ["lmm", "mag", "mal"])
def test_without_local_memories_tnt_is_titans(variant):
    """N = 0, C_G = C and the global memory read after its update (Titans' order): Titans' model with
    the same weights gives the same logits, bit for bit (the same parameter names, the same ops)."""
    tnt = build(variant=variant, local_chunk_sizes=[], global_read_start=False, chunk_size=4).double()
    titans_fields = tto.get("titans").config_class.field_names() - {"layer_mixers", "mixer_fields"}
    fields = {k: v for k, v in tnt.config.to_dict().items() if k in titans_fields}
    titans = tto.get("titans").model_class(tto.build_config("titans", **fields)).eval().double()
    titans.load_state_dict(tnt.state_dict())
    x = tokens(13)
    with torch.no_grad():
        assert torch.equal(tnt(x).logits, titans(x).logits)


def test_global_memory_reads_its_chunk_start_weights():
    """Eq. 7: f(V_{xi(t, C_G)}, q_t): with no local memory the layer's reads are Titans' chunk-start
    reads (MAC's h_t), and they differ from the reads after the update. The layer computes only these
    reads and the commits (``read_start="only"``), whose chunk-end coefficients are summed in another
    order than the full scan's: equal at float64 rounding (1e-12)."""
    model = build(local_chunk_sizes=[], chunk_size=4).double()
    layer = model.model.layers[0].mixer.wiring.memory
    x = torch.randn(2, 13, model.config.hidden_size, dtype=torch.float64)
    ctx = Context(mask=None, positions=torch.arange(13).expand(2, 13))
    with torch.no_grad():
        q, k, v = layer.qkv(x, ctx, None)
        after, start = layer.memory(q, k, v, layer.gates(x), None, None, read_start=True)
        reads = layer.reads(x, ctx, None)
    torch.testing.assert_close(reads, start, atol=1e-12, rtol=0)
    assert (reads - after).abs().max() > 1e-3


def project_naive(q, k):
    """M_t q_t with M_t = sum_{s <= t} k_s k_s^T / ||k_s||^2 built token by token (float64)."""
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        for h in range(q.shape[2]):
            m = torch.zeros(q.shape[-1], q.shape[-1], dtype=q.dtype)
            for t in range(q.shape[1]):
                m = m + torch.outer(k[b, t, h], k[b, t, h]) / k[b, t, h].dot(k[b, t, h])
                out[b, t, h] = m @ q[b, t, h]
    return out


def test_qk_projection_is_the_running_projector_sum_in_pieces():
    """One shard in one piece or in three (the carry between them), against the per-token matrices."""
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 9, 3, 5, dtype=torch.float64, generator=g) for _ in range(2))
    expected = project_naive(q, k)
    whole, _ = project_queries(q, k, None, None)
    torch.testing.assert_close(whole, expected, rtol=0, atol=1e-12)
    carry, pieces = None, []
    for lo, hi in [(0, 2), (2, 7), (7, 9)]:
        out, carry = project_queries(q[:, lo:hi], k[:, lo:hi], None, carry)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, 1), expected, rtol=0, atol=1e-12)


def test_local_memories_restart_at_every_shard_and_hold_their_initial_weights():
    """Decoding token by token: right after a token that starts a shard (S_L = 6, local chunks 2 and
    3: nothing committed yet in the new shard) every local memory's weights are its initial ones,
    its momentum zero; one token earlier they were not."""
    model = build()
    x = tokens(8)
    layers = [layer.mixer.wiring.memory for layer in model.model.layers]
    with torch.no_grad():
        out = model(x[:, :5], use_cache=True)
        cache = out.past_key_values
        out = model(x[:, 5:6], use_cache=True, past_key_values=cache)  # position 5: the shard's last token
        before = {(i, j): cache.states[i][f"local{j}.W.W1"].clone() for i in range(2) for j in range(2)}
        model(x[:, 6:7], use_cache=True, past_key_values=cache)  # position 6 = S_L: a new shard
    for i, layer in enumerate(layers):
        for j, local in enumerate(layer.local_memories):
            start = local.memory.fast.initial_params(2)
            for name, w in start.items():
                stored = cache.states[i][f"local{j}.W.{name}"].flatten(0, 1)
                assert torch.equal(stored, w), (i, j, name)
                assert torch.equal(cache.states[i][f"local{j}.S.{name}"], torch.zeros_like(cache.states[i][f"local{j}.S.{name}"]))
            assert not torch.equal(before[i, j].flatten(0, 1), start["W1"])
    # the projection restarted too: it holds the new shard's first key alone, k k^T / |k|^2 (trace 1)
    trace = cache.states[0]["qk_projection"].diagonal(dim1=-2, dim2=-1).sum(-1)
    torch.testing.assert_close(trace, torch.ones_like(trace), rtol=0, atol=1e-6)


@pytest.mark.parametrize("stateful", [False, True], ids=["shards-as-rows", "streamed"])
def test_local_path_does_not_depend_on_earlier_shards(stateful):
    """Tokens of shard 2 read the same local memories whatever shard 1 held, whether the shards run as
    rows of one batch (training) or the sequence streams through a state in pieces."""
    model = build()
    layer: HierarchicalMemory = model.model.layers[0].mixer.wiring.memory
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 14, model.config.hidden_size, generator=g)
    positions = torch.arange(14).expand(2, -1)
    with torch.no_grad():
        inputs = (*layer.qkv(x, Context(mask=None, positions=positions), None), x)
    changed = [t.clone() for t in inputs]
    for t in changed:  # shard 1 only (S_L = 6): its keys, values, queries and gate inputs
        t[:, :6] = torch.randn(t[:, :6].shape, generator=g)

    def local_reads(q, k, v, h):
        with torch.no_grad():
            if not stateful:
                return layer._by_shards(q, k, v, h, None)
            state, outs = {}, []
            for lo, hi in [(0, 4), (4, 9), (9, 14)]:
                ctx = Context(mask=None, positions=positions[:, lo:hi])
                outs.append(layer._by_segments(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], h[:, lo:hi], ctx, state))
            return torch.cat(outs, 1)

    a, b = local_reads(*inputs), local_reads(*changed)
    assert torch.equal(a[:, 6:], b[:, 6:])
    assert (a[:, :6] - b[:, :6]).abs().max() > 1e-3


def test_streamed_local_reads_equal_the_shards_as_rows():
    """The two paths of the local memories agree: restarts in the state at shard starts (pieces that
    cut shards anywhere, a left-padded row) and shards as rows of one batch."""
    model = build().double()
    layer: HierarchicalMemory = model.model.layers[0].mixer.wiring.memory
    x = torch.randn(2, 14, model.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    positions = torch.arange(14).expand(2, -1)
    with torch.no_grad():
        q, k, v = layer.qkv(x, Context(mask=None, positions=positions), None)
        rows = layer._by_shards(q, k, v, x, None)
        state, outs = {}, []
        for lo, hi in [(0, 5), (5, 6), (6, 13), (13, 14)]:
            ctx = Context(mask=None, positions=positions[:, lo:hi])
            outs.append(layer._by_segments(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], x[:, lo:hi], ctx, state))
    torch.testing.assert_close(torch.cat(outs, 1), rows, rtol=0, atol=1e-12)


def test_config_refuses_a_shard_that_is_not_whole_local_chunks():
    with pytest.raises(ValueError, match="local_chunk_sizes.*divide local_shard_size=6"):
        tto.build_config("tnt", preset="tiny", local_chunk_sizes=[4])
    with pytest.raises(ValueError, match="variant.*valid choices"):
        tto.build_config("tnt", preset="tiny", variant="mac")


def test_two_stage_training_fine_tunes_only_the_local_memories_at_a_smaller_chunk(tmp_path):
    """Stage 1 (configs/tiny/tnt.yml), then the stage-2 recipe (configs/tnt/stage2_150m.yml) on its
    output, offline and small: the loaded config takes the new local chunks, and only the local
    memories' parameters move."""
    from pathlib import Path

    from safetensors.torch import load_file

    from tto.training import load_recipe, train

    configs = Path(__file__).resolve().parents[1] / "configs"
    offline = ["dataset.name=builtin:pydoc", "dataset.max_seq_length=24", "tokenizer=builtin:bytes",
               "training_args.report_to=none", "training_args.device=cpu", "training_args.max_steps=3",
               "training_args.per_device_train_batch_size=2", "training_args.save_strategy=no",
               "training_args.logging_steps=1"]
    first, second = tmp_path / "stage1", tmp_path / "stage2"
    train(load_recipe(configs / "tiny" / "tnt.yml", [f"training_args.output_dir={first}", *offline]))
    train(load_recipe(configs / "tnt" / "stage2_150m.yml", [
        f"model.from_pretrained={first}", "model.config.local_chunk_sizes=[1, 3]",
        f"training_args.output_dir={second}", "training_args.max_steps=3", *offline]))
    assert json.loads((second / "config.json").read_text())["local_chunk_sizes"] == [1, 3]
    before, after = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert before.keys() == after.keys()
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert moved and all(".local_memories." in name for name in moved), sorted(moved)


def test_stage_two_config_changes_are_checked_before_loading(tmp_path):
    from tto.training import load_recipe

    model = build()
    model.save_pretrained(tmp_path)
    recipe = "configs/tnt/stage2_150m.yml"
    with pytest.raises(ValueError, match="local_chunk_size.*divide local_shard_size=6"):
        load_recipe(recipe, [f"model.from_pretrained={tmp_path}", "model.config.local_chunk_sizes=[4]"])
    with pytest.raises(ValueError, match="local_chunk_sise.*local_chunk_sizes"):
        load_recipe(recipe, [f"model.from_pretrained={tmp_path}", "model.config.local_chunk_sise=[1]"])
