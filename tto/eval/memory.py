"""``memory``: the pre/post memory test. A passage is read once, distractor text follows, then the same
passage again; how much lower is its loss the second time?

Sequence: ``lead`` tokens of prose, passage P (``passage`` tokens), ``gap`` tokens of other prose, P again.
Reported per (passage, gap): the mean loss on P's tokens at the first read and at the second, their
difference (absolute improvement) and that difference over the first (relative improvement). For a
tto model the past reaches the second read only through its state (fast weights, plus an attention
window where the type has one), so a gap longer than the window measures what the state absorbed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from .base import SourceOptions, Task, check_positive, map_batches, option, start, task, token_nll


@dataclass
class MemoryOptions(SourceOptions):
    passages: list[int] = option([32, 128], "passage lengths in tokens")
    gaps: list[int] = option([0, 256, 1024], "distractor tokens between the two reads")
    lead: int = option(64, "prose tokens before the first read")
    samples: int = option(8, "sequences per (passage, gap) cell (--limit caps it)")

    def check(self) -> None:
        super().check()
        check_positive("memory.passages", self.passages)
        check_positive("memory.samples", self.samples)
        if min(self.gaps) < 0 or self.lead < 0:
            raise ValueError(f"memory.gaps {self.gaps} and memory.lead {self.lead} must be >= 0")


@dataclass
class MemoryExample:
    ids: list[int]
    first: tuple[int, int]  # [start, end) of the first read of the passage
    second: tuple[int, int]  # [start, end) of the second read


def token_stream(lm, texts: list[str]) -> list[int]:
    """The documents' tokens, joined with EOS as train.py packs them."""
    out: list[int] = []
    for text in texts:
        out += lm.encode(text) + [lm.tokenizer.eos_token_id]
    return out


def memory_example(stream: list[int], rng: random.Random, lead: int, passage: int, gap: int) -> MemoryExample:
    """lead + P + distractor + P, with P and the distractor from disjoint random spans of `stream`."""
    first_len = lead + passage
    if len(stream) < first_len + gap:
        raise ValueError(f"memory: the held-out text has {len(stream)} tokens, fewer than lead + passage + gap "
                         f"= {first_len + gap}; use a smaller --grid memory.gaps / memory.passages or more data")
    s = rng.randrange(len(stream) - first_len + 1)
    while True:  # a distractor that does not overlap the passage (nor its lead)
        d = rng.randrange(len(stream) - gap + 1)
        if gap == 0 or d + gap <= s or d >= s + first_len:
            break
    ids = stream[s : s + first_len] + stream[d : d + gap] + stream[s + lead : s + first_len]
    return MemoryExample(ids, (lead, first_len), (first_len + gap, len(ids)))


@task("memory")
class Memory(Task):
    Options = MemoryOptions

    def __init__(self, options, **kw):
        super().__init__(options, **kw)
        self.texts = options.held_out_texts()

    def examples(self, lm) -> dict[tuple[int, int], list[MemoryExample]]:
        o, stream = self.options, token_stream(lm, self.texts)
        return {(p, g): [memory_example(stream, random.Random(f"{self.seed}/{p}/{g}/{i}"), o.lead, p, g)
                         for i in range(self.samples(o.samples))]
                for p in o.passages for g in o.gaps}

    def run(self, lm, bar=None) -> dict:
        cells = self.examples(lm)
        start(bar, sum(map(len, cells.values())))
        out = []
        for (p, g), examples in cells.items():
            ex0 = examples[0]  # every example of a cell has the same layout

            def reduce(logits, ids, rows):
                nll = token_nll(logits, ids)
                return list(zip(nll[:, slice(*ex0.first)].mean(1).tolist(), nll[:, slice(*ex0.second)].mean(1).tolist()))  # noqa: B023 - called within this iteration

            pairs = map_batches(lm, [e.ids for e in examples], reduce, self.batch_size, bar)
            first = sum(a for a, _ in pairs) / len(pairs)
            second = sum(b for _, b in pairs) / len(pairs)
            out.append({"passage": p, "gap": g, "first": first, "second": second, "improvement": first - second,
                        "relative": (first - second) / first if first else None, "samples": len(pairs)})
        return {"cells": out, "relative": sum(c["relative"] for c in out) / len(out)}

    def summary(self, result: dict) -> dict:
        return {"mem.rel": result["relative"]}

    def plot(self, results: dict[str, dict], out_dir: Path) -> list[Path]:
        from .report import pyplot, save_figure

        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for name, r in results.items():
            for p in sorted({c["passage"] for c in r["cells"]}):
                cells = [c for c in r["cells"] if c["passage"] == p]
                ax.plot([c["gap"] for c in cells], [c["relative"] for c in cells], marker="o", label=f"{name}, P={p}")
        ax.set_xlabel("distractor tokens between the reads")
        ax.set_ylabel("relative loss improvement, 2nd read")
        ax.set_title("memory: (first - second) / first")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        return [save_figure(fig, out_dir / "memory.png")]
