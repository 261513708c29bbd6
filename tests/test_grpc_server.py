"""The project's own protocol end to end: `sampler-sdk serve` with the default model,
driven through `Client(api_host=...)` and through raw gRPC calls.

Each failure case asserts its status code and that the server is still healthy after.
Generations are kept short: the engine is slow on this shared machine.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import subprocess
import time

import grpc
import pytest
from grpc_testing import MODEL_NAME, InProcessServer, ServerProcess, health_status
from sampler_sdk import AsyncSampler, Client, _proto
from sampler_sdk.grpc_stub import (
    AuthenticationError,
    DeadlineExceededError,
    GrpcStub,
    RemoteError,
    ResourceExhaustedError,
)

pb = _proto.sampler
GOOD_KEY = "good-key-0123"
TINY_KEY = "tiny-key-4567"
SAMPLE_PATH = "/sampler_sdk.v1.Sampler/Sample"


@pytest.fixture(scope="module")
def server(smollm_path, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("serve")
    keys = workdir / "keys.txt"
    keys.write_text(f"{GOOD_KEY} alice\n{TINY_KEY} bob 3\n")
    proc = ServerProcess(
        smollm_path, ["--api-keys", str(keys), "--max-concurrent", "2"], log_dir=workdir
    )
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def local_stub(smollm_path):
    from sampler_sdk.local import LocalStub

    return LocalStub({MODEL_NAME: smollm_path})


def run(stub, coro_fn):
    """Runs ``coro_fn(stub)`` on a fresh loop and closes the stub's channel for it."""

    async def main():
        try:
            return await coro_fn(stub)
        finally:
            if isinstance(stub, GrpcStub):
                await stub.aclose()

    return asyncio.run(main())


def remote(server, key=GOOD_KEY, **kwargs) -> GrpcStub:
    return GrpcStub(server.address, api_key=key, **kwargs)


async def _collect(stub, seed=7, **kwargs):
    sampler = AsyncSampler(stub, initial_rng_seed=seed)
    stream = sampler.sample(**kwargs)
    tokens = [t async for t in stream]
    return tokens, stream.finished


def _fingerprint(tokens):
    return [
        (
            t.token_id,
            t.token_str,
            t.token_bytes,
            t.prob,
            t.logprob,
            [(a.token_id, a.prob) for a in t.top_k],
        )
        for t in tokens
    ]


def assert_healthy(server):
    assert health_status(server.address) == "SERVING"


def raw_channel(server, **options):
    opts = [("grpc.max_send_message_length", 64 * 1024 * 1024)] + list(options.items())
    return grpc.insecure_channel(server.address, options=opts)


# -- the Sampler API over gRPC equals the Sampler API in process ----------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(inputs=("The capital of France is",), max_len=4, temperature=0.0),
        dict(
            inputs=("Once upon a time",), max_len=4, temperature=0.9, nucleus_p=0.9, rng_seed=1234
        ),
        dict(inputs=("Count: 1, 2,",), max_len=4, stop_strings=[","]),
    ],
    ids=["greedy", "seeded", "stop-string"],
)
def test_sample_equals_in_process(server, local_stub, kwargs):
    remote_tokens, remote_finished = run(remote(server), lambda s: _collect(s, **kwargs))
    local_tokens, local_finished = run(local_stub, lambda s: _collect(s, **kwargs))
    assert _fingerprint(remote_tokens) == _fingerprint(local_tokens)
    assert remote_finished == local_finished
    assert all(t.token_type.name == "SAMPLED" for t in remote_tokens)


def test_seed_derivation_matches_in_process(server, local_stub):
    """No rng_seed: both samplers derive the same per-call seeds from the initial seed."""

    async def two_calls(stub):
        sampler = AsyncSampler(stub, initial_rng_seed=99)
        out = []
        for _ in range(2):
            out.append(
                [
                    t.token_id
                    async for t in sampler.sample(inputs=("Hello",), max_len=3, temperature=1.0)
                ]
            )
        return out

    assert run(remote(server), two_calls) == run(local_stub, two_calls)


