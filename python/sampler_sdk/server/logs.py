"""Structured request logs: one JSON object per line on the ``sampler_sdk.server`` logger.

Every RPC the server answers (or turns away) produces exactly one line, written when
the call ends: method, key name, model, token counts, duration, outcome (a gRPC status
name, e.g. "OK", "CANCELLED", "DEADLINE_EXCEEDED") and, for failures, the detail.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Dict

logger = logging.getLogger("sampler_sdk.server")


def log_request(fields: Dict[str, Any]) -> None:
    record = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z", "event": "request"}
    record.update({k: v for k, v in fields.items() if v is not None})
    logger.info(json.dumps(record, ensure_ascii=False, separators=(", ", ": ")))


def log_event(event: str, **fields: Any) -> None:
    """A server lifecycle line (start, shutdown) in the same format."""
    record = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z", "event": event}
    record.update({k: v for k, v in fields.items() if v is not None})
    logger.info(json.dumps(record, ensure_ascii=False, separators=(", ", ": ")))
