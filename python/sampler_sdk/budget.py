"""Budget updates a server sends alongside the tokens of a sample stream."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

logger = logging.getLogger("sampler_sdk")


@dataclass(frozen=True)
class BudgetUpdate:
    """Tokens left for the API key after the tokens sampled so far (None = unlimited)."""

    tokens_used: int
    tokens_remaining: Optional[int]
    key_name: str = ""


def log_budget_update(budget: Any) -> None:
    """Logs a budget update received from a server (at INFO on the ``sampler_sdk`` logger)."""
    remaining = getattr(budget, "tokens_remaining", None)
    used = getattr(budget, "tokens_used", None)
    if remaining is None:
        logger.info("budget update: %s tokens used, no limit", used)
    else:
        logger.info("budget update: %s tokens used, %s remaining", used, remaining)