def test_attention_stop_tokens_and_token_sets_round_trip(server, local_stub):
    kwargs = dict(
        inputs=("Answer yes or no:",),
        max_len=2,
        temperature=0.0,
        return_attention=True,
        allowed_tokens=["yes", "no", "Yes", "No"],
        stop_tokens=["<|im_end|>"],
    )
    (remote_tokens, remote_finished) = run(remote(server), lambda s: _collect(s, **kwargs))
    (local_tokens, local_finished) = run(local_stub, lambda s: _collect(s, **kwargs))
    assert [t.token_id for t in remote_tokens] == [t.token_id for t in local_tokens]
    assert remote_finished == local_finished
    for got, want in zip(remote_tokens, local_tokens):
        assert got.attention is not None and got.attention.tolist() == want.attention.tolist()


def test_tokenize_and_list_models_equal_in_process(server, local_stub):
    async def both(stub):
        return await stub.tokenize("Hello, world! é", ""), await stub.list_models()

    remote_tokens, remote_models = run(remote(server), both)
    local_tokens, local_models = run(local_stub, both)
    assert [(t.token_id, t.token_str, t.token_bytes, t.token_type) for t in remote_tokens] == [
        (t.token_id, t.token_str, t.token_bytes, t.token_type) for t in local_tokens
    ]
    assert [(m.name, m.architecture, m.n_vocab, m.context_length) for m in remote_models] == [
        (m.name, m.architecture, m.n_vocab, m.context_length) for m in local_models
    ]


def test_client_with_api_host_and_sync_sampler(server):
    with Client(api_host=server.address, api_key=GOOD_KEY, initial_rng_seed=5) as client:
        stream = client.sync_sampler.sample(inputs=("The sky is",), max_len=2, temperature=0.0)
        text = stream.text()
        assert text and stream.stop_reason == "max_len" and stream.usage.sampled_tokens == 2


@pytest.mark.parametrize(
    "kwargs, error, named",
    [
        (dict(inputs=([10**6],), max_len=1), ValueError, "outside the vocabulary"),
        (dict(inputs=("x",), model_name="no-such-model", max_len=1), ValueError, "model_name"),
        (dict(inputs=(b"\x89PNG\r\n\x1a\n0000",), max_len=1), ValueError, "text-only"),
        (dict(inputs=("x",), allowed_tokens=[]), ValueError, "allowed_tokens"),
    ],
)
def test_bad_arguments_raise_as_in_process(server, local_stub, kwargs, error, named):
    for stub in (remote(server), local_stub):
        with pytest.raises(error, match=named):
            run(stub, lambda s: _collect(s, **kwargs))
    assert_healthy(server)


# -- failure cases: status code, then the server is healthy ---------------------------------


def test_unknown_or_missing_key_is_unauthenticated(server):
    with pytest.raises(AuthenticationError, match="unknown API key"):
        run(remote(server, key="wrong"), lambda s: s.tokenize("hi"))
    with pytest.raises(AuthenticationError, match="missing API key"):
        run(remote(server, key=None), lambda s: _collect(s, inputs=("hi",), max_len=1))
    with raw_channel(server) as channel:
        call = channel.unary_stream(SAMPLE_PATH)(
            pb.SampleRequest(max_len=1).SerializeToString(),
            metadata=[("authorization", "Bearer nope")],
        )
        with pytest.raises(grpc.RpcError) as info:
            list(call)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    server.wait_for_line(
        lambda r: (
            r.get("method", "").endswith("/Tokenize") and r.get("outcome") == "UNAUTHENTICATED"
        )
    )
    assert_healthy(server)


def test_exhausted_budget(server, caplog):
    """bob may sample 3 tokens: a 5-token request delivers 3 then RESOURCE_EXHAUSTED;
    the next request is refused before any work."""
    received = []

    async def greedy(stub):
        sampler = AsyncSampler(stub, initial_rng_seed=1)
        async for token in sampler.sample(inputs=("One, two,",), max_len=5, temperature=0.0):
            received.append(token)

    with caplog.at_level(logging.INFO, logger="sampler_sdk"):
        with pytest.raises(
            ResourceExhaustedError, match="token budget of API key 'bob' is spent"
        ) as info:
            run(remote(server, key=TINY_KEY), greedy)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(received) == 3
    assert any(
        "budget update: 3 tokens used, 0 remaining" in r.getMessage() for r in caplog.records
    )
    with pytest.raises(ResourceExhaustedError):
        run(remote(server, key=TINY_KEY), greedy)
    assert len(received) == 3
    server.wait_for_line(
        lambda r: (
            r.get("key") == "bob"
            and r.get("outcome") == "RESOURCE_EXHAUSTED"
            and r.get("sampled_tokens") == 0
        )
    )
    assert_healthy(server)


