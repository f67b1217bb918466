"""Load, override, type-check, validate and save ``Config``.

Errors are ``ConfigError`` with a one-line message naming the dotted key, the bad
value and what to do, so a mistake in a 64-rank job fails at start-up with a line
a user can act on instead of a traceback from deep inside a rank.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shlex
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from areal_hpc.config.fields import ConfigError, closest
from areal_hpc.config.schema import Config

__all__ = ["ConfigError", "config_to_dict", "load_config", "save_config", "validate"]

logger = logging.getLogger(__name__)

_SENTINEL = object()


# --------------------------------------------------------------------------- schema access


def _yaml_key(f: dataclasses.Field) -> str:
    return f.metadata.get("yaml_key", f.name)


def _root_fields() -> dict[str, tuple[dataclasses.Field, Any]]:
    """YAML key -> (field, resolved type) for the root ``Config``."""
    hints = typing.get_type_hints(Config)
    return {_yaml_key(f): (f, hints[f.name]) for f in dataclasses.fields(Config)}


def _section_fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    """YAML key -> (field, resolved type) for one section dataclass."""
    hints = typing.get_type_hints(cls)
    return {_yaml_key(f): (f, hints[f.name]) for f in dataclasses.fields(cls)}


def _is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp) and isinstance(tp, type)


def all_keys() -> list[str]:
    """Every settable dotted key, in schema order."""
    keys: list[str] = []
    for name, (_, tp) in _root_fields().items():
        if _is_section(tp):
            keys.extend(f"{name}.{sub}" for sub in _section_fields(tp))
        else:
            keys.append(name)
    return keys


# --------------------------------------------------------------------------- raw merging

# Keys an older config may still set, and why they went: the unknown-key error says so instead of
# suggesting a look-alike key of another section (rollout.compile is not trainer.compile).
REMOVED: dict[str, str] = {
    "rollout.gated_yield_ms": "sleeping through gated tails measured no gain",
    "rollout.stream_priority": "a high-priority rollout stream measured no effect",
    "cluster.mps_trainer_priority": "a below-normal MPS priority for the trainer measured no effect",
    "cluster.mps_trainer_sm_percent": "capping the trainer's SM share under MPS made the loop slower",
    "rollout.decode_layer": "the fast engine always runs its fastest layer form, norms folded into the projections",
    "rollout.decode_attention": "the fast engine times the attention splits at start, and the decode benchmark "
                                "fixes one with --decode-attention",
    "rollout.compile": "the fast engine always compiles its decode layer on CUDA, and the decode benchmark times "
                       "it uncompiled with --eager-layers-too",
    "rollout.cuda_graphs": "the fast engine always captures its decode step in CUDA graphs on CUDA, and the decode "
                           "benchmark times it without them with --no-graph",
}


def _unknown_key(key: str, where: str) -> ConfigError:
    """Build the 'unknown key' error with the best suggestion we can find."""
    if key in REMOVED:
        return ConfigError(f"unknown config key '{key}' ({where}); it was removed, delete it: {REMOVED[key]}")
    root = _root_fields()
    head, _, rest = key.partition(".")
    suggestion: str | None = None
    if head in root and _is_section(root[head][1]):
        sub_keys = list(_section_fields(root[head][1]))
        leaf = rest.partition(".")[0]
        hit = closest(leaf, sub_keys)
        if hit is not None:
            suggestion = f"{head}.{hit}"
        else:
            same_leaf = [f"'{k}'" for k in all_keys() if k.rsplit(".", 1)[-1] == leaf]
            if same_leaf:
                return ConfigError(
                    f"unknown config key '{key}' ({where}); did you mean {' or '.join(same_leaf)}?"
                )
        if suggestion is None:
            return ConfigError(
                f"unknown config key '{key}' ({where}); valid keys of '{head}': {', '.join(sub_keys)}"
            )
    else:
        suggestion = closest(head, root)
        if suggestion is None:
            return ConfigError(
                f"unknown config key '{key}' ({where}); valid top-level keys: {', '.join(root)}"
            )
    return ConfigError(
        f"unknown config key '{key}' ({where}); did you mean '{suggestion}'?"
    )


class _Raw:
    """Unvalidated values keyed like the YAML, remembering where each came from."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.origins: dict[str, str] = {}

    def set(self, key: str, value: Any, where: str) -> None:
        """Set one dotted key after checking that the schema knows it."""
        root = _root_fields()
        head, dot, rest = key.partition(".")
        if head not in root:
            raise _unknown_key(key, where)
        tp = root[head][1]
        if not _is_section(tp):
            if dot:
                raise ConfigError(
                    f"config key '{head}' is not a section, cannot set '{key}' ({where}); "
                    f"write it as '{head}=<value>'"
                )
            self.values[head] = value
            self.origins[head] = where
            return
        if not dot:
            self.set_section(head, value, where)
            return
        sub, dot2, _ = rest.partition(".")
        if sub not in _section_fields(tp):
            raise _unknown_key(key, where)
        if dot2:
            raise ConfigError(
                f"config key '{head}.{sub}' is not a section, cannot set '{key}' ({where}); "
                f"write it as '{head}.{sub}=<value>'"
            )
        self.values.setdefault(head, {})[sub] = value
        self.origins[f"{head}.{sub}"] = where

    def set_section(self, name: str, value: Any, where: str) -> None:
        """Merge a mapping into a section; an empty YAML section (null) is allowed."""
        if value is None:
            self.values.setdefault(name, {})
            return
        if not isinstance(value, dict):
            raise ConfigError(
                f"config section '{name}' must be a mapping, got {value!r} ({type(value).__name__}) "
                f"({where}); write it as '{name}:' followed by indented 'key: value' lines, "
                f"or override one key like '{name}.<key>=<value>'"
            )
        self.values.setdefault(name, {})
        for sub, sub_value in value.items():
            if not isinstance(sub, str):
                raise ConfigError(
                    f"config key '{name}.{sub!r}' must be a string ({where}); "
                    f"use one of: {', '.join(_section_fields(_root_fields()[name][1]))}"
                )
            self.set(f"{name}.{sub}", sub_value, where)


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(
            f"config file '{path}' does not exist; pass an existing YAML file "
            f"(e.g. configs/quickstart.yaml) or omit it to use the defaults"
        )
    try:
        with path.open(encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        loc = (
            f" at line {mark.line + 1}, column {mark.column + 1}"
            if mark is not None
            else ""
        )
        problem = exc.problem or exc.context or "syntax error"
        raise ConfigError(
            f"cannot parse YAML file '{path}'{loc}: {problem}; fix the YAML syntax there"
        ) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"cannot parse YAML file '{path}': {exc}; fix the YAML syntax"
        ) from exc


