"""What every part of the Slack adapter shares: the JSON type, reading Slack's errors."""

from __future__ import annotations

from typing import Any

from slack_sdk.errors import SlackApiError

JSON = dict[str, Any]


def _error_of(exc: SlackApiError) -> str:
    """Slack's error code, or the HTTP status when the answer was not JSON."""
    data = exc.response.data
    if isinstance(data, dict):
        return str(data.get("error", "unknown error"))
    return f"HTTP {exc.response.status_code}"


def _why(exc: BaseException) -> str:
    return _error_of(exc) if isinstance(exc, SlackApiError) else f"{type(exc).__name__}: {exc}"
