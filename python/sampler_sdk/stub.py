"""The one interface the sampler talks to, whatever the transport.

``AsyncSampler`` validates arguments, derives seeds and assembles a ``SampleRequest``;
a stub turns it into tokens. The in-process stub (``local.py``) runs the engine on
engine threads; the gRPC stub (``grpc_stub.py``) sends the same request to a server.
Both resolve strings (inputs, stop tokens, allowed/disallowed tokens) to ids with the
target model's tokenizer, because only they know which model serves the request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, List, Optional, Protocol, Sequence, Union

from .budget import BudgetUpdate
from .token import Token

#: One segment of the context: text, token ids, or image bytes.
InputSegment = Union[str, Sequence[int], bytes]


@dataclass(frozen=True)
class SampleRequest:
    inputs: Sequence[InputSegment]
    model_name: str = ""
    max_len: int = 256
    temperature: float = 0.7
    nucleus_p: float = 0.95
    stop_tokens: Sequence[str] = ()
    stop_strings: Sequence[str] = ()
    rng_seed: int = 0
    return_attention: bool = False
    allowed_tokens: Optional[Sequence[Union[int, str]]] = None
    disallowed_tokens: Optional[Sequence[Union[int, str]]] = None
    augment_tokens: bool = True


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    sampled_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.sampled_tokens


@dataclass(frozen=True)
class Finished:
    """The last event of a stream: why it stopped, and what it consumed.

    ``stop_reason`` is one of "max_len", "stop_token", "stop_string", "end_of_sequence",
    "context_full", "cancelled".
    """

    stop_reason: str
    usage: Usage
    stop_string: Optional[str] = None
    stop_token_id: Optional[int] = None


SampleEvent = Union[Token, BudgetUpdate, Finished]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    architecture: str
    n_vocab: int
    context_length: int
    path: str = ""
    aliases: List[str] = field(default_factory=list)


class SampleCall(Protocol):
    """An in-flight sample: an async iterator of events that ends after ``Finished``."""

    def __aiter__(self) -> AsyncIterator[SampleEvent]: ...

    async def __anext__(self) -> SampleEvent: ...

    def cancel(self) -> None: ...


class SamplerStub(Protocol):
    def sample(self, request: SampleRequest) -> SampleCall:
        """Starts sampling. Raises ValueError/TypeError at once for a bad request."""
        ...

    async def tokenize(self, text: str, model_name: str = "") -> List[Token]: ...

    async def list_models(self) -> List[ModelInfo]: ...
