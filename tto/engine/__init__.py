"""The memory engine shared by every memory mixer: fast models, inner objectives, inner
optimizers and the chunked dual-form scan (with its naive per-token reference); the exact
per-token delta rule of linear memories (with its recurrence as reference)."""

from .delta_rule import DeltaRule, naive_delta_rule
from .fast_models import ACTIVATIONS, FastModel, MLPMemory
from .memory import Memory, naive_memory
from .objectives import SquaredError
from .optimizers import Coefficients, InnerOptimizer, MiniBatchGD, MomentumGD

__all__ = ["ACTIVATIONS", "Coefficients", "DeltaRule", "FastModel", "InnerOptimizer", "MLPMemory", "Memory",
           "MiniBatchGD", "MomentumGD", "SquaredError", "naive_delta_rule",
           "naive_memory"]
