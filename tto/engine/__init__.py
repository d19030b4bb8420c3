"""The memory engine shared by every memory mixer: fast models, inner objectives, inner
optimizers, chunk-boundary retentions and the chunked dual-form scan (with its naive per-token
reference); the exact per-token delta rule of linear memories (with its recurrence as reference)."""

from .delta_rule import DeltaRule, naive_delta_rule
from .fast_models import ACTIVATIONS, FastModel, MLPMemory
from .memory import Memory, naive_memory
from .objectives import Huber, LpError, Objective, SquaredError
from .optimizers import Coefficients, DecayGD, InnerOptimizer, MiniBatchGD, MomentumGD
from .retention import LqNormalization, Retention, SoftmaxRetention

__all__ = ["ACTIVATIONS", "Coefficients", "DecayGD", "DeltaRule", "FastModel", "Huber", "InnerOptimizer",
           "LpError", "LqNormalization", "MLPMemory", "Memory", "MiniBatchGD", "MomentumGD", "Objective",
           "Retention", "SoftmaxRetention", "SquaredError", "naive_delta_rule", "naive_memory"]
