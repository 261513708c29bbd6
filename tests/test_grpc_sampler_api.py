"""The Sampler API, run once in process and once over gRPC (`Client(api_host=...)`
against `sampler-sdk serve`): every behaviour must be the same on both transports.

The `sampler_client` fixture is the transport switch; a Sampler API suite can take it to
run each of its tests over both.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from grpc_testing import MODEL_NAME, ServerProcess
from sampler_sdk import Client, TokenType

KEY = "api-suite-key"


@pytest.fixture(scope="module")
def grpc_server(smollm_path, tmp_path_factory):
    proc = ServerProcess(
        smollm_path,
        ["--api-key", KEY, "--max-concurrent", "4"],
        log_dir=tmp_path_factory.mktemp("api"),
    )
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module", params=["local", "grpc"])
def transport(request):
    return request.param


@pytest.fixture
def sampler_client(transport, smollm_path, request):
    """A factory of ``Client``s on the transport under test (closed after the test)."""
    made = []

    def make(initial_rng_seed=None) -> Client:
        if transport == "local":
            client = Client(models={MODEL_NAME: smollm_path}, initial_rng_seed=initial_rng_seed)
        else:
            server = request.getfixturevalue("grpc_server")
            client = Client(api_host=server.address, api_key=KEY, initial_rng_seed=initial_rng_seed)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def collect(client, **kwargs):
    async def main():
        stream = client.sampler.sample(**kwargs)
        tokens = [t async for t in stream]
        return tokens, stream

    return asyncio.run(main())


def test_stream_of_tokens_with_probabilities(sampler_client):
    tokens, stream = collect(
        sampler_client(1),
        inputs=("The capital of France is",),
        max_len=3,
        temperature=1.0,
        nucleus_p=1.0,
    )
    assert len(tokens) == 3 and stream.stop_reason == "max_len"
    assert stream.usage.sampled_tokens == 3 and stream.usage.prompt_tokens > 0
    for token in tokens:
        assert token.token_type == TokenType.SAMPLED and 0 < token.prob <= 1
        assert len(token.top_k) == 8
        probs = [alt.prob for alt in token.top_k]
        assert probs == sorted(probs, reverse=True)
        assert token.logprob is not None and token.logprob <= 0


def test_greedy_draw_has_probability_one(sampler_client):
    tokens, _ = collect(sampler_client(1), inputs=("1, 2, 3,",), max_len=2, temperature=0.0)
    assert all(t.prob == 1.0 for t in tokens)


def test_same_seed_same_stream(sampler_client):
    a, _ = collect(sampler_client(), inputs=("Once",), max_len=3, temperature=1.0, rng_seed=77)
    b, _ = collect(sampler_client(), inputs=("Once",), max_len=3, temperature=1.0, rng_seed=77)
    assert [t.token_id for t in a] == [t.token_id for t in b]


def test_stop_string_yields_the_completing_token(sampler_client):
    tokens, stream = collect(
        sampler_client(1), inputs=("1, 2, 3, 4,",), max_len=8, temperature=0.0, stop_strings=[" 6"]
    )
    text = "".join(t.token_str for t in tokens)
    assert stream.stop_reason == "stop_string" and stream.stop_string == " 6"
    assert " 6" in text


def test_disallowed_tokens_are_never_sampled(sampler_client):
    free, _ = collect(sampler_client(1), inputs=("1, 2, 3,",), max_len=1, temperature=0.0)
    banned = free[0].token_id
    tokens, _ = collect(
        sampler_client(1),
        inputs=("1, 2, 3,",),
        max_len=1,
        temperature=0.0,
        disallowed_tokens=[banned],
    )
    assert tokens[0].token_id != banned


def test_allowed_tokens_only(sampler_client):
    tokens, _ = collect(
        sampler_client(1),
        inputs=("Is the sky blue? Answer:",),
        max_len=1,
        temperature=1.0,
        allowed_tokens=["Yes", "No"],
    )
    assert tokens[0].token_str.strip() in ("Yes", "No")


def test_attention_is_returned_per_token(sampler_client):
    tokens, stream = collect(
        sampler_client(1),
        inputs=("Hello there",),
        max_len=2,
        temperature=0.0,
        return_attention=True,
    )
    prompt = stream.usage.prompt_tokens
    for i, token in enumerate(tokens):
        assert isinstance(token.attention, np.ndarray)
        assert len(token.attention) == prompt + i
        assert abs(float(token.attention.sum()) - 1.0) < 1e-3


def test_tokenize_gives_prompt_tokens(sampler_client):
    tokens = asyncio.run(sampler_client().sampler.tokenize("Hello world"))
    assert [t.token_str for t in tokens][-2:] == ["Hello", " world"]
    assert all(t.token_type == TokenType.PROMPT for t in tokens)


def test_list_models(sampler_client):
    models = asyncio.run(sampler_client().sampler.list_models())
    assert [m.name for m in models] == [MODEL_NAME]


@pytest.mark.parametrize(
    "kwargs, error, named",
    [
        (dict(temperature=-1), ValueError, "temperature"),
        (dict(nucleus_p=0), ValueError, "nucleus_p"),
        (dict(max_len=0), ValueError, "max_len"),
        (dict(allowed_tokens=[1], disallowed_tokens=[2]), ValueError, "allowed_tokens"),
        (dict(inputs=([99_999_999],)), ValueError, "inputs"),
        (dict(model_name="nope"), ValueError, "model_name"),
        (dict(inputs="not a tuple"), TypeError, "inputs"),
    ],
)
def test_bad_arguments_raise_named_errors(sampler_client, kwargs, error, named):
    params = dict(inputs=("x",), max_len=1)
    params.update(kwargs)
    with pytest.raises(error, match=named):
        collect(sampler_client(), **params)


def test_concurrent_samples_match_sequential_ones(sampler_client):
    client = sampler_client()

    async def one(seed):
        return [
            t.token_id
            async for t in client.sampler.sample(
                inputs=("Hi",), max_len=2, temperature=1.0, rng_seed=seed
            )
        ]

    async def together():
        return await asyncio.gather(one(1), one(2), one(3))

    sequential = [asyncio.run(one(s)) for s in (1, 2, 3)]
    assert asyncio.run(together()) == sequential


def test_closing_a_stream_early(sampler_client):
    client = sampler_client(1)

    async def main():
        stream = client.sampler.sample(inputs=("Tell me a story",), max_len=50)
        async for _ in stream:
            break
        await stream.aclose()
        return stream.stop_reason

    assert asyncio.run(main()) == "cancelled"


def test_sync_sampler(sampler_client):
    stream = sampler_client(3).sync_sampler.sample(
        inputs=("The sky is",), max_len=2, temperature=0.0
    )
    assert stream.text() and stream.usage.sampled_tokens == 2
