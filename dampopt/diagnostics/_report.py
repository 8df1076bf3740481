"""What every result dataclass shares: ``to_dict()`` for JSON, ``to_markdown()`` for reading.

Computing never prints: every diagnostic returns one of these and the caller decides what to show.
"""

from __future__ import annotations

import math
from dataclasses import fields

# Fields carrying live objects (parameter tensors, models) are marked with this metadata key and
# left out of ``to_dict``.
PRIVATE = {"serialize": False}


def _plain(value):
    """A JSON-ready copy of ``value``: dataclasses, dicts, lists, tuples and numbers."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if hasattr(value, "item") and callable(value.item):  # torch / numpy scalars
        return value.item()
    return value


class Report:
    """Mixin for result dataclasses."""

    def to_dict(self) -> dict:
        return {
            field.name: _plain(getattr(self, field.name))
            for field in fields(self)
            if field.metadata.get("serialize", True)
        }

    def to_markdown(self) -> str:  # pragma: no cover - every subclass overrides it
        raise NotImplementedError


def format_value(value) -> str:
    """Numbers with 4 significant digits, None as an em dash, everything else as ``str``."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0 or not math.isfinite(value):
            return str(value)
        if abs(value) >= 1e4 or abs(value) < 1e-3:
            return f"{value:.3e}"
        return f"{value:.4g}"
    return str(value)


def format_interval(value, interval) -> str:
    """``"value [low, high]"``; just the value without an interval; an em dash without a value."""
    if value is None:
        return "—"
    if interval is None:
        return format_value(float(value))
    low, high = interval
    return f"{format_value(float(value))} [{format_value(float(low))}, {format_value(float(high))}]"


def markdown_table(headers, rows) -> str:
    """A GitHub-flavoured Markdown table; cells go through :func:`format_value`."""
    lines = [
        "| " + " | ".join(str(h) for h in headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(format_value(cell) for cell in row) + " |")
    return "\n".join(lines)
