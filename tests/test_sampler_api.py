"""The Sampler API of SPEC §2 (the seed's Client / AsyncSampler / Token), end to end on the
default model. The `client` fixture is the transport under test; every test here must
hold for the in-process engine and for a gRPC server alike."""

from __future__ import annotations

import asyncio
import base64
import math
import threading
import time

import numpy as np
import pytest
import sampler_sdk
from sampler_sdk import Client, Token, TokenType

PROMPT = "The answer to life and the universe is"


@pytest.fixture(scope="module", params=["local", "grpc"])
def client(request, smollm_path, tmp_path_factory):
    if request.param == "local":
        c = Client(str(smollm_path), initial_rng_seed=1234)
        yield c
        c.close()
        return
    from grpc_testing import ServerProcess

    server = ServerProcess(smollm_path, log_dir=tmp_path_factory.mktemp("grpc"))
    c = Client(api_host=server.address, api_key="any", initial_rng_seed=1234)
    yield c
    c.close()
    assert server.stop() == 0


@pytest.fixture(scope="module")
def engine(smollm_path):
    return sampler_sdk.Model(str(smollm_path))


def collect(client, **kwargs):
    async def run():
        stream = client.sampler.sample(**kwargs)
        tokens = [t async for t in stream]
        return tokens, stream

    return asyncio.run(run())


def test_seed_example_streams_three_tokens(client):
    tokens, stream = collect(client, prompt="", inputs=(PROMPT,), max_len=3)
    assert len(tokens) == 3
    assert all(isinstance(t, Token) and t.token_type == TokenType.SAMPLED for t in tokens)
    assert stream.stop_reason == "max_len"
    assert stream.usage.sampled_tokens == 3
    assert stream.usage.prompt_tokens == len(asyncio.run(client.sampler.tokenize(PROMPT)))
    for t in tokens:
        assert 0.0 < t.prob <= 1.0
        assert 1 <= len(t.top_k) <= 8
        probs = [a.prob for a in t.top_k]
        assert probs == sorted(probs, reverse=True)
        assert sum(probs) <= 1.0 + 1e-5
        assert t.logprob is not None and t.logprob <= 0.0


def test_same_seed_same_tokens_and_probabilities(client):
    a, _ = collect(client, inputs=(PROMPT,), max_len=6, rng_seed=7, temperature=1.0)
    b, _ = collect(client, inputs=(PROMPT,), max_len=6, rng_seed=7, temperature=1.0)
    assert [(t.token_id, t.prob) for t in a] == [(t.token_id, t.prob) for t in b]


def test_initial_rng_seed_reproduces_a_sequence_of_calls(smollm_path):
    def run_calls():
        c = Client(str(smollm_path), initial_rng_seed=99)
        out = [[t.token_id for t in collect(c, inputs=(PROMPT,), max_len=4, temperature=1.2)[0]] for _ in range(3)]
        c.close()
        return out

    first, second = run_calls(), run_calls()
    assert first == second
    assert len({tuple(x) for x in first}) > 1, "different calls should get different derived seeds"


def test_greedy_equals_argmax_with_probability_one(client, engine):
    tokens, _ = collect(client, inputs=(PROMPT,), max_len=5, temperature=0)
    prompt_ids = engine.tokenize(PROMPT, add_special=True, parse_special=True)
    assert [t.token_id for t in tokens] == engine.generate_greedy(prompt_ids, 5)
    assert all(t.prob == 1.0 for t in tokens)


def test_allowed_tokens_by_string_with_augmentation(client, engine):
    tokens, _ = collect(
        client, inputs=("Is the sky blue? Answer:",), max_len=5, temperature=1.5, allowed_tokens=["Yes", "No"], rng_seed=3
    )
    allowed = {engine.token_id(p) for p in ("Yes", "No", "ĠYes", "ĠNo")} - {None}
    assert {t.token_id for t in tokens} <= allowed
    for t in tokens:
        assert {a.token_id for a in t.top_k} <= allowed


def test_disallowed_token_is_never_sampled(client, engine):
    prompt_ids = engine.tokenize(PROMPT, add_special=True, parse_special=True)
    banned = engine.generate_greedy(prompt_ids, 1)[0]
    for seed in range(5):
        tokens, _ = collect(client, inputs=(PROMPT,), max_len=1, temperature=0.3, disallowed_tokens=[banned], rng_seed=seed)
        assert tokens[0].token_id != banned
        assert banned not in {a.token_id for a in tokens[0].top_k}


