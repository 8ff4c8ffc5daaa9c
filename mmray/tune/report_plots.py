"""The PNG plots of ``mmray report``: matplotlib (Agg), one function per figure, plain data in.

Every function saves one file and returns its path; none reads the experiment folder itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

DPI = 110


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    plt = _pyplot()
    try:
        fig.tight_layout()
        fig.savefig(path, dpi=DPI)
    finally:
        plt.close(fig)
    return Path(path)


def plot_history(order: Sequence[int], values: Sequence[float], *, metric: str, mode: str, winner_index: int | None,
                 path: str | Path) -> Path:
    """Each completed trial's best-epoch metric in the order the trials started, and the best so far.

    Args:
        order: trial sequence numbers (x), ascending.
        values: the trials' best-epoch ``metric`` (y), same length.
        winner_index: position in ``values`` of the sweep's winner (highlighted), or None.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    pick = np.maximum.accumulate if mode == "max" else np.minimum.accumulate
    ax.plot(order, values, "o", color="tab:blue", alpha=0.8, label="trial (best epoch)")
    ax.step(order, pick(np.asarray(values, dtype=float)), where="post", color="tab:orange", lw=2,
            label=f"best so far ({mode})")
    if winner_index is not None:
        ax.plot([order[winner_index]], [values[winner_index]], "*", ms=16, color="tab:red", label="winner")
    ax.set_title(f"Optimisation history: {metric} per trial")
    ax.set_xlabel("trial (order started)")
    ax.set_ylabel(f"best-epoch {metric}")
    if len(order) <= 30:
        ax.set_xticks(list(order))
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    return _save(fig, path)


def plot_importances(importances: dict[str, float], *, metric: str, path: str | Path) -> Path:
    """Horizontal bars of fANOVA importances (they sum to 1), most important on top."""
    plt = _pyplot()
    names = list(importances)[::-1]
    vals = [importances[n] for n in names]
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.5 * len(names)))
    bars = ax.barh(names, vals, color="tab:green", label="fANOVA importance")
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in vals], padding=3)
    ax.set_xlim(0, max(1.0, max(vals) * 1.15))
    ax.set_title(f"Parameter importance for {metric} (fANOVA)")
    ax.set_xlabel("share of the metric's variance explained")
    ax.set_ylabel("parameter")
    ax.legend(loc="lower right")
    return _save(fig, path)


@dataclass
class ParallelAxis:
    """One vertical axis: a parameter (or the metric) and its value in each trial (None = not drawn)."""

    name: str
    values: list[Any]
    categories: list[str] | None = None  # categorical: the choices, in the space's order
    log: bool = False


def _normalised(axis: ParallelAxis) -> tuple[np.ndarray, list[float], list[str]]:
    """Values mapped to [0, 1], plus tick positions and labels for the axis."""
    if axis.categories is not None:
        k = len(axis.categories)
        pos = {c: (i / (k - 1) if k > 1 else 0.5) for i, c in enumerate(axis.categories)}
        ys = np.array([pos.get(v, np.nan) if v is not None else np.nan for v in axis.values], dtype=float)
        return ys, list(pos.values()), list(axis.categories)
    raw = np.array([np.nan if v is None else float(v) for v in axis.values], dtype=float)
    scaled = np.log10(raw) if axis.log else raw
    lo, hi = np.nanmin(scaled), np.nanmax(scaled)
    span = hi - lo if hi > lo else 1.0
    ys = (scaled - lo) / span if hi > lo else np.full_like(scaled, 0.5)
    ticks = np.linspace(lo, hi, 3) if hi > lo else np.array([lo])
    labels = [f"{(10 ** t if axis.log else t):.3g}" for t in ticks]
    return ys, list((ticks - lo) / span if hi > lo else [0.5]), labels


