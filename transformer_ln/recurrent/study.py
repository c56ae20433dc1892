"""Tables and figures of the layer normalization paper's own claims (Ba et al. 2016), from finished runs.

Why apart from ``plotting``: these read the LM runs of ``transformer_ln.recurrent.lm`` (``config.json`` and
``summary.json``, named by ``lm.CONFIG_JSON`` and ``RunDir``) and the BatchNorm-vs-LayerNorm sweep's ``results.csv``,
group them by seed and show mean and spread, which the per-run Transformer figures do not need. matplotlib only
through ``Figure`` (no pyplot, no global backend).
"""
from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Iterable, Optional

from ..atomic import write_with
from ..runs.rundir import RunDir

NORM_LABELS = {"layernorm": "LN-LSTM", None: "LSTM"}
NORM_COLORS = {"layernorm": "tab:blue", None: "tab:red", "batchnorm": "tab:orange"}


def lm_run_name(norm: Optional[str], lr: float, seed: int) -> str:
    return f"{'lnlstm' if norm == 'layernorm' else 'lstm'}-lr{lr:g}-s{seed}"


def read_lm_runs(root: str | Path) -> list[dict]:
    """Every finished LM run under ``root``: its config merged into its summary."""
    from .lm import CONFIG_JSON  # lazily: lm imports torch and tokenizers, reading runs needs neither

    runs = []
    for summary in sorted(Path(root).glob(f"*/{RunDir.SUMMARY}")):
        s = json.loads(summary.read_text())
        s["config"] = json.loads((summary.parent / CONFIG_JSON).read_text())
        s["name"] = summary.parent.name
        runs.append(s)
    return runs


def _groups(runs: Iterable[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in runs:
        out.setdefault((r["config"]["lr"], r["config"]["norm"]), []).append(r)
    return dict(sorted(out.items(), key=lambda kv: (kv[0][0], kv[0][1] is None)))


def _ppl_at(run: dict, update: int) -> Optional[float]:
    for row in run["history"]:
        if row["update"] == update:
            return row["valid_ppl"]
    return None


def _first_update_below(run: dict, ppl: float) -> Optional[int]:
    for row in run["history"]:
        if row["valid_ppl"] <= ppl:
            return row["update"]
    return None


def _mean_sd(xs: list[float]) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.1f}"
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}"


