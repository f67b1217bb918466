"""Load, override, type-check, validate and save ``Config``.

Errors are ``ConfigError`` with a one-line message naming the dotted key, the bad
value and what to do, so a mistake in a 64-rank job fails at start-up with a line
a user can act on instead of a traceback from deep inside a rank.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import shlex
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from areal_hpc.config.schema import Config

logger = logging.getLogger(__name__)

_SENTINEL = object()


class ConfigError(ValueError):
    """Invalid configuration; the message is a single actionable line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.splitlines()))


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


def _all_keys() -> list[str]:
    """Every settable dotted key, in schema order."""
    keys: list[str] = []
    for name, (_, tp) in _root_fields().items():
        if _is_section(tp):
            keys.extend(f"{name}.{sub}" for sub in _section_fields(tp))
        else:
            keys.append(name)
    return keys


def _closest(word: str, candidates: Iterable[str]) -> str | None:
    """Closest candidate by spelling, ignoring case."""
    by_lower = {c.lower(): c for c in candidates}
    hits = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return by_lower[hits[0]] if hits else None


# --------------------------------------------------------------------------- raw merging


def _unknown_key(key: str, where: str) -> ConfigError:
    """Build the 'unknown key' error with the best suggestion we can find."""
    root = _root_fields()
    head, _, rest = key.partition(".")
    suggestion: str | None = None
    if head in root and _is_section(root[head][1]):
        sub_keys = list(_section_fields(root[head][1]))
        leaf = rest.partition(".")[0]
        hit = _closest(leaf, sub_keys)
        if hit is not None:
            suggestion = f"{head}.{hit}"
        else:
            same_leaf = [f"'{k}'" for k in _all_keys() if k.rsplit(".", 1)[-1] == leaf]
            if same_leaf:
                return ConfigError(
                    f"unknown config key '{key}' ({where}); did you mean {' or '.join(same_leaf)}?"
                )
        if suggestion is None:
            return ConfigError(
                f"unknown config key '{key}' ({where}); valid keys of '{head}': {', '.join(sub_keys)}"
            )
    else:
        suggestion = _closest(head, root)
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
        return
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


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if typing.get_origin(tp) is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
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
    if isinstance(value, bool) and tp is str and {"on", "off"} <= set(f.metadata.get("choices", ())):
        value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
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
            f"config key '{key}' expects {_type_name(tp)}, got {value!r} ({type(value).__name__}) "
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