def test_stop_token_ends_the_stream_without_yielding_it(client, engine):
    prompt = "List three colors separated by commas: red,"
    greedy, _ = collect(client, inputs=(prompt,), max_len=12, temperature=0)
    texts = [t.token_str for t in greedy]
    assert "," in texts, texts
    tokens, stream = collect(client, inputs=(prompt,), max_len=12, temperature=0, stop_tokens=[",", "not one token at all"])
    assert [t.token_str for t in tokens] == texts[: texts.index(",")]
    assert stream.stop_reason == "stop_token"


def test_stop_string_spanning_tokens_stops_after_the_completing_token(client):
    greedy, _ = collect(client, inputs=(PROMPT,), max_len=16, temperature=0)
    text = "".join(t.token_str for t in greedy)
    # A stop string that starts inside one token and ends inside a later one.
    boundary = len(greedy[0].token_str) + len(greedy[1].token_str)
    stop = text[boundary - 2 : boundary + 2]
    assert len(stop) == 4
    tokens, stream = collect(client, inputs=(PROMPT,), max_len=16, temperature=0, stop_strings=[stop])
    out = "".join(t.token_str for t in tokens)
    assert stop in out
    assert stop not in "".join(t.token_str for t in tokens[:-1])
    assert stream.stop_reason == "stop_string" and stream.stop_string == stop


def test_token_strings_concatenate_to_the_decoded_text_with_multibyte_characters(client, engine):
    tokens, _ = collect(client, inputs=("日本の首都は東京です。中国の首都は",), max_len=12, temperature=0.8, rng_seed=5)
    text = "".join(t.token_str for t in tokens)
    raw = b"".join(t.token_bytes for t in tokens)
    assert text == raw.decode("utf-8", errors="replace") or raw.decode("utf-8", errors="replace").startswith(text)
    assert engine.detokenize([t.token_id for t in tokens]).startswith(text)


def test_return_attention_gives_one_weight_per_context_position(client):
    tokens, stream = collect(client, inputs=(PROMPT,), max_len=3, temperature=0, return_attention=True)
    n_prompt = stream.usage.prompt_tokens
    for i, t in enumerate(tokens):
        assert isinstance(t.attention, np.ndarray)
        assert t.attention.shape == (n_prompt + i,)
        assert math.isclose(float(t.attention.sum()), 1.0, rel_tol=1e-4)
    plain, _ = collect(client, inputs=(PROMPT,), max_len=1, temperature=0)
    assert plain[0].attention is None


def test_prompt_is_deprecated_but_works(client):
    with pytest.warns(DeprecationWarning, match="prompt is deprecated"):
        stream = client.sampler.sample(prompt=PROMPT, max_len=2, temperature=0)
    async def run():
        return [t async for t in stream]
    via_prompt = asyncio.run(run())
    via_inputs, _ = collect(client, inputs=(PROMPT,), max_len=2, temperature=0)
    assert [t.token_id for t in via_prompt] == [t.token_id for t in via_inputs]


def test_token_id_inputs_and_tokens_as_prompt(client):
    prompt_tokens = asyncio.run(client.sampler.tokenize(PROMPT))
    assert all(t.token_type == TokenType.PROMPT for t in prompt_tokens)
    a, _ = collect(client, inputs=([t.token_id for t in prompt_tokens],), max_len=3, temperature=0)
    b, _ = collect(client, inputs=(PROMPT,), max_len=3, temperature=0)
    assert [t.token_id for t in a] == [t.token_id for t in b]


def test_breaking_out_stops_the_generation(client):
    async def run():
        stream = client.sampler.sample(inputs=(PROMPT,), max_len=500, temperature=1.0)
        async for _ in stream:
            break
        await stream.aclose()
        return stream

    stream = asyncio.run(run())
    assert stream.stop_reason == "cancelled"
    call = stream._call
    handle = getattr(call, "_handle", None)
    if handle is not None:  # in-process: the engine thread must end promptly
        assert handle.wait(timeout=10)


def test_event_loop_keeps_running_while_sampling(client):
    async def run():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1

        task = asyncio.create_task(ticker())
        start = time.monotonic()
        tokens = [t async for t in client.sampler.sample(inputs=(PROMPT * 4,), max_len=8, temperature=0)]
        elapsed = time.monotonic() - start
        task.cancel()
        return ticks, elapsed, tokens

    ticks, elapsed, tokens = asyncio.run(run())
    assert len(tokens) == 8
    # The loop was never blocked for long: at least a third of the possible ticks happened.
    assert ticks >= (elapsed / 0.005) / 3, (ticks, elapsed)


