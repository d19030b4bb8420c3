"""Trainer callbacks that watch a run.

- :class:`StopOnNonFiniteLoss`: a diverging run stops at the step where its loss turns NaN/Inf,
  before that step's update, and is never saved as a finished model (:class:`Diverged`).
- :class:`InnerLRWarmup`: TTT-E2E's inner learning rate warms up over the first outer steps.
"""

from __future__ import annotations

import math

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


class InnerLRWarmup(TrainerCallback):
    """The inner-lr warm-up of models with prime layers (TTT-E2E): at outer step s (0-based) of N,
    the inner lr is ``inner_lr_init + (inner_lr - inner_lr_init) * min(1, (s + 1) / W)`` with
    ``W = ceil(inner_lr_warmup_ratio * N)`` (W = 0: ``inner_lr`` throughout), as the official
    ``get_ilr_multiplier``; ``inner_lr`` again after training. Follows the step count alone, so a
    resumed run continues the same schedule. Other models are left alone."""

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        for module in self._models(model):
            steps = math.ceil(module.config.inner_lr_warmup_ratio * state.max_steps)
            module.inner_lr_warmup = min(1.0, (state.global_step + 1) / steps) if steps else 1.0

    def on_train_end(self, args, state, control, model=None, **kwargs):
        for module in self._models(model):
            module.inner_lr_warmup = 1.0

    @staticmethod
    def _models(model):
        from ..modeling import TTOModel

        return [m for m in (model.modules() if model is not None else ()) if isinstance(m, TTOModel)
                and m.config.prime_layers]
