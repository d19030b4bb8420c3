"""Trainer callbacks that watch a run.

- :class:`StopOnNonFiniteLoss`: a diverging run stops at the step where its loss turns NaN/Inf,
  before that step's update, and is never saved as a finished model (:class:`Diverged`).
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback


class Diverged(FloatingPointError):
    """Training met a non-finite loss at optimizer step ``step`` (1-based, as the Trainer logs it).

    Raised before that step's backward pass and update, so the weights in memory and every checkpoint
    written so far are those of the last finite step.
    """

    def __init__(self, step: int, cause: str):
        self.step = step
        self.cause = cause
        super().__init__(f"non-finite loss at step {step}: {cause}")

    @classmethod
    def at(cls, state, err: FloatingPointError) -> Diverged:
        """``err`` as a Diverged at the step in progress: a layer's own NaN/Inf check (``check_finite``
        names the layer) raised during the forward of step ``state.global_step + 1``."""
        return err if isinstance(err, cls) else cls(state.global_step + 1, str(err))


class StopOnNonFiniteLoss(TrainerCallback):
    """Raise :class:`Diverged` at the first training micro-batch whose loss is NaN/Inf.

    The Trainer itself logs such a step as the running mean of the finite ones
    (``logging_nan_inf_filter``) and goes on updating with NaN gradients; the mean it logs cannot tell
    which step went wrong. A forward hook on the model reads each training forward's ``loss`` (one
    host sync per micro-batch) and raises before the backward pass. Evaluation forwards
    (``model.training`` False) are not checked.
    """

    def __init__(self):
        self._state = None
        self._hook = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._remove()  # a run that raised out of the last train() left its hook
        self._state = state
        self._hook = model.register_forward_hook(self._check)

    def on_train_end(self, args, state, control, **kwargs):
        self._remove()

    def _remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _check(self, module, args, output) -> None:
        loss = getattr(output, "loss", None)
        if module.training and loss is not None and not bool(torch.isfinite(loss).all()):
            self._remove()
            raise Diverged(self._state.global_step + 1, f"the training loss is {loss.detach().float().item()}")
