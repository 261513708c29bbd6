"""The gRPC server behind ``sampler-sdk serve``.

- ``app``: ``ServerConfig``, ``SamplerServer`` (start/stop), ``serve`` (run until SIGTERM);
- ``service``: the project's own ``sampler_sdk.v1.Sampler`` service;
- ``xai_compat``: the xAI API subset (Chat, Sample, Tokenize, Models) for ``xai-sdk``;
- ``auth``: API keys, token budgets (SQLite), the authentication interceptor;
- ``scope``: per-call bookkeeping, concurrency bound, error-to-status mapping;
- ``logs``: one JSON line per request.

Importing this package is cheap; the pieces load grpc and the engine when used.
"""

from __future__ import annotations

__all__ = ["ServerConfig", "SamplerServer", "serve"]


def __getattr__(name: str):
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
