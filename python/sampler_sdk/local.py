"""The in-process stub: runs the Rust engine and bridges its threads to asyncio.

Generation runs on an engine thread with the GIL released. For each token the engine
briefly takes the GIL to hand the event to a waker thread (``_Waker``), which calls
``loop.call_soon_threadsafe(queue.put_nowait, event)``, so the event loop never blocks and
never polls; other tasks keep running while a sample streams. Closing or abandoning the
iterator cancels the engine, which stops before its next token or prefill chunk.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import binascii
import logging
import os
import queue
import threading
import weakref
from typing import Dict, List, Mapping, Optional, Sequence, Union

from . import _engine, registry
from .stub import Finished, InputSegment, ModelInfo, SampleRequest, Usage
from .token import Token, TokenType

logger = logging.getLogger("sampler_sdk")

# Leading bytes of the image formats a vision model could take.
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"RIFF", b"BM")


def _looks_like_image(data: bytes) -> bool:
    return data.startswith(_IMAGE_MAGIC)


def _decode_base64_image(text: str) -> Optional[bytes]:
    """A str input is an image when it is a data URL or base64 of image bytes."""
    if text.startswith("data:image/"):
        return b"image"
    if len(text) < 16 or any(c.isspace() for c in text[:64]):
        return None
    try:
        raw = base64.b64decode(text[:64] + "=" * (-len(text[:64]) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if _looks_like_image(raw) else None


# Generations still running; at interpreter exit they are cancelled and awaited so no
# engine thread calls into a finalizing interpreter.
_live_generations: "weakref.WeakSet" = weakref.WeakSet()


@atexit.register
def _stop_live_generations() -> None:
    handles = list(_live_generations)
    for handle in handles:
        handle.cancel()
    for handle in handles:
        handle.wait(timeout=10)


class _Waker:
    """Wakes event loops on behalf of engine threads.

    ``call_soon_threadsafe`` writes to the loop's self-pipe, and Python releases the GIL
    around that write: the woken loop thread takes the GIL and handles the token while the
    engine thread, back from the write, waits for the GIL again. Called straight from the
    engine thread, that stalled the decode loop for the whole of the consumer's work on
    every token (0.1-0.5 ms a token, 4-8% of SmolLM2's decode rate). The engine thread
    instead puts the wake-up on a ``SimpleQueue`` (no system call, the GIL kept) and returns
    to computing; this thread, started on first use, makes the call. One thread serves every
    generation and keeps their events in order.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: "queue.SimpleQueue" = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None

    def call_soon_threadsafe(self, loop: asyncio.AbstractEventLoop, callback, arg) -> None:
        if loop.is_closed():
            # The consumer is gone: raising tells the engine to stop.
            raise RuntimeError("Event loop is closed")
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    thread = threading.Thread(target=self._run, name="sampler-sdk-waker", daemon=True)
                    thread.start()
                    self._thread = thread
        self._queue.put((loop, callback, arg))

    def _run(self) -> None:
        while True:
            loop, callback, arg = self._queue.get()
            try:
                loop.call_soon_threadsafe(callback, arg)
            except RuntimeError:
                # The loop closed after the event was queued; its consumer is gone, and the
                # engine stops at that generation's next event.
                pass
            del loop, callback, arg


_waker = _Waker()


class LoadedModel:
    """A model plus the tokenizer helpers the stub needs."""

    def __init__(self, name: str, engine: "_engine.Model"):
        self.name = name
        self.engine = engine

    def piece_text(self, token_id: int) -> str:
        return self.engine.token_bytes(token_id).decode("utf-8", errors="replace")

    def single_token(self, text: str) -> Optional[int]:
        ids = self.engine.tokenize(text, add_special=False, parse_special=True)
        return ids[0] if len(ids) == 1 else None

    def context_ids(self, inputs: Sequence[InputSegment]) -> List[int]:
        ids: List[int] = []
        for i, segment in enumerate(inputs):
            where = f"inputs[{i}]"
            if isinstance(segment, (bytes, bytearray, memoryview)):
                raise ValueError(
                    f"{where}: model {self.name!r} is text-only and cannot take an image"
                )
            if isinstance(segment, str):
                if _decode_base64_image(segment) is not None:
                    raise ValueError(
                        f"{where}: model {self.name!r} is text-only and cannot take an image "
                        "(the string is a base64-encoded image)"
                    )
                ids.extend(self.engine.tokenize(segment, add_special=False, parse_special=True))
                continue
            seg = list(segment)
            self._check_ids(seg, where)
            ids.extend(seg)
        bos = self.engine.bos_id
        if self.engine.add_bos and bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        return ids

    def _check_ids(self, ids: Sequence[int], where: str) -> None:
        n = self.engine.n_vocab
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int):
                raise TypeError(f"{where}: token ids must be ints, got {type(t).__name__}")
            if not 0 <= t < n:
                raise ValueError(f"{where}: token id {t} is outside the vocabulary of {n} tokens")

    def token_set(
        self, tokens: Sequence[Union[int, str]], param: str, augment: bool
    ) -> List[int]:
        """Ids for allowed/disallowed tokens: ints as given, strings (and, with augment,
        their leading-space variants) where they are exactly one token."""
        out: List[int] = []
        for t in tokens:
            if isinstance(t, str):
                variants = [t, " " + t] if augment and not t.startswith(" ") else [t]
                found = [v for v in variants if self.single_token(v) is not None]
                for v in variants:
                    tid = self.single_token(v)
                    if tid is None:
                        logger.debug("%s: %r is not a single token; ignored", param, v)
                    else:
                        out.append(tid)
                if not found:
                    logger.debug("%s: %r maps to no single token", param, t)
            elif isinstance(t, int) and not isinstance(t, bool):
                self._check_ids([t], param)
                out.append(t)
            else:
                raise TypeError(f"{param}: expected token ids or strings, got {type(t).__name__}")
        return sorted(set(out))

    def to_token(self, token_id: int, prob: float = 0.0, token_type=TokenType.SAMPLED) -> Token:
        raw = self.engine.token_bytes(token_id)
        return Token(
            token_id=token_id,
            token_str=raw.decode("utf-8", errors="replace"),
            prob=prob,
            token_type=token_type,
            token_bytes=raw,
        )

    def info(self) -> ModelInfo:
        e = self.engine
        return ModelInfo(
            name=self.name,
            architecture=e.architecture,
            n_vocab=e.n_vocab,
            context_length=e.n_ctx_train,
            path=str(e.path),
        )


