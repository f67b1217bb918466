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


def process_age_s() -> float | None:
    """Seconds since this process started (Linux ``/proc``): interpreter start, imports and MPI init
    before the first timed phase. None where ``/proc`` does not say."""
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
