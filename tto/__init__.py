"""tto: test-time-training / test-time-memorization language models on one backbone.

``import tto`` registers every type with the Hugging Face Auto classes.
"""

from . import mixers  # noqa: F401  (registers every type)
from .cache import TTOCache
from .config import MemoryConfig, TTOConfig
from .convert import convert_official_ttt
from .mixers.titans import TitansConfig
from .mixers.ttt import TTTConfig
from .modeling import TitansForCausalLM, TTOForCausalLM, TTOModel, TTTForCausalLM
from .registry import available, build_config, get
from .retrofit import retrofit

__all__ = ["MemoryConfig", "TTOCache", "TTOConfig", "TTOForCausalLM", "TTOModel", "TTTConfig", "TTTForCausalLM", "TitansConfig",
           "TitansForCausalLM", "available", "build_config", "convert_official_ttt", "get", "retrofit"]
