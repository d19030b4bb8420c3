"""Check everything, then run every task on every model and write the report."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .base import LM, Task, apply_grid, get_task


def parse_grid(items, tasks: list[str]) -> dict[str, dict[str, str]]:
    """``["niah.lengths=256,512", ...]`` -> ``{"niah": {"lengths": "256,512"}}``; the task must be selected."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        name, sep, value = item.partition("=")
        task_name, dot, key = name.partition(".")
        if not sep or not dot or not key or not value:
            raise ValueError(f"--grid {item!r}: expected TASK.OPTION=VALUE[,VALUE...] (e.g. niah.lengths=256,512)")
        get_task(task_name)
        if task_name not in tasks:
            raise ValueError(f"--grid {item!r}: task {task_name!r} is not among --tasks {','.join(tasks)}")
        out.setdefault(task_name, {})[key] = value
    return out


def build_tasks(names: list[str], grid: dict, *, seed: int, limit: int | None, batch_size: int) -> dict[str, Task]:
    """The selected tasks with their options (defaults + --grid), checked; text sources loaded."""
    options = {n: apply_grid(get_task(n).Options(), n, grid.get(n, {})) for n in names}
    return {n: get_task(n)(options[n], seed=seed, limit=limit, batch_size=batch_size) for n in names}


def model_names(paths: list[str]) -> list[str]:
    """Short unique names: the directory name, or the path as given when two share a name."""
    short = [Path(p).resolve().name for p in paths]
    return [s if short.count(s) == 1 else p for s, p in zip(short, paths)]


@dataclass
class Candidate:
    """A model to evaluate, checked but not loaded."""

    spec: str  # as given (--model, an adapter's base, --adapter)
    config: Any
    tokenizer: Any
    load: Callable[[str], Any]  # dtype name -> the model


def check_model(spec: str, tokenizer_spec_: str | None) -> Candidate:
    """The model's directory (`spec` or, for a hub name, its local cache), config and tokenizer, or a
    one-line error naming the problem (missing, unreadable, truncated weights, ...)."""
    from transformers import AutoConfig

    from ..cli import resolve_model, tokenizer_spec
    from ..data import load_tokenizer

    path = resolve_model(spec)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"--model {spec!r}: unreadable config ({str(err).splitlines()[0]})") from None
    tokenizer = load_tokenizer(tokenizer_spec(path, tokenizer_spec_))
    check_vocab(spec, config, tokenizer)

    def load(dtype: str):
        import torch
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))

    return Candidate(spec, config, tokenizer, load)


def check_vocab(spec: str, config, tokenizer) -> None:
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise ValueError(f"--model {spec!r}: its tokenizer has {len(tokenizer)} tokens but the model only {vocab}; "
                         f"pass the tokenizer it was trained with (--tokenizer)")


def check_adapter(directory: str, tokenizer_spec_: str | None) -> tuple[Candidate, Candidate]:
    """(its base, the base with the adapter) for a peft adapter directory: the base the adapter records,
    its config, and the adapter directory's tokenizer (train.py saves it there)."""
    import torch

    from ..adapters import load_adapted, read_adapter_config
    from ..cli import tokenizer_spec
    from ..data import load_tokenizer
    from ..pretrained import load_pretrained, load_pretrained_config

    base = read_adapter_config(directory).base_model_name_or_path
    try:
        config = load_pretrained_config(base)
    except (OSError, ValueError) as err:
        raise ValueError(f"--adapter {directory!r}: its base {base!r} cannot be read ({str(err).splitlines()[0]})") \
            from None
    tokenizer = load_tokenizer(tokenizer_spec(directory, tokenizer_spec_))
    check_vocab(base, config, tokenizer)
    return (Candidate(base, config, tokenizer, lambda dtype: load_pretrained(base).to(getattr(torch, dtype))),
            Candidate(directory, config, tokenizer, lambda dtype: load_adapted(directory, base, getattr(torch, dtype))))


