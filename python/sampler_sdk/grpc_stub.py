"""The gRPC stub: the ``SamplerStub`` interface over a ``sampler-sdk serve`` server.

``Client(api_host="localhost:50051", api_key=...)`` puts this under an ``AsyncSampler``,
which then behaves exactly as with the in-process stub: same tokens for the same seed,
same Finished event, same exceptions for bad arguments (the server names the Python
exception type of an INVALID_ARGUMENT in trailing metadata). Budget updates the server
interleaves with the tokens reach ``log_budget_update`` through ``SampleStream``.

Transport: ``api_host`` is ``host:port``, optionally prefixed with ``https://`` (TLS) or
``http://`` (plain text). Without a prefix, a loopback host (localhost, 127.x, ::1) is
plain text and any other host is TLS, so an API key never crosses a network in clear
text by default. ``root_certificates`` (PEM bytes) selects TLS with those roots.

Each asyncio event loop that uses the stub gets its own channel (a grpc.aio channel
belongs to the loop that created it); the sync sampler's private loop is one of them.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from typing import Any, List, Optional, Sequence, Tuple

import grpc

from . import _proto
from ._proto import convert
from .stub import ModelInfo, SampleRequest
from .token import Token

#: Trailing metadata key carrying the Python exception type of an INVALID_ARGUMENT
#: (the server side is ``server/scope.py``).
ERROR_TYPE_KEY = "sampler-sdk-error-type"

#: The server accepts up to 20 MiB per message, the same as the xAI API.
MAX_MESSAGE_BYTES = 20 * 1024 * 1024

CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.primary_user_agent", "sampler-sdk"),
)

SAMPLER_SERVICE = "sampler_sdk.v1.Sampler"


class RemoteError(RuntimeError):
    """A call the server ended with a gRPC status other than OK."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class AuthenticationError(RemoteError, PermissionError):
    """UNAUTHENTICATED: the server does not know the API key (or got none)."""


class ResourceExhaustedError(RemoteError):
    """RESOURCE_EXHAUSTED: the key's token budget is spent, the server is busy, or a
    message is larger than the server accepts."""


class DeadlineExceededError(RemoteError, TimeoutError):
    """DEADLINE_EXCEEDED: the call's timeout passed."""


_BY_CODE = {
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}


def _argument_error(name: Optional[str], details: str) -> Exception:
    if name in ("ContextOverflowError", "ModelFormatError"):
        from . import _engine

        return getattr(_engine, name)(details)
    if name == "TypeError":
        return TypeError(details)
    return ValueError(details)


def translate_error(error: grpc.RpcError) -> Exception:
    """The exception the in-process stub would raise for the same failure."""
    code = error.code()
    details = error.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        error_type = None
        for key, value in error.trailing_metadata() or ():
            if key == ERROR_TYPE_KEY:
                error_type = value.decode() if isinstance(value, bytes) else value
        return _argument_error(error_type, details)
    return _BY_CODE.get(code, RemoteError)(code, details)


_LOOPBACK_HOSTS = ("localhost", "::1", "[::1]", "ip6-localhost")


def _is_loopback(host: str) -> bool:
    host = host.lower()
    return host in _LOOPBACK_HOSTS or host.startswith("127.")


def parse_target(api_host: str) -> Tuple[str, Optional[bool]]:
    """``(target, tls)``: tls is True/False when the prefix says so, else None."""
    if not isinstance(api_host, str) or not api_host.strip():
        raise ValueError(f"api_host: expected 'host:port', got {api_host!r}")
    target = api_host.strip()
    tls: Optional[bool] = None
    for prefix, value in (
        ("https://", True),
        ("http://", False),
        ("grpcs://", True),
        ("grpc://", False),
    ):
        if target.lower().startswith(prefix):
            target, tls = target[len(prefix) :], value
            break
    target = target.rstrip("/")
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(
            f"api_host: expected 'host:port' (e.g. 'localhost:50051'), got {api_host!r}"
        )
    return target, tls


