"""``sampler-sdk serve``: the gRPC server's assembly and lifecycle.

One grpcio asyncio server on one port carries the project's own ``sampler_sdk.v1``
protocol, the xAI API subset and the standard health service. Generation runs on the
engine's threads, so the event loop only moves messages.

Lifecycle: ``SamplerServer.start()`` binds and reports the port (``--port 0`` picks a
free one); SIGTERM or SIGINT marks the server NOT_SERVING, stops accepting calls, gives
in-flight calls ``shutdown_grace`` seconds to finish, then cancels the rest (their
generations stop within one decode step) and writes the budgets out.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .. import _proto
from .auth import ApiKey, AuthInterceptor, BudgetStore, KeyRing
from .logs import log_event
from .scope import Limiter, Runtime, make_wrap
from .service import SamplerService

logger = logging.getLogger("sampler_sdk.server")

#: The official xai-sdk client sends and accepts up to 20 MiB; grpcio's default is 4.
MAX_MESSAGE_BYTES = 20 * 1024 * 1024

#: Transport settings (shared/XAI-API.md section 7). The xai-sdk client pings every 30 s
#: even without calls; grpcio's default policy calls that abuse after ~2 minutes of
#: silence, sends GOAWAY, and the client's retry policy then re-runs the generation.
SERVER_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
    # Our own pings find peers that vanished without closing (their generations stop).
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    # A second server on a busy port must fail, not silently share it.
    ("grpc.so_reuseport", 0),
)

SAMPLER_SERVICE = "sampler_sdk.v1.Sampler"
XAI_SERVICES = ("xai_api.Chat", "xai_api.Sample", "xai_api.Tokenize", "xai_api.Models")


@dataclass
class ServerConfig:
    """What ``sampler-sdk serve`` is asked to run.

    ``models``: served name -> GGUF path or registered model name (None: the name is a
    registered model); the first is the default. ``api_keys`` empty = an open server.
    ``budget_db``: where token budgets persist (None: in memory only).
    """

    models: Mapping[str, Optional[str]]
    port: int = 50051
    host: str = "[::]"
    api_keys: Sequence[ApiKey] = ()
    budget_db: Optional[Path] = None
    max_concurrent: int = 32
    max_queue: int = 256
    tls_cert: Optional[Path] = None
    tls_key: Optional[Path] = None
    shutdown_grace: float = 10.0
    threads: Optional[int] = None
    tokenizer: Optional[Path] = None
    kv_cache_type: Optional[str] = None
    extra_options: Sequence[tuple] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("--model: at least one model is needed")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert, --tls-key: give both or neither")
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port: must be in [0, 65535], got {self.port}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads: must be at least 1, got {self.threads}")
        if self.tokenizer is not None and len(self.models) != 1:
            raise ValueError("--tokenizer: applies to a single --model")
        if self.shutdown_grace < 0:
            raise ValueError(f"--shutdown-grace: must be >= 0, got {self.shutdown_grace}")


class SamplerServer:
    """The server: build with a config (and optionally a ready stub), then ``start``."""

    def __init__(self, config: ServerConfig, stub: Any = None):
        self.config = config
        if stub is None:
            from ..local import LocalStub

            stub = LocalStub(
                dict(config.models),
                threads=config.threads,
                tokenizer=config.tokenizer,
                max_batch=config.max_concurrent,
                kv_cache_type=config.kv_cache_type,
            )
        self.stub = stub
        self.keyring = KeyRing(config.api_keys)
        self.budgets = BudgetStore(config.budget_db)
        self.runtime = Runtime(
            stub=stub,
            keyring=self.keyring,
            budgets=self.budgets,
            limiter=Limiter(config.max_concurrent, config.max_queue),
        )
        self.health = health.aio.HealthServicer()
        self._server: Optional[grpc.aio.Server] = None
        self.port: Optional[int] = None
        self._stopped: Optional[asyncio.Event] = None

    def _services(self) -> List[tuple]:
        services: List[tuple] = [(SAMPLER_SERVICE, SamplerService(self.stub))]
        if hasattr(self.stub, "model"):  # the xAI calls need the loaded models themselves
            from .xai_compat import (
                ChatService,
                ModelsService,
                SampleService,
                TokenizeService,
                XaiCompat,
            )

            compat = XaiCompat(self.stub)
            services += [
                ("xai_api.Chat", ChatService(compat)),
                ("xai_api.Sample", SampleService(compat)),
                ("xai_api.Tokenize", TokenizeService(compat)),
                ("xai_api.Models", ModelsService(compat)),
            ]
        return services

    async def start(self) -> int:
        config = self.config
        server = grpc.aio.server(
            interceptors=[AuthInterceptor(self.keyring)],
            options=list(SERVER_OPTIONS) + list(config.extra_options),
        )
        wrap = make_wrap(self.runtime)
        names = []
        for name, implementation in self._services():
            server.add_generic_rpc_handlers([_proto.method_handlers(name, implementation, wrap)])
            names.append(name)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        address = f"{config.host}:{config.port}"
        if config.tls_cert is not None and config.tls_key is not None:
            credentials = grpc.ssl_server_credentials(
                [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())]
            )
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"--port: cannot bind {address} (in use, or not permitted)")
        await server.start()
        serving = health_pb2.HealthCheckResponse.SERVING
        await self.health.set("", serving)
        for name in names:
            await self.health.set(name, serving)
        self._server = server
        self.port = port
        self._stopped = asyncio.Event()
        log_event(
            "listening",
            address=f"{config.host}:{port}",
            tls=config.tls_cert is not None,
            models=list(config.models),
            keys=len(config.api_keys),
            max_concurrent=config.max_concurrent,
        )
        return port

    async def stop(self, grace: Optional[float] = None) -> None:
        """Graceful stop: NOT_SERVING, refuse new calls, let in-flight ones finish for
        ``grace`` seconds, cancel the rest, persist budgets."""
        if self._server is None:
            return
        server, self._server = self._server, None
        grace = self.config.shutdown_grace if grace is None else grace
        log_event("shutting_down", grace_s=grace)
        await self.health.enter_graceful_shutdown()
        self.runtime.shutting_down = True
        await server.stop(grace)
        # Cancelled handlers still run their cleanup (engine cancel, log line, budget
        # flush); let them, so nothing is charged after the budgets are closed.
        for _ in range(500):
            if self.runtime.in_flight == 0:
                break
            await asyncio.sleep(0.01)
        self.budgets.close()
        log_event("stopped")
        if self._stopped is not None:
            self._stopped.set()

    async def wait_stopped(self) -> None:
        if self._stopped is not None:
            await self._stopped.wait()


async def serve(config: ServerConfig, stub: Any = None) -> int:
    """Runs a server until SIGTERM/SIGINT, then shuts it down gracefully."""
    server = SamplerServer(config, stub)
    port = await server.start()
    print(f"sampler-sdk serve: listening on {config.host}:{port}", flush=True)
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(signum, stop_requested.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - Windows
            signal.signal(signum, lambda *_: loop.call_soon_threadsafe(stop_requested.set))
    await stop_requested.wait()
    await server.stop()
    return 0


def configure_logging(level: int = logging.INFO) -> None:
    """One JSON line per request on stderr (the CLI's choice; a library user configures
    the ``sampler_sdk.server`` logger as they wish)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    server_logger = logging.getLogger("sampler_sdk.server")
    server_logger.handlers[:] = [handler]
    server_logger.setLevel(level)
    server_logger.propagate = False


