"""Data pipeline: corpora (built-in synthetic, local files, hub), joint BPE, prepared memory-mapped token ids,
token-budget batching.

Typical use::

    data = prepare_data(cfg, run_dir, accelerator)      # builds the prepared directory once, then memory-maps it
    sampler = data.sampler("train", cfg.train.max_tokens, cfg.train.seed,
                           num_shards=accelerator.num_processes, shard_id=accelerator.process_index)
    for epoch in ...:
        sampler.set_epoch(epoch)
        for positions in sampler:
            batch = data.batch("train", positions)       # {"src", "tgt_in", "tgt_out", "ntokens", "nsentences"}
"""
from .batching import TokenBatchSampler, collate, pack_batches, token_cost
from .corpus import load_corpus, load_corpus_counted, load_raw
from .prepare import PreparedData, prepare_data, prepared_location
from .store import TOKENIZER_FILE, EncodedSplit, PreparedStore, build_prepared, cache_key, read_manifest
from .synthetic import generate_synthetic, iter_synthetic, synthetic_splits
from .tokenizer import BOS, EOS, PAD, SPECIALS, UNK, build_tokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "PAD", "BOS", "EOS", "UNK", "SPECIALS", "generate_synthetic", "iter_synthetic", "synthetic_splits", "load_corpus",
    "load_corpus_counted", "load_raw", "build_tokenizer", "load_tokenizer", "train_tokenizer", "TokenBatchSampler",
    "collate", "pack_batches", "token_cost", "prepare_data", "prepared_location", "PreparedData", "PreparedStore",
    "EncodedSplit", "build_prepared", "cache_key", "read_manifest", "TOKENIZER_FILE",
]