def _apply_file(raw: _Raw, path: Path) -> None:
    data = _read_yaml(path)
    if data is None:
        # Running the defaults here would start a run the user did not describe (and move aside the
        # run folder of the default name): a file given but saying nothing is a mistake.
        raise ConfigError(
            f"config file '{path}' is empty (or only comments); put the settings in it "
            f"(start from configs/quickstart.yaml) or omit the file to run the defaults"
        )
    where = f"in {path}"
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file '{path}' must contain a mapping of sections, got {type(data).__name__}; "
            f"start it with lines like 'trainer:' or 'async: true'"
        )
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(
                f"config key {key!r} ({where}) must be a string; valid top-level keys: "
                f"{', '.join(_root_fields())}"
            )
        if "." in key:
            raise _unknown_key(key, where)
        raw.set(key, value, where)


def _parse_override(text: str) -> tuple[str, Any]:
    """Split ``key=value`` and parse the value as YAML so types come out right."""
    key, eq, value_text = text.partition("=")
    key = key.strip()
    if not eq or not key:
        raise ConfigError(
            f"malformed override {text!r}; write it as 'section.key=value', e.g. 'trainer.lr=2e-5'"
        )
    try:
        value = yaml.safe_load(value_text)
    except yaml.YAMLError:
        value = (
            value_text  # not YAML: keep the text; type checking reports it if wrong.
        )
    return key, value


def _apply_overrides(raw: _Raw, overrides: Sequence[str]) -> None:
    for text in overrides:
        key, value = _parse_override(text)
        raw.set(key, value, f"from override {text!r}")


# --------------------------------------------------------------------------- typing


def type_name(tp: Any) -> str:
    """How a field's type is written in errors and docs/config.md: int, str or null, list[float]."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(type_name(a) for a in args) + " or null"
    if typing.get_origin(tp) is list:
        return f"list[{type_name(typing.get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def _to_float(value: Any) -> float | None:
    """Number or numeric string (PyYAML reads '1e-4' as a string) -> finite float, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        out = float(value)
    elif isinstance(value, str):
        try:
            out = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return out if math.isfinite(out) else None


