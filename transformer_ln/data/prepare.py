"""One call from config to training-ready data: find (or build once) the prepared directory, open it memory-mapped.

Where the prepared data comes from:
- ``data.prepared=DIR``: a directory written by ``transformer-ln data prepare``; nothing is redone, and its data
  settings are the run's (the config's own data settings are ignored, with a warning when they differ).
- otherwise the cache ``data.cache_dir`` (default ``RUN_DIR/cache``), one entry per key of the data and tokenizer
  settings and the files' size and modification time: a second run on the same data reuses the tokenizer and the
  encoding; a changed vocabulary size or data file builds a new entry.
Under several processes only the main one builds; every rank then reads the same files.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from tokenizers import Tokenizer

from ..config.run_config import DataConfig, RunConfig
from ..errors import UserError
from ..runs.rundir import RunDir
from .batching import TokenBatchSampler
from .store import EncodedSplit, PreparedStore, build_prepared, cache_key, data_settings
from .tokenizer import load_tokenizer, save_tokenizer

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    """Everything the trainer, the evaluator and ``data stats`` need, read from one prepared directory."""

    store: PreparedStore
    data_config: DataConfig
    tokenizer_path: Optional[Path] = None

    @property
    def tokenizer(self) -> Tokenizer:
        return self.store.tokenizer

    @property
    def directory(self) -> Path:
        return self.store.root

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def splits(self) -> dict[str, EncodedSplit]:
        return self.store.splits

    @property
    def n_filtered(self) -> dict[str, int]:
        return {k: s.n_filtered for k, s in self.splits.items()}

    @property
    def n_empty(self) -> dict[str, int]:
        return {k: v["empty"] for k, v in self.store.manifest["splits"].items()}

    @property
    def n_pairs(self) -> dict[str, int]:
        return {k: v["pairs"] for k, v in self.store.manifest["splits"].items()}

    def lengths(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Token lengths ``(src, tgt)`` of the kept rows of ``split`` (both include ``</s>``)."""
        s = self.splits[split]
        return s.src_lens, s.tgt_lens

    def sampler(self, split: str, max_tokens: int, seed: int, shuffle: bool = True, num_shards: int = 1,
                shard_id: int = 0, even: bool = False) -> TokenBatchSampler:
        """A ``TokenBatchSampler`` over ``split`` (remember ``set_epoch`` before each epoch)."""
        return self.store.sampler(split, max_tokens, seed, shuffle=shuffle, num_shards=num_shards,
                                  shard_id=shard_id, even=even)

    def batch(self, split: str, positions) -> dict:
        """The padded tensors of the examples at ``positions`` (what ``collate`` gives), gathered from the map."""
        return self.splits[split].batch(positions)

    def text(self, split: str) -> list[tuple[str, str]]:
        """The stripped, non-empty sentence pairs of an evaluation split (valid or test), in corpus order."""
        return self.store.text(split)


def prepared_location(cfg: RunConfig, run_dir: Path | None, name: str | None = None) -> Path:
    """The directory a run reads: ``data.prepared``, or its entry ``name`` (by default the translation data's,
    ``prepared-<settings hash>``) in the cache: ``data.cache_dir``, else the run directory's."""
    if cfg.data.prepared:
        return Path(cfg.data.prepared)
    if cfg.data.cache_dir:
        root = Path(cfg.data.cache_dir)
    elif run_dir is not None:
        root = RunDir(run_dir).cache
    else:
        raise UserError("no data.cache_dir and no run directory: nowhere to keep the prepared data")
    return root / (name or f"prepared-{cache_key(cfg.data)}")


def _adopt_settings(cfg: DataConfig, store: PreparedStore) -> DataConfig:
    """The prepared directory's data settings, with this run's location fields; warn about what differs."""
    theirs = store.data_config_dict
    ours = data_settings(cfg)
    differ = [k for k in theirs if ours.get(k) != theirs[k] and ours.get(k) != getattr(DataConfig(), k, None)]
    if differ:
        log.warning("data.prepared=%s was prepared with %s; the config's %s ignored", store.root,
                    ", ".join(f"data.{k}={theirs[k]!r}" for k in differ),
                    "value is" if len(differ) == 1 else "values are")
    keep = {k: v for k, v in cfg.to_dict().items() if k not in theirs}
    return DataConfig.from_dict({**theirs, **keep})


def prepare_data(cfg: RunConfig, run_dir: Path | None, accelerator=None, progress: bool = False) -> PreparedData:
    """Open (building once if needed) the run's prepared data and put ``tokenizer.json`` in ``run_dir``.

    With an ``accelerator`` the main process builds and writes first (``main_process_first``); the others then
    open the same files. A ``run_dir`` that already holds a ``tokenizer.json`` (a resumed run) must hold the same
    tokenizer as the data, or the ids would silently mean other words.
    """
    loc = prepared_location(cfg, run_dir)
    first = accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext()
    is_main = accelerator is None or accelerator.is_main_process
    with first:
        if not cfg.data.prepared and not loc.exists() and is_main:
            log.info("no prepared data in %s: building it", loc)
            build_prepared(cfg.data, loc, num_proc=cfg.data.num_proc, progress=progress)
        elif loc.exists():
            log.info("reusing the prepared data in %s", loc)
        store = PreparedStore(loc, cfg.model.max_positions)
        data_cfg = _adopt_settings(cfg.data, store) if cfg.data.prepared else cfg.data
        tok_path = None
        if run_dir is not None:
            tok_path = RunDir(run_dir).tokenizer
            if tok_path.is_file():
                if load_tokenizer(tok_path).to_str() != store.tokenizer.to_str():
                    raise UserError(f"{tok_path} differs from the tokenizer of the prepared data in {loc}: the "
                                    f"run was started on other data; resume it with its original data settings")
            elif is_main:
                save_tokenizer(store.tokenizer, tok_path)
    for split, n in store.splits.items():
        if n.n_filtered and is_main:
            log.warning("%s: filtered %d pair(s) longer than model.max_positions=%d tokens", split, n.n_filtered,
                        cfg.model.max_positions)
    return PreparedData(store=store, data_config=data_cfg, tokenizer_path=tok_path)
