"""Helpers for the gRPC tests: a `sampler-sdk serve` subprocess and an in-process server.

Servers bind loopback only, on a port the OS picks (`--port 0`), and are always stopped
by the test that started them.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import grpc

MODEL_NAME = "smollm2-135m-instruct"
START_TIMEOUT = 120.0


class ServerProcess:
    """`sampler-sdk serve` in a subprocess; its JSON log lines are read from stderr."""

    def __init__(
        self, model_path: Path, args: Sequence[str] = (), log_dir: Optional[Path] = None, env=None
    ):
        self.log_path = (
            Path(log_dir or Path.cwd()) / f"serve-{os.getpid()}-{time.monotonic_ns()}.log"
        )
        self._log = open(self.log_path, "w")
        command = [
            sys.executable,
            "-m",
            "sampler_sdk.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--model",
            f"{MODEL_NAME}={model_path}",
            *args,
        ]
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.port = self._wait_for_port()
        self.address = f"localhost:{self.port}"

    def _wait_for_port(self) -> int:
        found: List[int] = []

        def read() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                if "listening on" in line:
                    found.append(int(line.rsplit(":", 1)[1]))
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(START_TIMEOUT)
        if not found:
            self.process.kill()
            raise RuntimeError(f"server did not start; log:\n{self.log_path.read_text()}")
        return found[0]

    def log_lines(self) -> List[Dict[str, Any]]:
        lines = []
        for line in self.log_path.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
        return lines

    def requests(self, method_suffix: str = "") -> List[Dict[str, Any]]:
        return [
            r
            for r in self.log_lines()
            if r.get("event") == "request" and r.get("method", "").endswith(method_suffix)
        ]

    def wait_for_request(
        self, method_suffix: str, count: int = 1, timeout: float = 30.0
    ) -> List[Dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.requests(method_suffix)
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(
            f"no log line for {method_suffix} after {timeout}s; log:\n{self.log_path.read_text()}"
        )

    def wait_for_line(self, predicate, timeout: float = 30.0) -> Dict[str, Any]:
        """The first log line satisfying ``predicate`` (lines are written when a call
        has ended, which can be just after the client saw its status)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log_lines():
                if predicate(line):
                    return line
            time.sleep(0.05)
        raise AssertionError(
            f"no such log line after {timeout}s; log:\n{self.log_path.read_text()}"
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
                raise
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log.close()
        return self.process.returncode


def health_status(
    address: str, credentials: Optional[grpc.ChannelCredentials] = None, timeout: float = 10.0
) -> str:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = (
        grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    )
    with channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=timeout
        )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


class InProcessServer:
    """A `SamplerServer` on its own event loop thread, for tests that inspect the
    server's engine state (e.g. that a cancelled generation really stopped)."""

    def __init__(self, config: Any, stub: Any):
        from sampler_sdk.server.app import SamplerServer

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="test-grpc-server", daemon=True
        )
        self.thread.start()
        self.server = SamplerServer(config, stub)
        self.port = self._run(self.server.start())
        self.address = f"localhost:{self.port}"

    def _run(self, coro: Any, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 2.0) -> None:
        try:
            self._run(self.server.stop(grace))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()
