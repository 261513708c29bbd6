"""``AsyncSampler``: the seed's sampling API, over any ``SamplerStub``."""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import warnings
import weakref
from typing import Any, Iterator, List, Optional, Sequence, Union

from . import _engine
from .budget import BudgetUpdate, log_budget_update
from .stub import Finished, InputSegment, SampleCall, SampleRequest, SamplerStub, Usage
from .token import Token

logger = logging.getLogger("sampler_sdk")

_MAX_SEED = 2**64 - 1


def _check_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    return float(value)


def _check_strings(name: str, values: Any) -> List[str]:
    if values is None:
        return []
    if isinstance(values, str):
        raise TypeError(f"{name}: expected a list of strings, got a single str")
    out = list(values)
    for v in out:
        if not isinstance(v, str):
            raise TypeError(f"{name}: expected strings, got {type(v).__name__}")
    return out


def _normalise_segment(where: str, segment: Any) -> InputSegment:
    if isinstance(segment, (str, bytes)):
        return segment
    if isinstance(segment, (bytearray, memoryview)):
        return bytes(segment)
    if isinstance(segment, Token):
        return [segment.token_id]
    try:
        items = list(segment)
    except TypeError:
        raise TypeError(
            f"{where}: expected str, token ids, Tokens or image bytes, got {type(segment).__name__}"
        ) from None
    ids = []
    for t in items:
        if isinstance(t, Token):
            ids.append(t.token_id)
        elif isinstance(t, int) and not isinstance(t, bool):
            ids.append(t)
        else:
            raise TypeError(f"{where}: expected token ids or Tokens, got {type(t).__name__}")
    return ids


class SampleStream:
    """The async iterator returned by ``AsyncSampler.sample``.

    Iterate it for ``Token``s. Once exhausted, ``stop_reason`` says why it stopped
    ("max_len", "stop_token", "stop_string", "end_of_sequence", "context_full",
    "cancelled"), ``stop_string`` which stop string matched, and ``usage`` the prompt and
    sampled token counts. Breaking out of the loop (or ``aclose()``) stops the engine.
    """

    def __init__(self, stub: SamplerStub, request: SampleRequest):
        self._stub = stub
        self._request = request
        self._call: Optional[SampleCall] = None
        self.finished: Optional[Finished] = None

    @property
    def stop_reason(self) -> Optional[str]:
        return self.finished.stop_reason if self.finished else None

    @property
    def stop_string(self) -> Optional[str]:
        return self.finished.stop_string if self.finished else None

    @property
    def usage(self) -> Optional[Usage]:
        return self.finished.usage if self.finished else None

    def __aiter__(self) -> "SampleStream":
        return self

    async def __anext__(self) -> Token:
        if self.finished is not None:
            raise StopAsyncIteration
        if self._call is None:
            self._call = self._stub.sample(self._request)
        while True:
            try:
                event = await self._call.__anext__()
            except StopAsyncIteration:
                raise RuntimeError("sample stream ended without a finish event") from None
            token = self._take(event)
            if token is not None:
                return token
            if self.finished is not None:
                raise StopAsyncIteration

    def _next_blocking(self) -> Optional[Token]:
        """``__anext__`` in the calling thread, for a stub with ``sample_blocking``
        (events without an event loop); None once exhausted."""
        if self.finished is not None:
            return None
        if self._call is None:
            self._call = self._stub.sample_blocking(self._request)  # type: ignore[attr-defined]
        while True:
            try:
                event = next(self._call)  # type: ignore[call-overload]
            except StopIteration:
                raise RuntimeError("sample stream ended without a finish event") from None
            token = self._take(event)
            if token is not None:
                return token
            if self.finished is not None:
                return None

    def _take(self, event: object) -> Optional[Token]:
        """The token to yield for ``event``, or None (a budget update is logged; a
        ``Finished`` is recorded in ``finished``)."""
        if isinstance(event, Token):
            return event
        if isinstance(event, BudgetUpdate):
            log_budget_update(event)
            return None
        if isinstance(event, Finished):
            self.finished = event
            return None
        raise RuntimeError(f"unexpected sample event {event!r}")

    async def aclose(self) -> None:
        """Stops the generation (if still running)."""
        self._cancel()

    def _cancel(self) -> None:
        if self._call is not None and self.finished is None:
            self._call.cancel()
            self.finished = Finished("cancelled", Usage(0, 0))

    def __del__(self) -> None:
        call = getattr(self, "_call", None)
        if call is not None and getattr(self, "finished", None) is None:
            call.cancel()


