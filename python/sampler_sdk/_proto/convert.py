"""Conversions between the Python API's types and the ``sampler_sdk.v1`` messages,
shared by the server (``server/service.py``) and the client (``grpc_stub.py``)."""

from __future__ import annotations

import math
import random
from typing import Any, List, Optional, Sequence, Union

from ..budget import BudgetUpdate
from ..stub import Finished, InputSegment, ModelInfo, SampleRequest, Usage
from ..token import Token
from . import sampler as pb


class InvalidRequest(ValueError):
    """A request message with a bad field; the message names the field."""


_MAX_SEED = 2**64 - 1

STOP_REASONS = {
    "max_len": pb.StopReason.Value("STOP_REASON_MAX_LEN"),
    "stop_token": pb.StopReason.Value("STOP_REASON_STOP_TOKEN"),
    "stop_string": pb.StopReason.Value("STOP_REASON_STOP_STRING"),
    "end_of_sequence": pb.StopReason.Value("STOP_REASON_END_OF_SEQUENCE"),
    "context_full": pb.StopReason.Value("STOP_REASON_CONTEXT_FULL"),
    "cancelled": pb.StopReason.Value("STOP_REASON_CANCELLED"),
}
STOP_REASON_NAMES = {number: name for name, number in STOP_REASONS.items()}


# -- Python -> messages --------------------------------------------------------------


def _token_refs(tokens: Optional[Sequence[Union[int, str]]], param: str) -> Any:
    refs = pb.TokenSet()
    for t in tokens or ():
        if isinstance(t, str):
            refs.tokens.add(text=t)
        elif isinstance(t, int) and not isinstance(t, bool):
            if not 0 <= t < 2**32:
                raise ValueError(f"{param}: token id {t} is outside the vocabulary")
            refs.tokens.add(id=t)
        else:
            raise TypeError(f"{param}: expected token ids or strings, got {type(t).__name__}")
    return refs


def request_to_proto(request: SampleRequest) -> Any:
    message = pb.SampleRequest(
        model_name=request.model_name,
        max_len=request.max_len,
        temperature=request.temperature,
        nucleus_p=request.nucleus_p,
        stop_tokens=list(request.stop_tokens),
        stop_strings=list(request.stop_strings),
        rng_seed=request.rng_seed,
        return_attention=request.return_attention,
        augment_tokens=request.augment_tokens,
    )
    for i, segment in enumerate(request.inputs):
        if isinstance(segment, str):
            message.inputs.add(text=segment)
        elif isinstance(segment, (bytes, bytearray, memoryview)):
            message.inputs.add(image=bytes(segment))
        else:
            ids = list(segment)
            for t in ids:
                if isinstance(t, bool) or not isinstance(t, int):
                    raise TypeError(f"inputs[{i}]: token ids must be ints, got {type(t).__name__}")
                if not 0 <= t < 2**32:
                    raise ValueError(f"inputs[{i}]: token id {t} is outside the vocabulary")
            message.inputs.add().token_ids.ids.extend(ids)
    if request.allowed_tokens is not None:
        message.allowed_tokens.CopyFrom(_token_refs(request.allowed_tokens, "allowed_tokens"))
    if request.disallowed_tokens is not None:
        message.disallowed_tokens.CopyFrom(
            _token_refs(request.disallowed_tokens, "disallowed_tokens")
        )
    return message


def token_to_proto(token: Token, with_alternatives: bool = True) -> Any:
    message = pb.Token(
        token_id=token.token_id,
        token_str=token.token_str,
        prob=token.prob,
        token_type=int(token.token_type),
        token_bytes=token.token_bytes,
    )
    if token.logprob is not None:
        message.logprob = token.logprob
    if with_alternatives:
        message.top_k.extend(token_to_proto(alt, with_alternatives=False) for alt in token.top_k)
    if token.attention is not None:
        message.attention.extend(float(w) for w in token.attention)
    return message


def budget_to_proto(update: BudgetUpdate) -> Any:
    message = pb.BudgetUpdate(tokens_used=update.tokens_used, key_name=update.key_name)
    if update.tokens_remaining is not None:
        message.tokens_remaining = update.tokens_remaining
    return message