def plot_parallel(axes: Sequence[ParallelAxis], scores: Sequence[float], *, metric: str, mode: str,
                  path: str | Path) -> Path:
    """Parallel coordinates: one line per trial across the parameter axes and the metric, coloured by score.

    Categorical parameters are placed at evenly spaced positions labelled with their choices; a
    ``loguniform`` parameter's axis is logarithmic.
    """
    plt = _pyplot()
    from matplotlib import cm, colors

    all_axes = [*axes, ParallelAxis(metric, list(scores))]
    cols = [_normalised(a) for a in all_axes]
    fig, ax = plt.subplots(figsize=(max(6.5, 2.2 * len(all_axes)), 5.0))
    norm = colors.Normalize(vmin=min(scores), vmax=max(scores) if max(scores) > min(scores) else min(scores) + 1e-9)
    cmap = cm.viridis if mode == "max" else cm.viridis_r
    xs = np.arange(len(all_axes))
    order = np.argsort(scores) if mode == "max" else np.argsort(scores)[::-1]  # best drawn last (on top)
    for t in order:
        ax.plot(xs, [c[0][t] for c in cols], color=cmap(norm(scores[t])), lw=2, alpha=0.85, marker="o", ms=4)
    for x, (_, ticks, labels) in zip(xs, cols):
        ax.axvline(x, color="0.4", lw=1)
        for y, label in zip(ticks, labels):
            ax.text(x + 0.03, y, label, fontsize=8, va="center", ha="left",
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.7})
    ax.set_xticks(xs, labels=[_wrap(a.name) for a in all_axes], fontsize=9)
    ax.set_yticks([])
    ax.set_xlim(-0.2, len(all_axes) - 0.5)
    ax.set_ylim(-0.08, 1.08)
    ax.set_title(f"Parameters vs {metric} (one line per completed trial)")
    ax.set_xlabel("parameter (each axis scaled to its own range)")
    sm = cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(sm, ax=ax, label=f"best-epoch {metric}", fraction=0.04, pad=0.02)
    return _save(fig, path)


def _wrap(dotted: str) -> str:
    """``model.fusion.dropout`` -> two lines at the last dot, so long keys fit under an axis."""
    head, _, tail = dotted.rpartition(".")
    return f"{head}.\n{tail}" if head else tail


def plot_fusions(best: dict[str, float], *, metric: str, winner: str | None, path: str | Path) -> Path:
    """Bars of the best score reached by each fusion method; the winner's fusion highlighted."""
    plt = _pyplot()
    names = list(best)
    vals = [best[n] for n in names]
    fig, ax = plt.subplots(figsize=(max(5.5, 1.1 * len(names) + 2), 4.5))
    colours = ["tab:red" if n == winner else "tab:blue" for n in names]
    bars = ax.bar(names, vals, color=colours)
    ax.bar_label(bars, labels=[f"{v:.3f}" for v in vals], padding=3)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color="tab:red", label="winner's fusion"), Patch(color="tab:blue", label="other fusion")],
              loc="lower right")
    top = max(vals) if vals else 1.0
    ax.set_ylim(0, top * 1.15 if top > 0 else 1.0)
    ax.set_title(f"Best {metric} per fusion method")
    ax.set_xlabel("model.fusion.name")
    ax.set_ylabel(f"best-epoch {metric}")
    ax.tick_params(axis="x", rotation=20)
    return _save(fig, path)


def plot_control_arms(labels: Sequence[str], differences: Sequence[float], lows: Sequence[float],
                      highs: Sequence[float], *, level: float, path: str | Path) -> Path:
    """Forest plot: the winner's test-accuracy advantage over each control with its bootstrap CI."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 2.0 + 1.0 * len(labels)))
    ys = np.arange(len(labels))[::-1]
    d, lo, hi = map(np.asarray, (differences, lows, highs))
    ax.errorbar(d, ys, xerr=[d - lo, hi - d], fmt="o", color="tab:blue", ecolor="tab:blue", capsize=6, ms=8,
                label=f"difference, {level:.0%} bootstrap CI")
    ax.axvline(0.0, color="tab:red", ls="--", label="no difference")
    for y, v, h in zip(ys, d, hi):
        ax.annotate(f"{v:+.3f}", (h, y), xytext=(6, 0), textcoords="offset points", va="center", fontsize=9)
    ax.set_yticks(ys, labels=list(labels))
    ax.set_ylim(-0.8, len(labels) - 0.2)
    reach = max(0.05, float(np.max(np.abs(np.concatenate([lo, hi])))) * 1.3)
    ax.set_xlim(-reach, reach)
    ax.set_title("Winner vs control arms on the test split")
    ax.set_xlabel("test accuracy difference (winner - control)")
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)