def same_model(a: str, b: str) -> bool:
    """Whether two specs name the same model (local paths compared resolved)."""
    return a == b or Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve()


def candidates(models: list[str], adapters: list[str], tokenizer: str | None) -> list[Candidate]:
    """Every --model, then for each --adapter its base (unless already there) and the base with the adapter."""
    out = [check_model(p, tokenizer) for p in models]
    for directory in adapters:
        base, adapted = check_adapter(directory, tokenizer)
        out += [c for c in (base, adapted) if not any(same_model(c.spec, o.spec) for o in out)]
    return out


def load_lm(name: str, candidate: Candidate, device: str, dtype: str) -> LM:
    return LM(name, candidate.spec, candidate.load(dtype).to(device).eval(), candidate.tokenizer, device)


def evaluate(models: list[str], tasks: list[str], out: str | Path, *, grid=(), seed: int = 0, limit: int | None = None,
             device: str = "auto", dtype: str = "float32", batch_size: int = 8, tokenizer: str | None = None,
             progress: bool = True, echo=print, adapters: list[str] = ()) -> dict:
    """Run `tasks` on every model directory and on each adapter's base and base + adapter (side by side
    in one table and in each task's plot); writes ``out/results.json`` and the plots, returns the results.

    Everything that can be wrong with the inputs (task names, --grid, model directories, tokenizers,
    datasets) raises ValueError / OSError before any model is run.
    """
    import tto  # noqa: F401  (registers the tto types with the Auto classes)

    from ..cli import resolve_device

    if not models and not adapters:
        raise ValueError("give at least one --model DIR or --adapter DIR")
    for name in tasks:
        get_task(name)
    if limit is not None and limit <= 0:
        raise ValueError(f"--limit {limit} must be positive")
    if batch_size <= 0:
        raise ValueError(f"--batch-size {batch_size} must be positive")
    parsed = parse_grid(grid, tasks)
    checked = candidates(list(models), list(adapters), tokenizer)
    built = build_tasks(tasks, parsed, seed=seed, limit=limit, batch_size=batch_size)
    device = resolve_device(device)
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _run(checked, built, out, seed=seed, limit=limit, device=device, dtype=dtype,
                    progress=progress, echo=echo)
    except BaseException:
        if created and not any(out.iterdir()):  # leave nothing behind that was not there before
            out.rmdir()
        raise


def _run(checked: list[Candidate], built, out: Path, *, seed, limit, device, dtype, progress, echo) -> dict:
    """Every task on every checked model, then the plots and results.json in `out`."""
    import datasets
    from tqdm.auto import tqdm

    from . import report

    datasets.disable_progress_bars()  # tokenizing the held-out text is not worth a bar per task and model

    names = model_names([c.spec for c in checked])
    results: dict = {"seed": seed, "limit": limit, "device": device, "dtype": dtype,
                     "options": {n: dataclasses.asdict(t.options) for n, t in built.items()},
                     "models": {}, "results": {n: {} for n in built}, "summary": {}}
    for name, candidate in zip(names, checked):
        lm = load_lm(name, candidate, device, dtype)
        results["models"][name] = {"path": str(candidate.spec), "model_type": candidate.config.model_type,
                                   "parameters": sum(p.numel() for p in lm.model.parameters())}
        results["summary"][name] = {}
        for task_name, task in built.items():
            with tqdm(desc=f"{task_name} {name}", unit="seq", disable=not progress, file=sys.stderr) as bar:
                result = task.run(lm, bar)
            results["results"][task_name][name] = result
            results["summary"][name].update(task.summary(result))
        del lm
    plots = []
    for task_name, task in built.items():
        plots += task.plot(results["results"][task_name], out)
    results["plots"] = [str(p) for p in plots]
    path = report.write_json(results, out)
    echo(report.table(results["summary"]))
    echo(f"results: {path}; plots: {', '.join(p.name for p in plots) or 'none'}")
    return results
