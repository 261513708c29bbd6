"""The official `xai-sdk` client (from PyPI) against `sampler-sdk serve`: tokenize,
list/get models, blocking and streaming chat, seeds, stop strings, logprobs, n, the raw
Sample service, and errors (bad key, bad argument, unknown model)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_testing import MODEL_NAME, ServerProcess, health_status

xai_sdk = pytest.importorskip("xai_sdk")
from xai_sdk.chat import system, user  # noqa: E402

KEY = "xai-test-key"
SHORT = dict(max_tokens=4)


@pytest.fixture(scope="module")
def server(smollm_path, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("xai")
    proc = ServerProcess(smollm_path, ["--api-key", KEY, "--max-concurrent", "2"], log_dir=workdir)
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    c = xai_sdk.Client(api_key=KEY, api_host=server.address, use_insecure_channel=True, timeout=300)
    yield c
    c.close()


def chat(client, **kwargs):
    params = dict(model=MODEL_NAME, messages=[user("Name a colour.")])
    params.update(kwargs)
    return client.chat.create(**params)


def assert_healthy(server):
    assert health_status(server.address) == "SERVING"


def test_tokenize_text(client, smollm):
    tokens = client.tokenize.tokenize_text("Hello world, héllo!", MODEL_NAME)
    assert [t.token_id for t in tokens] == smollm.tokenize("Hello world, héllo!", add_special=False)
    assert b"".join(t.token_bytes for t in tokens) == "Hello world, héllo!".encode()
    assert tokens[0].string_token == "Hello"


def test_list_and_get_models(client, smollm):
    models = client.models.list_language_models()
    assert [m.name for m in models] == [MODEL_NAME]
    assert models[0].max_prompt_length == smollm.n_ctx_train
    assert client.models.get_language_model(MODEL_NAME).name == MODEL_NAME
    with pytest.raises(grpc.RpcError) as info:
        client.models.get_language_model("grok-9000")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_blocking_and_streaming_chat_agree(client, server):
    params = dict(seed=11, temperature=0.8, **SHORT)
    blocking = chat(client, **params).sample()
    assert blocking.content
    assert blocking.finish_reason in ("REASON_MAX_LEN", "REASON_STOP")
    usage = blocking.usage
    assert 0 < usage.completion_tokens <= 4 and usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert blocking.id and blocking.system_fingerprint.startswith("sampler-sdk")

    pieces = []
    response = None
    for accumulated, chunk in chat(client, **params).stream():
        pieces.append(chunk.content)
        response = accumulated
    assert "".join(pieces) == response.content == blocking.content
    assert response.finish_reason == blocking.finish_reason
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )
    assert_healthy(server)


def test_every_chunk_is_an_assistant_chunk_and_the_last_has_finish_and_usage(server):
    """The wire rules the client relies on (XAI-API.md section 3), read with the
    client's own generated stub."""
    from xai_sdk.proto import chat_pb2, chat_pb2_grpc

    request = chat_pb2.GetCompletionsRequest(
        model=MODEL_NAME,
        messages=[chat_pb2.Message(role=chat_pb2.ROLE_USER, content=[chat_pb2.Content(text="Hi")])],
        max_tokens=3,
        seed=1,
        n=1,
    )
    with grpc.insecure_channel(server.address) as channel:
        chunks = list(
            chat_pb2_grpc.ChatStub(channel).GetCompletionChunk(
                request, metadata=[("authorization", f"Bearer {KEY}")]
            )
        )
    assert chunks
    for chunk in chunks:
        assert chunk.id == chunks[0].id and chunk.model == MODEL_NAME and chunk.HasField("created")
        assert [o.index for o in chunk.outputs] == [0]
        assert chunk.outputs[0].delta.role == chat_pb2.ROLE_ASSISTANT
    last = chunks[-1]
    assert last.outputs[0].finish_reason in (1, 3)
    assert last.usage.completion_tokens == 3 or last.outputs[0].finish_reason == 3
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens


def test_seed_reproduces(client):
    first = chat(client, seed=42, temperature=1.0, **SHORT).sample().content
    second = chat(client, seed=42, temperature=1.0, **SHORT).sample().content
    assert first == second


