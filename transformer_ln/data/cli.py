"""``transformer-ln data stats|prepare [CONFIG] [overrides]``: look at a corpus, or preprocess it once for all runs.

``stats``: sizes per split, token-length percentiles, the ``<unk>`` rate (vocabulary coverage), and the number of
batches and the padding efficiency at ``train.max_tokens``, optionally written as JSON.

``prepare --out DIR``: train the tokenizer and encode every split into DIR (memory-mapped Arrow files, written
atomically); then ``transformer-ln train CONFIG data.prepared=DIR`` reads them instead of redoing any of it.

With a ``model.arch=decoder_only`` config both work on language-model text instead (``lm_prepare``): documents,
tokens, bytes and words per split and the blocks at ``data.block_size``; a byte-level BPE and one token stream
per split.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import numpy as np

from ..atomic import write_text
from ..config.parser import Parser, add_config_arguments, config_from_arguments
from ..config.run_config import RunConfig
from ..errors import UserError
from .lm_prepare import compute_lm_stats, format_lm_stats
from .lm_store import build_lm_prepared, lm_cache_key, read_lm_manifest
from .prepare import prepare_data
from .store import MANIFEST, build_prepared, cache_key, read_manifest
from .tokenizer import UNK

PERCENTILES = (50, 90, 95, 99)


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="transformer-ln data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["stats", "prepare"],
                   help="stats: corpus statistics; prepare: tokenize and encode once into --out DIR")
    add_config_arguments(p)
    p.add_argument("--out", metavar="DIR", help="prepare: the directory to write (required); stats: run directory "
                   "for tokenizer.json and the cache (default: a temporary directory, deleted afterwards)")
    p.add_argument("--num-proc", type=int, default=None, metavar="N",
                   help="prepare: processes that encode the corpus (default: data.num_proc)")
    p.add_argument("--json", metavar="FILE", help="also write the statistics to FILE as JSON")
    return p


def _length_stats(lens: np.ndarray) -> dict:
    if len(lens) == 0:
        return {"mean": 0.0, "min": 0, "max": 0, **{f"p{q}": 0 for q in PERCENTILES}}
    out = {"mean": round(float(lens.mean()), 2), "min": int(lens.min()), "max": int(lens.max())}
    out.update({f"p{q}": int(np.percentile(lens, q, method="higher")) for q in PERCENTILES})
    return out


def compute_stats(cfg, run_dir: Path) -> dict:
    """All statistics as a JSON-ready dict, read from the memory-mapped prepared data."""
    import pyarrow.compute as pc

    data = prepare_data(cfg, run_dir)
    stats: dict = {"source": data.data_config.source, "vocab_size": data.vocab_size,
                   "max_tokens": cfg.train.max_tokens, "max_positions": cfg.model.max_positions, "splits": {}}
    for split, enc in data.splits.items():
        src_lens, tgt_lens = data.lengths(split)
        n_unk = 0
        ids = enc.dataset.with_format("arrow", columns=["src_ids", "tgt_ids"])
        for start in range(0, len(enc.dataset), 100_000):  # chunk by chunk: memory stays flat
            table = ids[start:start + 100_000]
            for col in ("src_ids", "tgt_ids"):
                n_unk += int(pc.sum(pc.equal(pc.list_flatten(table[col]), UNK)).as_py() or 0)
        n_tok = int(np.load(data.directory / split / "lengths.npy").sum())  # every row, as the <unk> count
        sampler = data.sampler(split, cfg.train.max_tokens, cfg.train.seed)
        stats["splits"][split] = {
            "pairs": data.n_pairs[split], "dropped_empty": data.n_empty[split],
            "filtered_too_long": data.n_filtered[split], "encoded": len(enc),
            "src_tokens": _length_stats(src_lens), "tgt_tokens": _length_stats(tgt_lens),
            "unk_rate": n_unk / n_tok if n_tok else 0.0,
            "batches": len(sampler.batches), "sentences_per_batch": round(len(enc) / max(len(sampler.batches), 1), 1),
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
    cfg = config_from_arguments(args.args)  # the resolution `train` uses, so the stats describe the same run
    if args.command == "prepare":
        return prepare_main(cfg, args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import datasets

    datasets.disable_progress_bars()
    lm = cfg.task == "language_model"
    compute, fmt = (compute_lm_stats, format_lm_stats) if lm else (compute_stats, format_stats)
    if args.out:
        stats = compute(cfg, Path(args.out))
    else:
        with tempfile.TemporaryDirectory(prefix="transformer_ln_stats_") as tmp:
            stats = compute(cfg, Path(tmp))
    print(fmt(stats))
    if args.json:
        write_text(args.json, json.dumps(stats, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


def prepare_main(cfg: RunConfig, args: argparse.Namespace) -> int:
    """Write the prepared directory; an existing one for the same settings is kept, one for others refused."""
    if not args.out:
        raise UserError("data prepare needs --out DIR: the directory to write the tokenizer and encoded splits to")
    if cfg.data.prepared:
        raise UserError("data prepare writes a prepared directory; drop data.prepared from the config/overrides")
    num_proc = cfg.data.num_proc if args.num_proc is None else args.num_proc
    if num_proc < 1:
        raise UserError(f"--num-proc: got {num_proc}, must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    lm = cfg.task == "language_model"
    key, read = (lm_cache_key, read_lm_manifest) if lm else (cache_key, read_manifest)
    if out.exists():
        if not out.is_dir():
            raise UserError(f"--out {out} is a file, not a directory")
        if (out / MANIFEST).is_file():
            manifest = read(out)
            if manifest["key"] == key(cfg.data):
                print(f"{out} already holds this data (key {manifest['key']}); nothing to do")
                return 0
            raise UserError(f"{out} holds prepared data for other settings or files (key {manifest['key']}, "
                            f"these give {key(cfg.data)}); choose another --out or delete it")
        if any(out.iterdir()):
            raise UserError(f"--out {out} exists and is not empty (and not a prepared directory, or an "
                            f"interrupted one): delete it or choose another directory")
    if lm:
        build_lm_prepared(cfg.data, out, progress=True)
    else:
        build_prepared(cfg.data, out, num_proc=num_proc, progress=True)
    manifest = read(out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    unit = "tokens" if lm else "rows"
    rows = ", ".join(f"{k} {v[unit]}" for k, v in manifest["splits"].items())
    print(f"prepared {out}: {rows} {'tokens' if lm else 'pairs'}, vocabulary {cfg.data.vocab_size}, "
          f"{size / 2**20:.1f} MiB, "
          f"{manifest['seconds']['total']:.1f} s\nuse it with: transformer-ln train CONFIG data.prepared={out}")
    return 0