class _LocalCall:
    """One engine generation: starts it, and turns its raw events into sample events.

    Subclasses set up the queue ``_on_event`` feeds before calling ``__init__``.
    """

    def __init__(self, model: LoadedModel, request: SampleRequest):
        self._model = model
        self._done = False
        self._stop_strings = list(request.stop_strings)
        engine = model.engine
        context = model.context_ids(request.inputs)
        stop_ids = []
        for s in request.stop_tokens:
            tid = model.single_token(s)
            if tid is None:
                logger.debug("stop_tokens: %r is not exactly one token; ignored", s)
            else:
                stop_ids.append(tid)
        allowed = disallowed = None
        if request.allowed_tokens is not None:
            allowed = model.token_set(request.allowed_tokens, "allowed_tokens", request.augment_tokens)
            if not allowed:
                raise ValueError("allowed_tokens: none of the given tokens is a single token of this model")
        if request.disallowed_tokens is not None:
            disallowed = model.token_set(
                request.disallowed_tokens, "disallowed_tokens", request.augment_tokens
            )
        self._handle = engine.generate(
            context,
            self._on_event,
            max_len=request.max_len,
            temperature=request.temperature,
            nucleus_p=request.nucleus_p,
            seed=request.rng_seed,
            allowed_tokens=allowed,
            disallowed_tokens=disallowed,
            stop_token_ids=stop_ids,
            stop_strings=self._stop_strings,
            return_attention=request.return_attention,
        )
        _live_generations.add(self._handle)

    def _on_event(self, kind: str, payload: object) -> None:
        raise NotImplementedError

    def _event(self, kind: str, payload):
        """The sample event for one engine event; raises the engine's error."""
        if kind == "token":
            return self._token(payload)
        self._done = True
        # The engine thread is past its last event; let it finish leaving Python.
        self._handle.wait()
        if kind == "error":
            raise payload  # type: ignore[misc]
        return self._finished(payload)  # type: ignore[arg-type]

    def _token(self, payload) -> Token:
        token_id, raw, text, prob, logprob, top_k, attention = payload
        return Token(
            token_id=token_id,
            token_str=text,
            prob=prob,
            top_k=[self._model.to_token(i, p) for i, p in top_k],
            attention=attention,
            token_type=TokenType.SAMPLED,
            token_bytes=raw,
            logprob=logprob,
        )

    def _finished(self, d: dict) -> Finished:
        index = d.get("stop_string_index")
        return Finished(
            stop_reason=d["stop_reason"],
            usage=Usage(prompt_tokens=d["prompt_tokens"], sampled_tokens=d["sampled_tokens"]),
            stop_string=self._stop_strings[index] if index is not None else None,
            stop_token_id=d.get("stop_token_id"),
        )

    def cancel(self) -> None:
        if not self._done:
            self._handle.cancel()

    def __del__(self) -> None:
        handle = getattr(self, "_handle", None)
        if handle is not None and not handle.finished:
            handle.cancel()


