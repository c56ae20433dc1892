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

A decoder-only config (``cfg.task == "language_model"``) takes ``prepare_lm_data`` instead: the same sampler
protocol over fixed-length blocks of one packed token stream, batches ``{"input", "target", "ntokens",
"nsentences"}``.
"""
from .batching import TokenBatchSampler, collate, pack_batches, token_cost
from .corpus import load_corpus, load_corpus_counted, load_raw
from .lm_prepare import LMData, compute_lm_stats, lm_prepared_location, prepare_lm_data
from .lm_store import BlockBatchSampler, LMSplit, build_lm_prepared, lm_cache_key, read_lm_manifest
from .lm_text import load_documents, load_lm_tokenizer, train_byte_bpe
from .prepare import PreparedData, prepare_data, prepared_location
from .store import TOKENIZER_FILE, EncodedSplit, PreparedStore, build_prepared, cache_key, read_manifest
from .synthetic import generate_synthetic, iter_synthetic, synthetic_splits
from .tokenizer import BOS, EOS, PAD, SPECIALS, UNK, build_tokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "PAD", "BOS", "EOS", "UNK", "SPECIALS", "generate_synthetic", "iter_synthetic", "synthetic_splits", "load_corpus",
    "load_corpus_counted", "load_raw", "build_tokenizer", "load_tokenizer", "train_tokenizer", "TokenBatchSampler",
    "collate", "pack_batches", "token_cost", "prepare_data", "prepared_location", "PreparedData", "PreparedStore",
    "EncodedSplit", "build_prepared", "cache_key", "read_manifest", "TOKENIZER_FILE",
    "prepare_lm_data", "lm_prepared_location", "LMData", "LMSplit", "BlockBatchSampler", "build_lm_prepared",
    "lm_cache_key", "read_lm_manifest", "compute_lm_stats", "load_documents", "load_lm_tokenizer", "train_byte_bpe",
]