def test_oversized_request_is_resource_exhausted(server):
    huge = pb.SampleRequest(max_len=1)
    huge.inputs.add(text="a" * (21 * 1024 * 1024))
    with raw_channel(server) as channel:
        call = channel.unary_stream(SAMPLE_PATH)(
            huge.SerializeToString(), metadata=[("authorization", f"Bearer {GOOD_KEY}")], timeout=60
        )
        with pytest.raises(grpc.RpcError) as info:
            list(call)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_healthy(server)


@pytest.mark.parametrize(
    "payload, named",
    [
        (b"\x0a\xff\xff\xff", "malformed sampler_sdk.v1.SampleRequest"),
        (pb.SampleRequest(temperature=-1.0).SerializeToString(), "temperature"),
        (pb.SampleRequest(nucleus_p=2.0).SerializeToString(), "nucleus_p"),
        (pb.SampleRequest(max_len=0).SerializeToString(), "max_len"),
    ],
    ids=["undecodable", "temperature", "nucleus_p", "max_len"],
)
def test_malformed_request_is_invalid_argument(server, payload, named):
    with raw_channel(server) as channel:
        call = channel.unary_stream(SAMPLE_PATH)(
            payload, metadata=[("authorization", f"Bearer {GOOD_KEY}")]
        )
        with pytest.raises(grpc.RpcError) as info:
            list(call)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in info.value.details()
    assert_healthy(server)


def test_deadline_exceeded_stops_the_generation(server):
    stub = remote(server, timeout=1.5)
    start = time.monotonic()
    # Too long for any engine to finish within the deadline, and the end-of-generation
    # tokens banned so it cannot end early on its own.
    max_len = 4000
    with pytest.raises(DeadlineExceededError):
        run(
            stub,
            lambda s: _collect(
                s,
                inputs=("Write a long story:",),
                max_len=max_len,
                temperature=0.8,
                disallowed_tokens=[0, 2, 4],
            ),
        )
    assert time.monotonic() - start < 10
    line = server.wait_for_line(lambda r: r.get("outcome") == "DEADLINE_EXCEEDED")
    assert line["sampled_tokens"] < max_len
    assert_healthy(server)


# -- cancellation, with the engine observed in process ----------------------------------------


def test_client_cancel_stops_the_engine(smollm_path, local_stub):
    from sampler_sdk import local
    from sampler_sdk.server.app import ServerConfig

    config = ServerConfig(models={MODEL_NAME: str(smollm_path)}, host="127.0.0.1", port=0)
    server = InProcessServer(config, local_stub)
    try:

        async def first_token_then_close(stub):
            sampler = AsyncSampler(stub, initial_rng_seed=3)
            stream = sampler.sample(inputs=("Tell me a long story:",), max_len=400, temperature=0.8)
            async for _ in stream:
                break
            await stream.aclose()

        run(GrpcStub(server.address), first_token_then_close)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(
            not h.finished for h in list(local._live_generations)
        ):
            time.sleep(0.05)
        assert all(h.finished for h in list(local._live_generations)), "the engine kept generating"
        assert health_status(server.address) == "SERVING"
    finally:
        server.stop()


# -- lifecycle: graceful SIGTERM, persisted budgets, concurrency, TLS ----------------------------


