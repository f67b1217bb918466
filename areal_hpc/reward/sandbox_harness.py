"""The two sides of a code test: ``trusted`` runs the problem's tests, ``candidate`` runs the response's code.

Run by ``sandbox_exec.py`` (each side confined in its own sandbox), never imported by the package. Why two
processes: code that shares a process with whatever decides "passed" can patch it, find it through ``gc``,
or ``os._exit(0)`` before it runs. So the trusted side never executes the response: it runs the problem's
``code_prefix`` (trusted, from the dataset) and its test snippets, and every top-level function the
response defines reaches it as a proxy that calls into the candidate's process over a pipe. Arguments and
results cross as plain data only (None, bool, int, float, complex, str, bytes, list, tuple, dict, set,
frozenset, read by a restricted unpickler), so no object with a rigged ``__eq__`` can come back.

What that excludes: a test cannot see the solution mutate an argument in place (it gets a copy), cannot
pass or receive functions, generators, class instances or numpy values, and can call only the response's
top-level callables. The problem's own helpers (names ``code_prefix`` defines) and the builtins stay the
trusted ones (a response defining ``abs`` or ``all`` does not get to judge its own output), except the entry
point, which the response is there to define.

Files in the working directory, written by the caller: ``trusted``: ``spec.json`` (code_prefix, tests,
entry_point); ``candidate``: ``prefix.py`` and ``response.py``. Fds: trusted 3 = requests out,
4 = replies in, 5 = result out (one JSON object); candidate 3 = requests in, 4 = replies out.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import struct
import sys

MAX_MESSAGE = 256 << 20
_SAFE_GLOBALS = {("builtins", "complex"), ("builtins", "set"), ("builtins", "frozenset")}
_HEADER = struct.Struct("<Q")


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _SAFE_GLOBALS:
            return getattr(builtins, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not plain data")


def _read_exact(fd: int, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError("the solution's process ended")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def send(fd: int, obj: object) -> None:
    _write_frame(fd, pickle.dumps(obj, protocol=4))


def _write_frame(fd: int, data: bytes) -> None:
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def recv(fd: int) -> object:
    (n,) = _HEADER.unpack(_read_exact(fd, _HEADER.size))
    if n > MAX_MESSAGE:
        raise ValueError(f"a message of {n} bytes from the solution's process")
    return _PlainUnpickler(io.BytesIO(_read_exact(fd, n))).load()


def _flush() -> None:
    """The process ends by SIGKILL once the tests are done: what it printed so far must be in its files."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:300]


# -- candidate side ------------------------------------------------------------------------------------
def candidate(requests: int, replies: int) -> None:
    with open("prefix.py", encoding="utf-8") as f:
        prefix = f.read()
    with open("response.py", encoding="utf-8") as f:
        response = f.read()
    try:  # a completion continues the prefix (a body under its signature); a chat answer may stand alone
        code = compile(prefix + "\n" + response, "solution.py", "exec")
    except SyntaxError as first:
        try:
            code = compile(response, "solution.py", "exec")
        except SyntaxError:
            send(replies, ("error", _short(first)))
            return
    scope: dict = {"__name__": "solution", "__builtins__": builtins}
    try:
        exec(code, scope)
    except BaseException as e:  # noqa: BLE001 - whatever the response raises is its failure
        _flush()
        send(replies, ("error", _short(e)))
        return
    _flush()
    send(replies, ("ready", [k for k, v in scope.items() if not k.startswith("__") and callable(v)]))
    while True:
        try:
            _, name, args, kwargs = recv(requests)
        except EOFError:
            return
        try:
            reply = pickle.dumps(("ok", scope[name](*args, **kwargs)), protocol=4)
        except BaseException as e:  # noqa: BLE001
            reply = pickle.dumps(("raise", type(e).__name__, str(e)[:300]), protocol=4)
        _flush()
        _write_frame(replies, reply)


# -- trusted side --------------------------------------------------------------------------------------
class _Solution:
    """The candidate's process, called one function at a time."""

    def __init__(self, requests: int, replies: int) -> None:
        self.requests, self.replies = requests, replies

    def call(self, name: str, args: tuple, kwargs: dict) -> object:
        send(self.requests, ("call", name, args, kwargs))
        reply = recv(self.replies)
        if not isinstance(reply, tuple) or not reply:
            raise ValueError("a malformed reply from the solution's process")
        if reply[0] == "ok" and len(reply) == 2:
            return reply[1]
        if reply[0] == "raise" and len(reply) == 3 and isinstance(reply[1], str):
            exc = getattr(builtins, reply[1], None)
            if isinstance(exc, type) and issubclass(exc, Exception):
                raise exc(reply[2])
            raise RuntimeError(f"{reply[1]}: {reply[2]}")
        raise ValueError("a malformed reply from the solution's process")

    def proxy(self, name: str):  # noqa: ANN201 - a function standing for the solution's function
        def call(*args: object, **kwargs: object) -> object:
            return self.call(name, args, kwargs)

        call.__name__ = call.__qualname__ = name
        return call


def trusted(requests: int, replies: int, result: int) -> None:
    with open("spec.json", encoding="utf-8") as f:
        spec = json.load(f)
    tests, entry = spec["tests"], spec["entry_point"]
    outcome = {"passed": 0, "total": len(tests), "error": ""}
    try:
        outcome["error"] = _run_tests(spec, tests, entry, _Solution(requests, replies), outcome)
    finally:
        os.write(result, json.dumps(outcome).encode())
        os.close(result)


def _run_tests(spec: dict, tests: list[str], entry: str, solution: _Solution, outcome: dict) -> str:
    try:
        hello = recv(solution.replies)
    except Exception as e:  # noqa: BLE001 - ended, or sent something that is not a message
        return f"the solution's process: {_short(e)}"
    if not (isinstance(hello, tuple) and len(hello) == 2 and hello[0] in ("ready", "error")):
        return "a malformed first message from the solution's process"
    if hello[0] == "error":
        return str(hello[1])[:300]
    names = [n for n in hello[1] if isinstance(n, str)] if isinstance(hello[1], list) else []
    if entry and entry not in names:
        return f"the response defines no function {entry!r}"
    scope: dict = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile(spec["code_prefix"], "code_prefix.py", "exec"), scope)
    except Exception as e:  # noqa: BLE001 - the dataset's code: say so rather than blame the response
        return f"the problem's code_prefix failed: {_short(e)}"
    kept = set(scope) | set(dir(builtins))  # a response's ``abs`` or ``all`` must not judge its own output
    for name in names:
        if name == entry or name not in kept:
            scope[name] = solution.proxy(name)
    error = ""
    for i, test in enumerate(tests):
        try:
            exec(compile(test, f"test_{i + 1}.py", "exec"), dict(scope))
            outcome["passed"] += 1
        except BaseException as e:  # noqa: BLE001 - a failed test, whatever it raised
            error = error or f"test {i + 1}: {_short(e)}"
    return error


def main() -> None:
    if sys.argv[1] == "trusted":
        trusted(3, 4, 5)
    else:
        candidate(3, 4)


if __name__ == "__main__":
    main()
