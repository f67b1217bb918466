"""What every config section is built from: a field with its help text, and the one-line error.

A section is a dataclass whose fields carry a default, a ``help`` string and, when only some values
make sense, their ``choices``; the CLI's errors and docs/config.md are both made from these. Each
section checks its own fields in a ``validate`` method beside them, with ``need``, so every error
is one line naming the dotted key, the bad value and what to do.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable
from typing import Any


class ConfigError(ValueError):
    """Invalid configuration; the message is a single actionable line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.splitlines()))


def setting(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """Declare a scalar field with its help text (and allowed values, if any)."""
    meta: dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    return dataclasses.field(default=default, metadata=meta)


def need(ok: bool, key: str, value: Any, requirement: str, fix: str) -> None:
    """Raise the one-line error for ``key`` unless ``ok``: ``config key 'KEY' REQUIREMENT, got VALUE; FIX``."""
    if not ok:
        raise ConfigError(f"config key '{key}' {requirement}, got {value!r}; {fix}")


def closest(word: str, candidates: Iterable[str]) -> str | None:
    """Closest candidate by spelling, ignoring case."""
    by_lower = {c.lower(): c for c in candidates}
    hits = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return by_lower[hits[0]] if hits else None


def check_choices(name: str, section: Any) -> None:
    """Every field of ``section`` (written ``name`` in YAML) that lists ``choices`` holds one of them."""
    for f in dataclasses.fields(section):
        choices = f.metadata.get("choices")
        value = getattr(section, f.name)
        if choices is None or value in choices:
            continue
        hint = closest(str(value), choices)
        key = f"{name}.{f.metadata.get('yaml_key', f.name)}"
        fix = f"did you mean '{hint}'?" if hint else f"set {key} to one of {'|'.join(choices)}"
        need(False, key, value, f"must be one of {'|'.join(choices)}", fix)
