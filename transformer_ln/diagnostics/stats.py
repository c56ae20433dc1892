"""Statistics over seeds: the mean with its 95% interval, and the linear-versus-logarithmic depth fits.

Why a module of its own: the analyze command, the depth sweep and the analysis scripts all summarise repeated
measurements (one per seed) the same way, and these are plain numbers in, numbers out (numpy and math only, no
models), so they are tested and reused without building anything.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import numpy as np

# two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom (then the normal's 1.96)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def mean_ci95(values: Iterable[float]) -> tuple[float, float, float]:
    """(mean, low, high): the two-sided 95% Student-t interval of the mean (a few seeds are too few for the
    normal's 1.96); a single value gives a zero-width interval."""
    v = np.asarray(list(values), float)
    m = float(v.mean())
    if len(v) < 2:
        return m, m, m
    t = _T975[len(v) - 2] if len(v) - 1 <= len(_T975) else 1.96
    half = t * float(v.std(ddof=1)) / math.sqrt(len(v))
    return m, m - half, m + half


def mean_ci95_along(stacked: np.ndarray) -> np.ndarray:
    """``mean_ci95`` of every entry over the first axis (seeds): (seeds, ...) -> (3, ...) of mean, low, high.

    Why: a per-seed matrix (e.g. the dependency beta_{i,j}) is summarised entry by entry, not as one number."""
    return np.apply_along_axis(lambda v: np.array(mean_ci95(v)), 0, np.asarray(stacked))


def columns_ci95(per_seed: Sequence[Sequence[float]]) -> tuple[list[float], list[list[float]]]:
    """Per column of ``per_seed`` (seeds x points, e.g. depths): the means and their [low, high] 95% intervals."""
    stats = [mean_ci95(col) for col in zip(*per_seed)]
    return [s[0] for s in stats], [[s[1], s[2]] for s in stats]


def keys_ci95(rows: Sequence[Mapping[str, float]]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Per key of the per-seed records ``rows`` (one dict per seed, same keys, e.g. stacks): the mean over seeds
    and its [low, high] 95% interval."""
    stats = {k: mean_ci95(r[k] for r in rows) for k in rows[0]}
    return {k: v[0] for k, v in stats.items()}, {k: [v[1], v[2]] for k, v in stats.items()}


def fit(n: Iterable[float], y: Iterable[float]) -> dict[str, dict[str, float] | str]:
    """Least-squares fits y ~ a*N + b and y ~ a*log(N) + b, with residual sum of squares and R^2 each.

    Why both: the paper's claim is O(N) output change for Post-LN against O(log N) for Pre-LN and Admin;
    ``better`` names the fit with the higher R^2."""
    n, y = np.asarray(list(n), float), np.asarray(list(y), float)
    out: dict = {}
    tss = float(((y - y.mean()) ** 2).sum())
    for kind, x in (("linear", n), ("log", np.log(n))):
        A = np.stack([x, np.ones_like(x)], axis=1)
        (a, b), *_ = np.linalg.lstsq(A, y, rcond=None)
        rss = float(((A @ np.array([a, b]) - y) ** 2).sum())
        out[kind] = {"a": float(a), "b": float(b), "rss": rss, "r2": 1.0 - rss / tss if tss > 0 else 1.0}
    out["better"] = "linear" if out["linear"]["r2"] > out["log"]["r2"] else "log"
    return out


def fit_over_seeds(n: list[int], per_seed: list[list[float]]) -> dict:
    """Each seed's ``fit`` summarised: R^2 of both fits (mean, sd, min, max) and how many seeds each fit wins.

    Why per seed: a fit to the means can hide that single seeds disagree; the win count shows how robust it is."""
    fits = [fit(n, y) for y in per_seed]
    out: dict = {"wins": {k: sum(f["better"] == k for f in fits) for k in ("linear", "log")}, "seeds": len(fits)}
    for kind in ("linear", "log"):
        r2 = np.array([f[kind]["r2"] for f in fits])
        out[kind] = {"r2_mean": float(r2.mean()), "r2_sd": float(r2.std(ddof=1)) if len(r2) > 1 else 0.0,
                     "r2_min": float(r2.min()), "r2_max": float(r2.max())}
    return out
