"""bench/bench.py's image cases: derived from the registry, measured against the vit baseline, and
run without the language-model cases when only image types are named."""

import importlib.util
import sys
from pathlib import Path

import pytest

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
