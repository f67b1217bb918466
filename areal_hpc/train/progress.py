"""What a person watching the run sees: a progress line and a closing table."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from areal_hpc.phases import SETUP, TEARDOWN


class Progress:
    """The training progress line. A terminal gets one line redrawn in place at every step; anything else
    (mpiexec's or srun's forwarded stderr, a Slurm output file, a pipe) gets a new line at the first
    step, then once ``every_s`` seconds have passed since the last line, and at the last step: a log
    stays readable whatever the run's length and pace (a step per line only when steps are that slow).
    """

    def __init__(self, total: int, enabled: bool = True, stream: TextIO | None = None, every_s: float = 15.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.enabled, self.every_s, self.clock = total, enabled, every_s, clock
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.last_line: float | None = None  # clock() at the last line written (not a tty)

    def update(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        done = int(row["step"])
        width = 20
        filled = int(width * done / max(1, self.total))
        bar = "#" * filled + "-" * (width - filled)
        line = (f"[{bar}] step {done}/{self.total} | v{int(row['version'])} | reward {row['reward']:.3f} | "
                f"stale {row['staleness_mean']:.2f}/{int(row['staleness_max'])} | rej {int(row['rejected_total'])} | "
                f"{row['samples_per_s']:.1f} samples/s | {row['tokens_per_s']:.0f} tok/s")
        if self.tty:
            self.stream.write("\r" + line)
        else:
            now = self.clock()
            if self.last_line is not None and now - self.last_line < self.every_s and done < self.total:
                return
            self.last_line = now
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _outside(s: dict[str, Any]) -> str:
    """Steps, setup and teardown seconds, with the largest phase of each (where the rest of the wall time went)."""
    ph = s.get("phases", {}).get("trainer", {})
    if not ph:
        return f"{s['train_seconds']:.1f}"

    def largest(names: tuple[str, ...]) -> str:
        name = max(names, key=lambda k: ph.get(k, 0.0))
        return f" ({name} {ph[name]:.1f})" if ph.get(name, 0.0) > 0 else ""

    return (f"{s['train_seconds']:.1f} / {s.get('setup_seconds', 0.0):.1f}"
            f"{largest(SETUP)} / {s.get('teardown_seconds', 0.0):.1f}{largest(TEARDOWN)}")


def _tokens_per_s(s: dict[str, Any]) -> str:
    """Generated beside trained: their gap is the generation spent on samples never trained (rejected as
    stale, stopped early, in flight at the end). A summary without the generated figure shows the other."""
    trained = f"{s['tokens_per_s']:.0f} trained"
    generated = s.get("generated_tokens_per_s")
    return trained if generated is None else f"{generated:.0f} generated, {trained}"


def summary_table(s: dict[str, Any]) -> str:
    rows = [
        ("mode", f"{'async' if s['async'] else 'sync'}, eta={s['eta']}, "
                 f"{s['n_trainer']} trainer + {s['n_rollout']} rollout ranks"),
        ("held-out accuracy before RL", f"{s['accuracy_before']:.3f}"),
        ("held-out accuracy after RL", f"{s['accuracy_after']:.3f}"),
        ("training steps / final version", f"{s['steps']} / {s['final_version']}"),
        ("samples trained", f"{int(s['samples_trained'])}"),
        ("samples/s", f"{s['samples_per_s']:.1f}"),
        ("tokens/s", _tokens_per_s(s)),
        ("rejected as stale", f"{int(s['rejected'])} (groups stopped early in the rollout: "
                              f"{s.get('aborted_stale_groups', 0)})"),
        ("rollout idle fraction", f"{s['rollout_idle_fraction']:.2f}"),
        ("seconds in steps / before / after", _outside(s)),
        ("run folder", s["run_dir"]),
        ("final policy", s["checkpoint"] or "not saved (run.final_checkpoint: none)"),
        ("study it", f"areal-hpc analyze {s['run_dir']}"),
    ]
    w = max(len(k) for k, _ in rows)
    line = "-" * (w + 3 + max(len(v) for _, v in rows))
    return "\n".join([line, *(f"{k.ljust(w)} | {v}" for k, v in rows), line])
