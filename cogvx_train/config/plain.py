"""Typed config dataclasses from plain values: what every module below the CLI takes instead of OmegaConf."""

from __future__ import annotations

from typing import Any, TypeVar

T = TypeVar("T")


def plain_config(cls: type[T], value: T | dict[str, Any] | None, what: str) -> T:
    """A config dataclass from None (defaults), an instance, or a dict of plain values (unknown keys: one sentence
    naming them and the known ones)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a mapping of plain values, got {type(value).__name__}.")
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"unknown {what} setting(s) {unknown}; known: {', '.join(sorted(known))}.")
    kwargs = dict(value)
    if "overrides" in kwargs:
        kwargs["overrides"] = dict(kwargs["overrides"] or {})
    return cls(**kwargs)
