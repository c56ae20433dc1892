"""Text for decoder-only language models: documents, a byte-level BPE, and one flat token stream per split.

- Documents: the built-in corpus (both sides of each synthetic pair, one document each, in corpus order) or
  ``data.{train,valid,test}_text``: a text file (``.txt``, ``.gz``: one document per line), ``.jsonl``/``.json``/
  ``.parquet`` (the ``data.text_field`` column), or a ``datasets`` ``save_to_disk`` directory, read through
  ``datasets`` (memory-mapped Arrow; never a Python list of the corpus). Blank documents are dropped and counted;
  the others are kept verbatim (no stripping: indentation and inner spacing are text too).
- Tokenizer: byte-level BPE (no normalizer; ByteLevel pre-tokenizer and decoder), so ``decode(encode(t)) == t`` for
  any text; the project's special tokens keep their ids (``<pad>``=0, ``<s>``=1, ``</s>``=2, ``<unk>``=3), and a
  literal ``</s>`` in the text is encoded as text, never as the separator (``load_lm_tokenizer``).
- Stream (nanoGPT's ``train.bin``): the documents' ids, each followed by ``</s>``, concatenated into one ``.npy``
  file (uint16 below 65536 tokens), written batch by batch so memory stays flat in corpus size.
"""
from __future__ import annotations

import os
from itertools import chain
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ..config.run_config import DataConfig
from ..errors import UserError
from .corpus import SYNTHETIC_EVAL_SIZE, _chain, load_file
from .synthetic import synthetic_splits
from .tokenizer import EOS, SPECIALS, check_specials, load_tokenizer

LM_SPLITS = ("train", "valid", "test")
MIN_VOCAB = len(SPECIALS) + 256  # the specials and every byte: any text encodes without <unk>
ENCODE_BATCH = 10_000  # documents per encode call and per write
_HINT = ("give data.source=files data.train_text=... data.valid_text=... (a .txt/.gz/.jsonl/.json/.parquet file "
         "or a datasets save_to_disk directory)")


# --------------------------------------------------------------------------------------------------- documents


def check_lm_sources(data_cfg: DataConfig) -> None:
    """Cheap check that every configured text path exists, before a run deletes or builds anything."""
    if data_cfg.source == "hub" and not data_cfg.prepared:
        raise UserError(f"data.source='hub' is not supported for language models (no network here): save the text "
                        f"locally and {_HINT}")
    if data_cfg.source != "files" or data_cfg.prepared:
        return
    for split in LM_SPLITS:
        path = getattr(data_cfg, f"{split}_text")
        if path is not None and not Path(path).exists():
            raise UserError(f"data.{split}_text: {path} does not exist")
        if path is not None and not os.access(path, os.R_OK):
            raise UserError(f"data.{split}_text: {path} is not readable")


def load_documents(data_cfg: DataConfig, cache_dir: str | Path | None = None
                   ) -> tuple[dict[str, Dataset], dict[str, str]]:
    """``({split: Dataset with one string column "text"}, {split: where it came from})``, one row per document."""
    check_lm_sources(data_cfg)
    if data_cfg.source == "synthetic":
        splits = synthetic_splits(data_cfg.synthetic_size, data_cfg.synthetic_seed, SYNTHETIC_EVAL_SIZE)
        docs = {k: Dataset.from_dict({"text": [side for pair in v for side in pair]}) for k, v in splits.items()}
        return docs, {k: f"the synthetic corpus (seed {data_cfg.synthetic_seed}, both sides)" for k in docs}
    docs, origin = {}, {}
    for split in LM_SPLITS:
        path = getattr(data_cfg, f"{split}_text")
        if path is None:
            if split != "test":
                raise UserError(f"data.{split}_text: required for a language model with data.source=files")
            continue
        docs[split] = read_text_source(path, data_cfg.text_field, cache_dir, f"data.{split}_text")
        origin[split] = str(path)
    return docs, origin


def _builder(path: str) -> str:
    name = path[:-3] if path.endswith(".gz") else path
    return "json" if name.endswith((".jsonl", ".json")) else "parquet" if name.endswith(".parquet") else "text"


