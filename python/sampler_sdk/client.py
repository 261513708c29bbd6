"""``Client``: picks the transport (in-process engine or a gRPC server) and hands out
samplers that talk to it through one stub interface."""

from __future__ import annotations

import os
from typing import Mapping, Optional, Union

from . import registry
from .sampler import AsyncSampler, SyncSampler

ModelSource = Union[str, "os.PathLike[str]"]


class Client:
    """Entry point of the SDK.

    - ``Client()``: the default model (``smollm2-135m-instruct``), in this process.
    - ``Client("gemma3-270m")`` or ``Client("/path/model.gguf")``: another model; a
      registered name is pulled into the cache on first use.
    - ``Client(models={"small": "smollm2-135m-instruct", "gemma": "gemma3-270m"})``:
      several models, chosen per call with ``model_name`` (the first is the default).
    - ``Client(api_host="localhost:50051", api_key=...)``: a sampler-sdk server.

    ``client.sampler`` is an ``AsyncSampler``; ``client.sync_sampler`` the blocking
    equivalent for scripts.
    """

    def __init__(
        self,
        model: Optional[ModelSource] = None,
        *,
        models: Optional[Mapping[str, ModelSource]] = None,
        api_host: Optional[str] = None,
        api_key: Optional[str] = None,
        initial_rng_seed: Optional[int] = None,
        threads: Optional[int] = None,
        root_certificates: Optional[bytes] = None,
        tokenizer: Union[str, os.PathLike, None] = None,
        kv_cache_type: Optional[str] = None,
    ):
        if model is not None and models is not None:
            raise ValueError("model, models: give at most one of the two")
        if threads is not None:
            if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
                raise ValueError(f"threads: must be a positive int, got {threads!r}")
        if api_host is not None:
            if model is not None or models is not None:
                raise ValueError("model, models: choose models on the server, not with api_host")
            if tokenizer is not None:
                raise ValueError("tokenizer: the server chooses tokenizers, not the api_host client")
            if kv_cache_type is not None:
                raise ValueError("kv_cache_type: the server chooses its cache, not the api_host client")
            from .grpc_stub import GrpcStub

            self._stub = GrpcStub(api_host, api_key=api_key, root_certificates=root_certificates)
        else:
            from .local import LocalStub

            if models is None:
                source = model if model is not None else registry.DEFAULT_MODEL
                name = source if isinstance(source, str) and source in registry.KNOWN_MODELS else os.fspath(source)
                models = {name: source}
            self._stub = LocalStub(dict(models), threads=threads, tokenizer=tokenizer, kv_cache_type=kv_cache_type)
        self.sampler = AsyncSampler(self._stub, initial_rng_seed=initial_rng_seed)
        self._sync: Optional[SyncSampler] = None

    @property
    def sync_sampler(self) -> SyncSampler:
        if self._sync is None:
            self._sync = SyncSampler(self.sampler)
        return self._sync

    def close(self) -> None:
        if self._sync is not None:
            self._sync.close()
            self._sync = None
        close = getattr(self._stub, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
