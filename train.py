"""Train any registered type from a YAML recipe.

    python train.py configs/quickstart.yml
    python train.py configs/tiny/ttt.yml model.hidden_size=128 training_args.max_steps=20
    torchrun --nproc_per_node 2 train.py configs/tiny/ttt.yml       # DDP (gloo on CPU, nccl on GPU)

See tto/training.py for the recipe schema.
"""

from __future__ import annotations

import os
import sys

from tto.cli import OneLineErrors

#: exit code of a run stopped by a non-finite loss (2 is a bad recipe or input, before any work)
EXIT_DIVERGED = 3


def main(argv: list[str] | None = None) -> dict:
    parser = OneLineErrors(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="YAML recipe (dataset, model, tokenizer, training_args)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.hidden_size=128")
    args = parser.parse_args(argv)
    from tto.training import Diverged, build_trainer, load_recipe, run

    try:  # problems with the recipe or its inputs: one line, before any training
        trainer, resume = build_trainer(load_recipe(args.config, args.overrides))
    except (ValueError, OSError) as err:
        parser.exit(2, f"train.py: error: {' '.join(str(err).split())}\n")  # one line, whatever the message
    try:
        metrics = run(trainer, resume)
    except Diverged as err:  # one line: the step, the layer (with check_finite), what is kept
        from transformers.trainer_utils import get_last_checkpoint

        out = trainer.args.output_dir
        last = get_last_checkpoint(out) if os.path.isdir(out) else None
        kept = f"last checkpoint {last} kept" if last else "no checkpoint was written"
        parser.exit(EXIT_DIVERGED, f"train.py: error: {err}; stopped before its update, no model saved; {kept}\n")
    if trainer.is_world_process_zero():
        summary = " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if k in ("train_loss", "eval_loss"))
        print(f"done: {summary}; model saved in {trainer.args.output_dir}", flush=True)
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