def test_concurrent_calls_from_tasks_and_threads_match_sequential_results(client):
    seeds = list(range(32))

    async def one(seed):
        return [t.token_id for t in [t async for t in client.sampler.sample(inputs=(PROMPT,), max_len=3, rng_seed=seed, temperature=1.0)]]

    async def all_at_once():
        return await asyncio.gather(*(one(s) for s in seeds))

    concurrent = asyncio.run(all_at_once())
    thread_results = {}

    def in_thread(seed):
        stream = client.sync_sampler.sample(inputs=(PROMPT,), max_len=3, rng_seed=seed, temperature=1.0)
        thread_results[seed] = [t.token_id for t in stream]

    threads = [threading.Thread(target=in_thread, args=(s,)) for s in seeds[:4]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    sequential = [asyncio.run(one(s)) for s in seeds[:4]]
    assert concurrent[:4] == sequential
    assert [thread_results[s] for s in seeds[:4]] == sequential
    # At temperature 1 a call may draw the end of generation before its third token.
    assert all(1 <= len(c) <= 3 for c in concurrent)
    assert sum(len(c) == 3 for c in concurrent) >= len(seeds) // 2


def test_sync_sampler(client):
    stream = client.sync_sampler.sample(inputs=(PROMPT,), max_len=4, temperature=0)
    tokens = list(stream)
    assert len(tokens) == 4 and stream.stop_reason == "max_len"
    assert client.sync_sampler.tokenize("Hello")[0].token_type == TokenType.PROMPT


def test_sync_stream_gives_the_async_stream_tokens_and_finish(client):
    kwargs = dict(inputs=(PROMPT,), max_len=6, temperature=1.0, rng_seed=77, stop_strings=["\n\n"])
    stream = client.sync_sampler.sample(**kwargs)
    sync_tokens = list(stream)
    async_tokens, async_stream = collect(client, **kwargs)
    assert sync_tokens == async_tokens
    assert (stream.stop_reason, stream.stop_string, stream.usage) == (
        async_stream.stop_reason,
        async_stream.stop_string,
        async_stream.usage,
    )
    assert next(stream, None) is None  # exhausted stays exhausted


def _engine_handle(stream):
    """The in-process generation behind a sync stream (None over gRPC)."""
    return getattr(stream._stream._call, "_handle", None)


def test_sync_close_stops_the_generation(client):
    with client.sync_sampler.sample(inputs=(PROMPT,), max_len=500, temperature=1.0) as stream:
        next(stream)
    assert stream.stop_reason == "cancelled"
    assert list(stream) == []
    handle = _engine_handle(stream)
    if handle is not None:
        assert handle.wait(timeout=10)


def test_sync_abandoned_stream_stops_the_generation(client):
    stream = client.sync_sampler.sample(inputs=(PROMPT,), max_len=500, temperature=1.0)
    next(stream)
    handle = _engine_handle(stream)
    del stream
    if handle is not None:
        assert handle.wait(timeout=10)


def test_closing_the_sync_sampler_stops_its_streams(smollm_path):
    client = Client(str(smollm_path))
    stream = client.sync_sampler.sample(inputs=(PROMPT,), max_len=500, temperature=1.0)
    next(stream)
    client.close()
    assert _engine_handle(stream).wait(timeout=10)
    with pytest.raises(RuntimeError):
        next(stream)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(inputs=([10**9],)), ValueError, "token id"),
        (dict(inputs=(PROMPT,), model_name="no-such-model"), ValueError, "model_name"),
        (dict(inputs=("word " * 9000,)), ValueError, "context"),
    ],
)
def test_sync_bad_requests_raise_when_iterated(client, kwargs, exc, match):
    stream = client.sync_sampler.sample(max_len=2, **kwargs)
    with pytest.raises(exc, match=match):
        list(stream)