def test_stop_ends_text_before_the_stop_string(client, server):
    greedy = chat(
        client, temperature=0, max_tokens=8, messages=[user("Say: the sky is blue")]
    ).sample()
    text = greedy.content
    assert len(text) > 3, text
    stop = text[2:4]  # a string that first appears after some text
    expected = text[: text.index(stop)]
    stopped = chat(
        client, temperature=0, max_tokens=8, stop=[stop], messages=[user("Say: the sky is blue")]
    )
    blocking = stopped.sample()
    assert blocking.content == expected
    assert blocking.finish_reason == "REASON_STOP"
    streamed = "".join(
        chunk.content
        for _, chunk in chat(
            client,
            temperature=0,
            max_tokens=8,
            stop=[stop],
            messages=[user("Say: the sky is blue")],
        ).stream()
    )
    assert streamed == expected
    assert_healthy(server)


def test_logprobs(client):
    response = chat(client, seed=3, logprobs=True, top_logprobs=2, **SHORT).sample()
    entries = response.logprobs.content
    assert len(entries) == response.usage.completion_tokens
    assert "".join(e.token for e in entries) == response.content
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2


def test_n_choices(client):
    with pytest.warns(PendingDeprecationWarning):
        responses = chat(client, seed=5, temperature=1.0, max_tokens=2).sample_batch(2)
    assert len(responses) == 2 and all(r.content for r in responses)
    assert responses[0].usage.completion_tokens <= 4


def test_system_message_and_async_client(server):
    async def main():
        client = xai_sdk.AsyncClient(
            api_key=KEY, api_host=server.address, use_insecure_channel=True, timeout=300
        )
        conversation = client.chat.create(
            model=MODEL_NAME,
            messages=[system("Answer in one word."), user("Capital of France?")],
            seed=1,
            **SHORT,
        )
        response = await conversation.sample()
        return response

    response = asyncio.run(main())
    assert response.content and response.usage.completion_tokens <= 4


def test_raw_sample_service(server):
    from xai_sdk.proto import sample_pb2, sample_pb2_grpc

    metadata = [("authorization", f"Bearer {KEY}")]
    request = sample_pb2.SampleTextRequest(
        prompt=["The capital of France is"], model=MODEL_NAME, max_tokens=3, temperature=0
    )
    with grpc.insecure_channel(server.address) as channel:
        stub = sample_pb2_grpc.SampleStub(channel)
        blocking = stub.SampleText(request, metadata=metadata)
        streamed = list(stub.SampleTextStreaming(request, metadata=metadata))
    assert (
        len(blocking.choices) == 1 and blocking.choices[0].index == 0 and blocking.choices[0].text
    )
    assert blocking.choices[0].finish_reason == sample_pb2.REASON_MAX_LEN
    assert "".join(r.choices[0].text for r in streamed) == blocking.choices[0].text
    assert streamed[-1].choices[0].finish_reason == sample_pb2.REASON_MAX_LEN
    assert blocking.usage.completion_tokens == 3


def test_bad_key_is_unauthenticated(server):
    bad = xai_sdk.Client(
        api_key="wrong", api_host=server.address, use_insecure_channel=True, timeout=30
    )
    try:
        with pytest.raises(grpc.RpcError) as info:
            bad.models.list_language_models()
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            for _ in bad.chat.create(model=MODEL_NAME, messages=[user("hi")]).stream():
                pass
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        bad.close()
    assert_healthy(server)


@pytest.mark.parametrize(
    "kwargs, named",
    [
        (dict(temperature=3.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
        (dict(top_logprobs=9, logprobs=True), "top_logprobs"),
        (dict(frequency_penalty=0.5), "frequency_penalty"),
    ],
)
def test_bad_arguments_are_invalid_argument(client, server, kwargs, named):
    with pytest.raises(grpc.RpcError) as info:
        chat(client, **kwargs).sample()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in info.value.details()
    assert_healthy(server)


def test_unknown_model_in_chat_is_not_found(client):
    with pytest.raises(grpc.RpcError) as info:
        chat(client, model="grok-9000").sample()
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
