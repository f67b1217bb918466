"""What came before a rank's first timed phase: the launcher, the interpreter start, imports, MPI init.

A rank's own phases are timed by ``areal_hpc.phases``; these two figures are added to them so a run's
summary accounts for its whole wall time.
"""

from __future__ import annotations

import os
import time

# Set by the launcher to its start (epoch seconds), so the ranks can also count what came before them
# (the MPS daemon, mpiexec starting the interpreters).
LAUNCH_TIME_ENV = "AREAL_HPC_LAUNCH_TIME"
# "PID:EPOCH_SECONDS", set by a script that does other work first and then ``exec``s areal-hpc (the
# quickstart installs, then execs the launcher): an exec keeps the script's pid and start time, so
# ``/proc`` alone would count the install as the launch. Only the process with that pid reads it;
# the ranks, started later with other pids, inherit it and count from their own start.
EXEC_TIME_ENV = "AREAL_HPC_EXEC_TIME"


def process_age_s(environ: dict[str, str] | None = None) -> float | None:
    """Seconds since this process started running this program (Linux ``/proc``, or the exec time a
    wrapper script stamped in ``AREAL_HPC_EXEC_TIME``): interpreter start, imports and MPI init
    before the first timed phase. None where neither says."""
    pid, _, stamp = (os.environ if environ is None else environ).get(EXEC_TIME_ENV, "").partition(":")
    if pid == str(os.getpid()):
        try:
            return max(0.0, time.time() - float(stamp))
        except ValueError:
            pass  # a shell without sub-second `date` (%N): fall back to the process start
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))  # field 22: start time in ticks
    except (OSError, ValueError, IndexError):
        return None


def since_launch_s(environ: dict[str, str] | None = None) -> float | None:
    """Seconds since ``areal-hpc train`` started (from ``AREAL_HPC_LAUNCH_TIME``), None when not set."""
    value = (os.environ if environ is None else environ).get(LAUNCH_TIME_ENV)
    try:
        return max(0.0, time.time() - float(value)) if value else None
    except ValueError:
        return None
