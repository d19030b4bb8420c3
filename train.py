"""Train any registered type from a YAML recipe.

    python train.py configs/quickstart.yml
    python train.py configs/tiny/ttt.yml model.hidden_size=128 training_args.max_steps=20
    torchrun --nproc_per_node 2 train.py configs/tiny/ttt.yml       # DDP (gloo on CPU, nccl on GPU)

See tto/training.py for the recipe schema.
"""

from __future__ import annotations

import sys

from tto.cli import OneLineErrors


def main(argv: list[str] | None = None) -> dict:
    parser = OneLineErrors(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="YAML recipe (dataset, model, tokenizer, training_args)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.hidden_size=128")
    args = parser.parse_args(argv)
    from tto.training import load_recipe, train

    try:
        recipe = load_recipe(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"train.py: error: {err}\n")
    try:
        metrics = train(recipe)
    except (FileExistsError, OSError, ValueError) as err:
        parser.exit(2, f"train.py: error: {err}\n")
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    summary = " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if k in ("train_loss", "eval_loss"))
    print(f"rank {rank}: done {summary}", flush=True)
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
