"""Checkpoints that survive a kill at any instant, resume from the newest complete one, and stop on a
signal with a checkpoint.

- Every Trainer checkpoint is written under ``<output_dir>/.staging/checkpoint-N`` and renamed to
  ``<output_dir>/checkpoint-N`` once all its files are written and flushed (a rename is atomic), so a
  ``checkpoint-N`` directory is whole or absent.
- Resume takes the newest *complete* ``checkpoint-N`` (its ``trainer_state.json`` is readable and at
  step N: the Trainer writes it last), passing over half-written ones from other tools or older code.
- The loss summed over the steps before a checkpoint is stored with it (``run_loss.json``), so a
  resumed run's ``train_loss`` is the mean over every step since step 0, as if never interrupted.
- SIGINT (Ctrl-C) and SIGTERM end the current step, save a checkpoint and stop (:class:`StopOnSignal`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from pathlib import Path

import torch
import torch.distributed
from transformers import Trainer, TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, rotate_checkpoints

#: directory inside output_dir where checkpoints are written before they are renamed into place
STAGING_DIR = ".staging"
#: directory inside output_dir where the final model is written before its files are moved into place
FINAL_STAGING_DIR = ".saving"
#: file in each checkpoint: the training loss summed over the steps up to it
RUN_LOSS_NAME = "run_loss.json"
#: signals that stop training with a checkpoint
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def checkpoint_step(path: Path) -> int | None:
    """N for a directory named ``checkpoint-N``, else None."""
    prefix, _, step = path.name.partition("-")
    return int(step) if prefix == PREFIX_CHECKPOINT_DIR and step.isdigit() else None


def is_complete(path: Path) -> bool:
    """Whether ``path`` (``checkpoint-N``) holds a readable ``trainer_state.json`` at step N, the file
    the Trainer writes after every other one."""
    try:
        state = json.loads((path / TRAINER_STATE_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("global_step") == checkpoint_step(path)


def newest_complete_checkpoint(output_dir: Path) -> tuple[Path | None, list[Path]]:
    """``(newest complete checkpoint or None, the incomplete ones newer than it)``."""
    found = sorted((p for p in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir() and checkpoint_step(p)
                    is not None), key=checkpoint_step, reverse=True)
    for i, path in enumerate(found):
        if is_complete(path):
            return path, found[:i]
    return None, found


def resolve_resume(output_dir: Path, resume) -> tuple[Path | None, list[Path]]:
    """``(the checkpoint resume_from_checkpoint names (None, True or a path), the newer incomplete ones
    passed over)``; FileNotFoundError if there is none, or the path is not a complete checkpoint."""
    if resume is None or resume is False:
        return None, []
    if resume is True:
        path, skipped = newest_complete_checkpoint(output_dir) if output_dir.is_dir() else (None, [])
        if path is None:
            found = f" (only incomplete ones: {', '.join(p.name for p in skipped)})" if skipped else ""
            raise FileNotFoundError(f"resume_from_checkpoint=true, but output_dir {str(output_dir)!r} has no "
                                    f"complete checkpoint-*{found}")
        return path, skipped
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint={resume!r}: no such checkpoint directory")
    if not is_complete(path):
        raise FileNotFoundError(f"resume_from_checkpoint={resume!r} is incomplete (no readable trainer_state.json "
                                f"at its step); resume_from_checkpoint=true picks the newest complete one")
    return path, []


def remove_staging(output_dir: Path) -> None:
    """Delete what an interrupted save left behind (never a finished checkpoint or model)."""
    for name in (STAGING_DIR, FINAL_STAGING_DIR):
        shutil.rmtree(output_dir / name, ignore_errors=True)


def fsync(path: Path) -> None:
    """Flush a file or a directory's entries to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(staged: Path, final: Path) -> None:
    """Rename the finished ``staged`` directory to ``final``. A ``final`` already there (an incomplete
    checkpoint of the same step) is first moved aside and deleted after: at every instant ``final`` is
    either absent or complete."""
    for item in [*staged.rglob("*"), staged]:  # the data reaches the disk before the name does
        fsync(item)
    replaced = staged.parent / f"replaced-{final.name}"
    if final.exists():
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(staged, final)
    fsync(final.parent)
    shutil.rmtree(replaced, ignore_errors=True)
    try:
        staged.parent.rmdir()
    except OSError:  # not empty: another rank's files of a later save, or a user's
        pass


