"""API keys, per-key token budgets, and the interceptor that turns unknown keys away.

Keys file: one key per line, ``KEY NAME [TOKEN_BUDGET]``; blank lines and ``#``
comments are skipped. A key without a budget is unlimited. ``TOKEN_BUDGET`` counts
sampled tokens (prompt tokens are free): every token a generation delivers for the key
is charged exactly once, and a key whose budget is spent gets RESOURCE_EXHAUSTED.

Budgets are kept in memory (the event loop is the only writer, so a charge is atomic
with respect to every other request) and written to a small SQLite file after each
request, every second while tokens flow, and at shutdown, so a restart does not reset
them. One server process owns one budget file.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import grpc

from .logs import log_request

logger = logging.getLogger("sampler_sdk.server")

#: Methods any caller may use without a key: load balancers and orchestrators probe
#: health without credentials.
UNAUTHENTICATED_PREFIXES = ("/grpc.health.v1.Health/",)


@dataclass(frozen=True)
class ApiKey:
    key: str
    name: str
    token_budget: Optional[int] = None

    def __repr__(self) -> str:  # never print the secret
        return f"ApiKey(name={self.name!r}, token_budget={self.token_budget!r})"


#: The identity of every caller of a server started without keys.
ANONYMOUS = ApiKey(key="", name="anonymous")


def parse_api_keys(text: str, source: str = "<api keys>") -> List[ApiKey]:
    """Parses ``KEY NAME [TOKEN_BUDGET]`` lines; errors name the source and line."""
    keys: List[ApiKey] = []
    seen_keys: Dict[str, int] = {}
    seen_names: Dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        content = line.split("#", 1)[0].strip()
        if not content:
            continue
        where = f"{source}:{number}"
        fields = content.split()
        if len(fields) not in (2, 3):
            raise ValueError(
                f"{where}: expected 'KEY NAME [TOKEN_BUDGET]', got {len(fields)} fields"
            )
        key, name = fields[0], fields[1]
        budget: Optional[int] = None
        if len(fields) == 3:
            try:
                budget = int(fields[2])
            except ValueError:
                raise ValueError(
                    f"{where}: TOKEN_BUDGET must be an integer, got {fields[2]!r}"
                ) from None
            if budget < 0:
                raise ValueError(f"{where}: TOKEN_BUDGET must be >= 0, got {budget}")
        if key in seen_keys:
            raise ValueError(f"{where}: this key is already given on line {seen_keys[key]}")
        if name in seen_names:
            raise ValueError(
                f"{where}: key name {name!r} is already used on line {seen_names[name]}"
            )
        seen_keys[key] = seen_names[name] = number
        keys.append(ApiKey(key=key, name=name, token_budget=budget))
    return keys


def load_api_keys(path: Union[str, Path]) -> List[ApiKey]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"--api-keys: no such file: {path}") from None
    return parse_api_keys(text, str(path))


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class KeyRing:
    """Resolves the ``authorization: Bearer KEY`` metadata of a call to an ``ApiKey``.

    No keys = an open server: every caller (with any key, or none) is ``ANONYMOUS``.
    Keys are looked up by their SHA-256, so lookup time does not depend on how much of
    a guessed key is right.
    """

    def __init__(self, keys: Sequence[ApiKey] = ()):
        self._by_digest: Dict[bytes, ApiKey] = {}
        names = set()
        for k in keys:
            if k.name in names:
                raise ValueError(f"api keys: key name {k.name!r} is used twice")
            names.add(k.name)
            self._by_digest[_digest(k.key)] = k
        self.keys: Tuple[ApiKey, ...] = tuple(keys)

    @property
    def open(self) -> bool:
        return not self._by_digest

    @staticmethod
    def bearer(metadata: Optional[Iterable[Tuple[str, Union[str, bytes]]]]) -> Optional[str]:
        for name, value in metadata or ():
            if name.lower() != "authorization":
                continue
            if isinstance(value, bytes):
                value = value.decode("utf-8", errors="replace")
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        return None

    def identify(self, metadata) -> Optional[ApiKey]:
        """The caller's key, ANONYMOUS on an open server, None for an unknown/missing key."""
        if self.open:
            return ANONYMOUS
        token = self.bearer(metadata)
        if token is None:
            return None
        return self._by_digest.get(_digest(token))

    def rejection(self, metadata) -> str:
        if self.bearer(metadata) is None:
            return "missing API key: send the metadata 'authorization: Bearer <key>'"
        return "unknown API key"


