"""PNG figures of one or several runs; several runs share each figure (one series per run, e.g. an η sweep).

Figures are built with ``matplotlib.figure.Figure`` and its Agg canvas directly, not pyplot, so plotting
changes no process-wide backend or figure registry.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from areal_hpc.analysis.tables import RunData, load_run, per_step, split_steps, time_origin, trained_samples

log = logging.getLogger(__name__)

DPI = 120
PLOT_FILES = ("reward_accuracy.png", "staleness.png", "response_length.png", "throughput.png")


def _figure(nrows: int = 1, height: float = 4.2) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(9.0, height * nrows), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(nrows, 1, i + 1) for i in range(nrows)]
    return fig, axes


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    log.info("wrote %s", path)
    return path


def _no_data(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in the log yet", ha="center", va="center", transform=ax.transAxes,
            fontsize=12, color="0.4")


def _legend(ax: Axes, what: str, **kwargs: object) -> None:
    """A legend where there are series, else a note saying which data is missing."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**{"loc": "best", "fontsize": 8, **kwargs})
    else:
        _no_data(ax, what)


def _labels(runs: Sequence[RunData]) -> list[str]:
    """Legend labels; runs with equal folder names get their parent folder too."""
    labels = [r.label for r in runs]
    if len(set(labels)) < len(labels):
        labels = [f"{r.path.resolve().parent.name}/{lab}" for r, lab in zip(runs, labels)]
    return labels