def test_first_token_distribution_matches_the_filtered_softmax(client, engine):
    """Chi-square of 240 first-token draws against softmax(logits / T) after the nucleus."""
    prompt = "My favourite colour is"
    temperature, nucleus_p = 0.8, 0.9
    logits = engine.logits(engine.tokenize(prompt, add_special=True, parse_special=True)).astype(np.float64) / temperature
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    keep = order[: int(np.searchsorted(np.cumsum(probs[order]), nucleus_p) + 1)]
    expected = probs[keep] / probs[keep].sum()
    draws = 240

    async def run():
        ids = []
        for seed in range(draws):
            async for t in client.sampler.sample(inputs=(prompt,), max_len=1, temperature=temperature, nucleus_p=nucleus_p, rng_seed=seed):
                ids.append(t.token_id)
        return ids

    ids = asyncio.run(run())
    assert set(ids) <= set(keep.tolist())
    # Bins: the most likely tokens with expected count >= 5, the rest pooled.
    big = [i for i, p in enumerate(expected) if p * draws >= 5]
    observed = [sum(1 for x in ids if x == keep[i]) for i in big]
    exp_counts = [expected[i] * draws for i in big]
    rest_exp = draws - sum(exp_counts)
    if rest_exp >= 5:
        observed.append(draws - sum(observed))
        exp_counts.append(rest_exp)
    chi2 = sum((o - e) ** 2 / e for o, e in zip(observed, exp_counts))
    dof = len(observed) - 1
    # 99.9% critical value, Wilson-Hilferty approximation.
    z = 3.09
    critical = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3 if dof > 0 else 10.8
    assert chi2 < critical, (chi2, critical, observed, exp_counts)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(nucleus_p=0.0), ValueError, "nucleus_p"),
        (dict(nucleus_p=1.5), ValueError, "nucleus_p"),
        (dict(max_len=0), ValueError, "max_len"),
        (dict(max_len=2.5), TypeError, "max_len"),
        (dict(allowed_tokens=[1], disallowed_tokens=[2]), ValueError, "allowed_tokens"),
        (dict(temperature="hot"), TypeError, "temperature"),
        (dict(stop_strings="stop"), TypeError, "stop_strings"),
        (dict(rng_seed=-1), ValueError, "rng_seed"),
        (dict(inputs="not a tuple"), TypeError, "inputs"),
    ],
)
def test_bad_arguments_raise_at_call_time(client, kwargs, exc, match):
    kwargs.setdefault("inputs", (PROMPT,))
    with pytest.raises(exc, match=match):
        client.sampler.sample(**kwargs)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(inputs=([10**9],)), ValueError, "token id"),
        (dict(inputs=(PROMPT,), model_name="no-such-model"), ValueError, "model_name"),
        (dict(inputs=(PROMPT, b"\x89PNG\r\n\x1a\n" + bytes(32))), ValueError, "text-only"),
        (dict(inputs=(base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(64)).decode(),)), ValueError, "text-only"),
        (dict(inputs=(PROMPT,), allowed_tokens=[10**9]), ValueError, "allowed_tokens"),
        (dict(inputs=(PROMPT,), disallowed_tokens=[-1]), ValueError, "disallowed_tokens"),
        (dict(inputs=("word " * 9000,)), ValueError, "context"),
        (dict(inputs=(PROMPT,), stop_strings=[""]), ValueError, "stop_strings"),
    ],
)
def test_bad_requests_raise_when_iterated(client, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        collect(client, max_len=2, **kwargs)


def test_bad_client_arguments(smollm_path):
    with pytest.raises(FileNotFoundError):
        Client("/nonexistent/model.gguf")
    with pytest.raises(ValueError, match="unknown model name|neither"):
        Client("no-such-registered-model")
    with pytest.raises(ValueError, match="threads"):
        Client(str(smollm_path), threads=0)
    with pytest.raises(TypeError, match="initial_rng_seed"):
        Client(str(smollm_path), initial_rng_seed="x")


def test_several_models_by_name(smollm_path, gemma_path):
    c = Client(models={"small": str(smollm_path), "gemma": str(gemma_path)}, initial_rng_seed=0)
    small, _ = collect(c, inputs=("Hello",), max_len=2, temperature=0)
    gem, _ = collect(c, inputs=("Hello",), max_len=2, temperature=0, model_name="gemma")
    assert [t.token_id for t in small] != [t.token_id for t in gem]
    gemma_tokens = asyncio.run(c.sampler.tokenize("Hello", model_name="gemma"))
    assert gemma_tokens[0].token_id == 2  # Gemma's metadata asks for BOS
    models = asyncio.run(c.sampler.list_models())
    assert {m.name for m in models} == {"small", "gemma"}
    c.close()


def test_kv_cache_type_defaults_to_llama_cpp_f16_and_names_a_bad_choice(smollm_path):
    assert sampler_sdk.Model(str(smollm_path)).kv_cache_type == "f16"
    exact = sampler_sdk.Model(str(smollm_path), kv_cache_type="F32")
    assert exact.kv_cache_type == "f32"
    with pytest.raises(ValueError, match="kv_cache_type"):
        sampler_sdk.Model(str(smollm_path), kv_cache_type="q8_0")
    local = Client(str(smollm_path), kv_cache_type="f32")
    try:
        tokens = local.sync_sampler.sample(inputs=("Hello",), max_len=2, temperature=0)
        assert [t.token_id for t in tokens] == exact.generate_greedy(exact.tokenize("Hello"), 2)
    finally:
        local.close()
