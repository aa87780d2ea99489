"""PNG curves, one line per method with its interval band: eval's accuracy against samples per question (N) or
tokens generated (optsys.eval.report), and with `y=` any metric against another (optsys.telemetry.plots draws
a training run's curves with it). It lives here, below both, so that telemetry never imports eval.

matplotlib is imported inside `plot_curves`, so importing this module (and optsys.eval) does not need it.
The figure is drawn on a bare `matplotlib.figure.Figure`, whose `savefig` renders through the Agg canvas:
no display is needed and pyplot's global state (its backend, its list of open figures) is never touched,
so calling this from a notebook or a training process changes nothing there.
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def _point_values(method: str, points: list[dict], x: str, log_x: bool, y: str = "accuracy") -> dict[str, list[float]]:
    """The columns of one method's points, sorted by x, after checking each point has what is drawn."""
    if not points:
        raise ValueError(f"method {method!r} has no points to plot")
    for i, point in enumerate(points):
        for key in (x, y):
            if key not in point:
                raise ValueError(f"method {method!r}: point {i} has no {key!r} key (it has {sorted(point)}); "
                                 f"every point needs {x!r} and {y!r}")
        if log_x and not float(point[x]) > 0:
            raise ValueError(f"method {method!r}: point {i} has {x}={point[x]!r}, which a log x axis cannot show; "
                             "pass log_x=False or drop the point")
    points = sorted(points, key=lambda p: float(p[x]))
    nan = math.nan
    return {
        "x": [float(p[x]) for p in points],
        "y": [float(p[y]) for p in points],
        "low": [float(p["low"]) if p.get("low") is not None else nan for p in points],
        "high": [float(p["high"]) if p.get("high") is not None else nan for p in points],
        "n": [p.get("n") for p in points],
    }


def _compact(value: float) -> str:
    """A tick label: 500, 2k, 1.5M."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:g}{suffix}"
    return f"{value:g}"


def plot_curves(curves: dict[str, list[dict]], *, x: str, path: str | os.PathLike, title: str = "",
                xlabel: str | None = None, ylabel: str = "accuracy", log_x: bool = True, y: str = "accuracy",
                ylim: tuple[float, float] | None = None) -> Path:
    """Draw `y` (accuracy) vs `x` for each method (dict key = legend label) and write a PNG to path; returns the path.

    A point is a dict with `x` and `y`, optionally "low"/"high" (a shaded interval band; points without
    them leave a gap) and "n" (written beside each point when x is not "n", e.g. on a tokens axis). With
    x == "n" and a log axis, the ticks are the N values themselves (1, 2, 4, ...). `ylim` fixes the y range."""
    if not curves:
        raise ValueError("curves is empty: give at least one method's points")
    columns = {method: _point_values(method, points, x, log_x, y) for method, points in curves.items()}
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator
    except ImportError as e:
        raise ImportError("plot_curves needs matplotlib: pip install matplotlib") from e

    fig = Figure(figsize=(6.4, 4.4), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    xs_all: set[float] = set()
    for method, col in columns.items():
        # a dense curve (a training run's hundreds of logged steps) reads better without a marker per point
        (line,) = ax.plot(col["x"], col["y"], marker="o", markersize=4 if len(col["x"]) <= 60 else 0, label=method)
        if any(not math.isnan(v) for v in col["low"] + col["high"]):
            ax.fill_between(col["x"], col["low"], col["high"], color=line.get_color(), alpha=0.18, linewidth=0)
        if x != "n":
            for px, py, n in zip(col["x"], col["y"], col["n"]):
                if n is not None:
                    ax.annotate(f"N={n}", (px, py), textcoords="offset points", xytext=(4, -10), fontsize=7,
                                color=line.get_color())
        xs_all.update(col["x"])
    if log_x:
        ax.set_xscale("log", base=2 if x == "n" else 10)
        if x == "n" and len(xs_all) <= 16:
            ax.set_xticks(sorted(xs_all), [f"{v:g}" for v in sorted(xs_all)])
            ax.xaxis.set_minor_locator(NullLocator())
        else:  # plain numbers (200, 500, 1k, 2k) instead of matplotlib's 2x10^2 minor labels
            decades = math.log10(max(xs_all) / min(xs_all))
            subs = tuple(range(1, 10)) if decades < 1 else (1.0, 2.0, 5.0) if decades <= 2.5 else (1.0,)
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _compact(v)))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.06)  # room for the last point's "N=" label
    ax.set_xlabel(xlabel if xlabel is not None else ("samples per question (N)" if x == "n" else x))
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if title:
        ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="best", fontsize=8)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
