"""One call from a decoder-only config to training-ready blocks: ``prepare_lm_data``, the LM twin of ``prepare_data``.

Where the prepared text comes from:
- ``data.prepared=DIR``: a directory written by ``transformer-ln data prepare`` with a ``model.arch=decoder_only``
  config; nothing is redone, and its data settings are the run's (``data.block_size`` stays the run's own).
- otherwise the cache ``data.cache_dir`` (default ``RUN_DIR/cache``), one entry ``prepared-lm-<key>`` per key of the
  settings that change the streams and the files' size and modification time (``lm_store.lm_cache_key``); the
  block size is not in the key, so runs with other block sizes share an entry.
Under several processes only the main one builds; every rank then maps the same files.

Typical use::

    data = prepare_lm_data(cfg, run_dir, accelerator)
    sampler = data.sampler("train", cfg.train.max_tokens, cfg.train.seed,
                           num_shards=accelerator.num_processes, shard_id=accelerator.process_index)
    sampler.set_epoch(epoch)
    for positions in sampler:
        batch = data.batch("train", positions)   # {"input", "target": (B, T) int64, "ntokens": B*T, "nsentences": B}
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np
from tokenizers import Tokenizer

from ..config.run_config import DataConfig, RunConfig
from ..errors import UserError
from ..runs.rundir import RunDir
from .lm_store import (BlockBatchSampler, LMSplit, build_lm_prepared, lm_cache_key, open_lm_splits,
                       read_lm_manifest)
from .lm_text import check_lm_sources, load_lm_tokenizer
from .prepare import _adopt_settings, prepared_location
from .store import TOKENIZER_FILE
from .tokenizer import UNK, load_tokenizer, save_tokenizer

log = logging.getLogger(__name__)


@dataclass
class LMData:
    """A prepared LM directory, opened: tokenizer, per-split streams cut into ``data_config.block_size`` blocks."""

    directory: Path
    manifest: dict
    tokenizer: Tokenizer
    data_config: DataConfig
    splits: dict[str, LMSplit]
    tokenizer_path: Optional[Path] = None

    @classmethod
    def open(cls, root: Path, data_config: DataConfig) -> "LMData":
        """Open the prepared directory ``root`` with the block size of ``data_config``."""
        root = Path(root)
        manifest = read_lm_manifest(root)
        try:
            tok = load_lm_tokenizer(root / TOKENIZER_FILE)
        except UserError as e:
            raise UserError(f"prepared data directory {root} is incomplete or corrupt ({e}); delete it and run "
                            f"`transformer-ln data prepare` again") from None
        return cls(root, manifest, tok, data_config, open_lm_splits(root, manifest, data_config.block_size))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def block_size(self) -> int:
        return self.data_config.block_size

    def sampler(self, split: str, max_tokens: int, seed: int, shuffle: bool = True, num_shards: int = 1,
                shard_id: int = 0, even: bool = False) -> BlockBatchSampler:
        """Batches of ``max(1, max_tokens // block_size)`` block indices of ``split`` (call ``set_epoch`` before
        each epoch), with ``TokenBatchSampler``'s protocol."""
        return BlockBatchSampler(len(self.splits[split]), self.block_size, max_tokens, seed, shuffle=shuffle,
                                 num_shards=num_shards, shard_id=shard_id, even=even)

    def batch(self, split: str, positions) -> dict:
        """``{"input", "target", "ntokens", "nsentences"}`` of the blocks at ``positions``."""
        return self.splits[split].batch(positions)


def lm_prepared_location(cfg: RunConfig, run_dir: Path | None) -> Path:
    """The directory a language-model run reads: ``data.prepared``, or its entry in the cache."""
    return prepared_location(cfg, run_dir, f"prepared-lm-{lm_cache_key(cfg.data)}")