def _need(ok: bool, key: str, value: Any, requirement: str, fix: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' {requirement}, got {value!r}; {fix}")


def _check_choices(cfg: Config) -> None:
    for name, (f, tp) in _root_fields().items():
        if not _is_section(tp):
            continue
        section = getattr(cfg, f.name)
        for sub, (sf, _) in _section_fields(tp).items():
            choices = sf.metadata.get("choices")
            value = getattr(section, sf.name)
            if choices is None or value in choices:
                continue
            hint = _closest(str(value), choices)
            fix = (
                f"did you mean '{hint}'?"
                if hint
                else f"set {name}.{sub} to one of {'|'.join(choices)}"
            )
            _need(
                False,
                f"{name}.{sub}",
                value,
                f"must be one of {'|'.join(choices)}",
                fix,
            )


def _check_existing_file(key: str, value: str | None, kind_key: str) -> None:
    _need(
        value is not None,
        key,
        value,
        f"is required when {kind_key}=jsonl",
        f"set {key} to a local JSONL file or use {kind_key}=arithmetic",
    )
    if value is not None and not Path(value).expanduser().is_file():
        raise ConfigError(
            f"{key} '{value}' does not exist; point it at a local JSONL file "
            f"or use {kind_key}=arithmetic"
        )


def validate(cfg: Config) -> None:
    """Check every constraint of ``cfg``; raise ``ConfigError`` on the first violation."""
    _check_choices(cfg)
    run, cl, m, w, t = cfg.run, cfg.cluster, cfg.model, cfg.warmup, cfg.task
    r, tr, tp, wt, ev = cfg.rollout, cfg.trainer, cfg.transport, cfg.weights, cfg.eval

    # run
    _need(
        bool(run.name) and "/" not in run.name and os.sep not in run.name,
        "run.name",
        run.name,
        "must be a non-empty folder name without '/'",
        "set run.name=<name>; the run folder is run.output_dir/<name>",
    )
    _need(
        bool(run.output_dir),
        "run.output_dir",
        run.output_dir,
        "must be non-empty",
        "set run.output_dir=runs",
    )
    _need(
        bool(run.cache_dir),
        "run.cache_dir",
        run.cache_dir,
        "must be non-empty",
        "set run.cache_dir=runs/.cache",
    )
    _need(
        run.seed >= 0, "run.seed", run.seed, "must be >= 0", "use a non-negative seed"
    )
    _need(
        run.steps >= 1,
        "run.steps",
        run.steps,
        "must be >= 1",
        "set run.steps to the number of training steps",
    )
    _need(
        run.timeout_s > 0,
        "run.timeout_s",
        run.timeout_s,
        "must be > 0",
        "set run.timeout_s to the job's wall-clock limit in seconds",
    )

    # cluster
    _need(
        cl.n_trainer >= 1,
        "cluster.n_trainer",
        cl.n_trainer,
        "must be >= 1",
        "use at least one trainer rank",
    )
    _need(
        cl.n_rollout >= 1,
        "cluster.n_rollout",
        cl.n_rollout,
        "must be >= 1",
        "use at least one rollout rank",
    )
    _need(
        bool(cl.mpiexec.strip()),
        "cluster.mpiexec",
        cl.mpiexec,
        "must name a program",
        "set cluster.mpiexec=mpiexec (or srun)",
    )

    # model
    for key in (
        "hidden_size",
        "n_layers",
        "n_heads",
        "intermediate_size",
        "max_seq_len",
    ):
        value = getattr(m, key)
        _need(
            value >= 1,
            f"model.{key}",
            value,
            "must be >= 1",
            f"set model.{key} to a positive integer",
        )
    _need(
        m.hidden_size % m.n_heads == 0,
        "model.hidden_size",
        m.hidden_size,
        f"must be divisible by model.n_heads={m.n_heads}",
        "change model.hidden_size or model.n_heads",
    )
    if m.kind == "hf":
        _need(
            m.path is not None,
            "model.path",
            m.path,
            "is required when model.kind=hf",
            "point model.path at a local HF checkpoint directory or use model.kind=tiny",
        )
        if m.path is not None and not Path(m.path).expanduser().is_dir():
            raise ConfigError(
                f"model.path '{m.path}' does not exist; point it at a local HF checkpoint "
                f"directory (config.json + weights) or use model.kind=tiny"
            )
    elif m.path is not None:
        logger.warning("model.path=%r is ignored because model.kind=%s", m.path, m.kind)

    # warmup
    if w.enabled:
        _need(
            w.steps >= 1,
            "warmup.steps",
            w.steps,
            "must be >= 1 when warmup.enabled",
            "set warmup.steps to a positive number or warmup.enabled=false",
        )
    _need(
        w.batch_size >= 1,
        "warmup.batch_size",
        w.batch_size,
        "must be >= 1",
        "set warmup.batch_size=64",
    )
    _need(w.lr > 0, "warmup.lr", w.lr, "must be > 0", "set warmup.lr=1e-3")
    _need(0.0 <= w.flaw < 1.0, "warmup.flaw", w.flaw, "must be in [0, 1)", "set warmup.flaw=0.6 or 0")
    _need(
        w.flaw == 0.0 or t.kind == "arithmetic",
        "warmup.flaw",
        w.flaw,
        "is only defined for task.kind=arithmetic",
        "set warmup.flaw=0",
    )

    # task
    _need(t.digits >= 1, "task.digits", t.digits, "must be >= 1", "set task.digits=2")
    _need(
        bool(t.ops),
        "task.ops",
        t.ops,
        "must list at least one operator",
        "set task.ops='+'",
    )
    _need(t.n_eval >= 1, "task.n_eval", t.n_eval, "must be >= 1", "set task.n_eval=200")
    _need(t.seed >= 0, "task.seed", t.seed, "must be >= 0", "use a non-negative seed")
    if t.kind == "jsonl":
        _check_existing_file("task.train_path", t.train_path, "task.kind")
        _check_existing_file("task.eval_path", t.eval_path, "task.kind")
    if t.kind == "synthetic":
        _need(t.prompt_len >= 1, "task.prompt_len", t.prompt_len, "must be >= 1", "set task.prompt_len=128")
        _need(t.len_median >= 1, "task.len_median", t.len_median, "must be >= 1", "set task.len_median=48")
        _need(t.len_sigma >= 0, "task.len_sigma", t.len_sigma, "must be >= 0 (0: every response has the median length)",
              "set task.len_sigma=1.0")
        need = t.prompt_len + cfg.rollout.max_new_tokens
        _need(m.max_seq_len >= need, "model.max_seq_len", m.max_seq_len,
              f"must cover task.prompt_len + rollout.max_new_tokens = {need}",
              f"set model.max_seq_len={need} or shorten task.prompt_len / rollout.max_new_tokens")
    _need(m.kind != "random" or t.kind == "synthetic", "model.kind", m.kind,
          f"needs task.kind=synthetic (a random-weight model has no tokenizer for task.kind={t.kind} text)",
          "set task.kind=synthetic, or use model.kind=tiny|hf")

    # rollout
    _need(
        r.eta >= 0,
        "rollout.eta",
        r.eta,
        "must be >= 0",
        "set rollout.eta=0 for on-policy or a positive staleness bound",
    )
    _need(
        cfg.async_ or r.eta == 0,
        "rollout.eta",
        r.eta,
        "must be 0 when async=false",
        "the synchronous baseline requires rollout.eta=0; set rollout.eta=0 or async=true",
    )
    _need(
        r.group_size >= 2,
        "rollout.group_size",
        r.group_size,
        "must be >= 2",
        "group normalisation needs at least 2 samples per prompt; set rollout.group_size=8",
    )
    _need(
        r.max_new_tokens >= 1,
        "rollout.max_new_tokens",
        r.max_new_tokens,
        "must be >= 1",
        "set rollout.max_new_tokens=8",
    )
    _need(
        r.max_new_tokens < m.max_seq_len,
        "rollout.max_new_tokens",
        r.max_new_tokens,
        f"must be < model.max_seq_len={m.max_seq_len}",
        "leave room for the prompt or raise model.max_seq_len",
    )
    _need(
        r.temperature > 0,
        "rollout.temperature",
        r.temperature,
        "must be > 0",
        "use a positive temperature (e.g. 1.0)",
    )
    _need(
        0 < r.top_p <= 1,
        "rollout.top_p",
        r.top_p,
        "must be in (0, 1]",
        "set rollout.top_p=1.0",
    )
    _need(
        r.gated_yield_ms >= 0,
        "rollout.gated_yield_ms",
        r.gated_yield_ms,
        "must be >= 0",
        "set rollout.gated_yield_ms=0 (off) or a few milliseconds",
    )
    _need(
        r.batch_bucket_step >= 0 and r.batch_bucket_step % 16 == 0,
        "rollout.batch_bucket_step",
        r.batch_bucket_step,
        "must be 0 or a positive multiple of 16",
        "set rollout.batch_bucket_step=64 (or 0 for halves of the batch only)",
    )
    _need(
        1 <= cl.mps_trainer_sm_percent <= 100,
        "cluster.mps_trainer_sm_percent",
        cl.mps_trainer_sm_percent,
        "must be in 1..100",
        "set cluster.mps_trainer_sm_percent=100 (no limit) or e.g. 70",
    )
    _need(
        r.max_concurrent_groups >= 1,
        "rollout.max_concurrent_groups",
        r.max_concurrent_groups,
        "must be >= 1",
        "set rollout.max_concurrent_groups=8",
    )

    # trainer
    _need(
        tr.lr > 0,
        "trainer.lr",
        tr.lr,
        "must be > 0",
        "use a positive learning rate like trainer.lr=1e-4",
    )
    _need(
        tr.batch_size >= 1,
        "trainer.batch_size",
        tr.batch_size,
        "must be >= 1",
        "set trainer.batch_size=64",
    )
    _need(
        tr.batch_size % r.group_size == 0,
        "trainer.batch_size",
        tr.batch_size,
        f"must be a multiple of rollout.group_size={r.group_size}",
        f"use e.g. trainer.batch_size={max(1, round(tr.batch_size / r.group_size)) * r.group_size}",
    )
    n_groups = tr.batch_size // r.group_size
    _need(
        n_groups % cl.n_trainer == 0,
        "trainer.batch_size",
        tr.batch_size,
        f"must hold a number of groups (batch_size/group_size={n_groups}) divisible by "
        f"cluster.n_trainer={cl.n_trainer}",
        f"use trainer.batch_size={cl.n_trainer * max(1, n_groups // cl.n_trainer) * r.group_size} "
        f"so each trainer rank gets whole groups",
    )
    _need(
        0 < tr.eps_clip < 1,
        "trainer.eps_clip",
        tr.eps_clip,
        "must be in (0, 1)",
        "set trainer.eps_clip=0.2",
    )
    _need(
        tr.behav_imp_weight_cap > 1,
        "trainer.behav_imp_weight_cap",
        tr.behav_imp_weight_cap,
        "must be > 1 (uncapped is not allowed)",
        "set trainer.behav_imp_weight_cap=5.0",
    )
    _need(
        0 < tr.stale_weight <= 1,
        "trainer.stale_weight",
        tr.stale_weight,
        "must be in (0, 1]",
        "set trainer.stale_weight=0.5",
    )
    _need(
        tr.token_budget >= m.max_seq_len,
        "trainer.token_budget",
        tr.token_budget,
        f"must be >= model.max_seq_len={m.max_seq_len}",
        "raise trainer.token_budget so one sequence fits",
    )
    _need(
        tr.token_bucket == 0 or 64 <= tr.token_bucket <= tr.token_budget,
        "trainer.token_bucket",
        tr.token_bucket,
        f"must be 0 (off) or between 64 and trainer.token_budget={tr.token_budget}",
        "set trainer.token_bucket=0, or e.g. token_budget/8 (2048 for a 16384 budget)",
    )
    _need(
        tr.grad_clip > 0,
        "trainer.grad_clip",
        tr.grad_clip,
        "must be > 0",
        "set trainer.grad_clip=1.0",
    )
    _need(
        tr.weight_decay >= 0,
        "trainer.weight_decay",
        tr.weight_decay,
        "must be >= 0",
        "set trainer.weight_decay=0.0",
    )
    _need(
        len(tr.adam_betas) == 2 and all(0 <= b < 1 for b in tr.adam_betas),
        "trainer.adam_betas",
        tr.adam_betas,
        "must be two numbers in [0, 1)",
        "set trainer.adam_betas=[0.9,0.999]",
    )
    _need(
        tr.adam_eps > 0,
        "trainer.adam_eps",
        tr.adam_eps,
        "must be > 0",
        "set trainer.adam_eps=1e-8",
    )
    _need(
        tr.adv_eps > 0,
        "trainer.adv_eps",
        tr.adv_eps,
        "must be > 0",
        "set trainer.adv_eps=1e-6",
    )

    # transport / weights / eval
    _need(
        tp.ring_bytes >= 65536,
        "transport.ring_bytes",
        tp.ring_bytes,
        "must be >= 65536",
        "set transport.ring_bytes=8388608",
    )
    _need(cfg.run.checkpoint_every >= 0, "run.checkpoint_every", cfg.run.checkpoint_every, "must be >= 0",
          "set run.checkpoint_every=0 (checkpoint on preemption only) or a positive step count")
    _need(tp.poll_s > 0, "transport.poll_s", tp.poll_s, "must be > 0", "set transport.poll_s=0.002")
    lg = cfg.log
    _need(lg.shard_samples >= 1, "log.shard_samples", lg.shard_samples, "must be >= 1", "set log.shard_samples=512")
    _need(lg.flush_s > 0, "log.flush_s", lg.flush_s, "must be > 0", "set log.flush_s=2.0")
    _need(lg.trainer_shard_steps >= 1, "log.trainer_shard_steps", lg.trainer_shard_steps, "must be >= 1",
          "set log.trainer_shard_steps=20")
    _need(
        wt.bucket_mb >= 1,
        "weights.bucket_mb",
        wt.bucket_mb,
        "must be >= 1",
        "set weights.bucket_mb=64",
    )
    if ev.enabled:
        _need(
            ev.n >= 1,
            "eval.n",
            ev.n,
            "must be >= 1 when eval.enabled",
            "set eval.n=200 or eval.enabled=false",
        )


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