def finished_to_proto(finished: Finished) -> Any:
    message = pb.Finished(
        stop_reason=STOP_REASONS.get(finished.stop_reason, 0),
        usage=pb.Usage(
            prompt_tokens=finished.usage.prompt_tokens,
            sampled_tokens=finished.usage.sampled_tokens,
        ),
    )
    if finished.stop_string is not None:
        message.stop_string = finished.stop_string
    if finished.stop_token_id is not None:
        message.stop_token_id = finished.stop_token_id
    return message


def model_to_proto(info: ModelInfo) -> Any:
    return pb.ModelInfo(
        name=info.name,
        architecture=info.architecture,
        n_vocab=info.n_vocab,
        context_length=info.context_length,
        aliases=list(info.aliases),
    )


# -- messages -> Python --------------------------------------------------------------


def request_from_proto(message: Any) -> SampleRequest:
    """Validates a SampleRequest message; errors name the field, as ``AsyncSampler`` does."""
    inputs: List[InputSegment] = []
    for i, segment in enumerate(message.inputs):
        kind = segment.WhichOneof("kind")
        if kind == "text":
            inputs.append(segment.text)
        elif kind == "token_ids":
            inputs.append(list(segment.token_ids.ids))
        elif kind == "image":
            inputs.append(bytes(segment.image))
        else:
            raise InvalidRequest(f"inputs[{i}]: empty input (set text, token_ids or image)")
    max_len = message.max_len if message.HasField("max_len") else 256
    if max_len < 1:
        raise InvalidRequest(f"max_len: must be at least 1, got {max_len}")
    temperature = message.temperature if message.HasField("temperature") else 0.7
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise InvalidRequest(f"temperature: must be >= 0 and finite, got {temperature}")
    nucleus_p = message.nucleus_p if message.HasField("nucleus_p") else 0.95
    if not 0 < nucleus_p <= 1:
        raise InvalidRequest(f"nucleus_p: must be in (0, 1], got {nucleus_p}")
    has_allowed = message.HasField("allowed_tokens")
    has_disallowed = message.HasField("disallowed_tokens")
    if has_allowed and has_disallowed:
        raise InvalidRequest("allowed_tokens, disallowed_tokens: give at most one of the two")
    seed = (
        message.rng_seed
        if message.HasField("rng_seed")
        else random.SystemRandom().randrange(0, _MAX_SEED)
    )
    return SampleRequest(
        inputs=tuple(inputs),
        model_name=message.model_name,
        max_len=max_len,
        temperature=temperature,
        nucleus_p=nucleus_p,
        stop_tokens=tuple(message.stop_tokens),
        stop_strings=tuple(message.stop_strings),
        rng_seed=seed,
        return_attention=message.return_attention,
        allowed_tokens=_refs_from_proto(message.allowed_tokens) if has_allowed else None,
        disallowed_tokens=_refs_from_proto(message.disallowed_tokens) if has_disallowed else None,
        augment_tokens=message.augment_tokens if message.HasField("augment_tokens") else True,
    )


def _refs_from_proto(token_set: Any) -> tuple:
    return tuple(
        ref.text if ref.WhichOneof("kind") == "text" else ref.id for ref in token_set.tokens
    )


def token_from_proto(message: Any) -> Token:
    return Token.from_proto(message)


def budget_from_proto(message: Any) -> BudgetUpdate:
    return BudgetUpdate(
        tokens_used=message.tokens_used,
        tokens_remaining=message.tokens_remaining if message.HasField("tokens_remaining") else None,
        key_name=message.key_name,
    )


def finished_from_proto(message: Any) -> Finished:
    return Finished(
        stop_reason=STOP_REASON_NAMES.get(message.stop_reason, "unspecified"),
        usage=Usage(
            prompt_tokens=message.usage.prompt_tokens, sampled_tokens=message.usage.sampled_tokens
        ),
        stop_string=message.stop_string if message.HasField("stop_string") else None,
        stop_token_id=message.stop_token_id if message.HasField("stop_token_id") else None,
    )


def model_from_proto(message: Any) -> ModelInfo:
    return ModelInfo(
        name=message.name,
        architecture=message.architecture,
        n_vocab=message.n_vocab,
        context_length=message.context_length,
        aliases=list(message.aliases),
    )