def prepare_lm_data(cfg: RunConfig, run_dir: Path | None, accelerator=None, progress: bool = False) -> LMData:
    """Open (building once if needed) the run's prepared text and put ``tokenizer.json`` in ``run_dir``.

    With an ``accelerator`` the main process builds first (``main_process_first``); the others then map the same
    files. A ``run_dir`` that already holds a ``tokenizer.json`` (a resumed run) must hold the data's tokenizer.
    """
    check_lm_sources(cfg.data)
    loc = lm_prepared_location(cfg, run_dir)
    first = accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext()
    is_main = accelerator is None or accelerator.is_main_process
    with first:
        if not cfg.data.prepared and not loc.exists() and is_main:
            log.info("no prepared text in %s: building it", loc)
            build_lm_prepared(cfg.data, loc, progress=progress)
        elif loc.exists():
            log.info("reusing the prepared text in %s", loc)
        data_cfg = cfg.data
        if cfg.data.prepared:
            settings = read_lm_manifest(loc)["settings"]
            data_cfg = _adopt_settings(cfg.data, SimpleNamespace(root=loc, data_config_dict=settings))
        data = LMData.open(loc, data_cfg)
        if run_dir is not None:
            data.tokenizer_path = RunDir(run_dir).tokenizer
            if data.tokenizer_path.is_file():
                if load_tokenizer(data.tokenizer_path).to_str() != data.tokenizer.to_str():
                    raise UserError(f"{data.tokenizer_path} differs from the tokenizer of the prepared data in "
                                    f"{loc}: the run was started on other data; resume it with its original data "
                                    f"settings")
            elif is_main:
                save_tokenizer(data.tokenizer, data.tokenizer_path)
    return data


# --------------------------------------------------------------------------------------------------- data stats


def compute_lm_stats(cfg: RunConfig, run_dir: Path) -> dict:
    """``data stats`` for a language model, as a JSON-ready dict read from the memory-mapped streams."""
    data = prepare_lm_data(cfg, run_dir)
    T = data.block_size
    stats: dict = {"task": "language_model", "source": data.data_config.source, "vocab_size": data.vocab_size,
                   "block_size": T, "max_tokens": cfg.train.max_tokens, "splits": {}}
    for split, s in data.splits.items():
        n_unk = sum(int(np.count_nonzero(s.tokens[i:i + 2**24] == UNK)) for i in range(0, s.n_tokens, 2**24))
        sampler = data.sampler(split, cfg.train.max_tokens, cfg.train.seed)
        stats["splits"][split] = {
            "docs": s.n_docs, "dropped_empty": s.n_empty, "tokens": s.n_tokens, "bytes": s.n_bytes,
            "words": s.n_words, "tokens_per_doc": round(s.n_tokens / s.n_docs, 2),
            "bytes_per_token": round(s.n_bytes / s.n_tokens, 3), "unk_rate": n_unk / s.n_tokens, "blocks": len(s),
            "tail_dropped": s.n_tokens - 1 - len(s) * T, "batches": len(sampler.batches),
            "blocks_per_batch": max(1, cfg.train.max_tokens // T)}
    return stats


def format_lm_stats(stats: dict) -> str:
    lines = [f"source: {stats['source']}   vocabulary: {stats['vocab_size']} tokens (byte-level BPE)   "
             f"data.block_size={stats['block_size']}   train.max_tokens={stats['max_tokens']}",
             "tokens include one </s> per document; bytes (UTF-8) and words (whitespace) of the documents' text", ""]
    head = (f"{'split':<6} {'docs':>9} {'empty':>6} {'tokens':>11} {'bytes':>12} {'words':>10} {'tok/doc':>8} "
            f"{'bytes/tok':>9} {'<unk> %':>7} {'blocks':>8} {'batches':>7}")
    lines += [head, "-" * len(head)]
    for split, s in stats["splits"].items():
        lines.append(f"{split:<6} {s['docs']:>9} {s['dropped_empty']:>6} {s['tokens']:>11} {s['bytes']:>12} "
                     f"{s['words']:>10} {s['tokens_per_doc']:>8.2f} {s['bytes_per_token']:>9.3f} "
                     f"{100 * s['unk_rate']:>7.3f} {s['blocks']:>8} {s['batches']:>7}")
    return "\n".join(lines)
