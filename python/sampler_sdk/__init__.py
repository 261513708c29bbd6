"""sampler-sdk: sample from raw language models (GGUF files) on the CPU.

The public API follows xAI's Sampler SDK: ``Client().sampler.sample(...)`` streams
``Token`` objects. The engine is a Rust extension module, ``sampler_sdk._engine``.
"""

from . import registry
from ._engine import ContextOverflowError, Model, ModelFormatError, inspect_gguf, read_tensor

__version__ = "0.1.0"

__all__ = [
    "ContextOverflowError",
    "Model",
    "ModelFormatError",
    "inspect_gguf",
    "load_model",
    "read_tensor",
    "registry",
]


def load_model(model=None) -> Model:
    """Loads a model by registered name, path or ``hf://`` URI (None = the default model)."""
    return Model(str(registry.resolve(model)))