class LocalSampleCall(_LocalCall):
    """Async iterator over one engine generation's events."""

    def __init__(self, model: LoadedModel, request: SampleRequest):
        self._loop = asyncio.get_running_loop()
        self._queue: "asyncio.Queue[tuple]" = asyncio.Queue()
        super().__init__(model, request)

    def _on_event(self, kind: str, payload: object) -> None:
        # Runs on the engine thread. If the loop is closed this raises, which tells the
        # engine its consumer is gone.
        _waker.call_soon_threadsafe(self._loop, self._queue.put_nowait, (kind, payload))

    def __aiter__(self) -> "LocalSampleCall":
        return self

    async def __anext__(self):
        if self._done:
            raise StopAsyncIteration
        try:
            kind, payload = await self._queue.get()
        except BaseException:
            self.cancel()
            raise
        return self._event(kind, payload)


class BlockingLocalSampleCall(_LocalCall):
    """Plain iterator over one engine generation's events, for the synchronous API.

    The engine thread puts each event on a ``SimpleQueue`` (no system call when nobody
    waits, one futex wake when the consumer does; the GIL kept) and the consuming thread
    takes it from there: one hand-off a token, where going through an event loop took
    four (engine -> waker -> loop -> the thread blocked on the loop's future, plus the
    caller's request to the loop). Events stay in order; the consumer being gone shows as
    ``cancel`` (``SampleStream.__del__``, ``SyncSampler.close``).
    """

    def __init__(self, model: LoadedModel, request: SampleRequest):
        self._queue: "queue.SimpleQueue[tuple]" = queue.SimpleQueue()
        super().__init__(model, request)

    def _on_event(self, kind: str, payload: object) -> None:
        # Runs on the engine thread.
        self._queue.put((kind, payload))

    def __iter__(self) -> "BlockingLocalSampleCall":
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        try:
            kind, payload = self._queue.get()
        except BaseException:
            self.cancel()
            raise
        return self._event(kind, payload)


class LocalStub:
    """Serves sample/tokenize/list_models from models loaded in this process."""

    def __init__(
        self,
        models: Mapping[str, Union[str, os.PathLike, None]],
        default: Optional[str] = None,
        threads: Optional[int] = None,
        tokenizer: Union[str, os.PathLike, None] = None,
        max_batch: Optional[int] = None,
        kv_cache_type: Optional[str] = None,
    ):
        """`tokenizer`: a SentencePiece ``.model`` file replacing the GGUF's vocabulary (one
        model only); `max_batch`: generations each model decodes together at most;
        `kv_cache_type`: ``"f16"`` (the default, as llama.cpp's) or ``"f32"``."""
        if not models:
            raise ValueError("models: at least one model is needed")
        if tokenizer is not None and len(models) != 1:
            raise ValueError("tokenizer: a tokenizer file applies to exactly one model")
        tokenizer = None if tokenizer is None else os.fspath(tokenizer)
        self._models: Dict[str, LoadedModel] = {}
        for name, source in models.items():
            path = registry.resolve(source if source is not None else name)
            engine = _engine.Model(
                str(path), threads=threads, tokenizer=tokenizer, max_batch=max_batch, kv_cache_type=kv_cache_type
            )
            self._models[name] = LoadedModel(name, engine)
        self.default = default or next(iter(self._models))
        if self.default not in self._models:
            raise ValueError(f"model_name: default model {self.default!r} is not among the loaded models")

    def model(self, model_name: str) -> LoadedModel:
        name = model_name or self.default
        try:
            return self._models[name]
        except KeyError:
            known = ", ".join(sorted(self._models))
            raise ValueError(f"model_name: unknown model {name!r}; this client serves: {known}") from None

    def sample(self, request: SampleRequest) -> LocalSampleCall:
        return LocalSampleCall(self.model(request.model_name), request)

    def sample_blocking(self, request: SampleRequest) -> BlockingLocalSampleCall:
        """``sample`` for a thread that blocks on each event rather than awaiting it
        (``SyncSampler``); needs no event loop."""
        return BlockingLocalSampleCall(self.model(request.model_name), request)

    async def tokenize(self, text: str, model_name: str = "") -> List[Token]:
        model = self.model(model_name)
        ids = await asyncio.to_thread(model.engine.tokenize, text, True, True)
        return [model.to_token(i, token_type=TokenType.PROMPT) for i in ids]

    async def list_models(self) -> List[ModelInfo]:
        return [m.info() for m in self._models.values()]
