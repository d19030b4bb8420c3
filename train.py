"""Train any registered type from a YAML recipe.

    python train.py configs/quickstart.yml
    python train.py configs/tiny/ttt.yml model.hidden_size=128 training_args.max_steps=20
    torchrun --nproc_per_node 2 train.py configs/tiny/ttt.yml       # DDP (gloo on CPU, nccl on GPU)

See tto/training/recipe.py for the recipe schema. Ctrl-C saves a checkpoint and prints the command
that resumes.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

from tto.cli import OneLineErrors

#: exit code of a run stopped by a non-finite loss (2 is a bad recipe or input, before any work)
EXIT_DIVERGED = 3
#: exit code after SIGINT (Ctrl-C), as a shell reports a process it ended with it: 128 + 2
INTERRUPTED = 130


def resume_command(argv: list[str]) -> str:
    """The command line that continues this run from its newest complete checkpoint."""
    python = "python" if shutil.which("python") and os.path.samefile(shutil.which("python"), sys.executable) \
        else sys.executable
    script = os.path.relpath(__file__) if not os.path.relpath(__file__).startswith("..") else __file__
    kept = [a for a in argv if not a.startswith("training_args.resume_from_checkpoint=")]
    # under torchrun (single node: WORLD_SIZE = LOCAL_WORLD_SIZE) the run resumes with as many processes
    launcher = [python] if int(os.environ.get("WORLD_SIZE", "1")) == 1 else \
        ["torchrun", "--nproc_per_node", os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])]
    return shlex.join([*launcher, script, *kept, "training_args.resume_from_checkpoint=true"])


def main(argv: list[str] | None = None) -> dict:
    try:
        return train_from_command_line(argv)
    finally:
        end_process_group()


def end_process_group() -> None:
    """Under torchrun, destroy the process group the Trainer created, while the interpreter is whole:
    left to interpreter exit, gloo's worker threads can abort the process (SIGABRT, "terminate called
    without an active exception") after a run that finished and saved."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def train_from_command_line(argv: list[str] | None) -> dict:
    parser = OneLineErrors(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="YAML recipe (dataset, model, tokenizer, training_args)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.hidden_size=128")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    from tto.training import Diverged, TrainingInterrupted, build_trainer, load_recipe, newest_complete_checkpoint, run

    try:  # problems with the recipe or its inputs: one line, before any training
        trainer, resume = build_trainer(load_recipe(args.config, args.overrides))
    except (ValueError, OSError) as err:
        parser.exit(2, f"train.py: error: {' '.join(str(err).split())}\n")  # one line, whatever the message
    except KeyboardInterrupt:
        parser.exit(INTERRUPTED, "train.py: interrupted before training; nothing was written\n")
    try:
        metrics = run(trainer, resume)
    except Diverged as err:  # one line: the step, the layer (with check_finite), what is kept
        last, _ = newest_complete_checkpoint(Path(trainer.args.output_dir))
        kept = f"last checkpoint {last} kept" if last else "no checkpoint was written"
        parser.exit(EXIT_DIVERGED, f"train.py: error: {err}; stopped before its update, no model saved; {kept}\n")
    except TrainingInterrupted as stop:  # SIGINT / SIGTERM: a checkpoint was saved
        parser.exit(128 + stop.signum, f"train.py: {stop}; resume with:\n{resume_command(argv)}\n")
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the training steps (final evaluation or save)
        newest, _ = newest_complete_checkpoint(Path(trainer.args.output_dir))
        then = f"resume from {newest} with:\n{resume_command(argv)}" if newest else "no checkpoint was saved"
        parser.exit(INTERRUPTED, f"train.py: interrupted; {then}\n")
    if trainer.is_world_process_zero():
        summary = " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if k in ("train_loss", "eval_loss", "eval_accuracy"))
        print(f"done: {summary}; {metrics['trainable_parameters']:,} trainable parameters; model saved in "
              f"{trainer.args.output_dir}", flush=True)
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
