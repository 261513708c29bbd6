"""The gRPC front end's pieces that need no model: proto compilation, the hand-written
xai_api subset against the official client's descriptors, message conversions, the
OpenAI-style stop trimming, API keys and budgets, client target parsing."""

from __future__ import annotations

import threading

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sampler_sdk import _proto
from sampler_sdk._proto import convert
from sampler_sdk.grpc_stub import GrpcStub, parse_target, translate_error
from sampler_sdk.server.auth import ANONYMOUS, ApiKey, BudgetStore, KeyRing, parse_api_keys
from sampler_sdk.server.xai_compat import StopTrimmer
from sampler_sdk.stub import Finished, SampleRequest, Usage
from sampler_sdk.token import Token, TokenType

# -- protos ---------------------------------------------------------------------------


def test_method_paths_are_the_xai_ones():
    assert (
        _proto.method_path("xai_api.Chat", "GetCompletionChunk")
        == "/xai_api.Chat/GetCompletionChunk"
    )
    assert (
        _proto.method_path("xai_api.Models", "ListLanguageModels")
        == "/xai_api.Models/ListLanguageModels"
    )
    assert (
        _proto.method_path("xai_api.Tokenize", "TokenizeText") == "/xai_api.Tokenize/TokenizeText"
    )
    assert (
        _proto.method_path("sampler_sdk.v1.Sampler", "Sample") == "/sampler_sdk.v1.Sampler/Sample"
    )
    assert _proto.service("xai_api.Chat").methods_by_name["GetCompletionChunk"].server_streaming


def test_optional_fields_have_presence():
    request = _proto.xai.GetCompletionsRequest(temperature=0)
    assert request.HasField("temperature") and not request.HasField("top_p")
    assert _proto.xai.GetCompletionsRequest.FromString(request.SerializeToString()).HasField(
        "temperature"
    )


def test_embedded_descriptor_set_is_the_shipped_protos_compiled_by_protoc(tmp_path):
    """The set build.rs embeds equals what protoc (grpcio-tools, a test dependency) makes
    of the .proto files shipped now: a stale build or a compiler disagreement shows here."""
    grpc_tools = pytest.importorskip("grpc_tools")
    from pathlib import Path

    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    root = _proto.PROTO_ROOT
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.proto"))
    out = tmp_path / "set.binpb"
    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    status = protoc.main(
        ["protoc", f"--proto_path={root}", f"--proto_path={well_known}", "--include_imports",
         f"--descriptor_set_out={out}", *files]
    )
    assert status == 0
    by_protoc = {f.name: f for f in descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file}
    embedded = {f.name: f for f in _proto._file_set.file}
    assert set(files) <= set(embedded)
    assert embedded.keys() == by_protoc.keys()
    for name, file in by_protoc.items():
        # Source info and json names are compiler choices; the schema must be the same.
        for f in (file, embedded[name]):
            f.ClearField("source_code_info")
            for message in f.message_type:
                for field in message.field:
                    field.ClearField("json_name")
        assert embedded[name] == file, name


def test_server_transport_options_follow_the_xai_client():
    """XAI-API.md section 7: tolerate 30 s pings without calls, 20 MiB messages."""
    from sampler_sdk.server.app import SERVER_OPTIONS

    options = dict(SERVER_OPTIONS)
    assert options["grpc.keepalive_permit_without_calls"] == 1
    assert options["grpc.http2.max_ping_strikes"] == 0
    assert options["grpc.http2.min_recv_ping_interval_without_data_ms"] <= 30_000
    assert options["grpc.max_receive_message_length"] == options["grpc.max_send_message_length"] == 20 * 2**20


def _official_pool():
    pytest.importorskip("xai_sdk")
    from google.protobuf import descriptor_pool
    from xai_sdk.proto import chat_pb2, models_pb2, sample_pb2, tokenize_pb2, usage_pb2  # noqa: F401

    return descriptor_pool.Default()


