"""Datasets as users have them: JSONL (plain or gzipped) and Parquet files, with a field mapping.

A row's problem text is under ``task.prompt_key``: a string, or verl's layout, a list of chat messages
``[{"role": ..., "content": ...}]`` kept whole as ``Problem.messages``. The reference answer is under
``task.answer_key``, a dotted path into nested objects / struct columns (verl: ``reward_model.ground_truth``).
Code rows (``task.verifier=code``) carry their tests, entry point and optional trusted prefix under
their own keys instead. Every row is checked when the file is read, so a bad row stops the job before
it starts, with one line naming the file, the row and the key.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from areal_hpc.tasks.base import Problem
from areal_hpc.tasks.order import EpochOrder, held_out_split

SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
_OPTIONAL_KEYS = ("task.entry_point_key", "task.code_prefix_key")  # '' turns them off


@dataclass(frozen=True)
class Fields:
    """Where a row keeps what a :class:`Problem` needs (the ``task.*_key`` settings)."""

    prompt_key: str = "prompt"
    answer_key: str = "answer"
    verifier: str = "math"
    tests_key: str = "tests"
    entry_point_key: str = "entry_point"
    code_prefix_key: str = ""

    def required(self) -> list[tuple[str, str]]:
        """(config key, key path) of every field a row must have for this verifier."""
        out = [("task.prompt_key", self.prompt_key)]
        if self.verifier == "code":
            out.append(("task.tests_key", self.tests_key))
            out += [(k, v) for k, v in (("task.entry_point_key", self.entry_point_key),
                                        ("task.code_prefix_key", self.code_prefix_key)) if v]
        else:
            out.append(("task.answer_key", self.answer_key))
        return out


def dataset_format(path: str | Path) -> str:
    """``jsonl`` or ``parquet``, from the file's suffix (``.jsonl``, ``.jsonl.gz``, ``.parquet``)."""
    name = str(path).lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    raise ValueError(f"{path}: unknown dataset format; name the file *.jsonl, *.jsonl.gz or *.parquet")


def read_dataset(path: str | Path, fields: Fields | None = None, source: str | None = None) -> list[Problem]:
    """Every row of a JSONL/Parquet file as a :class:`Problem` (``prompt_id`` 0: the task numbers them).

    ``source`` (the config key that names the file, e.g. ``task.train_path``) prefixes every error.
    """
    fields = fields or Fields()
    path = Path(path).expanduser()
    where = f"{source}: {path}" if source else str(path)
    if not path.is_file():
        raise ValueError(f"{where}: no such file; point {source or 'the path'} at a local JSONL or Parquet file")
    rows = _jsonl_rows(path, where) if dataset_format(path) == "jsonl" else _parquet_rows(path, fields, where)
    problems = [_problem(obj, fields, row_where) for row_where, obj in rows]
    if not problems:
        raise ValueError(f"{where}: no problems found; a dataset needs one row per problem")
    return problems


def _jsonl_rows(path: str | Path, where: str) -> Iterator[tuple[str, Any]]:
    opener = gzip.open if str(path).lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:  # decoded line by line, so a byte that is not UTF-8 is reported with its line
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise ValueError(f"{where}:{lineno}: expected a JSON object ({type(e).__name__}: {e}); "
                                     f"fix or remove that {_unit(where)}") from None
                yield f"{where}:{lineno}", obj
    except (OSError, EOFError) as e:  # a truncated or corrupt .gz
        raise ValueError(f"{where}: unreadable ({type(e).__name__}: {e}); re-create or re-download the file") from None