class AsyncSampler:
    """Samples from raw models. All methods are asynchronous.

    ``initial_rng_seed``: when a ``sample`` call gets no ``rng_seed``, its seed is
    ``derive_call_seed(initial_rng_seed, n)`` for the n-th such call (counting from 0), a
    SplitMix64-style mix implemented in the engine, so a program's outputs are reproducible
    given its call order. Without an initial seed, one is drawn at random.
    """

    def __init__(self, stub: SamplerStub, initial_rng_seed: Optional[int] = None):
        if initial_rng_seed is None:
            initial_rng_seed = random.SystemRandom().randrange(0, _MAX_SEED)
        if isinstance(initial_rng_seed, bool) or not isinstance(initial_rng_seed, int):
            raise TypeError(f"initial_rng_seed: expected an int, got {type(initial_rng_seed).__name__}")
        if not 0 <= initial_rng_seed <= _MAX_SEED:
            raise ValueError(f"initial_rng_seed: must be in [0, 2**64), got {initial_rng_seed}")
        self._stub = stub
        self._initial_seed = initial_rng_seed
        self._calls = 0
        self._lock = threading.Lock()

    @property
    def initial_rng_seed(self) -> int:
        return self._initial_seed

    def _next_seed(self) -> int:
        with self._lock:
            index = self._calls
            self._calls += 1
        return _engine.derive_call_seed(self._initial_seed, index)

    def sample(
        self,
        *,
        prompt: Union[str, Sequence[int], Sequence[Token], None] = None,
        inputs: Sequence[Union[str, Sequence[int], bytes]] = (),
        model_name: str = "",
        max_len: int = 256,
        temperature: float = 0.7,
        nucleus_p: float = 0.95,
        stop_tokens: Optional[List[str]] = None,
        stop_strings: Optional[List[str]] = None,
        rng_seed: Optional[int] = None,
        return_attention: bool = False,
        allowed_tokens: Optional[Sequence[Union[int, str]]] = None,
        disallowed_tokens: Optional[Sequence[Union[int, str]]] = None,
        augment_tokens: bool = True,
    ) -> SampleStream:
        """Continues the context (``prompt`` followed by ``inputs``) token by token.

        Returns an async iterator of ``Token``; see ``SampleStream`` for the finish reason
        and usage. Bad arguments raise TypeError/ValueError naming the parameter.
        """
        segments: List[InputSegment] = []
        if prompt is not None:
            if prompt != "":
                warnings.warn(
                    "prompt is deprecated; pass the context in inputs instead",
                    DeprecationWarning,
                    stacklevel=2,
                )
            if isinstance(prompt, str):
                if prompt:
                    segments.append(prompt)
            else:
                segments.append(_normalise_segment("prompt", prompt))
        if isinstance(inputs, (str, bytes)):
            raise TypeError("inputs: expected a sequence of inputs, got a single str/bytes (wrap it in a tuple)")
        for i, seg in enumerate(inputs):
            segments.append(_normalise_segment(f"inputs[{i}]", seg))
        if not isinstance(model_name, str):
            raise TypeError(f"model_name: expected a str, got {type(model_name).__name__}")
        if isinstance(max_len, bool) or not isinstance(max_len, int):
            raise TypeError(f"max_len: expected an int, got {type(max_len).__name__}")
        if max_len < 1:
            raise ValueError(f"max_len: must be at least 1, got {max_len}")
        temperature = _check_number("temperature", temperature)
        if not temperature >= 0 or temperature == float("inf"):
            raise ValueError(f"temperature: must be >= 0 and finite, got {temperature}")
        nucleus_p = _check_number("nucleus_p", nucleus_p)
        if not 0 < nucleus_p <= 1:
            raise ValueError(f"nucleus_p: must be in (0, 1], got {nucleus_p}")
        if allowed_tokens is not None and disallowed_tokens is not None:
            raise ValueError("allowed_tokens, disallowed_tokens: give at most one of the two")
        for name, value in (("allowed_tokens", allowed_tokens), ("disallowed_tokens", disallowed_tokens)):
            if isinstance(value, (str, bytes)):
                raise TypeError(f"{name}: expected a list of ids or strings, got a single {type(value).__name__}")
        if rng_seed is None:
            rng_seed = self._next_seed()
        elif isinstance(rng_seed, bool) or not isinstance(rng_seed, int):
            raise TypeError(f"rng_seed: expected an int, got {type(rng_seed).__name__}")
        elif not 0 <= rng_seed <= _MAX_SEED:
            raise ValueError(f"rng_seed: must be in [0, 2**64), got {rng_seed}")
        request = SampleRequest(
            inputs=tuple(segments),
            model_name=model_name,
            max_len=max_len,
            temperature=temperature,
            nucleus_p=nucleus_p,
            stop_tokens=tuple(_check_strings("stop_tokens", stop_tokens)),
            stop_strings=tuple(_check_strings("stop_strings", stop_strings)),
            rng_seed=rng_seed,
            return_attention=bool(return_attention),
            allowed_tokens=None if allowed_tokens is None else tuple(allowed_tokens),
            disallowed_tokens=None if disallowed_tokens is None else tuple(disallowed_tokens),
            augment_tokens=bool(augment_tokens),
        )
        return SampleStream(self._stub, request)

    async def tokenize(self, prompt: str, model_name: str = "") -> List[Token]:
        """The tokens (type PROMPT) the model sees for ``prompt``, BOS included when the
        model's metadata asks for it, special-token text parsed as in ``sample``."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt: expected a str, got {type(prompt).__name__}")
        return await self._stub.tokenize(prompt, model_name)

    async def list_models(self):
        return await self._stub.list_models()


class SyncSampler:
    """Blocking wrapper for scripts: the same arguments, plain iterators.

    Runs a private event loop on a background thread, so it also works where an event
    loop is already running in the calling thread (e.g. Jupyter). A stub that can deliver
    events to a blocked thread (``sample_blocking``, the in-process engine) streams
    straight to the iterating thread instead, without a round trip through that loop per
    token.
    """

    def __init__(self, sampler: AsyncSampler):
        self._async = sampler
        self._blocking = callable(getattr(sampler._stub, "sample_blocking", None))
        # Streams iterated without the loop: close() cancels them, as closing the loop
        # stops the generations that deliver to it.
        self._direct: "weakref.WeakSet[SampleStream]" = weakref.WeakSet()
        self._direct_lock = threading.Lock()
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sampler-sdk-sync", daemon=True)
        self._thread.start()

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def sample(self, **kwargs) -> "SyncSampleStream":
        return SyncSampleStream(self, self._async.sample(**kwargs))

    def tokenize(self, prompt: str, model_name: str = "") -> List[Token]:
        return self._run(self._async.tokenize(prompt, model_name))

    def close(self) -> None:
        self._closed = True
        with self._direct_lock:
            direct = list(self._direct)
        for stream in direct:
            stream._cancel()
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        if not self._loop.is_running() and not self._loop.is_closed():
            self._loop.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class SyncSampleStream:
    """A plain iterator of Tokens; the same ``stop_reason``/``usage`` as ``SampleStream``."""

    def __init__(self, owner: SyncSampler, stream: SampleStream):
        self._owner = owner
        self._stream = stream
        if owner._blocking:
            with owner._direct_lock:
                owner._direct.add(stream)

    def __iter__(self) -> Iterator[Token]:
        return self

    def __next__(self) -> Token:
        if self._owner._blocking:
            if self._owner._closed:
                raise RuntimeError("SyncSampler is closed")
            token = self._stream._next_blocking()
            if token is None:
                raise StopIteration
            return token

        async def step():
            try:
                return await self._stream.__anext__()
            except StopAsyncIteration:
                return None

        token = self._owner._run(step())
        if token is None:
            raise StopIteration
        return token

    def close(self) -> None:
        if self._owner._blocking:
            self._stream._cancel()
        else:
            self._owner._run(self._stream.aclose())

    def __enter__(self) -> "SyncSampleStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def stop_reason(self) -> Optional[str]:
        return self._stream.stop_reason

    @property
    def stop_string(self) -> Optional[str]:
        return self._stream.stop_string

    @property
    def usage(self) -> Optional[Usage]:
        return self._stream.usage

    def text(self) -> str:
        """Consumes the stream and returns the sampled text."""
        return "".join(t.token_str for t in self)