def test_xai_subset_matches_the_official_client():
    """Every message, field, enum value and method we declare has the official name,
    number, type, cardinality and presence (the descriptors xai-sdk ships)."""
    reference = _official_pool()
    checked = 0
    for file_proto in _proto._file_set.file:
        if file_proto.package != "xai_api":
            continue
        for message in file_proto.message_type:
            ours = _proto.pool.FindMessageTypeByName(f"xai_api.{message.name}")
            theirs = reference.FindMessageTypeByName(f"xai_api.{message.name}")
            for f in ours.fields:
                t = theirs.fields_by_number[f.number]
                assert (t.name, t.type, t.is_repeated, t.has_presence) == (
                    f.name,
                    f.type,
                    f.is_repeated,
                    f.has_presence,
                ), f.full_name
                if f.message_type is not None:
                    assert t.message_type.full_name == f.message_type.full_name, f.full_name
                if f.enum_type is not None:
                    assert t.enum_type.full_name == f.enum_type.full_name, f.full_name
                checked += 1
        for enum in file_proto.enum_type:
            ours = _proto.pool.FindEnumTypeByName(f"xai_api.{enum.name}")
            theirs = reference.FindEnumTypeByName(f"xai_api.{enum.name}")
            for v in ours.values:
                assert theirs.values_by_number[v.number].name == v.name
        for service in file_proto.service:
            ours = _proto.pool.FindServiceByName(f"xai_api.{service.name}")
            theirs = reference.FindServiceByName(f"xai_api.{service.name}")
            for m in ours.methods:
                t = theirs.methods_by_name[m.name]
                assert (t.input_type.full_name, t.output_type.full_name, t.server_streaming) == (
                    m.input_type.full_name,
                    m.output_type.full_name,
                    m.server_streaming,
                )
    assert checked > 100


def test_private_pool_coexists_with_the_official_client():
    reference = _official_pool()
    ours = _proto.xai.GetCompletionsRequest(model="m", n=2, stop=["x"])
    theirs = reference.FindMessageTypeByName("xai_api.GetCompletionsRequest")
    from google.protobuf import message_factory

    parsed = message_factory.GetMessageClass(theirs).FromString(ours.SerializeToString())
    assert parsed.model == "m" and parsed.n == 2 and list(parsed.stop) == ["x"]


# -- conversions -----------------------------------------------------------------------


def test_sample_request_round_trip():
    request = SampleRequest(
        inputs=("text", [1, 2, 3], b"\x89PNG\r\n\x1a\n..."),
        model_name="m",
        max_len=7,
        temperature=0.0,
        nucleus_p=0.5,
        stop_tokens=("<|im_end|>",),
        stop_strings=("\n\n", "é"),
        rng_seed=2**64 - 1,
        return_attention=True,
        allowed_tokens=(5, "Yes"),
        augment_tokens=False,
    )
    message = _proto.sampler.SampleRequest.FromString(
        convert.request_to_proto(request).SerializeToString()
    )
    assert convert.request_from_proto(message) == request


def test_unset_fields_take_the_sampler_defaults():
    parsed = convert.request_from_proto(_proto.sampler.SampleRequest())
    defaults = SampleRequest(inputs=())
    for name in (
        "max_len",
        "temperature",
        "nucleus_p",
        "augment_tokens",
        "allowed_tokens",
        "disallowed_tokens",
    ):
        assert getattr(parsed, name) == getattr(defaults, name), name
    assert 0 <= parsed.rng_seed < 2**64


def test_empty_allowed_set_is_kept_apart_from_none():
    message = convert.request_to_proto(SampleRequest(inputs=(), allowed_tokens=()))
    assert convert.request_from_proto(message).allowed_tokens == ()


@pytest.mark.parametrize(
    "fields, named",
    [
        (dict(max_len=0), "max_len"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(nucleus_p=0.0), "nucleus_p"),
        (dict(nucleus_p=1.5), "nucleus_p"),
    ],
)
def test_bad_fields_are_named(fields, named):
    with pytest.raises(ValueError, match=named):
        convert.request_from_proto(_proto.sampler.SampleRequest(**fields))


def test_both_token_sets_rejected():
    message = _proto.sampler.SampleRequest()
    message.allowed_tokens.tokens.add(id=1)
    message.disallowed_tokens.tokens.add(id=2)
    with pytest.raises(ValueError, match="allowed_tokens, disallowed_tokens"):
        convert.request_from_proto(message)


def test_empty_input_segment_rejected():
    message = _proto.sampler.SampleRequest()
    message.inputs.add()
    with pytest.raises(ValueError, match=r"inputs\[0\]"):
        convert.request_from_proto(message)


