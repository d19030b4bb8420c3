"""Speed and memory of every registered tto type against a same-size HF Llama (image types: against
the ViT), in one process.

    python bench/bench.py                      # full run: seq 512 and 2048, decode at 1K/4K/16K
    python bench/bench.py --quick              # smoke run, < 1 minute
    python bench/bench.py --types ttt --variants linear --seq 2048 --decode-contexts 1024 16384
    python bench/bench.py --kinds decode --seq 2048 --ttt-official ../ttt-lm-pytorch/ttt.py
    python bench/bench.py --types vit vit3 memory_vit   # only the image classifiers

Method (as in shared/design/PEERS-CPU.md): float32 (--bf16: under bfloat16 autocast), 2 threads; for each measure every case runs
once untimed (warm-up), once under the FLOP counter, then `--iters` timed rounds round-robin with
the order reversed every other round, a 1024^3 matmul "ceiling" sample in every round; the median
is reported with the worst and best rounds. Ratios are to the baseline measured in the same run.

* train: forward + backward of the loss (no optimizer step), batch x seq tokens;
* prefill: one forward without cache (no grad);
* decode: after an untimed prefill of `context` tokens, 32 greedy tokens one at a time with the
  model's own cache (both rows of the batch counted);
* peak RSS: process high-water mark during one untimed train/prefill iteration, and its rise
  over the resident memory just before (after ``malloc_trim``);
* image types (their own group, ratios to the ``vit`` type): train is forward + backward of the
  classification loss, infer (the prefill kind) one forward, on `--image-batch` images of
  IMAGE_SMALL, reported in images/s and tokens/s (patch tokens).

A case that fails is reported as an error (row or cell) and the run goes on. The markdown
report is printed; everything, including each timed sample, goes to ``bench/results/<time>.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ helpers, wherever this is run from
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # tto from this checkout

import tto
from measure import (CEILING_FLOPS, ForeignCPU, PeakRSS, count_flops, matmul_ceiling, timed, trim,
                     wait_idle)
from models import (COMPILED_SUFFIX, DECODE_TOKENS, IMAGE_BASELINE, IMAGE_SMALL, LAYER_BASELINE, LM_BASELINE, SMALL,
                    Case, baseline_cases, image_cases, official_ttt_cases, peer_cases, selected_tasks,
                    titans_pytorch_version, tto_cases)

BASELINE = {"lm": LM_BASELINE, "layer": LAYER_BASELINE, "image": IMAGE_BASELINE}
GROUPS = tuple(BASELINE)
IMAGE_MEASURE = {"train": "train", "prefill": "infer"}  # measure kind -> its name in the image labels
CEILING = "mm1024"
KINDS = ("train", "prefill", "decode")
FAILED = object()  # what Run.attempt returns when the call raised

# Speed and memory targets, checked when both cases of a target ran:
# (what, (group, case, measure), (group, case, measure), metric, "min"/"max", bound on the ratio).
# The training-speed targets at 2,048 tokens, two threads, of the training-speed issue.
LLAMA_2048 = ("lm", "llama", "train@2048")
TARGETS = [
    *[(f"{case} train >= {bound}x Llama @2048", ("lm", case, "train@2048"), LLAMA_2048, "tok_s", "min", bound)
      for case, bound in [("ttt-linear", 1.3), ("ttt-mlp", 0.6), ("deltanet", 1.0), ("gated_deltanet", 1.0),
                          ("lact", 0.8), ("miras-moneta", 0.3), ("miras-yaad", 0.3), ("miras-memora", 0.3),
                          ("atlas-omeganet", 0.1)]],
    ("titans LMM train >= TTT-MLP @2048", ("lm", "titans-lmm", "train@2048"), ("lm", "ttt-mlp", "train@2048"),
     "tok_s", "min", 1.0),
    ("titans memory layer train >= 3x titans-pytorch NeuralMemory @2048", ("layer", "titans-lmm", "train@2048"),
     ("layer", "titans-pytorch-nm", "train@2048"), "tok_s", "min", 3.0),
    ("titans memory layer train peak rise <= 0.5x NeuralMemory's @2048", ("layer", "titans-lmm", "train@2048"),
     ("layer", "titans-pytorch-nm", "train@2048"), "peak_rise_mb", "max", 0.5),
    ("titans MAC train >= 5x titans-pytorch MAC @2048", ("lm", "titans-mac", "train@2048"),
     ("lm", "titans-pytorch-mac", "train@2048"), "tok_s", "min", 5.0),
    ("titans MAC train peak rise <= 1/3 of titans-pytorch MAC's @2048", ("lm", "titans-mac", "train@2048"),
     ("lm", "titans-pytorch-mac", "train@2048"), "peak_rise_mb", "max", 1 / 3),
]


@dataclass
class Measure:
    label: str  # "train@512", "prefill@2048", "decode@16384", "infer@224px"
    group: str  # "lm", "layer" or "image"
    kind: str  # "train", "prefill" or "decode"
    seq: int  # sequence length, or decode context, or image side in pixels
    batch: int  # sequences (images) per sample
    tokens: int  # tokens processed by one sample
    images: int | None = None  # images processed by one sample (image group)


def plan(args, groups: set[str]) -> list[Measure]:
    """Measures in run order: per seq LM train/prefill then layer train/prefill; image train/infer;
    then decode by context.

    Only the kinds in ``args.kinds`` and the `groups` that have cases are planned."""
    forward = [kind for kind in ("train", "prefill") if kind in args.kinds]
    out = []
    for seq in args.seq:
        for group in ("lm", "layer"):
            if group in groups:
                out += [Measure(f"{kind}@{seq}", group, kind, seq, args.batch, args.batch * seq) for kind in forward]
    if "image" in groups:
        size, tokens = IMAGE_SMALL["image_size"], (IMAGE_SMALL["image_size"] // IMAGE_SMALL["patch_size"]) ** 2
        out += [Measure(f"{IMAGE_MEASURE[kind]}@{size}px", "image", kind, size, args.image_batch,
                        args.image_batch * tokens, args.image_batch) for kind in forward]
    if "decode" in args.kinds and "lm" in groups:
        for ctx in sorted(set(args.seq) | set(args.decode_contexts)):
            out.append(Measure(f"decode@{ctx}", "lm", "decode", ctx, args.batch, args.batch * args.decode_tokens))
    return out


class Run:
    """Builds the cases, measures them, and collects everything into a JSON-ready dict."""

    def __init__(self, args, cases: list[Case]):
        self.args = args
        self.cases, self.adapters = cases, {}
        self.ceiling_s: list[float] = []
        self.noise: dict[str, list[float]] = {}
        self.results = {group: {} for group in GROUPS}
        for case in cases:
            entry = self.entry(case)
            entry.update(config=case.config, params=None, errors={}, measures={})
            try:
                adapter = case.build()
                entry["params"] = sum(p.numel() for p in adapter.module.parameters())
                self.adapters[case.group, case.name] = adapter
            except Exception as err:  # noqa: BLE001 - a broken entry is reported, not fatal
                self.fail(case, "build", err)

    def entry(self, case: Case) -> dict:
        return self.results[case.group].setdefault(case.name, {})

    def fail(self, case: Case, label: str, err: Exception) -> None:
        msg = f"{type(err).__name__}: {err}".strip().splitlines()[0][:300]
        self.entry(case)["errors"][label] = msg
        print(f"  ERROR {case.group}/{case.name} {label}: {msg}", file=sys.stderr, flush=True)
        if self.args.verbose:
            traceback.print_exc()

    def attempt(self, case: Case, label: str, fn, *args):
        """fn(*args); on an exception record it against (case, label) and return FAILED."""
        try:
            return fn(*args)
        except Exception as err:  # noqa: BLE001 - recorded against the case, the run goes on
            self.fail(case, label, err)
            return FAILED

    def measure(self, m: Measure) -> None:
        """Warm-up, FLOP count, round-robin timed rounds and peak memory of one measure."""
        started = time.monotonic()
        steps = {}  # case name -> (setup() -> args, run(*args)); only `run` is timed
        for case in self.cases:
            adapter = self.adapters.get((case.group, case.name))
            if case.group != m.group or adapter is None:
                continue
            if m.kind != "decode":
                steps[case.name] = (lambda: (m.batch, m.seq), self.in_dtype(getattr(adapter, m.kind)))
            elif adapter.can_decode:
                prefilled = self.attempt(case, m.label, self.in_dtype(adapter.start_decode), m.batch, m.seq)
                if prefilled is not FAILED:
                    steps[case.name] = (lambda p=prefilled: (copy.deepcopy(p), self.args.decode_tokens),
                                        self.in_dtype(adapter.decode))
        live = [c for c in self.cases if c.group == m.group and c.name in steps]
        live = [c for c in live if self.attempt(c, m.label, self.call, steps[c.name]) is not FAILED]  # warm-up
        if m.kind != "decode" and self.args.flops:
            # a compiled twin computes what its eager twin does, and under FlopCounterMode
            # torch.compile leaves the step uncompiled for the rest of the run: not counted
            for case in [c for c in live if not c.name.endswith(COMPILED_SUFFIX)]:
                flops = self.attempt(case, f"{m.label} flops", count_flops, self.call, steps[case.name])
                self.sample(case, m)["flops"] = None if flops is FAILED else flops

        for r in range(self.args.iters):
            wait_idle(self.args.idle_wait)
            order = live + [None]  # None: the matmul ceiling sample
            for case in order if r % 2 == 0 else order[::-1]:
                if case is None:
                    trim()
                    self.ceiling_s.append(matmul_ceiling())
                elif m.label not in self.entry(case)["errors"]:
                    setup, run = steps[case.name]
                    inputs = setup()  # no malloc_trim before a timed sample: it runs on a warm heap, as a
                    # training loop's steps do (trimmed, every sample re-faulted its memory from the OS:
                    # ~15% slower for every case alike, Llama included, the ratios unchanged)
                    with ForeignCPU() as foreign:
                        seconds = self.attempt(case, m.label, timed, run, *inputs)
                    if seconds is not FAILED:
                        self.sample(case, m).setdefault("seconds", []).append(seconds)
                        self.noise.setdefault(f"{m.group} {m.label}", []).append(foreign.share)

        if m.kind != "decode":
            for case in live:
                if m.label not in self.entry(case)["errors"]:
                    with PeakRSS() as peak:
                        result = self.attempt(case, f"{m.label} peak", self.call, steps[case.name])
                    if result is not FAILED:
                        self.sample(case, m).update(peak_mb=peak.peak, peak_rise_mb=peak.rise)
        steps.clear()
        trim()
        print(f"  {m.group:5s} {m.label:14s} {len(live)} cases, {time.monotonic() - started:6.1f} s", flush=True)

    def in_dtype(self, fn):
        """fn, under bfloat16 autocast with --bf16 (weights, and the memories' fast weights, stay float32)."""
        if not self.args.bf16:
            return fn

        def autocast(*args):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(*args)

        return autocast

    @staticmethod
    def call(step) -> None:
        """One untimed iteration: run(*setup())."""
        setup, run = step
        run(*setup())

    def sample(self, case: Case, m: Measure) -> dict:
        return self.entry(case)["measures"].setdefault(m.label, {"tokens": m.tokens} | (
            {"images": m.images} if m.images else {}))

    def summarize(self) -> None:
        """Median tok/s (img/s), worst/best, ratio to the group's baseline, GFLOP/s and % of the ceiling
        (again from the samples at every call: the run summarizes after each measure)."""
        ceiling = statistics.median(CEILING_FLOPS / s / 1e9 for s in self.ceiling_s) if self.ceiling_s else None
        for group in GROUPS:
            cases = self.results[group]
            for entry in cases.values():
                for s in entry["measures"].values():
                    if s.get("seconds"):
                        median = statistics.median(s["seconds"])
                        s.update(tok_s=s["tokens"] / median, worst=s["tokens"] / max(s["seconds"]),
                                 best=s["tokens"] / min(s["seconds"]))
                        if "images" in s:
                            s["img_s"] = s["images"] / median
                        if s.get("flops"):
                            s.update(gflop_s=s["flops"] / median / 1e9, flop_per_token=s["flops"] / s["tokens"])
                            if ceiling:
                                s["pct_ceiling"] = 100 * s["gflop_s"] / ceiling
            base = cases.get(BASELINE[group], {}).get("measures", {})
            for entry in cases.values():
                for label, s in entry["measures"].items():
                    ref = base.get(label, {}).get("tok_s")
                    if "tok_s" in s and ref:
                        s["ratio"] = s["tok_s"] / ref
        gflops = [CEILING_FLOPS / s / 1e9 for s in self.ceiling_s]
        self.results["ceiling"] = {"what": "8 x fp32 mm 1024^3 per sample, interleaved with the cases",
                                   "gflop_s_median": statistics.median(gflops) if gflops else None,
                                   "gflop_s_best": max(gflops, default=None), "gflop_s_worst": min(gflops, default=None)}
        self.results["foreign_cpu"] = {label: {"mean": statistics.fmean(v), "max": max(v)}
                                       for label, v in self.noise.items()}
        self.results["targets"] = check_targets(self.results)


def check_targets(results: dict) -> list[dict]:
    """Every target, and again for the compiled twin of its case when the run has one (--compile)."""
    out = []
    for what, num, den, metric, bound_kind, bound in TARGETS:
        for suffix in ("", COMPILED_SUFFIX):
            if suffix and num[1] + suffix not in results[num[0]]:
                continue
            a = results[num[0]].get(num[1] + suffix, {}).get("measures", {}).get(num[2], {}).get(metric)
            b = results[den[0]].get(den[1], {}).get("measures", {}).get(den[2], {}).get(metric)
            ratio = a / b if a is not None and b else None
            ok = None if ratio is None else (ratio >= bound if bound_kind == "min" else ratio <= bound)
            out.append({"target": what + (f" ({num[1]}{suffix})" if suffix else ""), "ratio": ratio, "met": ok})
    return out


# ----------------------------------------------------------------------------------------- report


def _num(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _speed(entry: dict, label: str, rate: str = "tok_s", ratio: bool = True) -> str:
    """The median `rate` (tok_s or img_s) of a measure, with its ratio to the baseline."""
    if label in entry["errors"]:
        return "error"
    s = entry["measures"].get(label, {})
    if rate not in s:
        return "—"
    times = f" ({s['ratio']:.2f}x)" if ratio and "ratio" in s else ""
    return f"{_num(s[rate])}{times}"


def _peak(entry: dict, label: str) -> str:
    s = entry["measures"].get(label, {})
    return f"{s['peak_mb']:,.0f} ({s['peak_rise_mb']:,.0f})" if "peak_mb" in s else "—"


def _compute(entry: dict, label: str) -> str:
    s = entry["measures"].get(label, {})
    if "gflop_s" not in s:
        return "—"
    pct = f" ({s['pct_ceiling']:.0f}%)" if "pct_ceiling" in s else ""
    return f"{s['gflop_s']:.1f}{pct}, {s['flop_per_token'] / 1e6:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def report(results: dict, args) -> str:
    seqs, contexts = args.seq, sorted(set(args.seq) | set(args.decode_contexts))
    st = results["settings"]
    text = bool(results["lm"] or results["layer"])
    ran = (["lm", "layer"] if text else []) + (["image"] if results["image"] else [])
    lines = [f"## tto bench — {st['started']}, {st['cpu']} ({st['cpu_capability']}), torch {st['torch']}, "
             f"{st['threads']} threads, {st['dtype']}, "
             f"{f'batch {args.batch}, ' if text else ''}median of {args.iters} "
             f"(ratio to {' / '.join(BASELINE[g] for g in ran)} of the same run)", ""]
    lm, layer, image = results["lm"], results["layer"], results["image"]
    peak_cols = [f"peak train MB (rise) @{s}" for s in seqs]
    forward = [k for k in ("train", "prefill") if k in args.kinds]
    if forward and lm:
        lines += ["### Whole models: tokens/s", ""]
        lines += _table(["model", "params"] + [f"train@{s}" for s in seqs] + [f"prefill@{s}" for s in seqs] + peak_cols,
                        [[n, f"{e['params'] / 1e6:.2f}M" if e["params"] else "—"]
                         + [_speed(e, f"train@{s}") for s in seqs] + [_speed(e, f"prefill@{s}") for s in seqs]
                         + [_peak(e, f"train@{s}") for s in seqs] for n, e in lm.items()])
    if lm:
        lines += ["", f"### Decode tokens/s ({args.decode_tokens} greedy tokens after an untimed prefill of the context)", ""]
        lines += _table(["model"] + [f"decode@{c}" for c in contexts] + [f"@{contexts[-1]} / @{contexts[0]}"],
                        [[n] + [_speed(e, f"decode@{c}") for c in contexts] + [_flatness(e, contexts)]
                         for n, e in lm.items() if any(k.startswith("decode@") for k in e["measures"])])
    if args.flops and forward and lm:
        lines += ["", "### Compute: GFLOP/s (% of the in-process matmul ceiling), MFLOP/token", ""]
        labels = [f"{k}@{s}" for s in seqs for k in ("train", "prefill")]
        lines += _table(["model"] + labels, [[n] + [_compute(e, lb) for lb in labels] for n, e in lm.items()])
    if layer and forward:
        lines += ["", f"### Single layers (hidden {SMALL['hidden_size']}, train = fwd+bwd incl. input grad): tokens/s", ""]
        lines += _table(["layer", "params"] + [f"train@{s}" for s in seqs] + [f"prefill@{s}" for s in seqs] + peak_cols,
                        [[n, f"{e['params'] / 1e3:.0f}k" if e["params"] else "—"]
                         + [_speed(e, f"train@{s}") for s in seqs] + [_speed(e, f"prefill@{s}") for s in seqs]
                         + [_peak(e, f"train@{s}") for s in seqs] for n, e in layer.items()])
    if image and forward:
        lines += ["", _image_heading(args), ""]
        labels = [f"{IMAGE_MEASURE[k]}@{IMAGE_SMALL['image_size']}px" for k in forward]
        header = ["model", "params"] + [f"{lb} {unit}" for lb in labels for unit in ("img/s", "tok/s")]
        header += [f"peak {labels[0]} MB (rise)"] + ([f"{lb} GFLOP/s (%), MFLOP/token" for lb in labels] if args.flops else [])
        lines += _table(header, [[n, f"{e['params'] / 1e6:.2f}M" if e["params"] else "—"]
                                 + [cell for lb in labels for cell in (_speed(e, lb, "img_s"), _speed(e, lb, ratio=False))]
                                 + [_peak(e, labels[0])] + ([_compute(e, lb) for lb in labels] if args.flops else [])
                                 for n, e in image.items()])
    ceiling = results["ceiling"]
    if ceiling["gflop_s_median"]:
        lines += ["", f"Matmul ceiling (in-process, {CEILING}): {ceiling['gflop_s_median']:.0f} GFLOP/s median "
                      f"({ceiling['gflop_s_worst']:.0f}–{ceiling['gflop_s_best']:.0f})."]
    noisy = {k: v for k, v in results["foreign_cpu"].items() if v["max"] > 0.05}
    lines += ["", "Other processes' CPU share while timing: " +
              (", ".join(f"{k} mean {v['mean']:.2f} max {v['max']:.2f}" for k, v in noisy.items())
               if noisy else "≤ 0.05 in every sample (clean run).")]
    targets = [t for t in results["targets"] if t["ratio"] is not None]
    if targets:
        lines += ["", "### Targets", ""]
        lines += _table(["target", "ratio", "met"],
                        [[t["target"], f"{t['ratio']:.2f}", "yes" if t["met"] else "NO"] for t in targets])
    errors = [(g, n, lb, msg) for g in GROUPS for n, e in results[g].items() for lb, msg in e["errors"].items()]
    if errors:
        lines += ["", "### Errors", ""] + [f"- {g}/{n} {lb}: {msg}" for g, n, lb, msg in errors]
    missing = [f"{g}/{b}" for g, b in BASELINE.items() if results[g] and b not in results[g]]
    if missing:
        lines += ["", f"No baseline {missing}: ratios omitted."]
    return "\n".join(lines)


def _image_heading(args) -> str:
    c = IMAGE_SMALL
    grid = c["image_size"] // c["patch_size"]
    return (f"### Image models: {c['image_size']}x{c['image_size']} px in {c['patch_size']}x{c['patch_size']} patches "
            f"({grid * grid} tokens), width {c['hidden_size']}, {c['num_hidden_layers']} layers, "
            f"{c['num_attention_heads']} heads, batch {args.image_batch}; train = fwd+bwd of the classification loss, "
            f"infer = one forward; ratio to {IMAGE_BASELINE}")


def _flatness(entry: dict, contexts: list[int]) -> str:
    first = entry["measures"].get(f"decode@{contexts[0]}", {}).get("tok_s")
    last = entry["measures"].get(f"decode@{contexts[-1]}", {}).get("tok_s")
    return f"{last / first:.2f}" if first and last else "—"


# ------------------------------------------------------------------------------------------- main


def settings(args) -> dict:
    root = Path(__file__).resolve().parents[1]

    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), None)
    return {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:], **SMALL, "batch": args.batch,
            "seq": args.seq, "decode_contexts": args.decode_contexts, "decode_tokens": args.decode_tokens,
            "image": {**IMAGE_SMALL, "batch": args.image_batch},
            "iters": args.iters, "threads": args.threads,
            "dtype": "bf16 autocast" if args.bf16 else "fp32", "torch": torch.__version__,
            "transformers": transformers.__version__, "titans_pytorch": titans_pytorch_version(),
            "python": platform.python_version(), "cpu": cpu,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_count": os.cpu_count(),
            "loadavg_start": os.getloadavg(), "tto_commit": git("rev-parse", "HEAD"),
            "tto_dirty": bool(git("status", "--porcelain", "--", "tto")), "registered": tto.available(None)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seq", type=int, nargs="+", default=[512, 2048], help="train/prefill lengths")
    p.add_argument("--decode-contexts", type=int, nargs="+", default=[1024, 4096, 16384],
                   help="decode contexts besides --seq")
    p.add_argument("--decode-tokens", type=int, default=DECODE_TOKENS,
                   help="greedy tokens timed per decode sample (TTT-E2E steps once per mini-batch of 1,024: "
                        "time that many to include its steps at their rate)")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS),
                   help="which measures to run (e.g. only decode)")
    p.add_argument("--types", nargs="+",
                   help="registered types to include (default: all); naming only image types runs only the image "
                        "cases (and naming no image type, no image case)")
    p.add_argument("--variants", nargs="+", help="variants to include, e.g. linear lmm (types without variants stay)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--image-batch", type=int, default=8, help="images per sample of the image cases")
    p.add_argument("--iters", type=int, default=5, help="timed rounds per measure (median reported)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bf16", action="store_true",
                   help="run every measure under CPU bfloat16 autocast (weights and fast weights stay float32)")
    p.add_argument("--idle-wait", type=float, default=5.0,
                   help="before each round, wait up to this many seconds for other processes to leave the CPUs")
    p.add_argument("--no-layers", dest="layers", action="store_false", help="skip the single-layer cases")
    p.add_argument("--no-peers", dest="peers", action="store_false", help="skip titans-pytorch even if installed")
    p.add_argument("--ttt-official", metavar="TTT_PY",
                   help="also run the official TTT-Linear / TTT-MLP from this copy of ttt-lm-pytorch's ttt.py")
    p.add_argument("--no-flops", dest="flops", action="store_false", help="skip the FLOP count")
    p.add_argument("--compile", action="store_true",
                   help=f"also run every memory language model with compile_inner_step (cases named <case>{COMPILED_SUFFIX})")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: seq 128, 1 round, decode at 256, 2 images, no idle wait")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("-v", "--verbose", action="store_true", help="print the traceback of every failing case")
    args = p.parse_args(argv)
    registered = tto.available(None)
    if args.types and (unknown := [t for t in args.types if t not in registered]):
        p.error(f"unknown type(s) {unknown}; registered: {sorted(registered)}")
    known_variants = {v for vs in registered.values() for v in vs}
    if args.variants and (unknown := [v for v in args.variants if v not in known_variants]):
        p.error(f"unknown variant(s) {unknown}; registered: {sorted(known_variants)}")
    if args.decode_tokens < 1:
        p.error(f"--decode-tokens must be at least 1 (got {args.decode_tokens})")
    if args.quick:
        args.seq, args.decode_contexts, args.iters, args.idle_wait, args.image_batch = [128], [256], 1, 0.0, 2
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tasks, cases = selected_tasks(args.types), []
    if "causal-lm" in tasks:
        cases += baseline_cases() + tto_cases(args.types, args.variants, args.compile) + (peer_cases() if args.peers else [])
        if args.ttt_official:
            cases += official_ttt_cases(args.ttt_official)
    if "image-classification" in tasks:
        cases += image_cases(args.types, args.variants)
    if not args.layers:
        cases = [c for c in cases if c.group != "layer"]
    info = settings(args)
    print(f"tto bench: {len(cases)} cases, registered {info['registered']}, titans-pytorch {info['titans_pytorch']}",
          flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    run, measures = Run(args, cases), plan(args, {c.group for c in cases})
    results = write_results(path, run, {**info, "measures_done": f"0 of {len(measures)}"})  # the builds' errors
    for done, m in enumerate(measures, start=1):
        run.measure(m)
        # after every measure, so that a run stopped or crashed later keeps what it measured
        results = write_results(path, run, {**info, "measures_done": f"{done} of {len(measures)}"})
    print()
    print(report(results, args))
    print(f"\nwrote {path}")
    return results


def write_results(path: Path, run: Run, info: dict) -> dict:
    """The run's summarized results so far, written to `path` whole or not at all."""
    run.summarize()
    results = {"settings": {**info, "loadavg_end": os.getloadavg(), "finished": time.strftime("%Y-%m-%d %H:%M:%S")},
               **run.results}
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(results, indent=1, default=str))
    os.replace(partial, path)
    return results


if __name__ == "__main__":
    main()
