"""Data pipeline: corpora (built-in synthetic, local files, hub), joint BPE, encoding, token-budget batching.

Typical use::

    data = prepare_data(cfg, run_dir, accelerator)
    sampler = data.sampler("train", cfg.train.max_tokens, cfg.train.seed,
                           num_shards=accelerator.num_processes, shard_id=accelerator.process_index, even=True)
    loader = DataLoader(data.datasets["train"], batch_sampler=sampler, collate_fn=collate)
    for epoch in ...: sampler.set_epoch(epoch); ...
"""
from .batching import TokenBatchSampler, collate, pack_batches, token_cost
from .corpus import load_corpus, load_corpus_counted
from .encode import encode_pairs, lengths
from .prepare import TOKENIZER_FILE, PreparedData, prepare_data
from .synthetic import generate_synthetic, iter_synthetic, synthetic_splits
from .tokenizer import BOS, EOS, PAD, SPECIALS, UNK, build_tokenizer, load_tokenizer

__all__ = [
    "PAD", "BOS", "EOS", "UNK", "SPECIALS", "generate_synthetic", "iter_synthetic", "synthetic_splits", "load_corpus",
    "load_corpus_counted", "build_tokenizer", "load_tokenizer", "encode_pairs", "lengths", "TokenBatchSampler",
    "collate", "pack_batches", "token_cost", "prepare_data", "PreparedData", "TOKENIZER_FILE",
]
