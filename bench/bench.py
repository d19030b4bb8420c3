"""Speed and memory of every registered type against a same-size HF Llama, in one process.

    python bench/bench.py                      # full run: seq 512 and 2048, decode at 1K/4K/16K
    python bench/bench.py --quick              # smoke run, < 1 minute
    python bench/bench.py --types ttt --seq 2048 --decode-contexts 1024 16384

Every case is measured round-robin (order reversed each round) so machine noise hits all of
them alike, and reported as a ratio to the Llama measured in the same run. Figures:

* train tok/s: forward + backward of the LM loss (no optimizer step), as in PEERS-CPU.md;
* prefill tok/s: one forward without cache;
* decode tok/s: after an untimed prefill, 32 greedy tokens one at a time with the model's own
  cache (both sequences of the batch counted);
* peak MB: the rise of the process's resident memory during one training iteration, sampled
  every millisecond after ``malloc_trim``.

Results are printed as a markdown table and written as JSON to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import tto

SMALL = dict(vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4)
DECODE_TOKENS = 32
PREFILL_PIECE = 2048  # long contexts are prefilled in pieces of this many tokens (untimed)


@dataclass
class Case:
    name: str
    build: callable
    times: dict = field(default_factory=dict)  # measure -> [seconds]
    peak_mb: float | None = None
    error: str | None = None


def cases(types: list[str] | None) -> list[Case]:
    out = [Case("llama", lambda: LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=True,
                                                            attn_implementation="sdpa")))]
    for name in tto.available():
        if name == "transformer" or (types and name not in types):
            continue
        entry = tto.get(name)
        for variant, fields in entry.variant_configs():
            label = f"{name}-{variant}" if variant else name
            out.append(Case(label, lambda e=entry, f=fields: e.model_class(tto.build_config(e.name, **SMALL, **f))))
    if not types or "transformer" in types:
        out.append(Case("transformer", lambda: tto.get("transformer").model_class(tto.build_config("transformer", **SMALL))))
    return out


def trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


class PeakRSS:
    """Highest resident memory while the block runs, sampled every millisecond."""

    def __enter__(self):
        trim()
        self.base = self.peak = rss_mb()
        self._run = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while self._run:
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._run = False
        self._thread.join()
        self.rise = self.peak - self.base


def train_step(model, x) -> None:
    model.train()
    model(x, labels=x).loss.backward()
    model.zero_grad(set_to_none=True)


@torch.no_grad()
def prefill(model, x) -> None:
    model.eval()
    model(x, use_cache=False)


@torch.no_grad()
def prefill_cache(model, x):
    """Prefill `x` in pieces (bounded memory) and return (cache, next token)."""
    model.eval()
    cache, out = None, None
    for start in range(0, x.shape[1], PREFILL_PIECE):
        out = model(x[:, start : start + PREFILL_PIECE], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
    return cache, out.logits[:, -1:].argmax(-1)


@torch.no_grad()
def decode(model, cache, token) -> None:
    for _ in range(DECODE_TOKENS):
        out = model(token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    all_cases = cases(args.types)
    models = {}
    for case in all_cases:
        try:
            models[case.name] = case.build()
        except Exception as err:  # a broken entry is reported, not fatal
            case.error = f"build: {type(err).__name__}: {err}"
    live = [c for c in all_cases if c.error is None]
    batch = args.batch
    measures = []
    for seq in args.seq:
        x = torch.randint(0, SMALL["vocab_size"], (batch, seq))
        measures.append((f"train@{seq}", batch * seq, lambda m, x=x: timed(train_step, m, x)))
        measures.append((f"prefill@{seq}", batch * seq, lambda m, x=x: timed(prefill, m, x)))
    for ctx in sorted(set(args.seq) | set(args.decode_contexts)):
        x = torch.randint(0, SMALL["vocab_size"], (batch, ctx))

        def dec(m, x=x):
            cache, token = prefill_cache(m, x)
            trim()  # release what the long prefill left behind, so only decoding is measured
            return timed(decode, m, cache, token)

        measures.append((f"decode@{ctx}", batch * DECODE_TOKENS, dec))

    for label, _, fn in measures:
        for case in live:  # warm-up
            try:
                fn(models[case.name])
            except Exception as err:
                case.error = f"{label}: {type(err).__name__}: {err}"
        order = [c for c in live if c.error is None]
        for r in range(args.iters):
            for case in order if r % 2 == 0 else order[::-1]:
                case.times.setdefault(label, []).append(fn(models[case.name]))
        print(f"  measured {label}", flush=True)

    train_seq = max(args.seq)
    x = torch.randint(0, SMALL["vocab_size"], (batch, train_seq))
    for case in live:
        if case.error is None:
            with PeakRSS() as peak:
                train_step(models[case.name], x)
            case.peak_mb = peak.rise

    results = {"settings": {**SMALL, "batch": batch, "threads": args.threads, "iters": args.iters,
                            "torch": torch.__version__, "peak_at_seq": train_seq}, "cases": {}}
    for label, tokens, _ in measures:
        base = statistics.median(all_cases[0].times[label]) if label in all_cases[0].times else None
        for case in all_cases:
            entry = results["cases"].setdefault(case.name, {"error": case.error, "peak_train_mb": case.peak_mb,
                                                            "params": None})
            if label in case.times:
                t = case.times[label]
                entry[label] = {"tok_s": tokens / statistics.median(t), "worst": tokens / max(t),
                                "best": tokens / min(t), "ratio_to_llama": base / statistics.median(t) if base else None}
    for case in all_cases:
        if case.name in models:
            results["cases"][case.name]["params"] = sum(p.numel() for p in models[case.name].parameters())
    return results


def table(results: dict) -> str:
    labels = sorted({k for c in results["cases"].values() for k in c if "@" in k},
                    key=lambda s: (s.split("@")[0], int(s.split("@")[1])))
    lines = ["| model | params | " + " | ".join(labels) + f" | peak train MB (seq {results['settings']['peak_at_seq']}) |",
             "|---|---:|" + "---:|" * len(labels) + "---:|"]
    for name, c in results["cases"].items():
        if c["error"]:
            lines.append(f"| {name} | error: {c['error']} |")
            continue
        cells = [f"{c[k]['tok_s']:,.0f} ({c[k]['ratio_to_llama']:.2f}x)" if k in c else "" for k in labels]
        lines.append(f"| {name} | {c['params'] / 1e6:.2f}M | " + " | ".join(cells) + f" | {c['peak_train_mb']:,.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[512, 2048], help="training/prefill lengths")
    parser.add_argument("--decode-contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--types", nargs="+", help="registered types to include (default: all)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5, help="timed iterations per case (median reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="seq 128, 1 iteration, decode at 256: a smoke run")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if args.types:
        unknown = [t for t in args.types if t not in tto.available()]
        if unknown:
            parser.error(f"unknown type(s) {unknown}; registered: {sorted(tto.available())}")
    if args.quick:
        args.seq, args.decode_contexts, args.iters = [128], [256], 1
    results = run(args)
    print(table(results))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
