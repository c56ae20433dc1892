#!/usr/bin/env python
"""Best validation nll of run directories within the same update budget, as a Markdown table.

  python experiments/compare_at_budget.py --updates 300 experiments/results/cpu_synthetic/*-12L-lr0.001-* \
      experiments/results/cpu_synthetic_schemes/*-12L-*

Runs of one setting that differ only in ``train.max_updates`` follow the same path up to the shorter one's end (the
schedule and the data order depend only on the update count and the seed), so a longer run's validation records up
to the budget compare with a shorter run's. Test BLEU is reported only for runs that ended at the budget.
"""
import argparse
import json
import math
import sys
from pathlib import Path

from transformer_ln.diagnostics.plotting import read_run, scheme_label


def row(run_dir: Path, budget: int) -> dict:
    run = read_run(run_dir)
    valid = [r for r in run["valid"] if r["update"] <= budget and math.isfinite(float(r.get("nll", math.nan)))]
    cfg = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else ""
    scheme = run["summary"].get("residual") or next((ln.split(":")[1].strip() for ln in cfg.splitlines()
                                                     if ln.strip().startswith("residual:")), run["name"])
    test = run_dir / "eval_test.json"
    bleu = None
    if run["summary"].get("updates") == budget and test.is_file():
        bleu = json.loads(test.read_text()).get("bleu")
    at = {r["update"]: r["nll"] for r in valid}
    return {"scheme": scheme, "status": run["summary"].get("status", "?"),
            "updates": run["summary"].get("updates"), "nll": at,
            "best": min(at.values()) if at else None, "bleu": bleu}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--updates", type=int, required=True, help="the update budget")
    args = p.parse_args(argv)
    rows = [row(r, args.updates) for r in args.runs if r.is_dir()]
    marks = sorted({u for r in rows for u in r["nll"] if u % 100 == 0})
    head = ["scheme", *(f"valid nll @{u}" for u in marks), f"best valid nll (≤{args.updates})",
            f"test BLEU @{args.updates}", "run length"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in sorted(rows, key=lambda r: (r["best"] is None, r["best"] if r["best"] is not None else 0.0)):
        cells = [f"{scheme_label(r['scheme'])} (`{r['scheme']}`)",
                 *(f"{r['nll'][u]:.2f}" if u in r["nll"] else "–" for u in marks),
                 f"{r['best']:.2f}" if r["best"] is not None else "–",
                 f"{r['bleu']:.2f}" if r["bleu"] is not None else "–", f"{r['updates']} ({r['status']})"]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
