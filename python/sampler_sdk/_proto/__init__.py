"""Message classes and RPC plumbing for the protocol buffers in ``sampler_sdk/protos``.

The ``.proto`` files ship inside the package (``protos/`` at the repository root links to
them) and are compiled when the package is built, never committed as generated code:

- ``build.rs`` compiles them (with a pure-Rust protoc) into one ``FileDescriptorSet``
  that the extension module embeds as ``_engine.PROTO_DESCRIPTOR_SET``; a ``.proto``
  edit rebuilds it. Installing needs no protoc and no ``grpcio-tools``.
- Message classes come from a **private** descriptor pool. The official ``xai-sdk``
  registers its own ``xai_api`` descriptors in protobuf's default pool; ours share their
  full names, so both in the default pool would collide in any process that imports both
  (an application using either client, or a test running the official client against an
  in-process server).
- No generated ``*_pb2_grpc`` stubs: ``method_handlers`` and ``unary_stream`` /
  ``unary_unary`` build server handlers and client callables from the service
  descriptors, so method paths and message types always come from the ``.proto`` files.

``sampler`` and ``xai`` are namespaces of the message classes and enum wrappers of the
packages ``sampler_sdk.v1`` and ``xai_api`` (``sampler.SampleRequest``,
``xai.FinishReason.Value("REASON_STOP")``).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, Optional, Tuple

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.internal import enum_type_wrapper

from .._engine import PROTO_DESCRIPTOR_SET

PROTO_ROOT = Path(__file__).resolve().parent.parent / "protos"


def _build_pool() -> Tuple[descriptor_pool.DescriptorPool, descriptor_pb2.FileDescriptorSet]:
    file_set = descriptor_pb2.FileDescriptorSet.FromString(PROTO_DESCRIPTOR_SET)
    pool = descriptor_pool.DescriptorPool()
    # The set lists imports before the files that import them.
    for file_proto in file_set.file:
        pool.Add(file_proto)
    return pool, file_set


pool, _file_set = _build_pool()


def message_class(full_name: str) -> Any:
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(full_name))


def _namespace(package: str) -> SimpleNamespace:
    names: Dict[str, Any] = {}
    for file_proto in _file_set.file:
        if file_proto.package != package:
            continue
        for message in file_proto.message_type:
            names[message.name] = message_class(f"{package}.{message.name}")
        for enum in file_proto.enum_type:
            names[enum.name] = enum_type_wrapper.EnumTypeWrapper(
                pool.FindEnumTypeByName(f"{package}.{enum.name}")
            )
    return SimpleNamespace(**names)


sampler = _namespace("sampler_sdk.v1")
xai = _namespace("xai_api")
Timestamp = message_class("google.protobuf.Timestamp")
Empty = message_class("google.protobuf.Empty")


def service(full_name: str):
    """The ``ServiceDescriptor`` of ``full_name`` (e.g. ``"xai_api.Chat"``)."""
    return pool.FindServiceByName(full_name)


def method_path(service_name: str, method: str) -> str:
    descriptor = service(service_name).methods_by_name[method]
    return f"/{descriptor.containing_service.full_name}/{descriptor.name}"


def _serialize(message: Any) -> bytes:
    return message.SerializeToString()


def method_handlers(
    service_name: str,
    implementation: Any,
    wrap: Callable[[Any, Any, Any], Any],
):
    """A grpc generic handler serving every method of ``service_name``.

    For each method, ``implementation`` has an attribute of the same name (an async
    function, or an async generator function for server-streaming methods) taking
    ``(request, context)``. Requests arrive as raw bytes: ``wrap(method_descriptor,
    request_class, function)`` returns the function grpc calls, and is where parsing
    (with INVALID_ARGUMENT for a malformed message rather than grpc's INTERNAL) and
    per-request bookkeeping happen. Methods the implementation lacks are left out, so
    grpc answers them UNIMPLEMENTED.
    """
    import grpc

    descriptor = service(service_name)
    handlers = {}
    for method in descriptor.methods:
        function = getattr(implementation, method.name, None)
        if function is None:
            continue
        if method.client_streaming:
            raise NotImplementedError(f"{method.full_name}: client streaming is not supported")
        request_class = message_factory.GetMessageClass(method.input_type)
        behaviour = wrap(method, request_class, function)
        make = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make(
            behaviour, request_deserializer=None, response_serializer=_serialize
        )
    return grpc.method_handlers_generic_handler(descriptor.full_name, handlers)


def _client_callable(channel: Any, service_name: str, method: str, streaming: bool):
    descriptor = service(service_name).methods_by_name[method]
    if descriptor.server_streaming != streaming:
        kind = "server-streaming" if descriptor.server_streaming else "unary"
        raise TypeError(f"{descriptor.full_name} is {kind}")
    response_class = message_factory.GetMessageClass(descriptor.output_type)
    make = channel.unary_stream if streaming else channel.unary_unary
    return make(
        method_path(service_name, method),
        request_serializer=_serialize,
        response_deserializer=response_class.FromString,
    )


def unary_unary(channel: Any, service_name: str, method: str):
    return _client_callable(channel, service_name, method, streaming=False)


def unary_stream(channel: Any, service_name: str, method: str):
    return _client_callable(channel, service_name, method, streaming=True)


def timestamp_now(now: Optional[float] = None) -> Any:
    import time

    t = time.time() if now is None else now
    seconds = int(t)
    return Timestamp(seconds=seconds, nanos=int((t - seconds) * 1e9))