def _to_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    as_float = _to_float(value)
    if as_float is not None and as_float.is_integer():
        return int(as_float)
    return None


def _coerce(value: Any, tp: Any) -> Any:
    """Return ``value`` converted to ``tp``, or ``_SENTINEL`` when it does not fit."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            out = _coerce(value, arg)
            if out is not _SENTINEL:
                return out
        return _SENTINEL
    if origin is list:
        if not isinstance(value, list | tuple):
            return _SENTINEL
        (item_tp,) = typing.get_args(tp)
        items = [_coerce(v, item_tp) for v in value]
        return _SENTINEL if any(i is _SENTINEL for i in items) else items
    if tp is bool:
        return value if isinstance(value, bool) else _SENTINEL
    if tp is int:
        out = _to_int(value)
        return _SENTINEL if out is None else out
    if tp is float:
        out = _to_float(value)
        return _SENTINEL if out is None else out
    if tp is str:
        return value if isinstance(value, str) else _SENTINEL
    raise TypeError(f"unsupported config field type {tp!r}")


def _typed(key: str, value: Any, tp: Any, f: dataclasses.Field, where: str) -> Any:
    if isinstance(value, bool) and tp is str:  # YAML 1.1 reads a bare on/off or true/false as a boolean
        choices = set(f.metadata.get("choices", ()))
        if {"on", "off"} <= choices:
            value = "on" if value else "off"
        elif {"true", "false"} <= choices:
            value = "true" if value else "false"
    out = _coerce(value, tp)
    if out is _SENTINEL:
        default = (
            f.default_factory()
            if f.default_factory is not dataclasses.MISSING
            else f.default
        )
        example = (
            "null"
            if default is None
            else yaml.safe_dump(default, default_flow_style=True).strip()
        )
        example = example.removesuffix("...").strip()
        raise ConfigError(
            f"config key '{key}' expects {type_name(tp)}, got {value!r} ({type(value).__name__}) "
            f"({where}); use a value like {key}={example}"
        )
    return out


def _build(raw: _Raw) -> Config:
    kwargs: dict[str, Any] = {}
    for name, (f, tp) in _root_fields().items():
        if name not in raw.values:
            continue
        if not _is_section(tp):
            kwargs[f.name] = _typed(name, raw.values[name], tp, f, raw.origins[name])
            continue
        section_kwargs: dict[str, Any] = {}
        for sub, (sf, stp) in _section_fields(tp).items():
            if sub in raw.values[name]:
                key = f"{name}.{sub}"
                section_kwargs[sf.name] = _typed(
                    key, raw.values[name][sub], stp, sf, raw.origins[key]
                )
        kwargs[f.name] = tp(**section_kwargs)
    return Config(**kwargs)


# --------------------------------------------------------------------------- validation


def validate(cfg: Config) -> None:
    """Check every constraint of ``cfg`` (each section's own, then those across sections); raise
    ``ConfigError`` on the first violation."""
    cfg.validate()


# --------------------------------------------------------------------------- public API


def load_config(
    path: str | os.PathLike[str] | None, overrides: Sequence[str] | str = ()
) -> Config:
    """Read ``path`` (defaults when None), apply ``key=value`` overrides, type-check, validate."""
    items = shlex.split(overrides) if isinstance(overrides, str) else list(overrides)
    raw = _Raw()
    if path is not None:
        _apply_file(raw, Path(path))
    _apply_overrides(raw, items)
    cfg = _build(raw)
    validate(cfg)
    logger.debug(
        "loaded config from %s with %d override(s)", path or "<defaults>", len(items)
    )
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Nested plain dict with YAML key names (``async``, not ``async_``)."""
    out: dict[str, Any] = {}
    for name, (f, tp) in _root_fields().items():
        value = getattr(cfg, f.name)
        if _is_section(tp):
            out[name] = {
                sub: _plain(getattr(value, sf.name))
                for sub, (sf, _) in _section_fields(tp).items()
            }
        else:
            out[name] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, list | tuple) else value


def save_config(cfg: Config, path: str | os.PathLike[str]) -> None:
    """Write the resolved config as YAML that ``load_config`` reads back to an equal ``Config``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(
        config_to_dict(cfg), sort_keys=False, default_flow_style=False
    )
    target.write_text(
        "# resolved areal_hpc config (written by save_config)\n" + text,
        encoding="utf-8",
    )
    logger.debug("saved config to %s", target)
