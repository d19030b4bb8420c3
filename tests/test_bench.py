"""bench/bench.py's image cases: derived from the registry, measured against the vit baseline, and
run without the language-model cases when only image types are named; its --bf16 switch; its
results file written after every measure."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import tto
from tto.registry import TINY_BACKBONE

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    """bench.py as a module (it puts bench/ on sys.path and imports its `models` from there)."""
    spec = importlib.util.spec_from_file_location("tto_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_quick_image_run(bench, monkeypatch, tmp_path):
    # The image cases at the tiny image backbone (8 x 8 one-channel images in 2 x 2 patches, 16 tokens)
    models = sys.modules["models"]
    tiny = dict(TINY_BACKBONE, image_size=8, patch_size=2, num_channels=1, num_labels=10)
    for name, value in tiny.items():
        monkeypatch.setitem(models.IMAGE_SMALL, name, value)
    results = bench.main(["--quick", "--types", "vit3", "memory_vit", "--threads", "1", "--out", str(tmp_path)])

    expected = {"vit", "vit3"} | {f"memory_vit-{v}" for v in tto.available("image-classification")["memory_vit"]}
    assert set(results["image"]) == expected
    assert list(results["image"])[0] == "vit"  # the baseline leads its table
    assert not results["lm"] and not results["layer"]  # no Llama, no layers, no peers
    for name, entry in results["image"].items():
        assert entry["errors"] == {}, name
        assert entry["config"]["image_size"] == 8 and entry["config"]["hidden_size"] == TINY_BACKBONE["hidden_size"]
        for label in ("train@8px", "infer@8px"):
            s = entry["measures"][label]
            assert (s["images"], s["tokens"]) == (2, 2 * 16), (name, label)
            assert s["flops"] > 0 and s["img_s"] > 0, (name, label)
            assert s["ratio"] == pytest.approx(s["tok_s"] / results["image"]["vit"]["measures"][label]["tok_s"])
    assert results["image"]["vit"]["measures"]["train@8px"]["ratio"] == 1.0
    assert list(tmp_path.glob("*.json"))


@pytest.mark.parametrize("bf16", [False, True])
def test_bf16_runs_every_measure_under_autocast(bench, monkeypatch, tmp_path, bf16):
    # --bf16: every timed, counted and peak call of every case runs under CPU bfloat16 autocast; without it, none
    models = sys.modules["models"]
    seen = []
    train, prefill = models.CausalLM.train, models.CausalLM.prefill

    def recording(fn):
        def call(self, *args):
            seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
            return fn(self, *args)
        return call

    monkeypatch.setattr(models.CausalLM, "train", recording(train))
    monkeypatch.setattr(models.CausalLM, "prefill", recording(prefill))
    argv = ["--quick", "--types", "ttt", "--variants", "linear", "--no-layers", "--no-peers", "--kinds", "train",
            "prefill", "--threads", "1", "--out", str(tmp_path)]
    results = bench.main(argv + (["--bf16"] if bf16 else []))
    assert results["settings"]["dtype"] == ("bf16 autocast" if bf16 else "fp32")
    # 2 cases x 2 measures x at least (warm-up, round, peak); the FLOP count adds one more each
    assert len(seen) >= 2 * 2 * 3 and set(seen) == {bf16}
    for name in ("llama", "ttt-linear"):
        assert results["lm"][name]["errors"] == {}, name


def test_a_run_stopped_midway_keeps_the_measures_it_finished(bench, monkeypatch, tmp_path):
    # the results file is rewritten after every measure: a run interrupted in its second measure
    # leaves the first one's samples and summaries, and says how many of its measures it holds
    measure, calls = bench.Run.measure, []

    def stopping(self, m):
        calls.append(m.label)
        if len(calls) == 2:
            raise KeyboardInterrupt
        measure(self, m)

    monkeypatch.setattr(bench.Run, "measure", stopping)
    argv = ["--quick", "--types", "ttt", "--variants", "linear", "--no-layers", "--no-peers", "--no-flops", "--kinds",
            "train", "prefill", "--threads", "1", "--out", str(tmp_path)]
    with pytest.raises(KeyboardInterrupt):
        bench.main(argv)
    [path] = tmp_path.glob("*.json")
    results = json.loads(path.read_text())
    assert results["settings"]["measures_done"] == "1 of 2"
    first, second = calls
    for name in ("llama", "ttt-linear"):
        measures = results["lm"][name]["measures"]
        assert measures[first]["tok_s"] > 0 and len(measures[first]["seconds"]) == 1, name
        assert second not in measures, name
    assert not list(tmp_path.glob("*.partial"))


def test_decode_times_the_number_of_tokens_asked_for(bench, monkeypatch, tmp_path):
    # --decode-tokens sets the greedy tokens of every timed decode sample (TTT-E2E steps once per
    # mini-batch: a sample shorter than one charges its step to those few tokens)
    adapter = sys.modules["models"].CausalLM  # bench.py's own import of bench/models.py
    decode, asked = adapter.decode, []

    def counting(self, state, tokens):
        asked.append(tokens)
        decode(self, state, tokens)

    monkeypatch.setattr(adapter, "decode", counting)
    argv = ["--quick", "--types", "ttt", "--variants", "linear", "--no-layers", "--no-peers", "--kinds", "decode",
            "--decode-tokens", "3", "--threads", "1", "--out", str(tmp_path)]
    results = bench.main(argv)
    assert asked and set(asked) == {3}
    assert results["settings"]["decode_tokens"] == 3
    with pytest.raises(SystemExit):
        bench.parse_args(["--decode-tokens", "0"])