def _parquet_rows(path: str | Path, fields: Fields, where: str) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{where}: reading Parquet needs pyarrow; pip install pyarrow") from None
    try:
        schema = pq.read_schema(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for files that are not Parquet
        raise ValueError(f"{where}: not a readable Parquet file ({type(e).__name__}: {e}); "
                         f"re-create or re-download the file") from None
    columns = []
    for key, path_ in fields.required():
        column, missing = _schema_path(schema, path_)
        if missing:
            none = " (or '' if the rows have none)" if key in _OPTIONAL_KEYS else ""
            raise ValueError(f"{where}: has no column '{path_}' ({missing}); set {key} to one of its columns{none} "
                             f"or convert the file")
        if column not in columns:
            columns.append(column)
    try:
        table = pq.read_table(path, columns=columns)
    except Exception as e:
        raise ValueError(f"{where}: not a readable Parquet file ({type(e).__name__}: {e}); "
                         f"re-create or re-download the file") from None
    for i, obj in enumerate(table.to_pylist()):
        yield f"{where} row {i}", obj


def _schema_path(schema: Any, path: str) -> tuple[str, str]:
    """(top-level column, '' or why ``path`` is not in ``schema``): dotted parts walk struct fields."""
    import pyarrow as pa

    if path in schema.names:
        return path, ""
    head, *rest = path.split(".")
    if head not in schema.names:
        return head, f"its columns are {', '.join(schema.names)}"
    typ, walked = schema.field(head).type, head
    for part in rest:
        if not pa.types.is_struct(typ):
            return head, f"column '{walked}' is {typ}, not a struct"
        names = [typ.field(j).name for j in range(typ.num_fields)]
        if part not in names:
            return head, f"struct column '{walked}' has fields {', '.join(names)}"
        typ, walked = typ.field(part).type, f"{walked}.{part}"
    return head, ""


_MISSING = object()


def _unit(where: str) -> str:
    """What a bad row is called in its file: a JSONL line or a Parquet row."""
    return "row" if re.search(r" row \d+$", where) else "line"


def _lookup(obj: dict[str, Any], path: str) -> Any:
    """The value at a dotted key path, or ``_MISSING``; a literal key with dots wins over the path."""
    if path in obj:
        return obj[path]
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return _MISSING
        cur = cur[part]
    return cur


def _get(obj: dict[str, Any], key: str, path: str, where: str) -> Any:
    value = _lookup(obj, path)
    if value is _MISSING or value is None:
        what = "null" if value is None else "missing"
        raise ValueError(f"{where}: expected key '{path}', which is {what}; set {key} to the key path that holds it, "
                         f"or fix or remove that {_unit(where)}")
    return value


def _text(value: Any, key: str, path: str, where: str, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"{where}: expected {what} under '{path}', got {type(value).__name__}; "
                         f"set {key} to the key path that holds it, or fix or remove that {_unit(where)}")
    return str(value)


def _problem(obj: Any, f: Fields, where: str) -> Problem:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object with '{f.prompt_key}' and "
                         f"'{f.answer_key if f.verifier != 'code' else f.tests_key}', got {type(obj).__name__}; "
                         f"fix or remove that {_unit(where)}")
    raw = _get(obj, "task.prompt_key", f.prompt_key, where)
    messages = None
    if isinstance(raw, list):
        messages = _messages(raw, f.prompt_key, where)
        users = [c for r, c in messages if r == "user"]
        if not users:
            raise ValueError(f"{where}: expected a 'user' message among the messages under '{f.prompt_key}'; "
                             f"fix or remove that {_unit(where)}")
        prompt = users[-1]
    else:
        prompt = _text(raw, "task.prompt_key", f.prompt_key, where, "the problem text or a list of chat messages")
    if not prompt.strip():
        raise ValueError(f"{where}: expected problem text under '{f.prompt_key}', found it empty; "
                         f"fix or remove that {_unit(where)}")
    if f.verifier != "code":
        answer = _text(_get(obj, "task.answer_key", f.answer_key, where), "task.answer_key", f.answer_key, where,
                       "the reference answer (a string or number)").strip()
        if not answer:
            raise ValueError(f"{where}: expected an answer under '{f.answer_key}', found it empty; "
                             f"fix or remove that {_unit(where)}")
        return Problem(0, prompt, answer, verifier="math", messages=messages)
    tests = _get(obj, "task.tests_key", f.tests_key, where)
    tests = (tests,) if isinstance(tests, str) else tests
    if not isinstance(tests, list | tuple) or not all(isinstance(t, str) for t in tests) \
            or not any(t.strip() for t in tests):
        raise ValueError(f"{where}: expected tests under '{f.tests_key}' (a code problem needs a test string or a "
                         f"list of them), got {tests!r:.60}; set task.tests_key, "
                         f"or fix or remove that {_unit(where)}")
    entry = ""
    if f.entry_point_key:
        entry = _text(_get(obj, "task.entry_point_key", f.entry_point_key, where), "task.entry_point_key",
                      f.entry_point_key, where, "the name of the function the tests call")
    prefix = ""
    if f.code_prefix_key:
        prefix = _text(_get(obj, "task.code_prefix_key", f.code_prefix_key, where), "task.code_prefix_key",
                       f.code_prefix_key, where, "the code the problem provides")
    return Problem(0, prompt, "", verifier="code", messages=messages, tests=tuple(t for t in tests if t.strip()),
                   entry_point=entry, code_prefix=prefix)


