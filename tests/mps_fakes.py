"""Stand-ins for nvidia-smi and nvidia-cuda-mps-control, so the launcher's MPS handling runs on a CPU.

The fake control program behaves as the real one does: ``-d`` creates the pipe files in
``CUDA_MPS_PIPE_DIRECTORY`` and returns; ``quit`` on stdin ends the daemon but leaves those files behind;
``get_server_list`` answers while the daemon runs and afterwards exits 1 with "Cannot find MPS control
daemon process". Each start and quit is appended to ``$FAKE_MPS_RECORD`` (with the pipe folder it saw),
so a test can check the daemon was stopped. ``$FAKE_MPS_QUIT_DELAY`` seconds: the daemon still answers
that long after its quit."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

CONTROL = """#!{python}
import os, sys
from pathlib import Path
pipe = Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps"))
record = os.environ.get("FAKE_MPS_RECORD")
def note(what):
    if record:
        with open(record, "a") as f:
            f.write(what + " " + str(pipe) + "\\n")
import time
alive = pipe / ".fake_daemon_alive"  # holds the time the daemon ends (inf while it runs)
if sys.argv[1:] == ["-d"]:
    if os.environ.get("FAKE_MPS_FAIL"):
        print("An instance of this daemon is already running", file=sys.stderr)
        sys.exit(1)
    for name in ("control", "control_lock", "control_privileged"):
        (pipe / name).write_text("")
    alive.write_text("inf")
    note("start")
else:
    cmd = sys.stdin.read().strip()
    if not alive.exists() or float(alive.read_text()) <= time.time():
        print("Cannot find MPS control daemon process")
        sys.exit(1)
    if cmd == "quit":
        note(cmd)
        alive.write_text(str(time.time() + float(os.environ.get("FAKE_MPS_QUIT_DELAY", "0"))))
"""

SMI = """#!/bin/sh
# --query-gpu=compute_mode --format=csv,noheader: one line per GPU
i=0
while [ $i -lt {n_gpus} ]; do echo "{mode}"; i=$((i+1)); done
"""


def install(bin_dir: Path, n_gpus: int = 1, mode: str = "Default", control: bool = True) -> dict[str, str]:
    """Write the fakes into ``bin_dir``; returns the environment that puts them first on PATH."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    files = {"nvidia-smi": SMI.format(n_gpus=n_gpus, mode=mode)}
    if control:
        files["nvidia-cuda-mps-control"] = CONTROL.format(python=sys.executable)
    for name, text in files.items():
        p = bin_dir / name
        p.write_text(text)
        p.chmod(p.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "FAKE_MPS_RECORD": str(bin_dir / "calls")}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env
