"""What every RPC of the server shares: caller identity, budget charging, the bound on
concurrent generations, error-to-status mapping and the one-line request log.

Service code raises ``RpcFailure`` (or ValueError/TypeError for a bad argument, as the
Python API does) and never touches statuses itself; ``make_wrap`` turns that into the
gRPC answer and logs the call exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional

import grpc
from google.protobuf.message import DecodeError

from ..budget import BudgetUpdate
from .auth import ApiKey, BudgetStore, KeyRing
from .logs import log_request

logger = logging.getLogger("sampler_sdk.server")

#: Trailing metadata naming the Python exception type behind an INVALID_ARGUMENT, so
#: the gRPC client raises what the in-process stub would (TypeError vs ValueError).
ERROR_TYPE_KEY = "sampler-sdk-error-type"


class RpcFailure(Exception):
    """Ends the call with ``code`` and ``details``."""

    def __init__(self, code: grpc.StatusCode, details: str, error_type: Optional[str] = None):
        super().__init__(details)
        self.code = code
        self.details = details
        self.error_type = error_type


def invalid(details: str) -> RpcFailure:
    return RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, details, "ValueError")


class Limiter:
    """At most ``max_active`` generations run at once; up to ``max_waiting`` more wait
    for a turn (in arrival order); past that a request gets RESOURCE_EXHAUSTED at once
    (never UNAVAILABLE, which clients retry by re-sending the request)."""

    def __init__(self, max_active: int, max_waiting: int):
        if max_active < 1:
            raise ValueError(f"--max-concurrent: must be at least 1, got {max_active}")
        if max_waiting < 0:
            raise ValueError(f"--max-queue: must be >= 0, got {max_waiting}")
        self.max_active = max_active
        self.max_waiting = max_waiting
        self._semaphore: Optional[asyncio.Semaphore] = None
        self.active = 0
        self.waiting = 0

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.max_active)
        if self._semaphore.locked() and self.waiting >= self.max_waiting:
            raise RpcFailure(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server busy: {self.active} generations running and {self.waiting} waiting; retry later",
            )
        self.waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self.waiting -= 1
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            self._semaphore.release()


@dataclass
class Runtime:
    """Server-wide state shared by all services."""

    stub: Any  # a LocalStub (xAI services need its models) or any SamplerStub
    keyring: KeyRing
    budgets: BudgetStore
    limiter: Limiter
    budget_update_every: int = 32
    shutting_down: bool = False
    #: Calls whose handler has not finished (including its log line).
    in_flight: int = 0


class RequestScope:
    """One call: who is calling, what it used, how it ended."""

    def __init__(self, runtime: Runtime, method: str, context: Any):
        self.runtime = runtime
        self.method = method
        self.context = context
        # Read now: grpcio's context.peer() on a call that has ended can crash the process.
        self.peer = context.peer()
        remaining = context.time_remaining()
        self.deadline = None if remaining is None else time.monotonic() + remaining
        key = runtime.keyring.identify(context.invocation_metadata())
        if key is None:  # the interceptor already refused it; defence in depth
            raise RpcFailure(
                grpc.StatusCode.UNAUTHENTICATED,
                runtime.keyring.rejection(context.invocation_metadata()),
            )
        self.key: ApiKey = key
        self.model: Optional[str] = None
        self.prompt_tokens = 0
        self.sampled_tokens = 0
        self.started = time.monotonic()

    # -- budgets -------------------------------------------------------------------
    def check_budget(self) -> None:
        if self.runtime.budgets.exhausted(self.key):
            raise self._exhausted()

    def charge(self, tokens: int = 1) -> None:
        """Charges sampled tokens before they are delivered; raises when the budget is spent."""
        if not self.runtime.budgets.try_charge(self.key, tokens):
            raise self._exhausted()
        self.sampled_tokens += tokens

    def _exhausted(self) -> RpcFailure:
        return RpcFailure(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"token budget of API key {self.key.name!r} is spent "
            f"({self.key.token_budget} tokens, {self.runtime.budgets.used(self.key.name)} used)",
        )

    def budget_update(self) -> BudgetUpdate:
        budgets = self.runtime.budgets
        return BudgetUpdate(
            tokens_used=budgets.used(self.key.name),
            tokens_remaining=budgets.remaining(self.key),
            key_name=self.key.name,
        )

    @property
    def reports_budget(self) -> bool:
        """Budget updates go to callers of a keyed server (an open server has none)."""
        return not self.runtime.keyring.open

    def slot(self):
        return self.runtime.limiter.slot()

    # -- ending ------------------------------------------------------------------
    def interrupted_outcome(self) -> str:
        if self.deadline is not None and time.monotonic() >= self.deadline - 0.05:
            return "DEADLINE_EXCEEDED"
        if self.runtime.shutting_down:
            return "CANCELLED_BY_SHUTDOWN"
        return "CANCELLED"

    def log(self, outcome: str, detail: Optional[str] = None) -> None:
        log_request(
            {
                "method": self.method,
                "key": self.key.name,
                "model": self.model,
                "prompt_tokens": self.prompt_tokens,
                "sampled_tokens": self.sampled_tokens,
                "duration_ms": round((time.monotonic() - self.started) * 1000, 1),
                "outcome": outcome,
                "detail": detail,
                "peer": self.peer,
            }
        )


def _parse(request_class: Any, raw: bytes) -> Any:
    try:
        return request_class.FromString(raw)
    except DecodeError as exc:
        raise invalid(f"malformed {request_class.DESCRIPTOR.full_name} message: {exc}") from None


#: Exception types the gRPC client re-raises by name; others map to their nearest base.
CLIENT_ERROR_TYPES = ("ContextOverflowError", "ModelFormatError", "TypeError", "ValueError")


def _error_type(exc: BaseException) -> str:
    for cls in type(exc).__mro__:
        if cls.__name__ in CLIENT_ERROR_TYPES:
            return cls.__name__
    return "ValueError"


def _failure_from(exc: BaseException) -> RpcFailure:
    if isinstance(exc, RpcFailure):
        return exc
    if isinstance(exc, (ValueError, TypeError)):
        return RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, str(exc), _error_type(exc))
    logger.exception("internal error")
    return RpcFailure(grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}): {exc}")


async def _abort(context: Any, failure: RpcFailure) -> None:
    metadata = ((ERROR_TYPE_KEY, failure.error_type),) if failure.error_type else ()
    await context.abort(failure.code, failure.details, trailing_metadata=metadata)


def make_wrap(runtime: Runtime):
    """The ``wrap`` hook of ``_proto.method_handlers``: parse, run, map errors, log.

    Implementations take ``(request, scope)``; streaming ones are async generators.
    """

    def wrap(method: Any, request_class: Any, function: Any):
        path = f"/{method.containing_service.full_name}/{method.name}"

        if method.server_streaming:

            async def streaming(raw: bytes, context: Any):
                scope: Optional[RequestScope] = None
                outcome, detail = "OK", None
                runtime.in_flight += 1
                try:
                    scope = RequestScope(runtime, path, context)
                    request = _parse(request_class, raw)
                    async for response in function(request, scope):
                        yield response
                except (asyncio.CancelledError, GeneratorExit):
                    # grpc.aio ends a stream whose deadline passed or whose client left by
                    # cancelling the task (CancelledError where the handler awaits) or by
                    # closing this generator (GeneratorExit at a `yield`): the same ending.
                    outcome = scope.interrupted_outcome() if scope else "CANCELLED"
                    raise
                except Exception as exc:
                    failure = _failure_from(exc)
                    outcome, detail = failure.code.name, failure.details
                    await _abort(context, failure)
                finally:
                    if scope is not None:
                        scope.log(outcome, detail)
                    runtime.budgets.flush()
                    runtime.in_flight -= 1

            return streaming

        async def unary(raw: bytes, context: Any):
            scope: Optional[RequestScope] = None
            outcome, detail = "OK", None
            runtime.in_flight += 1
            try:
                scope = RequestScope(runtime, path, context)
                request = _parse(request_class, raw)
                return await function(request, scope)
            except asyncio.CancelledError:
                outcome = scope.interrupted_outcome() if scope else "CANCELLED"
                raise
            except Exception as exc:
                failure = _failure_from(exc)
                outcome, detail = failure.code.name, failure.details
                await _abort(context, failure)
            finally:
                if scope is not None:
                    scope.log(outcome, detail)
                runtime.budgets.flush()
                runtime.in_flight -= 1

        return unary

    return wrap
