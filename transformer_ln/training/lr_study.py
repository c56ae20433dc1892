"""What the learning-rate sweep's trained runs show, measured from their checkpoints by the diagnostics' hooks
(``attach``; the model never knows it is observed) on one fixed batch of validation blocks:

* ``trace``: over training (every update checkpoint), the largest attention logit q.k/sqrt(d_h) over all layers
  and heads (Wortsman et al.'s attention-logit growth) and the mean and extremes of the output log-partition
  log Z = logsumexp(logits) (their output-logit divergence, which z-loss holds near 0);
* ``depth_profile``: on a final model, the hidden-state variance after each layer (the Curse-of-Depth growth), the
  angular distance arccos(cos(h_l, h_{l+1}))/pi between consecutive layers averaged over all tokens (Gromov et
  al.; Mix-LN) and the loss increase when each layer is skipped (Mix-LN's layer removal), in bits per token.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import mean, stdev
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..atomic import write_text
from ..runs.checkpoint import load_model, load_run_config_from, update_checkpoints
from .sweep import Point, is_finished

LN2 = math.log(2.0)


def analysis_batch(run_dir: Path, n_blocks: int = 16) -> torch.Tensor:
    """The first ``n_blocks`` validation blocks of the run's data, ``(B, T)`` token ids (the same for every run
    of a sweep that shares its data)."""
    from ..data.lm_prepare import prepare_lm_data

    cfg = load_run_config_from(run_dir)
    data = prepare_lm_data(cfg, run_dir)
    n = min(n_blocks, len(data.splits["valid"]))
    return data.batch("valid", list(range(n)))["input"]


def _attach(run_dir: Path, which: str):
    from ..diagnostics.families import attach

    model, _ = load_model(run_dir, which)
    return attach(model)  # float32 forward; the statistics are taken in float64


def trace(run_dir: Path, ids: torch.Tensor) -> dict[str, list]:
    """``{"update": [...], "max_attn_logit": [...], "log_z_mean": [...], "log_z_min": [...], "log_z_max": [...]}``
    over the run's update checkpoints (only weights that passed the divergence guard are ever written)."""
    from ..diagnostics.depth_stats import attention_logits, log_partition

    out: dict[str, list] = {k: [] for k in ("update", "max_attn_logit", "log_z_mean", "log_z_min", "log_z_max")}
    for ckpt in update_checkpoints(run_dir):
        sites = _attach(run_dir, ckpt.name)
        logits = attention_logits(sites, (ids,))
        z = log_partition(sites, (ids,))
        out["update"].append(int(ckpt.name.rsplit("_", 1)[-1]))
        out["max_attn_logit"].append(max(float(np.max(r["max"])) for r in logits.values()))
        out["log_z_mean"].append(z["mean"])
        out["log_z_min"].append(z["min"])
        out["log_z_max"].append(z["max"])
    return out


def depth_profile(run_dir: Path, ids: torch.Tensor, which: str = "last") -> dict[str, list]:
    """``{"variance": (L+1,), "angular": (L,), "removal_bits": (L,), "loss_bits": float}`` of one model."""
    from ..diagnostics.depth_stats import angular_distances, hidden_state_stats, layer_removal

    sites = _attach(run_dir, which)
    stats = hidden_state_stats(sites, (ids,))["decoder"]
    ang = angular_distances(sites, (ids,), gaps=[1])["decoder"]
    rem = layer_removal(sites, (ids,))["decoder"]
    return {"variance": [float(v) for v in stats["variance"]], "angular": [float(v) for v in ang["distance"][0]],
            "removal_bits": [float(v) / LN2 for v in rem["delta"]], "loss_bits": rem["base_loss"] / LN2}


def best_runs(rows: list[dict]) -> dict[tuple, str]:
    """``{(scheme, depth, seed): run}``: the completed run with the lowest final loss over the LR grid."""
    best: dict[tuple, dict] = {}
    for r in rows:
        if r["final_loss"] is None:
            continue
        key = (r["scheme"], r["depth"], r["seed"])
        if key not in best or r["final_loss"] < best[key]["final_loss"]:
            best[key] = r
    return {k: r["run"] for k, r in best.items()}


def _cached(path: Path, compute) -> dict:
    """``compute()``, kept in ``path`` (a finished run's checkpoints never change, so neither does the result)."""
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    write_text(path, json.dumps(value))
    return value


