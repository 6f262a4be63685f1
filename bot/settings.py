"""Generation settings: names, allowed ranges, parsing and validation.

One table drives `/xwin set`, `/xwin settings`, the config check and the
adapters' command schemas (Discord min/max, Slack help text).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from bot.types import Settings


@dataclass(frozen=True)
class SettingSpec:
    name: str
    kind: type
    # Inclusive bounds unless *_open is set; None = unbounded.
    low: float | None
    high: float | None
    low_open: bool = False
    help: str = ""

    def range_text(self, context_length: int | None = None) -> str:
        if self.kind is str:
            return "any text up to 4000 characters"
        high = self.high
        if self.name == "max_new_tokens" and context_length is not None:
            high = max_new_tokens_limit(context_length)
        lo = "(" if self.low_open else "["
        if high is None:
            return f"an integer ≥ {_fmt(self.low)}" if self.kind is int else f"a number ≥ {_fmt(self.low)}"
        kind = "an integer" if self.kind is int else "a number"
        return f"{kind} in {lo}{_fmt(self.low)}, {_fmt(high)}]"


def _fmt(x: float | None) -> str:
    if x is None:
        return "∞"
    return str(int(x)) if float(x).is_integer() else str(x)


SYSTEM_PROMPT_MAX = 4000


def max_new_tokens_limit(context_length: int) -> int:
    """A reply may use the whole context but one token: the prompt needs room."""
    return max(1, context_length - 1)

SPECS: dict[str, SettingSpec] = {
    s.name: s
    for s in (
        SettingSpec("temperature", float, 0.0, 2.0, help="randomness; 0 = always the likeliest word"),
        SettingSpec("top_p", float, 0.0, 1.0, low_open=True, help="nucleus sampling mass"),
        SettingSpec("top_k", int, 0, None, help="sample among the k likeliest tokens; 0 = off"),
        SettingSpec("repetition_penalty", float, 1.0, 2.0, help="discourages repeating text; 1 = off"),
        SettingSpec("max_new_tokens", int, 1, None, help="longest reply, in tokens"),
        SettingSpec("system_prompt", str, None, None, help="the sentence that opens every prompt"),
    )
}


def parse_value(name: str, raw: str, *, context_length: int) -> Any:
    """Parse and check one setting from text; ValueError names the allowed range."""
    spec = SPECS.get(name)
    if spec is None:
        raise ValueError(f"unknown setting {name!r}; settings are: {', '.join(SPECS)}")
    if spec.kind is str:
        value: Any = raw.strip()
    else:
        try:
            value = spec.kind(raw.strip())
        except ValueError:
            raise ValueError(
                f"{name} must be {spec.range_text(context_length)}, got {raw.strip()!r}"
            ) from None
    check_value(name, value, context_length=context_length)
    return value


def check_value(name: str, value: Any, *, context_length: int) -> None:
    spec = SPECS[name]
    if spec.kind is str:
        if not isinstance(value, str) or not value.strip() or len(value) > SYSTEM_PROMPT_MAX:
            raise ValueError(f"{name} must be {spec.range_text()} (not empty)")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be {spec.range_text(context_length)}, got {value!r}")
    if spec.kind is int and not float(value).is_integer():
        raise ValueError(f"{name} must be {spec.range_text(context_length)}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} must be {spec.range_text(context_length)}, got {value!r}")
    high = max_new_tokens_limit(context_length) if name == "max_new_tokens" else spec.high
    too_low = spec.low is not None and (value <= spec.low if spec.low_open else value < spec.low)
    too_high = high is not None and value > high
    if too_low or too_high:
        raise ValueError(f"{name} must be {spec.range_text(context_length)}, got {_fmt(value)}")


def validate_settings(settings: Settings, *, context_length: int) -> None:
    for f in dataclasses.fields(settings):
        check_value(f.name, getattr(settings, f.name), context_length=context_length)


def apply_overrides(defaults: Settings, overrides: dict[str, Any]) -> Settings:
    known = {k: v for k, v in overrides.items() if k in SPECS}
    return dataclasses.replace(defaults, **known)


def describe(settings: Settings, overridden: set[str]) -> str:
    lines = []
    for name in SPECS:
        value = getattr(settings, name)
        shown = repr(value) if isinstance(value, str) else _fmt(value)
        mark = " (set here)" if name in overridden else ""
        lines.append(f"{name} = {shown}{mark}")
    return "\n".join(lines)
