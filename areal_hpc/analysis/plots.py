"""PNG figures of one or several runs; several runs share each figure (one series per run, e.g. an η sweep).

Figures are built with ``matplotlib.figure.Figure`` and its Agg canvas directly, not pyplot, so plotting
changes no process-wide backend or figure registry. Each ``figure_*`` function builds a figure from numbers a
``*_data`` function computes (what the tests check); ``plot_*`` saves it. Legends sit right of the axes, never
over the data: a sweep's labels are long and a 2-token answer's curve runs along the axes' edge.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from areal_hpc.analysis.tables import (
    RunData,
    comparison_table,
    elastic_timeline,
    has_workers,
    load_run,
    per_step,
    producer_table,
    split_steps,
    time_origin,
    trained_samples,
)

log = logging.getLogger(__name__)

DPI = 120
PLOT_FILES = ("reward_accuracy.png", "staleness.png", "response_length.png", "throughput.png")
COMPARE_FILE = "compare.png"  # several runs only: one row of numbers per run, side by side
ELASTIC_FILE = "elastic.png"  # only when rollout workers attached to a run


def _figure(nrows: int = 1, height: float = 4.2, width: float = 11.0) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(width, height * nrows), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(nrows, 1, i + 1) for i in range(nrows)]
    return fig, axes


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")  # "tight" keeps the legends outside the axes in the file
    log.info("wrote %s", path)
    return path


def _no_data(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in the log yet", ha="center", va="center", transform=ax.transAxes,
            fontsize=12, color="0.4")


def _legend(ax: Axes, what: str, **kwargs: object) -> None:
    """A legend right of the axes where there are series, else a note saying which data is missing."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**{"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "borderaxespad": 0.0, "fontsize": 8,
                     **kwargs})
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


@dataclass
class Curves:
    """One run's learning curves: per-step reward and accuracy of trained samples, and the held-out accuracy
    before and after training (``summary.json``; NaN when the run has not reached that evaluation)."""

    label: str
    steps: pd.DataFrame  # step, reward, accuracy
    window: int  # rolling-mean window, in steps
    heldout_before: float
    heldout_after: float
    last_step: int


def _num(v: object) -> float:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else float("nan")