def parse_model_args(values: Sequence[str]) -> Dict[str, Optional[str]]:
    """``--model`` values: ``NAME`` (registered), ``PATH`` (named by its file stem), or
    ``NAME=PATH``."""
    from .. import registry

    models: Dict[str, Optional[str]] = {}
    for value in values:
        name: str
        source: Optional[str]
        if "=" in value and not Path(value).exists():
            name, source = value.split("=", 1)
            if not name or not source:
                raise ValueError(f"--model: expected NAME=PATH, got {value!r}")
        elif value in registry.KNOWN_MODELS:
            name, source = value, None
        else:
            path = Path(value).expanduser()
            if not path.is_file():
                known = ", ".join(sorted(registry.KNOWN_MODELS))
                raise FileNotFoundError(
                    f"--model: {value!r} is neither a GGUF file nor a known model ({known})"
                )
            name, source = path.stem, str(path)
        if name in models:
            raise ValueError(f"--model: the name {name!r} is given twice")
        models[name] = source
    return models


def default_budget_db(
    api_keys_file: Union[str, Path, None], keys: Sequence[ApiKey]
) -> Optional[Path]:
    """Budgets persist beside the keys file (``KEYS.usage.sqlite``) when any key has one."""
    if api_keys_file is None or not any(k.token_budget is not None for k in keys):
        return None
    path = Path(api_keys_file)
    return path.with_name(path.name + ".usage.sqlite")
