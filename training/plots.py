"""Figures logged with every model run: ROC, calibration, lift by decile, feature importance, and the
next-purchase and value equivalents. Each function takes plain arrays and returns a matplotlib Figure
(Agg backend, nothing shown, nothing written: ``mlflow.log_figure`` stores it).

Example::

    fig = roc_figure(y, {"model": p, "bg_nbd": bg})
    mlflow.log_figure(fig, "plots/roc.png")
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from training.metrics import calibration_table, lift_by_decile

_SIZE = (5.5, 4.0)


def _figure() -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=_SIZE, dpi=100, layout="constrained")
    return fig, fig.add_subplot()


def _roc_curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-s, kind="stable")
    ys, ss = y[order], s[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(ss)), len(ss) - 1]
    tp = np.cumsum(ys)[last_of_tie]
    fp = (last_of_tie + 1) - tp
    pos, neg = max(ys.sum(), 1), max(len(ys) - ys.sum(), 1)
    return np.r_[0, fp / neg], np.r_[0, tp / pos]


def roc_figure(y_true: Any, scores: Mapping[str, Any], title: str = "ROC on the backtest") -> Any:
    """ROC curves of several scores of the same binary outcome (higher score = more likely 1)."""
    y = np.asarray(y_true, dtype=float)
    fig, ax = _figure()
    for name, s in scores.items():
        fpr, tpr = _roc_curve(y, np.asarray(s, dtype=float))
        auc = float(np.trapezoid(tpr, fpr))
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def calibration_figure(y_true: Any, p: Any, title: str = "Calibration on the backtest") -> Any:
    """Observed rate against mean predicted probability by decile of the prediction."""
    table = calibration_table(y_true, p, bins=10, strategy="quantile")
    fig, ax = _figure()
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.plot(table["mean_predicted"], table["observed_rate"], marker="o")
    ax.set(xlabel="mean predicted probability", ylabel="observed rate", title=title, xlim=(0, 1), ylim=(0, 1))
    return fig


def lift_figure(y_true: Any, score: Any, title: str = "Lift by decile") -> Any:
    """Lift (rate in the decile / overall rate) of the deciles of ``score``, highest score first."""
    table = lift_by_decile(y_true, score)
    fig, ax = _figure()
    ax.bar(table["decile"], table["lift"])
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="decile (1 = highest score)", ylabel="lift", title=title, xticks=list(table["decile"]))
    return fig


def importance_figure(importance: pd.Series, top: int = 20, title: str = "Feature importance (gain)") -> Any:
    """Horizontal bars of the ``top`` features by importance."""
    s = importance.sort_values(ascending=False).head(top)[::-1]
    fig, ax = _figure()
    ax.barh(list(map(str, s.index)), s.to_numpy(dtype=float))
    ax.set(xlabel="gain", title=title)
    ax.tick_params(axis="y", labelsize=7)
    return fig


def decile_figure(y_true: Any, pred: Any, title: str = "Spend by decile of the prediction") -> Any:
    """Mean actual and mean predicted value per decile of the prediction (highest first)."""
    y = np.asarray(y_true, dtype=float)
    p = np.asarray(pred, dtype=float)
    order = np.argsort(-p, kind="stable")
    group = np.arange(len(p)) * 10 // max(len(p), 1) + 1
    frame = pd.DataFrame({"decile": group, "actual": y[order], "predicted": p[order]})
    table = frame.groupby("decile").mean()
    fig, ax = _figure()
    width = 0.4
    ax.bar(table.index - width / 2, table["actual"], width, label="actual")
    ax.bar(table.index + width / 2, table["predicted"], width, label="predicted")
    ax.set(xlabel="decile (1 = highest prediction)", ylabel="mean", title=title, xticks=list(table.index))
    ax.legend(fontsize=8)
    return fig
