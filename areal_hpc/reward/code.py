"""The code reward: run the response's code against the problem's tests in the sandbox.

The tests run in a trusted process that never executes the response; the response runs in its own
sandboxed process and the tests reach its top-level functions through proxies (``sandbox_harness.py`` says
why and what that excludes). Both processes run under the same ``SandboxLimits`` and share one wall clock.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from areal_hpc.reward.result import RewardResult
from areal_hpc.reward.sandbox import RunDir, SandboxLimits
from areal_hpc.tasks.base import Problem

HARNESS = Path(__file__).with_name("sandbox_harness.py")
_FENCE = re.compile(r"^\s*```+\s*([\w+-]*)")
_PYTHON_FENCES = {"", "python", "py", "python3", "py3"}


def extract_code(response: str) -> str:
    """The last fenced ```python (or ```py / ```) block, else the whole response.

    A block the response leaves open (cut at the token limit) runs to the end; blocks in other languages
    (```bash) are skipped."""
    blocks: list[str] = []
    lines: list[str] | None = None
    for line in response.splitlines():
        fence = _FENCE.match(line)
        if lines is None:
            if fence is not None:
                lines = [] if fence.group(1).lower() in _PYTHON_FENCES else None
                if lines is None:  # another language: skip to its closing fence
                    lines = ["\0skip"]
        elif fence is not None and not fence.group(1):
            if lines[:1] != ["\0skip"]:
                blocks.append("\n".join(lines))
            lines = None
        else:
            lines.append(line)
    if lines is not None and lines[:1] != ["\0skip"]:
        blocks.append("\n".join(lines))
    return blocks[-1] + "\n" if blocks else response


@dataclass(frozen=True)
class TestRun:
    """One response against one problem's tests: snippets passed of total, and how the run went (the
    first failure, the time limit, the candidate's first output), for the reward and for debugging."""

    passed: int
    total: int
    timed_out: bool = False
    error: str = ""
    stdout: str = ""
    stderr: str = ""


def run_tests(problem: Problem, code: str, limits: SandboxLimits) -> TestRun:
    """Run ``code`` (the response's, or a completion of ``problem.code_prefix``) against ``problem.tests``."""
    total = len(problem.tests)
    with RunDir(limits) as run:
        tdir, cdir = run.workdir("trusted"), run.workdir("candidate")
        spec = {"code_prefix": problem.code_prefix, "tests": list(problem.tests), "entry_point": problem.entry_point}
        (tdir / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
        (cdir / "prefix.py").write_text(problem.code_prefix, encoding="utf-8")
        (cdir / "response.py").write_text(code, encoding="utf-8")
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        res_r, res_w = os.pipe()
        with os.fdopen(res_r, "rb") as results:
            try:
                trusted = run.start(HARNESS, ["trusted"], tdir, fds=[req_w, rep_r, res_w])
                run.start(HARNESS, ["candidate"], cdir, fds=[req_r, rep_w])
            finally:
                for fd in (req_r, req_w, rep_r, rep_w, res_w):
                    os.close(fd)
            finished = run.wait(trusted)
            run.kill()
            os.set_blocking(results.fileno(), False)
            data = results.read() or b""
        stdout, stderr = run.output("candidate")
        trusted_err = run.output("trusted")[1].strip().splitlines()
    if not finished:
        return TestRun(0, total, True, f"timed out after {limits.timeout_s:g} s", stdout, stderr)
    try:
        outcome = json.loads(data)
    except ValueError:
        status = trusted.returncode
        why = f"killed by signal {-status if status < 0 else status - 128}" if status < 0 or status > 128 else \
            f"exit status {status}"
        last = f": {trusted_err[-1][:200]}" if trusted_err else ""
        return TestRun(0, total, False, f"the test process ended without a result ({why}){last}", stdout, stderr)
    return TestRun(int(outcome["passed"]), total, False, str(outcome["error"]), stdout, stderr)


def code_reward(problem: Problem, response: str, limits: SandboxLimits, partial: bool = False) -> RewardResult:
    """1.0 when every test snippet passes (with ``partial``, the fraction that pass); 0 on any failure,
    a timeout (``timed_out``), a kill, or no code."""
    start = time.monotonic()
    if not problem.tests:
        raise ValueError(f"problem {problem.prompt_id}: verifier 'code' needs tests (Problem.tests, snippets of "
                         "asserts calling entry_point); give the dataset's tests or choose another verifier")
    code = extract_code(response)
    if not code.strip():
        return RewardResult(0.0, time.monotonic() - start, error="no code in the response")
    result = run_tests(problem, code, limits)
    if result.timed_out:
        return RewardResult(0.0, time.monotonic() - start, timed_out=True, error=result.error)
    if partial:
        reward = result.passed / result.total
    else:
        reward = 1.0 if result.passed == result.total else 0.0
    return RewardResult(reward, time.monotonic() - start, error=result.error)