def analyse(points: list[Point], rows: list[dict], out: Path, top: int = 2, seeds: int = 1) -> dict[str, Any]:
    """Traces of the runs at the ``top`` largest learning rates (first ``seeds`` seeds) and depth profiles of each
    (scheme, depth, seed)'s best run: ``{"traces": {run: trace}, "profiles": {run: profile}, "best": ...}``.
    Each run's numbers are kept in its directory (``lr_trace.json``, ``lr_profile.json``) and read back on a rerun."""
    lrs = sorted({p.lr for p in points})[-top:] if top > 0 else []
    keep_seeds = sorted({p.seed for p in points})[:seeds]
    traced = [p for p in points if p.lr in lrs and p.seed in keep_seeds and is_finished(out / p.name)]
    best = best_runs(rows)
    memo: dict[str, torch.Tensor] = {}

    def batch(run_dir: Path) -> torch.Tensor:  # one fixed batch for every run (they share their data)
        if "ids" not in memo:
            memo["ids"] = analysis_batch(run_dir)
        return memo["ids"]
    result: dict[str, Any] = {"traces": {}, "profiles": {}, "best": {"|".join(map(str, k)): v for k, v in best.items()},
                              "traced_lrs": lrs}
    info = {p.name: {"scheme": p.scheme, "depth": p.depth, "lr": p.lr, "seed": p.seed} for p in points}
    for p in tqdm(traced, desc="traces", unit="run"):
        result["traces"][p.name] = {**info[p.name], **_cached(out / p.name / "lr_trace.json",
                                                              lambda: trace(out / p.name, batch(out / p.name)))}
    for run in tqdm(sorted(best.values()), desc="depth profiles", unit="run"):
        result["profiles"][run] = {**info[run], **_cached(out / run / "lr_profile.json",
                                                          lambda: depth_profile(out / run, batch(out / run)))}
    return result


# ------------------------------------------------------------------------------------------- the claims
def _stat(values: list[float]) -> str:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.3g} (1 seed)"
    return f"{mean(vals):.3g} ± {stdev(vals):.2g} (n={len(vals)}, range {min(vals):.3g}..{max(vals):.3g})"


def profile_numbers(profiles: dict[str, dict]) -> dict[tuple, dict[str, list[float]]]:
    """Per (scheme, depth): over seeds, the deepest quarter's mean angular distance and removal cost, the first
    quarter's (after the embedding's step, d(h_0, h_1)), and the variance growth over the deeper half,
    var(h_L)/var(h_{L/2}) (Mix-LN's first quarter is Post-LN, normalised: the half leaves it out)."""
    out: dict[tuple, dict[str, list[float]]] = {}
    for p in profiles.values():
        L = len(p["angular"])
        q = max(1, L // 4)
        d = out.setdefault((p["scheme"], p["depth"]), {k: [] for k in (
            "angular_deep", "angular_early", "removal_deep", "removal_early", "variance_growth")})
        d["angular_deep"].append(mean(p["angular"][-q:]))
        d["angular_early"].append(mean(p["angular"][1:1 + q] or p["angular"][:q]))  # l = 1.. (not the embedding)
        d["removal_deep"].append(mean(p["removal_bits"][-q:]))
        d["removal_early"].append(mean(p["removal_bits"][1:1 + q] or p["removal_bits"][:q]))
        mid = p["variance"][L // 2]
        d["variance_growth"].append(p["variance"][-1] / mid if mid > 0 else math.nan)
    return out


def claims_markdown(sens: list[dict], analysis: dict[str, Any]) -> str:
    """The numbers behind each claim of the issue, as tables (the verdicts are written by a person)."""
    lines = ["## LR sensitivity (bits; lower = less sensitive) and best loss, mean ± sd over seeds", "",
             "| scheme | depth | LRS | best final loss | best LR (per seed) | diverged runs |", "|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for s in sens:
        groups.setdefault((s["scheme"], s["depth"]), []).append(s)
    for (scheme, depth), ss in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        lines.append(f"| {scheme} | {depth} | {_stat([s['lrs'] for s in ss])} | "
                     f"{_stat([s['best_loss'] for s in ss])} | {', '.join(format(s['best_lr'], 'g') if s['best_lr'] else '-' for s in ss)} | "
                     f"{sum(s['diverged'] for s in ss)} |")
    lines += ["", "## Depth profiles of each scheme's best-LR run (deepest vs first quarter of layers)", "",
              "| scheme | depth | angular d(l,l+1) deep | early | removal cost deep (bits) | early | var(h_L)/var(h_L/2) |",
              "|---|---|---|---|---|---|---|"]
    for (scheme, depth), d in sorted(profile_numbers(analysis["profiles"]).items(), key=lambda kv: (kv[0][1], kv[0][0])):
        lines.append(f"| {scheme} | {depth} | {_stat(d['angular_deep'])} | {_stat(d['angular_early'])} | "
                     f"{_stat(d['removal_deep'])} | {_stat(d['removal_early'])} | {_stat(d['variance_growth'])} |")
    lines += ["", f"## At the largest learning rates {analysis['traced_lrs']}: last good checkpoint", "",
              "| run | updates traced | max attention logit (first -> last) | mean log Z (first -> last) |",
              "|---|---|---|---|"]
    for run, t in sorted(analysis["traces"].items(), key=lambda kv: (kv[1]["depth"], kv[1]["lr"], kv[1]["scheme"])):
        if not t["update"]:
            lines.append(f"| {run} | none (no checkpoint) | - | - |")
            continue
        lines.append(f"| {run} | {t['update'][0]}..{t['update'][-1]} | {t['max_attn_logit'][0]:.3g} -> "
                     f"{t['max_attn_logit'][-1]:.3g} | {t['log_z_mean'][0]:.3g} -> {t['log_z_mean'][-1]:.3g} |")
    return "\n".join(lines) + "\n"