def test_token_round_trip_keeps_every_field():
    import numpy as np

    alt = Token(token_id=9, token_str="b", prob=0.25, token_bytes=b"b")
    token = Token(
        token_id=3,
        token_str="é",
        prob=0.123456789012345,
        top_k=[alt],
        attention=np.array([0.5, 0.25, 0.25], dtype=np.float32),
        token_type=TokenType.SAMPLED,
        token_bytes=b"\xa9",
        logprob=-1.5,
    )
    back = Token.from_proto(
        _proto.sampler.Token.FromString(convert.token_to_proto(token).SerializeToString())
    )
    assert back.token_id == 3 and back.token_str == "é" and back.prob == token.prob
    assert (
        back.token_bytes == b"\xa9"
        and back.logprob == -1.5
        and back.token_type == TokenType.SAMPLED
    )
    assert (
        back.top_k[0].token_id == 9 and back.top_k[0].prob == 0.25 and back.top_k[0].logprob is None
    )
    assert back.attention.dtype == np.float32 and back.attention.tolist() == [0.5, 0.25, 0.25]


def test_finished_round_trip():
    for finished in (
        Finished("stop_string", Usage(4, 2), stop_string="\n"),
        Finished("end_of_sequence", Usage(4, 2), stop_token_id=2),
        Finished("max_len", Usage(1, 9)),
    ):
        assert convert.finished_from_proto(convert.finished_to_proto(finished)) == finished


# -- OpenAI-style stop strings -------------------------------------------------------------


def _trim_all(pieces, stops):
    trimmer = StopTrimmer(stops)
    shown = [trimmer.feed(p) for p in pieces]
    shown.append(trimmer.finish())
    return "".join(shown), trimmer


def test_stop_string_spanning_pieces_is_cut_before():
    text, trimmer = _trim_all(["Hello", " wo", "rld", "!"], ["world"])
    assert text == "Hello " and trimmer.stopped


def test_text_that_might_start_a_stop_is_held_back():
    trimmer = StopTrimmer(["</end>"])
    assert trimmer.feed("abc</") == "abc"
    assert trimmer.feed("x") == "</x"


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="ab\n<>é", max_size=30),
    stops=st.lists(st.text(alphabet="ab\n<>é", min_size=1, max_size=4), max_size=4),
    data=st.data(),
)
def test_trimming_equals_cutting_the_whole_text(text, stops, data):
    """For any split of the text into pieces (tokens): what is shown equals the text cut
    before the earliest-starting stop string present once the first piece completing
    any stop string arrived (generation ends at that token), and nothing shown is ever
    taken back."""
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=8)))
    pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    expected, stopped, so_far = text, False, ""
    for piece in pieces:
        so_far += piece
        found = [i for i in (so_far.find(s) for s in stops) if i >= 0]
        if found:
            expected, stopped = so_far[: min(found)], True
            break
    trimmer = StopTrimmer(stops)
    shown = ""
    for piece in pieces:
        shown += trimmer.feed(piece)
        assert expected.startswith(shown)
    shown += trimmer.finish()
    assert shown == expected
    assert trimmer.stopped == stopped


# -- keys and budgets -----------------------------------------------------------------


def test_keys_file_parsing():
    keys = parse_api_keys("# comment\n\nk1 alice\nk2 bob 100  # trailing\n", "keys.txt")
    assert keys == [ApiKey("k1", "alice"), ApiKey("k2", "bob", 100)]
    assert "k1" not in repr(keys[0])


@pytest.mark.parametrize(
    "text, message",
    [
        ("lonely\n", r"keys.txt:1: expected 'KEY NAME \[TOKEN_BUDGET\]'"),
        ("k a b c\n", "keys.txt:1"),
        ("k a x\n", "keys.txt:1: TOKEN_BUDGET must be an integer"),
        ("k a -1\n", "keys.txt:1: TOKEN_BUDGET must be >= 0"),
        ("k a\nk b\n", "keys.txt:2: this key is already given on line 1"),
        ("k a\nj a\n", "keys.txt:2: key name 'a' is already used on line 1"),
    ],
)
def test_keys_file_errors_name_the_line(text, message):
    with pytest.raises(ValueError, match=message):
        parse_api_keys(text, "keys.txt")


