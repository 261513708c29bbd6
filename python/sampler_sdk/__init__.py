"""sampler-sdk: sample from raw language models (GGUF files) on the CPU.

The public API follows xAI's Sampler SDK::

    import asyncio, sampler_sdk

    async def main():
        client = sampler_sdk.Client()
        async for token in client.sampler.sample(prompt="", inputs=("The answer is",), max_len=3):
            print(token.token_str, end="")

    asyncio.run(main())

The engine is a Rust extension module, ``sampler_sdk._engine``.
"""

from . import registry
from ._engine import ContextOverflowError, Model, ModelFormatError, inspect_gguf, read_tensor
from .budget import BudgetUpdate, log_budget_update
from .client import Client
from .sampler import AsyncSampler, SampleStream, SyncSampler, SyncSampleStream
from .stub import Finished, ModelInfo, SampleRequest, SamplerStub, Usage
from .token import Token, TokenType

__version__ = "0.1.0"

__all__ = [
    "AsyncSampler",
    "BudgetUpdate",
    "Client",
    "ContextOverflowError",
    "Finished",
    "Model",
    "ModelFormatError",
    "ModelInfo",
    "SampleRequest",
    "SampleStream",
    "SamplerStub",
    "SyncSampleStream",
    "SyncSampler",
    "Token",
    "TokenType",
    "Usage",
    "inspect_gguf",
    "load_model",
    "log_budget_update",
    "read_tensor",
    "registry",
]


def load_model(model=None) -> Model:
    """Loads a model by registered name, path or ``hf://`` URI (None = the default model)."""
    return Model(str(registry.resolve(model)))
