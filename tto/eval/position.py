"""``position``: mean loss as a function of token position over long held-out sequences."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .base import SourceOptions, Task, check_positive, map_batches, option, start, task, token_nll


@dataclass
class PositionOptions(SourceOptions):
    length: int = option(2048, "tokens per sequence (may exceed the training length)")
    sequences: int = option(16, "sequences averaged (--limit caps it)")
    bins: int = option(24, "log-spaced position bins of the curve")

    def check(self) -> None:
        super().check()
        for name in ("length", "sequences", "bins"):
            check_positive(f"position.{name}", getattr(self, name))
        if self.length < 2:
            raise ValueError("position.length must be at least 2")


def log_bins(length: int, bins: int) -> list[tuple[int, int]]:
    """[start, end) position ranges covering 1..length-1, log-spaced (the first few are single positions)."""
    edges = sorted(set(np.unique(np.round(np.geomspace(1, length, bins + 1)).astype(int)).tolist()) | {1, length})
    return list(zip(edges[:-1], edges[1:]))


@task("position")
class Position(Task):
    """Held-out documents packed into ``length``-token sequences; the loss of the token at each position
    (given all before it) averaged over sequences, then over log-spaced position bins."""

    Options = PositionOptions

    def __init__(self, options, **kw):
        super().__init__(options, **kw)
        self.texts = options.held_out_texts()

    def run(self, lm, bar=None) -> dict:
        from datasets import Dataset

        from ..data import pack_documents

        o = self.options
        seqs = pack_documents(Dataset.from_dict({"text": self.texts}), lm.tokenizer, o.length)["input_ids"]
        seqs = seqs[: self.samples(o.sequences)]
        if not seqs:
            raise ValueError(f"position: dataset {o.dataset!r} holds out fewer than {o.length} tokens; "
                             f"lower --grid position.length")
        start(bar, len(seqs))
        rows = map_batches(lm, seqs, lambda logits, ids, r: list(token_nll(logits, ids)), self.batch_size, bar)
        per_position = mean_over_sequences(rows)
        curve = [(a, b, float(np.mean(per_position[a:b]))) for a, b in log_bins(o.length, o.bins)]
        return {"length": o.length, "sequences": len(seqs),
                "position": [(a + b - 1) / 2 for a, b, _ in curve], "loss": [v for *_, v in curve],
                "bin_edges": [[a, b] for a, b, _ in curve]}

    def summary(self, result: dict) -> dict:
        return {"loss@start": result["loss"][0], "loss@end": result["loss"][-1]}

    def plot(self, results: dict[str, dict], out_dir: Path) -> list[Path]:
        from .report import pyplot, save_figure

        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for name, r in results.items():
            ax.plot(r["position"], r["loss"], marker=".", label=name)
        ax.set_xscale("log")
        ax.set_xlabel("token position")
        ax.set_ylabel("mean loss (nats)")
        ax.set_title("loss by position")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        return [save_figure(fig, out_dir / "position.png")]


def mean_over_sequences(rows) -> np.ndarray:
    """Per-position mean over sequences of (T,) loss tensors (position 0 is NaN: nothing predicts it)."""
    arr = np.stack([r.numpy() for r in rows])
    return np.where(np.arange(arr.shape[1]) == 0, math.nan, arr.mean(0))
