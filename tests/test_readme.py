"""The README stays true: every registered type is in its table, and its Python snippet runs."""

from __future__ import annotations

import re
from pathlib import Path

import tto

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_registered_type_is_in_the_table():
    rows = set(re.findall(r"^\| `([a-z_]+)` \|", README, flags=re.M))
    assert rows == set(tto.available()), f"README table lists {sorted(rows)}, registry has {sorted(tto.available())}"


def test_every_variant_is_named_in_the_table():
    for name, variants in tto.available().items():
        row = next(line for line in README.splitlines() if line.startswith(f"| `{name}` |"))
        for variant in variants:
            assert f"`{variant}`" in row, f"variant {variant!r} of {name!r} missing from the README table"


def test_python_snippet_runs(tmp_path, monkeypatch):
    snippet = re.search(r"```python\n(.*?)```", README, flags=re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "README.md", "exec"), {})
    assert (tmp_path / "ttt-mlp-tiny" / "model.safetensors").exists()