class BudgetStore:
    """Tokens used per key name; persisted in SQLite when ``path`` is given."""

    def __init__(self, path: Union[str, Path, None] = None, flush_interval: float = 1.0):
        self._lock = threading.Lock()
        self._used: Dict[str, int] = {}
        self._dirty: set = set()
        self._flush_interval = flush_interval
        self._last_flush = time.monotonic()
        self._db: Optional[sqlite3.Connection] = None
        self.path = Path(path) if path is not None else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                str(self.path), check_same_thread=False, isolation_level=None
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS token_usage (key_name TEXT PRIMARY KEY, tokens_used INTEGER NOT NULL)"
            )
            for name, used in self._db.execute("SELECT key_name, tokens_used FROM token_usage"):
                self._used[name] = int(used)

    def used(self, name: str) -> int:
        return self._used.get(name, 0)

    def remaining(self, key: ApiKey) -> Optional[int]:
        if key.token_budget is None:
            return None
        return max(0, key.token_budget - self.used(key.name))

    def exhausted(self, key: ApiKey) -> bool:
        remaining = self.remaining(key)
        return remaining is not None and remaining <= 0

    def try_charge(self, key: ApiKey, tokens: int = 1) -> bool:
        """Charges ``tokens`` to ``key`` unless that would pass its budget."""
        with self._lock:
            used = self._used.get(key.name, 0)
            if key.token_budget is not None and used + tokens > key.token_budget:
                return False
            self._used[key.name] = used + tokens
            self._dirty.add(key.name)
        if time.monotonic() - self._last_flush >= self._flush_interval:
            self.flush()
        return True

    def flush(self) -> None:
        with self._lock:
            self._last_flush = time.monotonic()
            if self._db is None or not self._dirty:
                self._dirty.clear()
                return
            rows = [(name, self._used[name]) for name in sorted(self._dirty)]
            self._dirty.clear()
            try:
                self._db.execute("BEGIN")
                self._db.executemany(
                    "INSERT INTO token_usage (key_name, tokens_used) VALUES (?, ?) "
                    "ON CONFLICT(key_name) DO UPDATE SET tokens_used = excluded.tokens_used",
                    rows,
                )
                self._db.execute("COMMIT")
            except sqlite3.Error:
                logger.exception("cannot write token budgets to %s; will retry", self.path)
                self._dirty.update(name for name, _ in rows)
                try:
                    self._db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass

    def close(self) -> None:
        self.flush()
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


def _deny(handler, details: str):
    """A handler of the same kind as ``handler`` that answers UNAUTHENTICATED."""

    async def reject(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, details)

    if handler.request_streaming or handler.response_streaming:
        if handler.request_streaming:
            maker = (
                grpc.stream_stream_rpc_method_handler
                if handler.response_streaming
                else grpc.stream_unary_rpc_method_handler
            )
        else:
            maker = grpc.unary_stream_rpc_method_handler
    else:
        maker = grpc.unary_unary_rpc_method_handler
    return maker(
        reject,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Answers UNAUTHENTICATED, before any work, to a call whose key is missing or
    unknown; covers every method (unary and streaming) but the health service."""

    def __init__(self, keyring: KeyRing):
        self._keyring = keyring

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or method.startswith(UNAUTHENTICATED_PREFIXES):
            return handler
        metadata = handler_call_details.invocation_metadata
        if self._keyring.identify(metadata) is not None:
            return handler
        log_request({"method": method, "peer": None, "outcome": "UNAUTHENTICATED"})
        return _deny(handler, self._keyring.rejection(metadata))