def lm_table(runs: list[dict]) -> tuple[str, list[dict]]:
    """Markdown table (mean ± sd over seeds) and CSV rows (one per run) of validation perplexity against updates.

    "updates to LSTM's final" is, for each run, the first evaluated update at which it reached the plain LSTM's mean
    final perplexity at the same learning rate: the paper's claim of faster convergence, in numbers.
    """
    groups = _groups(runs)
    updates = sorted({row["update"] for r in runs for row in r["history"]})
    shown = [u for u in updates if u in (100, 200, 300, 500) or u == updates[-1]]
    target = {lr: statistics.mean(r["final_valid_ppl"] for r in rs) for (lr, norm), rs in groups.items()
              if norm is None}
    head = ["lr", "model", "seeds"] + [f"ppl @ {u}" for u in shown] + ["best ppl", "updates to LSTM's final",
                                                                        "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(shown) + 2) + "---|"]
    rows = []
    for (lr, norm), rs in groups.items():
        cells = [f"{lr:g}", NORM_LABELS.get(norm, str(norm)), str(len(rs))]
        cells += [_mean_sd([p for p in (_ppl_at(r, u) for r in rs) if p is not None]) for u in shown]
        cells.append(_mean_sd([r["best_valid_ppl"] for r in rs]))
        reach = [_first_update_below(r, target[lr]) if lr in target else None for r in rs]
        cells.append(", ".join("-" if u is None else str(u) for u in reach) if lr in target else "-")
        statuses = sorted({r["status"] for r in rs})
        cells.append(", ".join(statuses))
        lines.append("| " + " | ".join(cells) + " |")
        for r, u in zip(rs, reach):
            rows.append({"run": r["name"], "lr": lr, "norm": norm or "none", "seed": r["config"]["seed"],
                         "status": r["status"], "final_valid_ppl": r["final_valid_ppl"],
                         "best_valid_ppl": r["best_valid_ppl"], "updates_to_lstm_final": u,
                         "seconds": round(r["seconds"], 1),
                         **{f"ppl_at_{u2}": _ppl_at(r, u2) for u2 in shown}})
    return "\n".join(lines) + "\n", rows


def write_csv(rows: list[dict], path: str | Path) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
    write_with(path, write)


def _figure(width: float, height: float, ncols: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _axes_labels(ax, xlabel: str, ylabel: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()


def _save_png(fig, path: str | Path, dpi: int = 130) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_with(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))


def _plain_log_ticks(ax) -> None:
    from matplotlib.ticker import LogLocator, ScalarFormatter

    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter("")


def plot_lm_curves(runs: list[dict], path: str | Path, title: str = "") -> Path:
    """Validation perplexity against updates, one panel per learning rate: mean over seeds, min-max band."""
    groups = _groups(runs)
    lrs = sorted({lr for lr, _ in groups})
    fig, axes = _figure(5.0 * len(lrs), 3.8, len(lrs))
    for ax, lr in zip(axes, lrs):
        for (glr, norm), rs in groups.items():
            if glr != lr:
                continue
            ups = sorted(set.intersection(*({row["update"] for row in r["history"]} for r in rs)) - {0})
            per = [[_ppl_at(r, u) for r in rs] for u in ups]
            color = NORM_COLORS.get(norm)
            ax.plot(ups, [statistics.mean(p) for p in per], color=color, marker="o", ms=3,
                    label=f"{NORM_LABELS.get(norm, norm)} ({len(rs)} seeds)")
            if len(rs) > 1:
                ax.fill_between(ups, [min(p) for p in per], [max(p) for p in per], color=color, alpha=0.2)
        ax.set_yscale("log")
        _plain_log_ticks(ax)
        ax.set_title(f"Adam lr {lr:g}")
        _axes_labels(ax, "updates", "validation perplexity")
    if title:
        fig.suptitle(title)
    return _save_png(fig, path)


def plot_lm_gap(runs: list[dict], path: str | Path, title: str = "") -> Path:
    """LSTM's perplexity over LN-LSTM's (same lr, same seed) against updates: above 1 where LN-LSTM is ahead."""
    by = {(r["config"]["lr"], r["config"]["norm"], r["config"]["seed"]): r for r in runs}
    lrs = sorted({k[0] for k in by})
    fig, axes = _figure(5.5, 3.6)
    ax = axes[0]
    for lr, color in zip(lrs, ("tab:purple", "tab:green", "tab:gray", "tab:brown")):
        seeds = sorted({k[2] for k in by if k[0] == lr and (lr, None, k[2]) in by and (lr, "layernorm", k[2]) in by})
        for i, seed in enumerate(seeds):
            plain, ln = by[(lr, None, seed)], by[(lr, "layernorm", seed)]
            ups = [row["update"] for row in ln["history"] if row["update"] > 0 and _ppl_at(plain, row["update"])]
            ratio = [_ppl_at(plain, u) / _ppl_at(ln, u) for u in ups]
            ax.plot(ups, ratio, color=color, alpha=0.8, label=f"lr {lr:g}" if i == 0 else None)
    ax.axhline(1.0, color="k", lw=0.8)
    _axes_labels(ax, "updates", "ppl(LSTM) / ppl(LN-LSTM), per seed")
    if title:
        ax.set_title(title)
    return _save_png(fig, path)


def rescaling_change(model, run, names: Iterable, factor: float = 3.0) -> dict:
    """max |y' - y| / max |y| of ``run(model)`` when each named parameter (or tuple of names, together) is
    multiplied by ``factor``.

    The paper's Table 1: the output of a layer whose summed inputs a = W x are layer-normalized does not change when
    W is rescaled (LN removes the scale with sigma). Each parameter is restored before the next is scaled; the model
    runs in eval mode and under ``no_grad``.
    """
    import torch

    params = dict(model.named_parameters())
    out = {}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        ref = run(model)
        scale = ref.abs().max().item()
        for name in names:
            group = (name,) if isinstance(name, str) else tuple(name)
            saved = [params[n].detach().clone() for n in group]
            for n in group:
                params[n].mul_(factor)
            out[name] = (run(model) - ref).abs().max().item() / scale
            for n, s in zip(group, saved):
                params[n].copy_(s)
    model.train(was_training)
    return out


# ---- BatchNorm against LayerNorm in the Transformer, across batch sizes ----

def _has_running_stats(module) -> bool:
    return hasattr(module, "running_mean") and hasattr(module, "running_var")


def valid_nll_two_ways(run_dir: str | Path, max_tokens: Optional[int] = None) -> dict:
    """Valid nll (bits/token) of a run's best checkpoint with running statistics (eval mode, what inference does)
    and with each batch's own statistics (norms in train mode, dropout off): BatchNorm's train/eval gap.

    For a LayerNorm model both numbers are the same computation; the difference is BatchNorm's alone.
    """
    import torch

    from ..runs.checkpoint import load_model
    from ..data.prepare import prepare_data
    from ..training.losses import label_smoothed_nll_loss

    run_dir = Path(run_dir)
    model, cfg = load_model(run_dir, RunDir.BEST)
    data = prepare_data(cfg, run_dir)
    tokens = max_tokens or cfg.train.max_tokens
    out = {}
    for mode in ("running", "batch"):
        model.eval()
        if mode == "batch":
            for m in model.modules():
                if _has_running_stats(m):
                    m.train()
        total = count = 0.0
        sampler = data.sampler("valid", tokens, seed=0, shuffle=False)
        with torch.no_grad():
            for ix in sampler:
                b = data.batch("valid", ix)
                logits = model(b["src"], b["tgt_in"])
                _, nll = label_smoothed_nll_loss(logits, b["tgt_out"], 0.0, cfg.model.pad_id)
                total, count = total + float(nll), count + float(b["ntokens"])
        out[mode] = total / count / math.log(2)
    out["gap"] = out["running"] - out["batch"]
    return out


def read_norm_runs(root: str | Path) -> list[dict]:
    """Every finished run under ``root/<norm>-tok<N>/<run>/``: norm, max_tokens, summary, test BLEU, last train nll."""
    rows = []
    for summary in sorted(Path(root).glob(f"*-tok*/*/{RunDir.SUMMARY}")):
        run = summary.parent
        norm, _, tok = run.parent.name.rpartition("-tok")
        s = json.loads(summary.read_text())
        ev = RunDir(run).find_eval("test")
        train = [json.loads(line) for line in RunDir(run).metrics.read_text().splitlines() if '"train"' in line]
        train = [r for r in train if r.get("kind") == "train"]
        last = train[-50:]
        rows.append({"norm": norm, "max_tokens": int(tok), "run": str(run), "status": s["status"],
                     "best_valid_nll": s.get("best_valid_nll"), "updates": s.get("updates"),
                     "test_bleu": json.loads(ev.read_text())["bleu"] if ev is not None else None,
                     "train_nll_last50": (sum(r["nll"] for r in last) / len(last)) if last else None,
                     "target_tokens_per_batch": (sum(r["ntokens"] for r in last) / len(last)) if last else None,
                     "wall_time_s": s.get("wall_time_s")})
    return rows


def norm_table(rows: list[dict]) -> str:
    head = ["norm", "max_tokens", "status", "best valid nll (bits)", "valid nll, batch stats", "BN train/eval gap",
            "test BLEU", "updates", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|---|" + "---:|" * (len(head) - 3)]

    def f(v, fmt="{:.2f}"):
        return "-" if v is None else fmt.format(v)
    for r in sorted(rows, key=lambda r: (r["max_tokens"], r["norm"])):
        lines.append("| " + " | ".join([r["norm"], str(r["max_tokens"]), r["status"], f(r["best_valid_nll"]),
                                        f(r.get("valid_nll_batch")), f(r.get("gap"), "{:+.2f}"), f(r["test_bleu"]),
                                        f(r["updates"], "{}"), f(r["wall_time_s"], "{:.0f}")]) + " |")
    return "\n".join(lines) + "\n"


def plot_norm_vs_batch(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Final valid nll, test BLEU and BatchNorm's train/eval gap against the batch size (tokens), one line per norm."""
    fig, axes = _figure(13.5, 3.8, 3)
    norms = sorted({r["norm"] for r in rows})
    panels = (("best_valid_nll", "best valid nll (bits/token)"), ("test_bleu", "test BLEU"),
              ("gap", "valid nll: running - batch statistics"))
    for ax, (key, label) in zip(axes, panels):
        for norm in norms:
            pts = sorted((r["max_tokens"], r.get(key)) for r in rows if r["norm"] == norm and r.get(key) is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", color=NORM_COLORS.get(norm), label=norm)
        ax.set_xscale("log", base=2)
        _axes_labels(ax, "batch size (train.max_tokens)", label)
    if title:
        fig.suptitle(title)
    return _save_png(fig, path)


def plot_norm_curves(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Valid nll against updates, one panel per batch size, BatchNorm and LayerNorm overlaid."""
    sizes = sorted({r["max_tokens"] for r in rows})
    fig, axes = _figure(3.6 * len(sizes), 3.4, len(sizes))
    for ax, size in zip(axes, sizes):
        for r in sorted((r for r in rows if r["max_tokens"] == size), key=lambda r: r["norm"]):
            recs = [json.loads(line) for line in RunDir(r["run"]).metrics.read_text().splitlines()]
            valid = [(x["update"], x["nll"]) for x in recs if x.get("kind") == "valid" and math.isfinite(x["nll"])]
            if valid:
                ax.plot(*zip(*valid), marker="o", ms=3, color=NORM_COLORS.get(r["norm"]), label=r["norm"])
        ax.set_title(f"max_tokens {size}")
        _axes_labels(ax, "updates", "valid nll (bits/token)")
    if title:
        fig.suptitle(title)
    return _save_png(fig, path)