def _colors(n: int) -> list[tuple[float, ...]]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def plot_reward_accuracy(runs: Sequence[RunData], out: Path) -> Path:
    """Learning curves: faint per-step values, a rolling mean on top."""
    fig, (ax_r, ax_a) = _figure(2, 3.4)
    for run, label, color in zip(runs, _labels(runs), _colors(len(runs))):
        ps = per_step(run).sort_values("step")
        if len(ps) == 0:
            continue
        w = max(1, len(ps) // 25)
        for ax, col in ((ax_r, "reward"), (ax_a, "accuracy")):
            y = ps[col].astype(float)
            ax.plot(ps["step"], y, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(ps["step"], y.rolling(w, center=True, min_periods=1).mean(), color=color, linewidth=1.8,
                    label=label + (f", mean of {w} steps" if w > 1 else ""))
    for ax, what in ((ax_r, "mean reward"), (ax_a, "accuracy (answer_ok)")):
        ax.set_xlabel("training step")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        _legend(ax, "trained steps")
    ax_r.set_title("Reward of trained samples per step")
    ax_a.set_title("Accuracy of trained samples per step")
    return _save(fig, out / "reward_accuracy.png")


def plot_staleness(runs: Sequence[RunData], out: Path) -> Path:
    """How many versions behind the trained policy samples were: trained ones solid, rejected ones hatched."""
    fig, (ax,) = _figure(1, 4.6)
    data = []
    for run in runs:
        ts = trained_samples(run)
        data.append((ts[ts["fate"] == "used"]["staleness"].to_numpy(int) if len(ts) else np.empty(0, int),
                     ts[ts["fate"] == "rejected"]["staleness"].to_numpy(int) if len(ts) else np.empty(0, int)))
    top = max([int(max(u.max(initial=0), r.max(initial=0))) for u, r in data] + [0])
    xs = np.arange(top + 1)
    width = 0.8 / max(1, len(runs))
    for i, ((used, rej), label, color) in enumerate(zip(data, _labels(runs), _colors(len(runs)))):
        total = len(used) + len(rej)
        if total == 0:
            continue
        u = np.bincount(used, minlength=top + 1) / total
        r = np.bincount(rej, minlength=top + 1) / total
        x = xs - 0.4 + width * (i + 0.5)
        ax.bar(x, u, width, color=color, label=f"{label}: trained (mean {used.mean() if len(used) else 0:.2f})")
        if len(rej):
            ax.bar(x, r, width, bottom=u, color=color, alpha=0.35, hatch="//", label=f"{label}: rejected ({len(rej)})")
        if runs[i].eta is not None:
            ax.axvline(runs[i].eta + 0.5, color=color, linestyle=":", linewidth=1.2)
    ax.set_xticks(xs)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.1)  # headroom: the legend sits above the bars, not on them
    ax.set_xlabel("staleness (policy versions behind the trained one); dotted line: η bound")
    ax.set_ylabel("fraction of samples reaching the trainer")
    ax.set_title("Staleness of samples at training time")
    ax.grid(axis="y", alpha=0.3)
    _legend(ax, "trained samples")
    return _save(fig, out / "staleness.png")


def plot_response_length(runs: Sequence[RunData], out: Path, bins: int = 10) -> Path:
    """Median response length of trained samples per step range, with its p25-p75 band (and p10-p90 for one run;
    several runs' wide bands would hide each other)."""
    fig, (ax,) = _figure(1, 4.6)
    single = len(runs) == 1
    for run, label, color in zip(runs, _labels(runs), _colors(len(runs))):
        ts = trained_samples(run)
        used = ts[(ts["fate"] == "used") & ts["response_len"].notna()] if len(ts) else ts
        if len(used) == 0:
            continue
        rows = []
        for lo, hi in split_steps(used["step"].to_numpy(), max(bins, 20)):
            lens = used[(used["step"] >= lo) & (used["step"] <= hi)]["response_len"].to_numpy(float)
            rows.append(((lo + hi) / 2, *np.percentile(lens, [10, 25, 50, 75, 90]), lens.mean()))
        d = pd.DataFrame(rows, columns=["x", "p10", "p25", "p50", "p75", "p90", "mean"])
        if single:
            ax.fill_between(d["x"], d["p10"], d["p90"], color=color, alpha=0.12, linewidth=0, label="p10–p90")
        ax.fill_between(d["x"], d["p25"], d["p75"], color=color, alpha=0.25, linewidth=0,
                        label="p25–p75" if single else None)
        ax.plot(d["x"], d["p50"], color=color, marker="o", markersize=3, linewidth=1.8, label=f"{label}: median")
        if single:
            ax.plot(d["x"], d["mean"], color=color, linestyle="--", linewidth=1.0, label=f"{label}: mean")
    ax.set_xlabel("training step (middle of step range)")
    ax.set_ylabel("response length (tokens)")
    ax.set_title("Response length of trained samples over training (band: p25–p75)")
    ax.grid(alpha=0.3)
    _legend(ax, "trained samples")
    return _save(fig, out / "response_length.png")


def _rate(times: np.ndarray, weights: np.ndarray, span: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Weighted events per second in ``n`` equal buckets of [0, span]: (bucket middles, rates)."""
    edges = np.linspace(0.0, span, max(1, n) + 1)
    total, _ = np.histogram(times, edges, weights=weights)
    return (edges[:-1] + edges[1:]) / 2, total / (edges[1] - edges[0])


def plot_throughput(runs: Sequence[RunData], out: Path) -> Path:
    """Generated vs trained samples/s and generated tokens/s over wall-clock time.

    Training is bucketed more coarsely than generation (about 3 steps per bucket): steps are few and
    discrete, and finer buckets would show 0/1 steps rather than a rate.
    """
    fig, (ax_s, ax_t) = _figure(2, 3.4)
    for run, label, color in zip(runs, _labels(runs), _colors(len(runs))):
        t0 = time_origin(run)
        t_end = run.samples["t_end"].to_numpy(float) - t0 if len(run.samples) else np.empty(0)
        t_step = run.steps["time"].to_numpy(float) - t0 if len(run.steps) else np.empty(0)
        if len(t_end) + len(t_step) == 0:
            continue
        span = max(float(np.concatenate([t_end, t_step]).max()), 1e-3)
        if len(t_end):
            n = int(np.clip(len(t_end) // 20, 5, 60))
            x, y = _rate(t_end, np.ones(len(t_end)), span, n)
            ax_s.plot(x, y, color=color, drawstyle="steps-mid", linewidth=1.6, label=f"{label}: generated")
            x, y = _rate(t_end, run.samples["response_len"].to_numpy(float), span, n)
            ax_t.plot(x, y, color=color, drawstyle="steps-mid", linewidth=1.6, label=label)
        if len(t_step) and "n_used" in run.steps:
            n = int(np.clip(run.steps["step"].nunique() // 3, 3, 60))
            x, y = _rate(t_step, run.steps["n_used"].to_numpy(float), span, n)
            ax_s.plot(x, y, color=color, drawstyle="steps-mid", linestyle="--", linewidth=1.2,
                      label=f"{label}: trained")
    ax_s.set_title("Samples per second (generated by t_end, trained by step time)")
    ax_s.set_ylabel("samples / s")
    ax_t.set_title("Generated response tokens per second")
    ax_t.set_ylabel("tokens / s")
    for ax in (ax_s, ax_t):
        ax.set_xlabel("seconds since the run's first sample")
        ax.grid(alpha=0.3)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.4)  # room for the legend above the lines
        _legend(ax, "samples", loc="upper center", ncols=min(3, len(runs)))
    return _save(fig, out / "throughput.png")


def plot_loaded(runs: Sequence[RunData], out_dir: str | Path, bins: int = 10) -> list[Path]:
    """All figures for runs already in memory (the CLI loads each run once for tables and plots)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [plot_reward_accuracy(runs, out), plot_staleness(runs, out), plot_response_length(runs, out, bins),
            plot_throughput(runs, out)]


def plot_runs(run_dirs: Sequence[str | Path], out_dir: str | Path, *, bins: int = 10,
              strict: bool = False) -> list[Path]:
    """Write the standard figures of one or several runs into ``out_dir``; returns the PNG paths."""
    return plot_loaded([load_run(d, strict=strict) for d in run_dirs], out_dir, bins)