class GrpcSampleCall:
    """One remote sample: an async iterator of Token / BudgetUpdate / Finished."""

    def __init__(self, stub: "GrpcStub", request: SampleRequest):
        message = convert.request_to_proto(request)  # bad types raise here, at once
        self._call = stub._callable("Sample", streaming=True)(
            message, metadata=stub._metadata, timeout=stub.timeout
        )
        self._done = False

    def __aiter__(self) -> "GrpcSampleCall":
        return self

    async def __anext__(self) -> Any:
        if self._done:
            raise StopAsyncIteration
        try:
            response = await self._call.read()
        except asyncio.CancelledError:
            self.cancel()
            raise
        except grpc.RpcError as error:
            self._done = True
            raise translate_error(error) from None
        if response is grpc.aio.EOF:
            self._done = True
            raise StopAsyncIteration
        kind = response.WhichOneof("event")
        if kind == "token":
            return Token.from_proto(response.token)
        if kind == "budget":
            return convert.budget_from_proto(response.budget)
        if kind == "finished":
            self._done = True
            return convert.finished_from_proto(response.finished)
        raise RemoteError(
            grpc.StatusCode.UNKNOWN, f"unexpected sample event {kind!r} (a newer server?)"
        )

    def cancel(self) -> None:
        if not self._done:
            self._done = True
            try:
                self._call.cancel()
            except RuntimeError:  # its event loop is already closed: nothing left to stop
                pass


class GrpcStub:
    """``SamplerStub`` over gRPC; see the module docstring for the transport rules.

    ``timeout``: seconds allowed per call (a gRPC deadline), None = no limit.
    ``options``: extra grpc channel options.
    """

    def __init__(
        self,
        api_host: str,
        *,
        api_key: Optional[str] = None,
        root_certificates: Optional[bytes] = None,
        timeout: Optional[float] = None,
        options: Sequence[Tuple[str, Any]] = (),
    ):
        target, tls = parse_target(api_host)
        if tls is None:
            tls = root_certificates is not None or not _is_loopback(target.rpartition(":")[0])
        elif tls is False and root_certificates is not None:
            raise ValueError("root_certificates: given, but api_host asks for plain text (http://)")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout: must be a positive number of seconds, got {timeout}")
        self.target = target
        self.tls = tls
        self.timeout = timeout
        self._root_certificates = root_certificates
        self._metadata: Tuple[Tuple[str, str], ...] = (
            (("authorization", f"Bearer {api_key}"),) if api_key else ()
        )
        self._options = list(CHANNEL_OPTIONS) + list(options)
        self._channels: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, grpc.aio.Channel]" = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()

    def _channel(self) -> "grpc.aio.Channel":
        loop = asyncio.get_running_loop()
        with self._lock:
            channel = self._channels.get(loop)
            if channel is None:
                if self.tls:
                    credentials = grpc.ssl_channel_credentials(
                        root_certificates=self._root_certificates
                    )
                    channel = grpc.aio.secure_channel(
                        self.target, credentials, options=self._options
                    )
                else:
                    channel = grpc.aio.insecure_channel(self.target, options=self._options)
                self._channels[loop] = channel
            return channel

    def _callable(self, method: str, streaming: bool) -> Any:
        make = _proto.unary_stream if streaming else _proto.unary_unary
        return make(self._channel(), SAMPLER_SERVICE, method)

    async def _unary(self, method: str, request: Any) -> Any:
        try:
            return await self._callable(method, streaming=False)(
                request, metadata=self._metadata, timeout=self.timeout
            )
        except grpc.RpcError as error:
            raise translate_error(error) from None

    # -- SamplerStub -------------------------------------------------------------------
    def sample(self, request: SampleRequest) -> GrpcSampleCall:
        return GrpcSampleCall(self, request)

    async def tokenize(self, text: str, model_name: str = "") -> List[Token]:
        response = await self._unary(
            "Tokenize", _proto.sampler.TokenizeRequest(text=text, model_name=model_name)
        )
        return [Token.from_proto(t) for t in response.tokens]

    async def list_models(self) -> List[ModelInfo]:
        response = await self._unary("ListModels", _proto.sampler.ListModelsRequest())
        return [convert.model_from_proto(m) for m in response.models]

    # -- extras ----------------------------------------------------------------------
    async def health(self, service: str = "") -> str:
        """The server's health status name ("SERVING", "NOT_SERVING", ...)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel())
        try:
            response = await stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=self.timeout or 10
            )
        except grpc.RpcError as error:
            raise translate_error(error) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    async def aclose(self) -> None:
        """Closes the channel of the running loop (others: see ``close``)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            channel = self._channels.pop(loop, None)
        if channel is not None:
            await channel.close()

    def close(self) -> None:
        """Closes every channel whose loop is still usable."""
        with self._lock:
            channels = list(self._channels.items())
            self._channels.clear()
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        for loop, channel in channels:
            if loop.is_closed():
                continue
            if loop is current:
                loop.create_task(channel.close())
            elif loop.is_running():
                asyncio.run_coroutine_threadsafe(channel.close(), loop)
            else:
                loop.run_until_complete(channel.close())