class CheckpointingTrainer(Trainer):
    """The Hugging Face Trainer with atomic checkpoints, resume from the newest complete checkpoint, and
    a ``train_loss`` over the whole run when resumed."""

    _staging = False  # True while _save_checkpoint runs: the Trainer's output dir is then the staging dir
    _loss_before_resume: float | None = None  # loss summed over the steps before the resumed checkpoint

    def _get_output_dir(self, trial) -> str:
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING_DIR) if self._staging else run_dir

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's save, into the staging dir; then (process 0) the loss sum, the rename, and the
        rotation of old checkpoints (which the Trainer did in the staging dir, where there was none)."""
        run_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staged = run_dir / STAGING_DIR / name
        if self.args.should_save:
            shutil.rmtree(staged, ignore_errors=True)  # left by a save killed at this step in an earlier attempt
        self.accelerator.wait_for_everyone()
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        self.accelerator.wait_for_everyone()  # every rank's rng_state_<rank>.pth is in the staging dir
        if self.args.should_save:
            best = self.state.best_model_checkpoint
            if best is not None and Path(best).parent == staged.parent:  # the best is this checkpoint
                self.state.best_model_checkpoint = str(run_dir / Path(best).name)
                self.state.save_to_json(str(staged / TRAINER_STATE_NAME))
            loss_sum = self._loss_sum()
            (staged / RUN_LOSS_NAME).write_text(json.dumps({"global_step": self.state.global_step,
                                                            "loss_sum": loss_sum}))
            publish(staged, run_dir / name)
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        # no rank leaves before the rename: after a stop save each rank exits, and torchrun kills the
        # others at the first non-zero status, which could catch process 0 before its rename
        self.accelerator.wait_for_everyone()

    def _loss_sum(self) -> float:
        """The training loss summed over every step so far (the Trainer's sum for this call, the steps not
        logged yet, and the steps before a resume)."""
        return (self._loss_before_resume or 0.0) + self._total_loss_scalar + self._tr_loss.item()

    def train(self, resume_from_checkpoint=None, **kwargs):
        """``resume_from_checkpoint=True`` takes the newest complete checkpoint; the run's ``train_loss``
        covers every step since step 0."""
        resume, skipped = resolve_resume(Path(self.args.output_dir), resume_from_checkpoint)
        self._loss_before_resume = None
        if resume is not None:
            if self.is_world_process_zero():
                passed = f" (passing over incomplete {', '.join(p.name for p in skipped)})" if skipped else ""
                print(f"resuming from {resume}{passed}", flush=True)
            stored = resume / RUN_LOSS_NAME
            if stored.exists():
                self._loss_before_resume = json.loads(stored.read_text())["loss_sum"]
            if 0 < self.args.max_steps <= checkpoint_step(resume):  # the Trainer would take a step past max_steps
                return self._finished(resume)
        result = super().train(resume_from_checkpoint=str(resume) if resume else None, **kwargs)
        return TrainOutput(result.global_step, result.metrics["train_loss"], result.metrics)

    def _finished(self, checkpoint: Path) -> TrainOutput:
        """Resuming a run whose checkpoint is at max_steps (e.g. killed during the final save): its
        weights and state, no step."""
        self._load_from_checkpoint(str(checkpoint))
        self.state = TrainerState.load_from_json(str(checkpoint / TRAINER_STATE_NAME))
        loss = float("nan") if self._loss_before_resume is None else self._loss_before_resume / self.state.global_step
        return TrainOutput(self.state.global_step, loss, {"train_loss": loss})

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "train_loss" in logs and self._loss_before_resume is not None:  # the Trainer's covers this call only
            logs["train_loss"] = (self._loss_before_resume + self._total_loss_scalar) / max(self.state.global_step, 1)
        super().log(logs, *args, **kwargs)


class TrainingInterrupted(Exception):
    """Training stopped on signal ``signum`` after saving ``checkpoint``."""

    def __init__(self, signum: int, checkpoint: Path):
        super().__init__(f"{signal.Signals(signum).name}: stopped after saving {checkpoint}")
        self.signum, self.checkpoint = signum, checkpoint


class StopOnSignal(TrainerCallback):
    """SIGINT / SIGTERM during training: finish the current step, save a checkpoint, stop.

    ``received`` is the signal number afterwards (None if none came). A second signal acts at once
    (the default handlers are back): checkpoints are atomic, so it leaves nothing half-written.
    Under torchrun (workers in their own sessions: Ctrl-C reaches the launcher, which forwards the
    signal to each worker and kills them after its ``--shutdown_timeout``, 30 s by default) every
    rank handles the signal, and the ranks agree at each step end on whether any of them got one
    (an all-reduce MAX of the signal number): all stop after the same step and save one checkpoint.
    """

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.received = None
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.received = signum
        self.restore()

    def restore(self) -> None:
        """Put back the handlers that were there before training (also when training raised)."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def on_step_end(self, args, state, control, **kwargs):
        received = self.received or 0
        if args.world_size > 1 and torch.distributed.is_initialized():  # any rank's signal stops every rank
            flag = torch.tensor([received], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            received = int(flag.item())
        if received:
            self.received = received
            self.restore()
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

