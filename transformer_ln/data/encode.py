"""Sentence pairs -> an Arrow ``Dataset`` of token ids, with a batched ``datasets.map`` cached on disk.

The cache file is named by a hash of the text, the tokenizer and ``max_positions``, so a resumed run, or a second
process after the main one, reads the ids back instead of tokenizing again, and any change gives a new file.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np
from datasets import Dataset, Features, Sequence as ListOf, Value
from tokenizers import Tokenizer

from .tokenizer import EOS

FEATURES = Features({"id": Value("int64"), "src_ids": ListOf(Value("int32")), "tgt_ids": ListOf(Value("int32"))})


def _cache_key(pairs: Sequence[tuple[str, str]], tokenizer: Tokenizer, max_positions: int) -> str:
    h = hashlib.sha256(f"encode-v1|{max_positions}|".encode())
    h.update(tokenizer.to_str().encode())
    for s, t in pairs:
        h.update(s.encode())
        h.update(b"\0")
        h.update(t.encode())
        h.update(b"\1")
    return h.hexdigest()[:32]


def encode_pairs(pairs: Sequence[tuple[str, str]], tokenizer: Tokenizer, max_positions: int,
                 cache_dir: str | Path | None = None) -> tuple[Dataset, int]:
    """Encode to ``src_ids = bpe(src) + [</s>]``, ``tgt_ids = bpe(tgt) + [</s>]``, plus ``id`` = index in ``pairs``.

    A pair is filtered out (and counted) when ``len(src_ids) > max_positions`` or ``len(tgt_ids) + 1 >
    max_positions``: the model has no position embedding for it. Returns ``(dataset, n_filtered)``.
    """
    if max_positions < 2:
        raise ValueError(f"max_positions: got {max_positions}, must be at least 2")
    if not pairs:
        return Dataset.from_dict({"id": [], "src_ids": [], "tgt_ids": []}, features=FEATURES), 0

    def encode(batch: dict, idx: list[int]) -> dict:
        src = [e.ids + [EOS] for e in tokenizer.encode_batch(batch["src"], add_special_tokens=False)]
        tgt = [e.ids + [EOS] for e in tokenizer.encode_batch(batch["tgt"], add_special_tokens=False)]
        keep = [i for i in range(len(idx)) if len(src[i]) <= max_positions and len(tgt[i]) + 1 <= max_positions]
        return {"id": [idx[i] for i in keep], "src_ids": [src[i] for i in keep], "tgt_ids": [tgt[i] for i in keep]}

    raw = Dataset.from_dict({"src": [s for s, _ in pairs], "tgt": [t for _, t in pairs]})
    key = _cache_key(pairs, tokenizer, max_positions)
    kwargs: dict = {"keep_in_memory": True}
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        kwargs = {"cache_file_name": str(Path(cache_dir) / f"encoded-{key}.arrow"), "load_from_cache_file": True}
    ds = raw.map(encode, batched=True, batch_size=2000, with_indices=True, remove_columns=["src", "tgt"],
                 features=FEATURES, new_fingerprint=key, desc="Encoding", **kwargs)
    return ds, len(pairs) - len(ds)


def lengths(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """``(src_lens, tgt_lens)`` of an encoded dataset, read from the Arrow offsets (no Python rows)."""
    import pyarrow.compute as pc

    table = ds.with_format("arrow")[:]
    if table.num_rows == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return (pc.list_value_length(table["src_ids"]).to_numpy().astype(np.int64),
            pc.list_value_length(table["tgt_ids"]).to_numpy().astype(np.int64))