def _messages(raw: list[Any], path: str, where: str) -> tuple[tuple[str, str], ...]:
    out = []
    for m in raw:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: expected {{role, content}} chat messages in the list under '{path}' "
                             f"(found {m!r:.60}); set task.prompt_key, or fix or remove that {_unit(where)}")
        out.append((m["role"], m["content"]))
    return tuple(out)


class DatasetTask:
    """Rows of a dataset as an endless, seeded training stream plus a held-out set.

    Training problem ``i`` is row ``order.row_of(i)`` of the training rows (every row once per epoch,
    shuffled per epoch by the seed when ``shuffle``). The held-out set is ``eval_rows`` (its first
    ``n_eval``) when given, else ``n_eval`` rows split off ``rows`` by the seed, never trained on.
    """

    def __init__(self, rows: list[Problem], eval_rows: list[Problem] | None, *, n_eval: int, seed: int,
                 shuffle: bool, source: str, alternative: str = "") -> None:
        if eval_rows is None:
            held, kept = held_out_split(len(rows), n_eval, seed, source, alternative)
            eval_rows, rows = [rows[i] for i in held], [rows[i] for i in kept]
        else:
            eval_rows = eval_rows[:n_eval]
        self._rows = rows
        self._order = EpochOrder(len(rows), seed, shuffle)
        self.eval_problems = [replace(p, prompt_id=-(i + 1)) for i, p in enumerate(eval_rows)]

    @classmethod
    def from_files(cls, train_path: str, eval_path: str | None, fields: Fields, *, n_eval: int, seed: int,
                   shuffle: bool) -> DatasetTask:
        rows = read_dataset(train_path, fields, "task.train_path")
        held = read_dataset(eval_path, fields, "task.eval_path") if eval_path else None
        return cls(rows, held, n_eval=n_eval, seed=seed, shuffle=shuffle, source=f"task.train_path: {train_path}",
                   alternative="give a separate task.eval_path")

    @property
    def n_train(self) -> int:
        """Training rows in one epoch."""
        return len(self._rows)

    def train_problem(self, index: int) -> Problem:
        """Training problem number ``index`` (a pure function of the seed and ``index``)."""
        return replace(self._rows[self._order.row_of(index)], prompt_id=index)

    def epoch_of(self, index: int) -> int:
        """The epoch (0-based) of training problem ``index``."""
        return self._order.epoch_of(index)

    def _all(self) -> list[Problem]:
        return self._rows + self.eval_problems

    @property
    def alphabet(self) -> str:
        chars = {c for p in self._all() for c in p.prompt + p.answer}
        chars |= {c for p in self._all() for _, content in (p.messages or ()) for c in content}
        return "".join(sorted(chars))

    def max_prompt_chars(self) -> int:
        return max(len(p.prompt) for p in self._all())

    def max_answer_chars(self) -> int:
        return max(1, max(len(p.answer) for p in self._all()))