def reward_accuracy_data(runs: Sequence[RunData]) -> tuple[list[Curves], bool]:
    """Each run's curves, and whether reward and accuracy are one series in every run.

    They are with a 0/1 verifier (reward 1 exactly when the answer is correct, as for math tasks): two panels
    would then show the same curve twice, so the figure draws one.
    """
    out = []
    for run, label in zip(runs, _labels(runs)):
        ps = per_step(run).sort_values("step")
        s = run.summary or {}
        final = _num(s.get("final_version"))
        last = max(int(ps["step"].max()) if len(ps) else 0, 0 if np.isnan(final) else int(final))
        out.append(Curves(label, ps, max(1, len(ps) // 25), _num(s.get("accuracy_before")),
                          _num(s.get("accuracy_after")), last))
    same = all(np.allclose(c.steps["reward"].to_numpy(float), c.steps["accuracy"].to_numpy(float), equal_nan=True)
               for c in out if len(c.steps))
    return out, same


def _heldout(ax: Axes, c: Curves, color: tuple[float, ...]) -> None:
    """Held-out accuracy as two marked points, before (step 0) and after (last step), joined by a dotted line."""
    before, after = c.heldout_before, c.heldout_after
    if np.isnan(before) and np.isnan(after):
        return
    def fmt(v: float) -> str:
        return "(not evaluated)" if np.isnan(v) else f"{v:.3f}"

    text = f"{c.label}: held-out accuracy {fmt(before)} → {fmt(after)}"
    if not np.isnan(before) and not np.isnan(after):
        ax.plot([0, c.last_step], [before, after], color=color, linestyle=":", linewidth=1.0)
    if not np.isnan(before):
        ax.plot([0], [before], color=color, marker="D", markersize=7, markeredgecolor="black", linestyle="none",
                label=text)
    if not np.isnan(after):
        ax.plot([c.last_step], [after], color=color, marker="*", markersize=13, markeredgecolor="black",
                linestyle="none", label=None if not np.isnan(before) else text)


def figure_reward_accuracy(runs: Sequence[RunData]) -> Figure:
    """Learning curves (faint per-step values, a rolling mean on top) with the held-out accuracy marked."""
    curves, same = reward_accuracy_data(runs)
    fig, axes = _figure(1 if same else 2, 4.2 if same else 3.6)
    ax_r, ax_a = axes[0], axes[-1]
    for c, color in zip(curves, _colors(len(curves))):
        if len(c.steps) == 0:
            _heldout(ax_a, c, color)
            continue
        cols = [(ax_r, "reward")] if same else [(ax_r, "reward"), (ax_a, "accuracy")]
        for ax, col in cols:
            y = c.steps[col].astype(float)
            ax.plot(c.steps["step"], y, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(c.steps["step"], y.rolling(c.window, center=True, min_periods=1).mean(), color=color,
                    linewidth=1.8, label=c.label + (f", mean of {c.window} steps" if c.window > 1 else ""))
        _heldout(ax_a, c, color)
    if same:
        ax_r.set_ylabel("reward = accuracy")
        ax_r.set_title("Reward (= accuracy: the verifier gives 1 for a correct answer, else 0) of trained samples "
                       "per step\n◆ held-out accuracy before training, ★ after", fontsize=10)
    else:
        ax_r.set_ylabel("mean reward")
        ax_a.set_ylabel("accuracy (answer_ok)")
        ax_r.set_title("Reward of trained samples per step", fontsize=10)
        ax_a.set_title("Accuracy of trained samples per step; ◆ held-out accuracy before training, ★ after",
                       fontsize=10)
    for ax in axes:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        _legend(ax, "trained steps")
    return fig


def plot_reward_accuracy(runs: Sequence[RunData], out: Path) -> Path:
    return _save(figure_reward_accuracy(runs), out / "reward_accuracy.png")


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
    ax.set_ylim(0, ax.get_ylim()[1] * 1.05)
    ax.set_xlabel("staleness (policy versions behind the trained one); dotted line: η bound")
    ax.set_ylabel("fraction of samples reaching the trainer")
    ax.set_title("Staleness of samples at training time")
    ax.grid(axis="y", alpha=0.3)
    _legend(ax, "trained samples")
    return _save(fig, out / "staleness.png")


def response_length_data(run: RunData, bins: int = 10) -> pd.DataFrame:
    """Percentiles of the trained samples' response length per step range: x, p10, p25, p50, p75, p90, mean."""
    cols = ["x", "p10", "p25", "p50", "p75", "p90", "mean"]
    ts = trained_samples(run)
    used = ts[(ts["fate"] == "used") & ts["response_len"].notna()] if len(ts) else ts
    if len(used) == 0:
        return pd.DataFrame(columns=cols)
    rows = []
    for lo, hi in split_steps(used["step"].to_numpy(), max(bins, 20)):
        lens = used[(used["step"] >= lo) & (used["step"] <= hi)]["response_len"].to_numpy(float)
        rows.append(((lo + hi) / 2, *np.percentile(lens, [10, 25, 50, 75, 90]), lens.mean()))
    return pd.DataFrame(rows, columns=cols)


def figure_response_length(runs: Sequence[RunData], bins: int = 10) -> Figure:
    """Median response length of trained samples per step range, with its p25-p75 band (and p10-p90 for one run;
    several runs' wide bands would hide each other).

    The y axis starts at 0 with headroom above the p90 and whole-token ticks, so 2-token answers read as
    clearly as 3000-token ones; the legend sits outside the axes.
    """
    fig, (ax,) = _figure(1, 4.6)
    single = len(runs) == 1
    top = 0.0
    for run, label, color in zip(runs, _labels(runs), _colors(len(runs))):
        d = response_length_data(run, bins)
        if len(d) == 0:
            continue
        top = max(top, float(d["p90" if single else "p75"].max()), float(d["p50"].max()))
        if single:
            ax.fill_between(d["x"], d["p10"], d["p90"], color=color, alpha=0.12, linewidth=0, label="p10–p90")
        ax.fill_between(d["x"], d["p25"], d["p75"], color=color, alpha=0.25, linewidth=0,
                        label="p25–p75" if single else None)
        ax.plot(d["x"], d["p50"], color=color, marker="o", markersize=3, linewidth=1.8, label=f"{label}: median")
        if single:
            ax.plot(d["x"], d["mean"], color=color, linestyle="--", linewidth=1.0, label=f"{label}: mean")
    ax.set_ylim(0, max(1.0, top * 1.15 + 0.5))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("training step (middle of step range)")
    ax.set_ylabel("response length (tokens)")
    ax.set_title("Response length of trained samples over training (band: p25–p75)")
    ax.grid(alpha=0.3)
    _legend(ax, "trained samples")
    return fig


def plot_response_length(runs: Sequence[RunData], out: Path, bins: int = 10) -> Path:
    return _save(figure_response_length(runs, bins), out / "response_length.png")


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
        ax.set_ylim(0, ax.get_ylim()[1] * 1.05)
        _legend(ax, "samples")
    return _save(fig, out / "throughput.png")


def elastic_bins(run: RunData) -> int:
    """Time buckets of the elastic figure: about 3 steps each (as the throughput figure's training rate), so a
    worker's few seconds show; at least 5, at most 60."""
    return int(np.clip(run.steps["step"].nunique() // 3 if len(run.steps) else 5, 5, 60))


_LEFT_STYLE = {"left": ("tab:blue", "|"), "expired": ("tab:red", "X")}  # how a worker's lane ends


def figure_elastic(runs: Sequence[RunData]) -> Figure:
    """Per run with attached workers: training samples/s per time bucket (the workers' part hatched) with the
    number of workers active on a second axis, above one lane per producer from its first sample to its last
    one, each worker's lane ending in how it left (| left, X lease expired: killed).

    The numbers are :func:`elastic_timeline`'s and :func:`producer_table`'s."""
    shown = [(r, lab) for r, lab in zip(runs, _labels(runs)) if has_workers(r)]
    fig = Figure(figsize=(11.0, 6.4 * max(1, len(shown))), dpi=DPI)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2 * max(1, len(shown)), 1, height_ratios=[1.6, 1.0] * max(1, len(shown)))
    if not shown:
        _no_data(fig.add_subplot(grid[:, 0]), "attached workers")
        return fig
    for i, (run, label) in enumerate(shown):
        ax, lanes = fig.add_subplot(grid[2 * i, 0]), fig.add_subplot(grid[2 * i + 1, 0])
        lanes.sharex(ax)
        tl, prod = elastic_timeline(run, elastic_bins(run)), producer_table(run)
        if len(tl):
            width = float(tl["t_to_s"].iloc[0] - tl["t_from_s"].iloc[0])
            x = tl["t_from_s"].to_numpy(float)
            total = tl["trained_per_s"].to_numpy(float)
            mine = tl["from_workers"].to_numpy(float) / width
            ax.bar(x, total - mine, width, align="edge", color="tab:green", alpha=0.6,
                   label="trained samples/s from the job's rollout ranks")
            ax.bar(x, mine, width, bottom=total - mine, align="edge", color="tab:orange", hatch="//",
                   edgecolor="black", linewidth=0.4, label="trained samples/s from attached workers")
            ax2 = ax.twinx()
            ax2.step(np.append(x, x[-1] + width), np.append(tl["workers"], tl["workers"].iloc[-1]), where="post",
                     color="black", linewidth=1.6, label="attached workers active")
            ax2.set_ylim(0, max(1, int(tl["workers"].max())) + 0.5)
            ax2.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax2.set_ylabel("workers active")
            ax.set_ylim(0, max(1.0, float(total.max())) * 1.15)
            back = run.reissued
            if back is not None and len(back):
                t0 = time_origin(run)
                for frm, when in back.groupby("from")["time"].min().items():
                    ax.axvline(float(when) - t0, color="tab:purple", linestyle="--", linewidth=1.2)
                    ax.text(float(when) - t0, ax.get_ylim()[1], f" grants of w{frm} re-issued", rotation=90,
                            va="top", ha="left", fontsize=7, color="tab:purple")
            handles = ax.get_legend_handles_labels()
            extra = ax2.get_legend_handles_labels()
            ax.legend(handles[0] + extra[0], handles[1] + extra[1], loc="upper left", bbox_to_anchor=(1.08, 1.0),
                      borderaxespad=0.0, fontsize=8)
        else:
            _no_data(ax, "training steps")
        ax.set_ylabel("trained samples / s")
        ax.set_title(f"{label}: training throughput as rollout workers join and leave", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        for k, row in enumerate(prod.itertuples(index=False)):
            is_worker = row.producer.startswith("worker")
            if np.isnan(row.joined_s):
                lanes.text(0, k, "  registered, no sample written", va="center", fontsize=8, color="0.4")
                continue
            color, end = _LEFT_STYLE.get(str(row.lease), ("tab:gray", ">")) if is_worker else ("tab:green", "")
            lanes.barh(k, row.left_s - row.joined_s, left=row.joined_s, height=0.5, color=color, alpha=0.7)
            if is_worker:
                lanes.plot([row.left_s], [k], marker=end, color="black", markersize=9, linestyle="none")
                for t in (row.joined_s, row.left_s):
                    ax.axvline(t, color=color, linestyle=":", linewidth=1.0)
                lanes.text(row.left_s, k, f"  {row.generated} samples, {row.trained} trained; {row.lease}",
                           va="center", fontsize=8)
        lanes.set_yticks(range(len(prod)), list(prod["producer"]), fontsize=8)
        lanes.set_ylim(len(prod) - 0.5, -0.5)
        lanes.set_xlabel("seconds since the run's first sample")
        lanes.set_title("Producers, first sample to last (| left, X lease expired: killed)", fontsize=9)
        lanes.grid(axis="x", alpha=0.3)
    return fig


def plot_elastic(runs: Sequence[RunData], out: Path) -> Path:
    return _save(figure_elastic(runs), out / ELASTIC_FILE)


def figure_compare(runs: Sequence[RunData]) -> Figure:
    """Several runs side by side, labelled by their swept values: the reward curves, samples/s, and the
    held-out accuracy before and after (a panel only when some run has it). Its numbers are
    :func:`comparison_table`'s."""
    table = comparison_table(runs)
    has_acc = bool(table[["accuracy_before", "accuracy_after"]].notna().to_numpy().any())
    fig, axes = _figure(3 if has_acc else 2, 3.6)
    labels, colors = _labels(runs), _colors(len(runs))
    ax = axes[0]
    for run, label, color in zip(runs, labels, colors):
        ps = per_step(run).sort_values("step")
        if len(ps):
            w = max(1, len(ps) // 25)
            ax.plot(ps["step"], ps["reward"].astype(float).rolling(w, center=True, min_periods=1).mean(),
                    color=color, linewidth=1.8, label=label + (f" (mean of {w} steps)" if w > 1 else ""))
    ax.set_xlabel("training step")
    ax.set_ylabel("mean reward")
    ax.set_title("Reward of trained samples per step, per run", fontsize=10)
    ax.grid(alpha=0.3)
    _legend(ax, "trained steps")
    x = np.arange(len(runs))
    pairs = [(axes[1], ("generated_per_s", "trained_per_s"), "samples / s", "Samples per second over the run")]
    if has_acc:
        pairs.append((axes[2], ("accuracy_before", "accuracy_after"), "held-out accuracy",
                      "Held-out accuracy before and after training"))
    for ax, cols, ylabel, title in pairs:
        for k, (col, hatch) in enumerate(zip(cols, ("", "//"))):
            vals = table[col].to_numpy(float)
            bars = ax.bar(x + (k - 0.5) * 0.4, np.nan_to_num(vals), 0.4, color=colors, hatch=hatch,
                          edgecolor="black", linewidth=0.5, alpha=1.0 if k else 0.55, label=col.replace("_", " "))
            ax.bar_label(bars, labels=["-" if np.isnan(v) else f"{v:.3g}" for v in vals], fontsize=7)
        ticks = [lab + (f"\n(log lacks {m})" if m != "none" else "") for lab, m in zip(labels, table["missing"])]
        ax.set_xticks(x, ticks, rotation=15 if len(runs) > 3 else 0, ha="right" if len(runs) > 3 else "center",
                      fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.12)
        _legend(ax, ylabel)
    return fig


def plot_compare(runs: Sequence[RunData], out: Path) -> Path:
    return _save(figure_compare(runs), out / COMPARE_FILE)


def plot_loaded(runs: Sequence[RunData], out_dir: str | Path, bins: int = 10) -> list[Path]:
    """All figures for runs already in memory (the CLI loads each run once for tables and plots); several runs
    also get ``compare.png``, runs with attached rollout workers ``elastic.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [plot_reward_accuracy(runs, out), plot_staleness(runs, out), plot_response_length(runs, out, bins),
             plot_throughput(runs, out)]
    paths += [plot_compare(runs, out)] if len(runs) > 1 else []
    return paths + ([plot_elastic(runs, out)] if any(has_workers(r) for r in runs) else [])


def plot_runs(run_dirs: Sequence[str | Path], out_dir: str | Path, *, bins: int = 10,
              strict: bool = False) -> list[Path]:
    """Write the standard figures of one or several runs into ``out_dir``; returns the PNG paths."""
    return plot_loaded([load_run(d, strict=strict) for d in run_dirs], out_dir, bins)
