"""The memory engine shared by every memory mixer: fast models, inner objectives, inner
optimizers, chunk-boundary retentions and the chunked dual-form scan (with its naive per-token
reference; TTT-Linear's and TTT-MLP's scans also as one autograd node with a written-out backward,
``ttt_scans``); the exact per-token delta rule of linear memories (with its recurrence as reference);
large-chunk apply-then-update memories with Muon and weight norm (LaCT); the non-causal one-step
memory of whole images (ViT³); feature maps (ATLAS).
Each memory runs its chunks through one step (``chunkwise.ChunkwiseMemory``), optionally compiled."""

from .chunkwise import ChunkwiseMemory, Float32Parameters, noncausal
from .delta_rule import DeltaRule, naive_delta_rule
from .fast_models import ACTIVATIONS, FastModel, GatedLinearMemory, MLPMemory, SwiGLUMemory
from .feature_maps import PolynomialFeatures
from .large_chunk import LargeChunkMemory, naive_large_chunk
from .muon import newton_schulz5
from .memory import Memory, naive_memory
from .one_step import OneStepMemory, naive_one_step
from .objectives import DotProduct, Huber, LpError, Objective, SquaredError
from .optimizers import Coefficients, DecayGD, InnerOptimizer, MiniBatchGD, MomentumGD, OmegaWindow, PlainGD
from .retention import LqNormalization, MuonRetention, Retention, SoftmaxRetention, WeightNorm

__all__ = ["ACTIVATIONS", "ChunkwiseMemory", "Coefficients", "DecayGD", "DeltaRule", "DotProduct", "FastModel", "GatedLinearMemory",
           "Float32Parameters", "Huber", "InnerOptimizer", "LargeChunkMemory", "LpError", "LqNormalization", "MLPMemory", "Memory",
           "MiniBatchGD", "MomentumGD", "MuonRetention", "Objective", "OmegaWindow", "OneStepMemory", "PlainGD", "PolynomialFeatures",
           "Retention", "SoftmaxRetention",
           "SquaredError", "SwiGLUMemory", "WeightNorm", "naive_delta_rule", "naive_large_chunk", "naive_memory", "naive_one_step",
           "newton_schulz5", "noncausal"]
