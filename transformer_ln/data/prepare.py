"""One call from config to training-ready data: corpus, tokenizer (trained or reloaded), encoded splits."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from datasets import Dataset
from tokenizers import Tokenizer

from ..config import RunConfig
from ..rundir import RunDir
from .batching import TokenBatchSampler
from .corpus import load_corpus_counted
from .encode import encode_pairs, lengths
from .tokenizer import build_tokenizer

log = logging.getLogger(__name__)

TOKENIZER_FILE = RunDir.TOKENIZER


@dataclass
class PreparedData:
    """Everything the trainer and the evaluator need; ``datasets[split]["id"]`` indexes into ``pairs[split]``."""

    tokenizer: Tokenizer
    pairs: dict[str, list[tuple[str, str]]]
    datasets: dict[str, Dataset]
    n_filtered: dict[str, int]
    n_empty: dict[str, int] = field(default_factory=dict)
    tokenizer_path: Optional[Path] = None
    cache_dir: Optional[Path] = None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def lengths(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Token lengths ``(src, tgt)`` of the encoded ``split`` (both include ``</s>``)."""
        return lengths(self.datasets[split])

    def sampler(self, split: str, max_tokens: int, seed: int, shuffle: bool = True, num_shards: int = 1,
                shard_id: int = 0, even: bool = False) -> TokenBatchSampler:
        """A ``TokenBatchSampler`` over ``split`` (remember ``set_epoch`` before each epoch)."""
        src, tgt = self.lengths(split)
        return TokenBatchSampler(src, tgt, max_tokens, seed, shuffle=shuffle, num_shards=num_shards,
                                 shard_id=shard_id, even=even)


def prepare_data(cfg: RunConfig, run_dir: Path, accelerator=None) -> PreparedData:
    """Load the corpus, train or reload ``run_dir/tokenizer.json``, encode and cache every split.

    With an ``accelerator``, the main process trains the tokenizer and writes the caches first; the other processes
    then read them back (``main_process_first``), so all ranks share one vocabulary.
    """
    run = RunDir(run_dir)
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else run.cache
    tok_path = run.tokenizer
    first = accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext()
    with first:
        pairs, n_empty = load_corpus_counted(cfg.data, cache_dir)
        tokenizer = build_tokenizer(pairs["train"], cfg.data.vocab_size, tok_path)
        encoded, n_filtered = {}, {}
        for split, rows in pairs.items():
            encoded[split], n_filtered[split] = encode_pairs(rows, tokenizer, cfg.model.max_positions, cache_dir)
            if n_filtered[split]:
                log.warning("%s: filtered %d pair(s) longer than model.max_positions=%d tokens", split,
                            n_filtered[split], cfg.model.max_positions)
    return PreparedData(tokenizer=tokenizer, pairs=pairs, datasets=encoded, n_filtered=n_filtered, n_empty=n_empty,
                        tokenizer_path=tok_path, cache_dir=cache_dir)