def read_text_source(path: str | Path, field: str, cache_dir: str | Path | None, what: str) -> Dataset:
    """One source of documents as a one-column ``Dataset`` named ``text``; every failure a ``UserError`` naming
    ``what`` (the config key) and the path."""
    from datasets import DatasetDict, load_from_disk

    path = str(path)
    if not Path(path).exists():
        raise UserError(f"{what}: {path} does not exist")
    if Path(path).is_dir():
        try:
            ds = load_from_disk(path)
        except Exception as e:
            cause = _chain(e)[-1]
            raise UserError(f"{what}: {path} is a directory but not one written by datasets' save_to_disk "
                            f"({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''})") from None
        if isinstance(ds, DatasetDict):
            if len(ds) != 1:
                raise UserError(f"{what}: {path} holds the splits {', '.join(ds)}; point it at one of them, "
                                f"e.g. {Path(path) / next(iter(ds))}")
            ds = next(iter(ds.values()))
        builder = "save_to_disk"
    else:
        builder = _builder(path)
        ds = load_file(builder, path, what, str(cache_dir) if cache_dir else None)
    if builder == "text":
        return ds.select_columns(["text"])
    if field not in ds.column_names and "." in field:
        ds = ds.flatten()  # a nested field, e.g. data.text_field=meta.body
    if field not in ds.column_names:
        raise UserError(f"{what}: {path} has no field {field!r} (data.text_field); its fields are "
                        f"{', '.join(ds.column_names)}")
    dtype = getattr(ds.features[field], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise UserError(f"{what}: the field {field!r} of {path} holds {ds.features[field]}, not text; set "
                        f"data.text_field to a text field")
    ds = ds.select_columns([field])
    return ds if field == "text" else ds.rename_column(field, "text")


def iter_documents(ds: Dataset, batch_size: int = ENCODE_BATCH) -> Iterator[tuple[list[str], int]]:
    """``(non-blank documents, rows read)`` a batch at a time, in corpus order."""
    for batch in ds.iter(batch_size=batch_size):
        rows = batch["text"]
        yield [t for t in rows if t and not t.isspace()], len(rows)


# --------------------------------------------------------------------------------------------------- tokenizer


def train_byte_bpe(docs: Iterable[str], vocab_size: int, n_docs: Optional[int] = None,
                   show_progress: bool = False) -> Tokenizer:
    """A byte-level BPE of at most ``vocab_size`` tokens trained on ``docs`` (read once, in chunks)."""
    if vocab_size < MIN_VOCAB:
        raise UserError(f"data.vocab_size: got {vocab_size}; a byte-level BPE needs at least {MIN_VOCAB} "
                        f"({len(SPECIALS)} special tokens and the 256 bytes)")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    tok.train_from_iterator(docs, trainer=trainer, length=n_docs)
    check_specials(tok, "the trained tokenizer")
    tok.encode_special_tokens = True
    return tok


def load_lm_tokenizer(path: str | Path) -> Tokenizer:
    """``load_tokenizer``, set to encode a literal ``</s>`` (or ``<s>``, ...) in text as text.

    Why: ``tokenizers`` otherwise matches special tokens inside the text, so a document quoting ``</s>`` would
    get a separator in the middle, and decoding (which skips specials) would lose it. The flag is not saved in
    ``tokenizer.json``, so anything that encodes LM text loads the tokenizer through here.
    """
    tok = load_tokenizer(path)
    tok.encode_special_tokens = True
    return tok


def training_documents(ds: Dataset, sample: Optional[int]) -> tuple[Iterator[str], int]:
    """The non-blank training documents for the BPE (a seeded sample of ``sample`` rows when that is smaller)."""
    if sample is not None and sample < len(ds):
        ds = ds.select(np.sort(np.random.default_rng(0).choice(len(ds), size=sample, replace=False)))
    return chain.from_iterable(docs for docs, _ in iter_documents(ds)), len(ds)


# --------------------------------------------------------------------------------------------------- stream


def stream_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size < 2**16 else np.dtype("<i4")


class NpyStream:
    """A 1-D ``.npy`` file written by appending: a header for length 0 first, rewritten with the real length on
    ``close`` (a 1-D header pads to the same 128 bytes for any length)."""

    def __init__(self, path: str | Path, dtype: np.dtype):
        self.path, self.dtype, self.n = Path(path), np.dtype(dtype), 0
        self._f = open(self.path, "wb")
        self._header_len = self._write_header()

    def _write_header(self) -> int:
        self._f.seek(0)
        np.lib.format.write_array_header_1_0(self._f, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                       "fortran_order": False, "shape": (self.n,)})
        return self._f.tell()

    def append(self, values: np.ndarray) -> None:
        self._f.write(np.ascontiguousarray(values, dtype=self.dtype).tobytes())
        self.n += len(values)

    def close(self) -> None:
        with self._f:
            end = self._f.tell()
            if self._write_header() != self._header_len:
                raise AssertionError(f"{self.path}: the .npy header changed length")
            self._f.seek(end)
            self._f.flush()
            os.fsync(self._f.fileno())


def encode_stream(tok: Tokenizer, ds: Dataset, path: str | Path, progress: bool = False, desc: str = "") -> dict:
    """Encode the documents of ``ds`` into the stream file ``path``, ``</s>`` after each; returns the counts
    ``{"docs", "empty", "tokens", "bytes", "words"}`` (bytes: UTF-8 of the documents' text, separators not counted;
    words: whitespace-separated)."""
    from tqdm.auto import tqdm

    out = NpyStream(path, stream_dtype(tok.get_vocab_size()))
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # no offsets: faster
    counts = dict.fromkeys(("docs", "empty", "tokens", "bytes", "words"), 0)
    try:
        with tqdm(total=len(ds), desc=desc, unit="doc", disable=not progress) as bar:
            for docs, n_rows in iter_documents(ds):
                encs = encode(docs, add_special_tokens=False)
                n = sum(len(e.ids) for e in encs) + len(encs)
                out.append(np.fromiter(chain.from_iterable(chain(e.ids, (EOS,)) for e in encs), out.dtype, n))
                counts["docs"] += len(docs)
                counts["empty"] += n_rows - len(docs)
                counts["bytes"] += sum(len(d.encode("utf-8")) for d in docs)
                counts["words"] += sum(len(d.split()) for d in docs)
                bar.update(n_rows)
    finally:
        out.close()
    counts["tokens"] = out.n
    return counts
