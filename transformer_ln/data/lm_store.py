"""Prepared data for decoder-only language models: built once, memory-mapped by every run, cut into blocks.

A prepared LM directory (``transformer-ln data prepare`` with ``model.arch=decoder_only``, or a cache entry)::

    manifest.json       format, the data settings and their key, the stream dtype; per split: docs, empty (blank
                        documents dropped), tokens, bytes and words of the raw text, origin, files with sizes
    tokenizer.json      the byte-level BPE
    <split>.npy         the split's token stream: every document's ids followed by </s>, concatenated (uint16/int32)

As in ``store.py``: built under a temporary name and renamed once complete; anything not matching its manifest is
refused with one message. ``data.block_size`` is not part of the content: blocks are cut when a run opens the
directory (block k: input ``stream[kT : kT+T]``, target ``stream[kT+1 : kT+T+1]``, the tail dropped), so one
directory serves any block size.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from ..config.run_config import DataConfig
from ..errors import UserError
from .batching import TokenBatchSampler
from .lm_text import (encode_stream, load_documents, load_lm_tokenizer, stream_dtype, train_byte_bpe,
                      training_documents)
from .store import FORMAT as TRANSLATION_FORMAT, MANIFEST, TOKENIZER_FILE, _corrupt, discard, publish
from .tokenizer import save_tokenizer

log = logging.getLogger(__name__)

LM_FORMAT = "transformer_ln language-model data v1"
# the DataConfig fields that decide the content of a prepared LM directory, per data.source
LM_SETTINGS = {"synthetic": ("source", "synthetic_size", "synthetic_seed", "vocab_size", "tokenizer_sample"),
               "files": ("source", "train_text", "valid_text", "test_text", "text_field", "vocab_size",
                         "tokenizer_sample")}


# --------------------------------------------------------------------------------------------------- settings, key


def lm_data_settings(data_cfg: DataConfig) -> dict:
    """The data settings that decide the content of a prepared LM directory (not block_size: see the module)."""
    fields = LM_SETTINGS.get(data_cfg.source)
    if fields is None:
        raise UserError(f"data.source={data_cfg.source!r} is not supported for language models (no network here); "
                        f"use data.source=files with data.train_text=... data.valid_text=...")
    return {k: getattr(data_cfg, k) for k in fields}


def _file_stats(path: str) -> list:
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p] if p.is_file() else []
    return [str(p.resolve())] + [[str(f.relative_to(p)) if p.is_dir() else f.name, f.stat().st_size,
                                  f.stat().st_mtime_ns] for f in files]


def lm_cache_key(data_cfg: DataConfig) -> str:
    """Hash of the settings and, for local files (or directories), each file's path, size and modification time."""
    files = [[name, _file_stats(getattr(data_cfg, name))] for name in ("train_text", "valid_text", "test_text")
             if data_cfg.source == "files" and getattr(data_cfg, name) is not None]
    blob = json.dumps({"format": LM_FORMAT, "settings": lm_data_settings(data_cfg), "files": files}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


# --------------------------------------------------------------------------------------------------- building


def build_lm_prepared(data_cfg: DataConfig, out: Path, progress: bool = False) -> Path:
    """Load the documents, train the byte-level BPE, write every split's stream into ``out`` (atomically)."""
    import datasets

    out = Path(out)
    key = lm_cache_key(data_cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    was_enabled = datasets.is_progress_bar_enabled()
    (datasets.enable_progress_bars if progress else datasets.disable_progress_bars)()
    t0 = time.time()
    try:
        docs, origin = load_documents(data_cfg, tmp / "raw")  # datasets' Arrow cache goes with the temporary dir
        texts, n_tok_docs = training_documents(docs["train"], data_cfg.tokenizer_sample)
        log.info("training the byte-level BPE (vocabulary %d) on %d training documents", data_cfg.vocab_size,
                 n_tok_docs)
        save_tokenizer(train_byte_bpe(texts, data_cfg.vocab_size, n_tok_docs, show_progress=progress),
                       tmp / TOKENIZER_FILE)
        tok = load_lm_tokenizer(tmp / TOKENIZER_FILE)
        t_tok = time.time() - t0
        manifest: dict = {"format": LM_FORMAT, "key": key, "settings": lm_data_settings(data_cfg),
                          "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                          "tokenizer_docs": n_tok_docs, "vocab_size": tok.get_vocab_size(),
                          "dtype": stream_dtype(tok.get_vocab_size()).str, "splits": {}}
        for split, ds in docs.items():
            log.info("encoding %s: %d documents", split, len(ds))
            name = f"{split}.npy"
            counts = encode_stream(tok, ds, tmp / name, progress=progress, desc=f"Encoding {split}")
            if not counts["docs"]:
                raise UserError(f"the {split} split is empty: {origin[split]} holds no text")
            if counts["empty"]:
                log.warning("%s: dropped %d blank document(s) from %s", split, counts["empty"], origin[split])
            manifest["splits"][split] = {**counts, "origin": origin[split], "stream": name,
                                         "files": {name: (tmp / name).stat().st_size}}
        del docs
        shutil.rmtree(tmp / "raw", ignore_errors=True)
        publish(tmp, out, manifest, t_tok, t0)
    except BaseException as e:
        discard(tmp, out, e)
        raise
    finally:
        (datasets.enable_progress_bars if was_enabled else datasets.disable_progress_bars)()
    log.info("prepared %s in %.1f s", out, time.time() - t0)
    return out


# --------------------------------------------------------------------------------------------------- reading


def read_lm_manifest(root: Path) -> dict:
    """The manifest of a complete prepared LM directory; one clear error for anything else."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"prepared data directory {root} does not exist; create it with "
                        f"`transformer-ln data prepare CONFIG --out {root}` (CONFIG with model.arch=decoder_only)")
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except FileNotFoundError:
        raise _corrupt(root, f"no {MANIFEST}: not written by `transformer-ln data prepare`, or interrupted") from None
    except (OSError, ValueError) as e:
        raise _corrupt(root, f"{MANIFEST} is unreadable: {e}") from None
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if fmt == TRANSLATION_FORMAT:
        raise UserError(f"{root} holds translation data (sentence pairs), not language-model text; prepare the "
                        f"text with a model.arch=decoder_only config, or train a model.arch=encoder_decoder model")
    if fmt != LM_FORMAT:
        raise _corrupt(root, f"{MANIFEST} is not a {LM_FORMAT!r} manifest")
    expected = dict(manifest.get("files", {}))
    for split in manifest.get("splits", {}).values():
        expected.update(split.get("files", {}))
    for name, size in expected.items():
        f = root / name
        if not f.is_file():
            raise _corrupt(root, f"{name} is missing")
        if f.stat().st_size != size:
            raise _corrupt(root, f"{name} has {f.stat().st_size} bytes, the manifest says {size}")
    return manifest


class LMSplit:
    """One split's token stream (``np.memmap``), cut into blocks of ``block_size`` tokens.

    Block ``k`` is ``input = tokens[kT : kT+T]``, ``target = tokens[kT+1 : kT+T+1]``; there are
    ``(n_tokens - 1) // T`` of them (the tail is dropped).
    """

    def __init__(self, tokens: np.ndarray, block_size: int, info: dict):
        self.tokens, self.block_size = tokens, block_size
        self.n_tokens, self.n_docs, self.n_empty = len(tokens), info["docs"], info["empty"]
        self.n_bytes, self.n_words = info["bytes"], info["words"]
        self._window = np.arange(block_size + 1, dtype=np.int64)

    def __len__(self) -> int:
        return (self.n_tokens - 1) // self.block_size

    def blocks(self, positions) -> np.ndarray:
        """``(B, T + 1)`` int64 token windows of the blocks at ``positions`` (gathered from the map)."""
        starts = np.asarray(positions, dtype=np.int64) * self.block_size
        return self.tokens[starts[:, None] + self._window].astype(np.int64)

    def batch(self, positions) -> dict:
        """``{"input", "target"}`` int64 ``(B, T)`` tensors (target = input shifted by one), ``ntokens`` = B*T and
        ``nsentences`` = B."""
        x = torch.from_numpy(self.blocks(positions))
        return {"input": x[:, :-1], "target": x[:, 1:], "ntokens": x.shape[0] * self.block_size,
                "nsentences": x.shape[0]}


class BlockBatchSampler(TokenBatchSampler):
    """``TokenBatchSampler``'s protocol over equal-length blocks: ``max(1, max_tokens // block_size)`` blocks a
    batch, the composition a seeded permutation of the blocks cut into chunks (what ``TokenBatchSampler`` builds
    when every length is equal, without its per-example packing loop); epochs, shuffling, sharding and ``even``
    are ``TokenBatchSampler``'s own."""

    def __init__(self, n_blocks: int, block_size: int, max_tokens: int, seed: int, shuffle: bool = True,
                 num_shards: int = 1, shard_id: int = 0, even: bool = False) -> None:
        empty = np.zeros(0, dtype=np.int64)
        super().__init__(empty, empty, max_tokens, seed, shuffle=shuffle, num_shards=num_shards, shard_id=shard_id,
                         even=even)  # checks the arguments and sets the epoch and shard fields
        self.block_size = block_size
        self.src_lens = self.tgt_lens = np.broadcast_to(np.int64(block_size), (n_blocks,))
        per = max(1, max_tokens // block_size)
        order = np.random.default_rng(seed % 2**32).permutation(n_blocks)
        self.batches = [order[i:i + per] for i in range(0, n_blocks, per)]


def open_lm_splits(root: Path, manifest: dict, block_size: int) -> dict[str, LMSplit]:
    """Every split of a prepared LM directory, memory-mapped; a split too short for one block is an error."""
    splits = {}
    for split, info in manifest["splits"].items():
        try:
            tokens = np.load(root / info["stream"], mmap_mode="r")
        except Exception as e:  # a truncated or foreign .npy file
            raise _corrupt(root, f"cannot read {info['stream']}: {type(e).__name__}: {e}") from None
        if tokens.ndim != 1 or len(tokens) != info["tokens"]:
            raise _corrupt(root, f"{info['stream']} holds {tokens.shape} tokens, the manifest says {info['tokens']}")
        if len(tokens) < block_size + 1:
            raise UserError(f"the {split} split has {len(tokens)} tokens ({info['docs']} documents from "
                            f"{info['origin']}); data.block_size={block_size} needs at least {block_size + 1} "
                            f"(one block and the token after it): add text or lower data.block_size")
        splits[split] = LMSplit(tokens, block_size, info)
    return splits
