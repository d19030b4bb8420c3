"""Evaluate causal LMs (tto checkpoints or any AutoModelForCausalLM directory) on memory tasks.

    python eval.py --model runs/ttt --model runs/transformer --out runs/eval
    python eval.py --model runs/ttt --tasks niah,mqar --grid niah.lengths=256,1024 --limit 2
    python eval.py --adapter runs/sft_lora --tasks memory,ppl    # its base vs base + adapter, side by side
    python eval.py --list-tasks                     # every task's options and their defaults

Writes OUT/results.json and PNG plots, and prints a table comparing the models.
"""

from __future__ import annotations

import sys

from tto.cli import DTYPES, OneLineErrors
from tto.typed import AT_LEAST_1, SEED, flag


def parse_args(argv):
    from tto.eval import TASKS

    p = OneLineErrors(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", default=[], help="model directory (repeat to compare several)")
    p.add_argument("--adapter", action="append", default=[],
                   help="peft adapter directory: evaluates its base and the base with it (repeat for several)")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {','.join(TASKS)} (default: all)")
    p.add_argument("--out", default="runs/eval", help="directory for results.json and the plots")
    p.add_argument("--grid", nargs="+", action="extend", default=[], metavar="TASK.OPTION=V1,V2",
                   help="set task options, e.g. niah.lengths=256,512 memory.gaps=0,512 (see --list-tasks)")
    p.add_argument("--limit", type=flag(int, AT_LEAST_1), default=None, help="at most N examples per grid cell (quick runs)")
    p.add_argument("--seed", type=flag(int, SEED), default=0, help="seed of the task generators")
    p.add_argument("--batch-size", type=flag(int, AT_LEAST_1), default=8)
    p.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--tokenizer", help="for models without their own tokenizer (default: builtin:bytes)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--list-tasks", action="store_true", help="print every task's options and defaults, then exit")
    return p.parse_args(argv), p


def list_tasks() -> str:
    from dataclasses import fields

    from tto.eval import TASKS

    lines = []
    for name, cls in TASKS.items():
        lines.append(f"{sys.modules[cls.__module__].__doc__.strip().splitlines()[0]}")
        for f in fields(cls.Options):
            lines.append(f"  {name}.{f.name} = {getattr(cls.Options(), f.name)!r}  # {f.metadata.get('help', '')}")
    return "\n".join(lines)


def main(argv=None) -> dict | None:
    args, parser = parse_args(argv)
    if args.list_tasks:
        print(list_tasks())
        return None
    from tto.eval import evaluate

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        return evaluate(args.model, tasks, args.out, grid=args.grid, seed=args.seed, limit=args.limit,
                        device=args.device, dtype=args.dtype, batch_size=args.batch_size, tokenizer=args.tokenizer,
                        progress=not args.no_progress, adapters=args.adapter)
    except (ValueError, OSError) as err:  # bad input: one line, before any model is run
        parser.exit(2, f"eval.py: error: {str(err).splitlines()[0]}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