def test_sigterm_ends_streams_cleanly_and_exits_zero(smollm_path, tmp_path):
    proc = ServerProcess(smollm_path, ["--shutdown-grace", "1"], log_dir=tmp_path)
    outcome = {}
    # Long enough that no engine finishes it within the grace period, and with the
    # end-of-generation tokens banned so the stream cannot end early on its own.
    max_len = 4000

    async def stream_until_shutdown(stub):
        sampler = AsyncSampler(stub, initial_rng_seed=1)
        tokens = 0
        try:
            async for _ in sampler.sample(
                inputs=("Tell me a long story:",), max_len=max_len, disallowed_tokens=[0, 2, 4]
            ):
                tokens += 1
                if tokens == 1:
                    proc.process.send_signal(signal.SIGTERM)
        except Exception as exc:  # the server cancels what is left after the grace period
            outcome["error"] = exc
        outcome["tokens"] = tokens

    try:
        start = time.monotonic()
        run(GrpcStub(proc.address), stream_until_shutdown)
        assert proc.process.wait(30) == 0
        assert time.monotonic() - start < 30
        assert 1 <= outcome["tokens"] < max_len
        events = [line["event"] for line in proc.log_lines()]
        assert events.index("shutting_down") < events.index("stopped") == len(events) - 1
        assert proc.requests("/Sample")[-1]["outcome"] == "CANCELLED_BY_SHUTDOWN"
    finally:
        proc.stop()


def test_budgets_persist_and_are_charged_once_under_concurrency(smollm_path, tmp_path):
    """carol may sample 8 tokens: 2 before a restart, then 3 concurrent streams of up
    to 4 tokens share the remaining 6 exactly."""
    from sampler_sdk.server.auth import ApiKey, BudgetStore

    keys = tmp_path / "keys.txt"
    keys.write_text("carol-key carol 8\n")
    args = ["--api-keys", str(keys), "--max-concurrent", "3"]

    proc = ServerProcess(smollm_path, args, log_dir=tmp_path)
    tokens, _ = run(
        GrpcStub(proc.address, api_key="carol-key"),
        lambda s: _collect(s, inputs=("Hi",), max_len=2),
    )
    assert len(tokens) == 2
    assert proc.stop() == 0
    assert (tmp_path / "keys.txt.usage.sqlite").is_file()

    proc = ServerProcess(smollm_path, args, log_dir=tmp_path)
    received = []
    errors = []

    async def three_streams(stub):
        async def one(i):
            sampler = AsyncSampler(stub, initial_rng_seed=i)
            try:
                async for token in sampler.sample(
                    inputs=("Count to ten:",), max_len=4, temperature=1.0
                ):
                    received.append((i, token.token_id))
            except ResourceExhaustedError as exc:
                errors.append(exc)

        await asyncio.gather(*(one(i) for i in range(3)))

    run(GrpcStub(proc.address, api_key="carol-key"), three_streams)
    assert len(received) == 6 and errors
    assert health_status(proc.address) == "SERVING"
    assert proc.stop() == 0
    store = BudgetStore(tmp_path / "keys.txt.usage.sqlite")
    assert store.used("carol") == 8 and store.exhausted(ApiKey("carol-key", "carol", 8))
    store.close()


def test_busy_server_answers_resource_exhausted(smollm_path, tmp_path):
    proc = ServerProcess(
        smollm_path, ["--max-concurrent", "1", "--max-queue", "0"], log_dir=tmp_path
    )
    try:

        async def two_at_once(stub):
            sampler = AsyncSampler(stub, initial_rng_seed=1)
            first = sampler.sample(inputs=("Tell me a story:",), max_len=50)
            await first.__anext__()  # the first generation holds the only slot
            with pytest.raises(ResourceExhaustedError, match="server busy"):
                async for _ in sampler.sample(inputs=("Hi",), max_len=1):
                    pass
            await first.aclose()

        run(GrpcStub(proc.address), two_at_once)
        assert health_status(proc.address) == "SERVING"
    finally:
        assert proc.stop() == 0


@pytest.mark.skipif(
    shutil.which("openssl") is None, reason="needs the openssl command to make a certificate"
)
def test_tls(smollm_path, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    proc = ServerProcess(
        smollm_path, ["--tls-cert", str(cert), "--tls-key", str(key)], log_dir=tmp_path
    )
    try:
        with Client(
            api_host=proc.address, api_key="any", root_certificates=cert.read_bytes()
        ) as client:
            tokens = client.sync_sampler.tokenize("Hello")
            assert [t.token_str for t in tokens][-1] == "Hello"
        with pytest.raises(RemoteError):
            run(GrpcStub(f"http://{proc.address}", timeout=5), lambda s: s.tokenize("Hello"))
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        assert health_status(proc.address, credentials) == "SERVING"
    finally:
        assert proc.stop() == 0
