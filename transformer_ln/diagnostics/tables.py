"""The key numbers of each ``analyze`` command as a small plain-text table, printed beside its JSON and figure.

People read a terminal before they open a PNG; every value printed here is also in the command's JSON.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], note: str = "") -> str:
    """Columns padded to their widest cell; the first column left-aligned, the others right-aligned."""
    cells = [list(map(str, header))] + [[_cell(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    return "\n".join(lines + ([note] if note else []))


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _ci(mean: float, ci: Sequence[float] | None) -> str:
    return _cell(mean) if not ci else f"{_cell(mean)} [{_cell(ci[0])}, {_cell(ci[1])}]"


def dependency_table(results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """Per scheme and stack: the own-branch dependency beta_{i,i} of the first and last sub-layer and its mean."""
    rows = []
    for scheme, stacks in results.items():
        for stack, r in stacks.items():
            diag = [float(d) for d in r["diagonal"]]
            rows.append([scheme, stack, len(diag), diag[0], diag[-1], float(np.mean(diag))])
    return table(["scheme", "stack", "sub-layers", "beta_11", "beta_NN", "mean beta_ii"], rows,
                 "beta_ii: how much sub-layer i's output depends on its own residual branch (rows of unit norm)")


def output_change_table(changes: Mapping[str, Mapping[str, float]],
                        ci95: Mapping[str, Mapping[str, Sequence[float]]] | None = None, label: str = "") -> str:
    """Per scheme: the output change of each stack (mean, and [95% interval] when there are several seeds)."""
    stacks = list(next(iter(changes.values())))
    rows = [[scheme] + [_ci(v[s], (ci95 or {}).get(scheme, {}).get(s)) for s in stacks]
            for scheme, v in changes.items()]
    return table(["scheme", *stacks], rows, label)


def depth_sweep_table(sweep: Mapping[str, Any] | list[Mapping[str, Any]]) -> str:
    """Per scheme (and definition): output change at the shallowest and deepest N, their ratio, the better fit."""
    sweeps = list(sweep) if isinstance(sweep, list) else [sweep]
    rows = []
    for sw in sweeps:
        name = (sw.get("definition") or {}).get("text", "")
        for scheme, r in sw["results"].items():
            n, y, fit = r["sublayers"], r["output_change"], r.get("fit")
            rows.append([scheme, f"{n[0]}-{n[-1]}", y[0], y[-1], r.get("ratio"),
                         fit["better"] if fit else None, name])
    return table(["scheme", "N", "change at min N", "at max N", "ratio", "better fit", "definition"], rows)


def grad_norms_table(norms: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """Per scheme and stack: relative output-gradient norm at the first and last sub-layer, and the smallest."""
    rows = []
    for scheme, entries in norms.items():
        for stack in dict.fromkeys(e["stack"] for e in entries.values()):
            es = sorted((e for e in entries.values() if e["stack"] == stack), key=lambda e: e["index"])
            rel = [float(e["output_grad_rel"]) for e in es]
            rows.append([scheme, stack, len(es), rel[0], rel[-1], min(rel)])
    return table(["scheme", "stack", "sub-layers", "first", "last", "min"], rows,
                 "|dL/dx_i| at each sub-layer's output, relative to the largest in the network")


def curves_table(rows: list[dict]) -> str:
    """The numbers behind the curves figure, one line per run (losses in bits per token)."""
    def num(v, fmt="{:.3f}") -> str:
        return "-" if v is None else fmt.format(v)

    width = max([len(r["name"]) for r in rows] + [3])
    lines = [f"{'run'.ljust(width)}  {'status':<9} {'stopped':<11} {'updates':>7} {'last train':>10} "
             f"{'best valid':>10}  (loss, bits/token)"]
    for r in rows:
        s = r["summary"]
        lines.append(f"{r['name'].ljust(width)}  {s.get('status') or '-':<9} {s.get('stopped') or '-':<11} "
                     f"{num(s.get('updates'), '{}'):>7} {num(r['last_train_loss']):>10} "
                     f"{num(s.get('best_valid_loss')):>10}")
    return "\n".join(lines)
