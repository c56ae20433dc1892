"""``transformer-ln data stats [CONFIG] [overrides]``: what a corpus looks like to the model before training on it.

Sizes per split, token-length percentiles, the ``<unk>`` rate (vocabulary coverage), and the number of batches and
the padding efficiency at ``train.max_tokens``, optionally written as JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import numpy as np

from ..atomic import write_text
from ..cli import Parser, add_config_arguments, config_from_arguments
from .batching import TokenBatchSampler
from .prepare import prepare_data
from .tokenizer import UNK

PERCENTILES = (50, 90, 95, 99)


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="transformer-ln data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["stats"], help="what to do (only 'stats' for now)")
    add_config_arguments(p)
    p.add_argument("--out", metavar="DIR", help="run directory for tokenizer.json and the cache "
                   "(default: a temporary directory, deleted afterwards)")
    p.add_argument("--json", metavar="FILE", help="also write the statistics to FILE as JSON")
    return p


def _length_stats(lens: np.ndarray) -> dict:
    if len(lens) == 0:
        return {"mean": 0.0, "min": 0, "max": 0, **{f"p{q}": 0 for q in PERCENTILES}}
    out = {"mean": round(float(lens.mean()), 2), "min": int(lens.min()), "max": int(lens.max())}
    out.update({f"p{q}": int(np.percentile(lens, q, method="higher")) for q in PERCENTILES})
    return out


def compute_stats(cfg, run_dir: Path) -> dict:
    """All statistics as a JSON-ready dict."""
    data = prepare_data(cfg, run_dir)
    stats: dict = {"source": cfg.data.source, "vocab_size": data.vocab_size, "max_tokens": cfg.train.max_tokens,
                   "max_positions": cfg.model.max_positions, "splits": {}}
    for split, ds in data.datasets.items():
        src_lens, tgt_lens = data.lengths(split)
        table = ds.with_format("arrow")[:]
        n_unk = n_tok = 0
        for col in ("src_ids", "tgt_ids"):
            flat = table[col].combine_chunks().flatten().to_numpy() if table.num_rows else np.zeros(0)
            n_unk += int((flat == UNK).sum())
            n_tok += len(flat)
        sampler = TokenBatchSampler(src_lens, tgt_lens, cfg.train.max_tokens, cfg.train.seed)
        stats["splits"][split] = {
            "pairs": len(data.pairs[split]) + data.n_empty.get(split, 0), "dropped_empty": data.n_empty.get(split, 0),
            "filtered_too_long": data.n_filtered[split], "encoded": len(ds),
            "src_tokens": _length_stats(src_lens), "tgt_tokens": _length_stats(tgt_lens),
            "unk_rate": n_unk / n_tok if n_tok else 0.0,
            "batches": len(sampler.batches), "sentences_per_batch": round(len(ds) / max(len(sampler.batches), 1), 1),
            "padding_efficiency": round(sampler.padding_efficiency(), 4),
        }
    return stats


def format_stats(stats: dict) -> str:
    lines = [f"source: {stats['source']}   vocabulary: {stats['vocab_size']} tokens   "
             f"train.max_tokens={stats['max_tokens']}   model.max_positions={stats['max_positions']}",
             "lengths in tokens, </s> included; padding efficiency = non-pad / all tokens of the padded batches", ""]
    head = (f"{'split':<6} {'pairs':>8} {'empty':>6} {'too long':>8}  {'src mean/p50/p95/p99/max':>26}  "
            f"{'tgt mean/p50/p95/p99/max':>26}  {'<unk> %':>7} {'batches':>7} {'sent/batch':>10} {'padding eff':>11}")
    lines += [head, "-" * len(head)]
    for split, s in stats["splits"].items():
        def ls(d: dict) -> str:
            return f"{d['mean']:.1f}/{d['p50']}/{d['p95']}/{d['p99']}/{d['max']}"
        lines.append(f"{split:<6} {s['pairs']:>8} {s['dropped_empty']:>6} {s['filtered_too_long']:>8}  "
                     f"{ls(s['src_tokens']):>26}  {ls(s['tgt_tokens']):>26}  {100 * s['unk_rate']:>7.3f} "
                     f"{s['batches']:>7} {s['sentences_per_batch']:>10} {s['padding_efficiency']:>11.4f}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv:
        _parser().print_help()
        return 2
    args = _parser().parse_intermixed_args(argv)
    cfg = config_from_arguments(args.args)  # without CONFIG: the built-in defaults, so train.max_epochs stays set
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import datasets

    datasets.disable_progress_bars()
    if args.out:
        stats = compute_stats(cfg, Path(args.out))
    else:
        with tempfile.TemporaryDirectory(prefix="transformer_ln_stats_") as tmp:
            stats = compute_stats(cfg, Path(tmp))
    print(format_stats(stats))
    if args.json:
        write_text(args.json, json.dumps(stats, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0
