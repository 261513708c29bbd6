"""The ``sampler_sdk.v1.Sampler`` service: the Sampler API over gRPC.

It serves any ``SamplerStub`` (normally the in-process ``LocalStub``), so a remote
``AsyncSampler`` sees exactly the events an in-process one does: the same tokens for the
same seed, the same stop semantics, the same Finished event.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, AsyncIterator

from .._proto import sampler as pb
from .._proto.convert import (
    budget_to_proto,
    finished_to_proto,
    model_to_proto,
    request_from_proto,
    token_to_proto,
)
from ..budget import BudgetUpdate
from ..stub import Finished, SampleRequest
from ..token import Token
from .scope import RequestScope, RpcFailure

# -- the service ---------------------------------------------------------------------


class SamplerService:
    """Implements ``sampler_sdk.v1.Sampler`` over a ``SamplerStub``."""

    def __init__(self, stub: Any):
        self._stub = stub

    def _model_name(self, name: str) -> str:
        return name or getattr(self._stub, "default", "")

    async def _tokenized(self, request: SampleRequest) -> SampleRequest:
        """The request with its context already tokenized, off the event loop.

        The in-process stub tokenizes text inputs when a call starts, on the calling
        thread; for a server that is the event loop, which a long prompt (messages may
        be 20 MiB) would stall for every other call. Same function, same ids: the stub
        then sees token ids it only checks.
        """
        if not hasattr(self._stub, "model") or not any(isinstance(s, str) for s in request.inputs):
            return request
        model = self._stub.model(request.model_name)
        ids = await asyncio.to_thread(model.context_ids, list(request.inputs))
        limit = model.engine.n_ctx_train
        if len(ids) >= limit:  # the engine's own rule and message, without the id checks
            from .._engine import ContextOverflowError

            raise ContextOverflowError(
                f"prompt of {len(ids)} tokens does not fit the context of {limit} tokens"
            )
        return dataclasses.replace(request, inputs=(ids,))

    async def Sample(self, request: Any, scope: RequestScope) -> AsyncIterator[Any]:
        sample_request = request_from_proto(request)
        scope.model = self._model_name(sample_request.model_name)
        scope.check_budget()
        sample_request = await self._tokenized(sample_request)
        every = scope.runtime.budget_update_every
        async with scope.slot():
            call = self._stub.sample(sample_request)
            finished = False
            try:
                async for event in call:
                    if isinstance(event, Token):
                        try:
                            scope.charge(1)
                        except RpcFailure:
                            # Tell the caller where the budget stands before failing.
                            yield pb.SampleResponse(budget=budget_to_proto(scope.budget_update()))
                            raise
                        yield pb.SampleResponse(token=token_to_proto(event))
                        if (
                            scope.reports_budget
                            and scope.key.token_budget is not None
                            and scope.sampled_tokens % every == 0
                        ):
                            yield pb.SampleResponse(budget=budget_to_proto(scope.budget_update()))
                    elif isinstance(event, Finished):
                        finished = True
                        scope.prompt_tokens = event.usage.prompt_tokens
                        if scope.reports_budget:
                            yield pb.SampleResponse(budget=budget_to_proto(scope.budget_update()))
                        yield pb.SampleResponse(finished=finished_to_proto(event))
                    elif isinstance(event, BudgetUpdate):
                        # A stub that is itself remote: its budget is not this caller's.
                        continue
            finally:
                if not finished:
                    call.cancel()

    async def Tokenize(self, request: Any, scope: RequestScope) -> Any:
        scope.model = self._model_name(request.model_name)
        tokens = await self._stub.tokenize(request.text, request.model_name)
        scope.prompt_tokens = len(tokens)
        return pb.TokenizeResponse(
            tokens=[token_to_proto(t) for t in tokens],
            model_name=scope.model,
        )

    async def ListModels(self, request: Any, scope: RequestScope) -> Any:
        models = await self._stub.list_models()
        return pb.ListModelsResponse(
            models=[model_to_proto(m) for m in models],
            default_model=getattr(self._stub, "default", ""),
        )