def test_keyring_identifies_bearer_keys():
    ring = KeyRing([ApiKey("secret", "alice")])
    assert ring.identify([("authorization", "Bearer secret")]).name == "alice"
    assert ring.identify([("authorization", "bearer  secret ")]).name == "alice"
    assert ring.identify([("authorization", "Bearer wrong")]) is None
    assert ring.identify([]) is None
    assert "missing" in ring.rejection([])
    assert KeyRing().identify([]) is ANONYMOUS


def test_budget_charges_exactly_once_under_threads(tmp_path):
    key = ApiKey("k", "alice", token_budget=1000)
    store = BudgetStore(tmp_path / "usage.sqlite", flush_interval=0.0)
    granted = []

    def worker():
        n = 0
        while store.try_charge(key):
            n += 1
        granted.append(n)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(granted) == 1000 and store.used("alice") == 1000 and store.exhausted(key)
    store.close()
    reopened = BudgetStore(tmp_path / "usage.sqlite")
    assert reopened.used("alice") == 1000 and reopened.remaining(key) == 0
    reopened.close()


def test_unlimited_key_is_counted_but_never_exhausted():
    store = BudgetStore(None)
    key = ApiKey("k", "free")
    for _ in range(5):
        assert store.try_charge(key)
    assert store.used("free") == 5 and store.remaining(key) is None and not store.exhausted(key)


# -- client ---------------------------------------------------------------------------


def test_parse_target():
    assert parse_target("localhost:50051") == ("localhost:50051", None)
    assert parse_target("https://example.com:443") == ("example.com:443", True)
    assert parse_target("http://10.0.0.1:50051/") == ("10.0.0.1:50051", False)
    assert parse_target("[::1]:50051") == ("[::1]:50051", None)
    for bad in ("", "localhost", "host:port", ":50051"):
        with pytest.raises(ValueError, match="api_host"):
            parse_target(bad)


def test_tls_by_default_except_on_loopback():
    assert not GrpcStub("localhost:1").tls
    assert not GrpcStub("127.0.0.1:1").tls
    assert not GrpcStub("[::1]:1").tls
    assert GrpcStub("example.com:1").tls
    assert GrpcStub("localhost:1", root_certificates=b"pem").tls
    assert not GrpcStub("http://example.com:1").tls
    with pytest.raises(ValueError, match="root_certificates"):
        GrpcStub("http://example.com:1", root_certificates=b"pem")


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code, details, trailing=()):
        self._code, self._details, self._trailing = code, details, trailing

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailing


def test_error_translation():
    from sampler_sdk import ContextOverflowError
    from sampler_sdk.grpc_stub import (
        AuthenticationError,
        DeadlineExceededError,
        RemoteError,
        ResourceExhaustedError,
    )

    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert type(translate_error(_FakeRpcError(invalid, "x"))) is ValueError
    assert (
        type(
            translate_error(_FakeRpcError(invalid, "x", (("sampler-sdk-error-type", "TypeError"),)))
        )
        is TypeError
    )
    overflow = translate_error(
        _FakeRpcError(invalid, "long", (("sampler-sdk-error-type", "ContextOverflowError"),))
    )
    assert isinstance(overflow, ContextOverflowError)
    assert isinstance(
        translate_error(_FakeRpcError(grpc.StatusCode.UNAUTHENTICATED, "k")), AuthenticationError
    )
    assert isinstance(
        translate_error(_FakeRpcError(grpc.StatusCode.UNAUTHENTICATED, "k")), PermissionError
    )
    assert isinstance(
        translate_error(_FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "b")),
        ResourceExhaustedError,
    )
    assert isinstance(
        translate_error(_FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "d")), TimeoutError
    )
    assert isinstance(
        translate_error(_FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "d")),
        DeadlineExceededError,
    )
    internal = translate_error(_FakeRpcError(grpc.StatusCode.INTERNAL, "boom"))
    assert isinstance(internal, RemoteError) and internal.code == grpc.StatusCode.INTERNAL


def test_server_config_defaults_and_tokenizer_rule(tmp_path):
    from sampler_sdk.server.app import ServerConfig

    config = ServerConfig(models={"m": "m.gguf"})
    # Concurrent generations are decoded together: the default admits a full batch.
    assert config.max_concurrent == 32
    ServerConfig(models={"m": "m.gguf"}, tokenizer=tmp_path / "t.model")
    with pytest.raises(ValueError, match="--tokenizer"):
        ServerConfig(models={"a": "a.gguf", "b": "b.gguf"}, tokenizer=tmp_path / "t.model")
