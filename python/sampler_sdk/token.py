"""The Token type streamed by the sampler (the seed's ``xai_sdk.sampler.Token``)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, List, Optional


class TokenType(enum.IntEnum):
    """Where a token came from: the caller's context, or the model."""

    PROMPT = 1
    SAMPLED = 2


@dataclass
class Token:
    """An element of the vocabulary, with what the sampler knows about it.

    - ``token_id``: index in the model's vocabulary.
    - ``token_str``: the text this token contributes to the stream. A character whose
      UTF-8 bytes span several tokens is carried whole by the token that completes it, so
      ``"".join(t.token_str for t in stream)`` is exactly the decoded text; tokens inside
      such a character carry ``""``. For ``top_k`` alternatives and prompt tokens it is the
      token's own text (undecodable bytes shown as U+FFFD).
    - ``token_bytes``: the token's raw bytes.
    - ``prob``: probability of this token in the final sampling distribution (after
      temperature, the allowed/disallowed mask and the nucleus filter). 1.0 for a greedy
      (temperature 0) draw; 0.0 for prompt tokens.
    - ``logprob``: log-probability under the model's unfiltered distribution
      (softmax of the raw logits at temperature 1), the value wanted for scoring;
      None where not computed.
    - ``top_k``: the 8 most probable tokens of the final distribution, most probable
      first, each a ``Token`` with its ``prob``.
    - ``attention``: when requested, a 1-D float32 numpy array with one weight per context
      position (prompt and sampled tokens so far) that the model attended to when this
      token was sampled, averaged over every layer and head (it sums to 1).
    """

    token_id: int
    token_str: str
    prob: float = 0.0
    top_k: List["Token"] = field(default_factory=list)
    attention: Optional[Any] = None
    token_type: TokenType = TokenType.SAMPLED
    token_bytes: bytes = b""
    logprob: Optional[float] = None

    @classmethod
    def from_proto(cls, proto: Any) -> "Token":
        """Builds a Token from a ``sampler_sdk.v1.Token`` protocol buffer message."""
        attention = None
        if len(getattr(proto, "attention", ())):
            import numpy as np

            attention = np.asarray(list(proto.attention), dtype=np.float32)
        token_type = TokenType(proto.token_type) if getattr(proto, "token_type", 0) else TokenType.SAMPLED
        has_logprob = hasattr(proto, "HasField") and _has_field(proto, "logprob")
        return cls(
            token_id=proto.token_id,
            token_str=proto.token_str,
            prob=proto.prob,
            top_k=[cls.from_proto(alt) for alt in getattr(proto, "top_k", ())],
            attention=attention,
            token_type=token_type,
            token_bytes=bytes(getattr(proto, "token_bytes", b"")),
            logprob=proto.logprob if has_logprob else None,
        )


def _has_field(proto: Any, name: str) -> bool:
    try:
        return bool(proto.HasField(name))
    except ValueError:
        return False
