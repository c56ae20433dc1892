"""Prepared data on disk: the tokenizer and every split's token ids, written once, memory-mapped by every run.

A prepared directory (``transformer-ln data prepare``, or an entry of the ``data.cache_dir`` cache)::

    manifest.json            format, the data settings and their key, per split: counts and files with sizes
    tokenizer.json           the joint BPE
    <split>/*.arrow          Arrow files (``datasets.map`` output): src_ids, tgt_ids (list<int32>, ``</s>`` included);
                             valid and test also keep the stripped text (src, tgt) for BLEU
    <split>/lengths.npy      (rows, 2) int32 token lengths, so batching never touches the Arrow pages

Why: fairseq binarizes once into memory-mapped files; we do the same with Arrow. The rows are every pair with text
on both sides, in corpus order; the ``model.max_positions`` filter is applied when a run opens the directory, so one
directory serves models of any length limit. The directory is built under a temporary name and renamed into place
only once ``manifest.json`` is written, so a crash never leaves something that looks complete; what does not match
its manifest is refused with one message.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from datasets import Dataset, Features, Sequence as ListOf, Value, concatenate_datasets
from tokenizers import Tokenizer

from ..atomic import no_space, tree_size
from ..config.run_config import DataConfig
from ..errors import UserError
from .batching import TokenBatchSampler
from .corpus import load_raw, report_empty
from .tokenizer import BOS, EOS, PAD, load_tokenizer, save_tokenizer, train_tokenizer

log = logging.getLogger(__name__)

FORMAT = "transformer_ln prepared data v1"
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
EVAL_TEXT_SPLITS = ("valid", "test")
# DataConfig fields that say where data lives or how fast to build it, not what it is
NOT_IN_KEY = ("cache_dir", "prepared", "num_proc")
ENCODE_BATCH = 10_000  # rows per encode call and per Arrow record batch: opening a split faults in the pages
# around each batch's header, so fewer, larger batches keep less of the file resident
PARALLEL_MIN = 2000  # rows per encoding process below which forking is not worth it
OWN_PROCESS_PAIRS = 100_000  # tokenizer samples from this size up train in their own process
IDS = {"src_ids": ListOf(Value("int32")), "tgt_ids": ListOf(Value("int32"))}


# --------------------------------------------------------------------------------------------------- settings, key


def data_settings(data_cfg: DataConfig) -> dict:
    """The data settings that decide the content of a prepared directory."""
    return {k: v for k, v in data_cfg.to_dict().items() if k not in NOT_IN_KEY}


def cache_key(data_cfg: DataConfig) -> str:
    """Hash of the settings and, for local files, each file's absolute path, size and modification time."""
    files = []
    if data_cfg.source == "files":
        for name in ("train_src", "train_tgt", "valid_src", "valid_tgt", "test_src", "test_tgt"):
            path = getattr(data_cfg, name)
            if path is None:
                continue
            p = Path(path)
            st = p.stat() if p.is_file() else None
            files.append([name, str(p.resolve()), st.st_size if st else None, st.st_mtime_ns if st else None])
    blob = json.dumps({"format": FORMAT, "settings": data_settings(data_cfg), "files": files}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


# --------------------------------------------------------------------------------------------------- building


def _encoder(tokenizer: Tokenizer, keep_text: bool):
    def encode(batch: dict) -> dict:
        src, tgt = [s.strip() for s in batch["src"]], [t.strip() for t in batch["tgt"]]
        keep = [i for i in range(len(src)) if src[i] and tgt[i]]
        if len(keep) < len(src):
            src, tgt = [src[i] for i in keep], [tgt[i] for i in keep]
        out = {"src_ids": [e.ids + [EOS] for e in tokenizer.encode_batch(src, add_special_tokens=False)],
               "tgt_ids": [e.ids + [EOS] for e in tokenizer.encode_batch(tgt, add_special_tokens=False)]}
        if keep_text:
            out.update(src=src, tgt=tgt)
        return out
    return encode


def _training_pairs(box: list, sample: Optional[int]) -> tuple[Iterator[tuple[str, str]], int]:
    """Stripped non-empty pairs for the BPE, streamed in batches; a seeded sample of ``sample`` pairs if smaller.

    ``box`` holds the dataset and is emptied: once the pairs are read nothing refers to it, so its memory-mapped
    text pages are unmapped before the BPE's merges, its peak, begin.
    """
    ds = box.pop()
    if sample is not None and sample < len(ds):
        rows = np.sort(np.random.default_rng(0).choice(len(ds), size=sample, replace=False))
        ds = ds.select(rows)
    box.append(ds)

    def gen() -> Iterator[tuple[str, str]]:
        for batch in box[0].iter(batch_size=10_000):
            for s, t in zip(batch["src"], batch["tgt"]):
                s, t = s.strip(), t.strip()
                if s and t:
                    yield s, t
        box.clear()
    return gen(), len(ds)


def _train_to_file(box: list, sample: Optional[int], vocab_size: int, progress: bool, path: str) -> None:
    """Train the BPE on (a sample of) the dataset in ``box`` and save it to ``path``."""
    pairs, n = _training_pairs(box, sample)
    save_tokenizer(train_tokenizer(pairs, vocab_size, n_pairs=n, show_progress=progress), path)


def _train_tokenizer_file(ds: Dataset, data_cfg: DataConfig, progress: bool, path: Path) -> None:
    """``_train_to_file``, in a fresh process when the sample is large.

    Why: the BPE's tables (about 0.6 GB for 1M numbered pairs) are freed after training, but the allocator keeps the
    pages, so the encoding workers forked next and the training run itself would carry them; a process that exits
    gives them back. Small corpora train in place: starting a process costs more than they do.
    """
    args = ([ds], data_cfg.tokenizer_sample, data_cfg.vocab_size, progress, str(path))
    if min(len(ds), data_cfg.tokenizer_sample or len(ds)) < OWN_PROCESS_PAIRS:
        return _train_to_file(*args)
    # stderr stays the caller's (progress bars); Ctrl-C or an error here kills the child (subprocess.run)
    here = str(Path(__file__).resolve().parents[2])  # the child imports this same copy of transformer_ln
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "transformer_ln.data.bpe_process"], input=pickle.dumps(args),
                          env=env)
    if proc.returncode:
        raise UserError(f"the tokenizer training process failed (exit code {proc.returncode}"
                        + ("; killed: out of memory? lower data.tokenizer_sample" if proc.returncode < 0 else
                           "; its error is above") + ")")


def _rel_files(root: Path, ds: Dataset) -> list[str]:
    return [str(Path(f["filename"]).resolve().relative_to(root.resolve())) for f in ds.cache_files]


def build_prepared(data_cfg: DataConfig, out: Path, num_proc: int = 1, progress: bool = False) -> Path:
    """Load the corpus, train the tokenizer, encode every split into ``out`` (atomically); returns ``out``."""
    import datasets

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    was_enabled = datasets.is_progress_bar_enabled()
    (datasets.enable_progress_bars if progress else datasets.disable_progress_bars)()
    t0 = time.time()
    saved_env = os.environ.get("TOKENIZERS_PARALLELISM")
    try:
        # the text's own Arrow cache lives in the temporary directory and goes with it (hub downloads excepted)
        raw_cache = None if data_cfg.source == "hub" else tmp / "raw"
        raw, origin = load_raw(data_cfg, raw_cache or data_cfg.cache_dir)
        n_tok_pairs = min(len(raw["train"]), data_cfg.tokenizer_sample or len(raw["train"]))
        log.info("training the tokenizer (vocabulary %d) on %d training pairs", data_cfg.vocab_size, n_tok_pairs)
        _train_tokenizer_file(raw["train"], data_cfg, progress, tmp / TOKENIZER_FILE)
        tokenizer = load_tokenizer(tmp / TOKENIZER_FILE)
        t_tok = time.time() - t0
        manifest: dict = {"format": FORMAT, "key": cache_key(data_cfg), "settings": data_settings(data_cfg),
                          "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                          "tokenizer_pairs": n_tok_pairs, "splits": {}}
        for split, ds in raw.items():
            log.info("encoding %s: %d pairs", split, len(ds))
            keep_text = split in EVAL_TEXT_SPLITS
            feats = Features({**({"src": Value("string"), "tgt": Value("string")} if keep_text else {}), **IDS})
            (tmp / split).mkdir()
            parallel = num_proc > 1 and len(ds) >= PARALLEL_MIN * num_proc  # worth forking for
            if parallel:  # the workers encode single-threaded: no fork warning from tokenizers, no oversubscription
                os.environ["TOKENIZERS_PARALLELISM"] = "false"
            enc = ds.map(_encoder(tokenizer, keep_text), batched=True, batch_size=ENCODE_BATCH,
                         remove_columns=ds.column_names, features=feats, num_proc=num_proc if parallel else None,
                         cache_file_name=str(tmp / split / "data.arrow"), load_from_cache_file=False,
                         new_fingerprint=f"{manifest['key']}-{split}", desc=f"Encoding {split}",
                         writer_batch_size=ENCODE_BATCH)
            if parallel:
                os.environ.pop("TOKENIZERS_PARALLELISM", None) if saved_env is None else \
                    os.environ.__setitem__("TOKENIZERS_PARALLELISM", saved_env)
            report_empty(split, len(ds) - len(enc), len(enc), origin[split])
            lens = _lengths_from_arrow(enc)
            np.save(tmp / split / "lengths.npy", lens)
            files = _rel_files(tmp, enc) + [f"{split}/lengths.npy"]
            manifest["splits"][split] = {"pairs": len(ds), "empty": len(ds) - len(enc), "rows": len(enc),
                                         "text": keep_text, "arrow": _rel_files(tmp, enc),
                                         "files": {f: (tmp / f).stat().st_size for f in files}}
            del enc
        del raw
        if raw_cache is not None:
            shutil.rmtree(raw_cache, ignore_errors=True)
        publish(tmp, out, manifest, t_tok, t0)
    except BaseException as e:
        discard(tmp, out, e)
        raise
    finally:
        (datasets.enable_progress_bars if was_enabled else datasets.disable_progress_bars)()
    log.info("prepared %s in %.1f s", out, time.time() - t0)
    return out


def publish(tmp: Path, out: Path, manifest: dict, t_tok: float, t0: float) -> None:
    """Finish a prepared directory built in ``tmp`` (the tokenizer written, ``manifest`` filled) and move it to
    ``out`` in one rename, so ``out`` is complete or absent (translation pairs and language-model streams alike)."""
    manifest["files"] = {TOKENIZER_FILE: (tmp / TOKENIZER_FILE).stat().st_size}
    manifest["seconds"] = {"tokenizer": round(t_tok, 2), "total": round(time.time() - t0, 2)}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # an empty directory the user made for us
    os.replace(tmp, out)  # atomic: `out` is complete or absent


def discard(tmp: Path, out: Path, error: BaseException) -> None:
    """Remove a half-built ``tmp`` after ``error``; a full disk becomes one line, not a traceback from deep in
    datasets or torch. Returns for any other error (the caller re-raises it)."""
    written = tree_size(tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    full = no_space(error, out, written, "free some space (or set data.cache_dir elsewhere) and run again", True)
    if full is not None:
        raise UserError(str(full)) from None


def _lengths_from_arrow(ds: Dataset) -> np.ndarray:
    """(rows, 2) token lengths of ``ds`` (``map``'s output), its Arrow files read batch by batch, not mapped: mapping
    them to read the offsets would fault in most of the ids' pages (the kernel maps pages around each access)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    out = np.zeros((len(ds), 2), dtype=np.int32)
    row = 0
    for f in ds.cache_files:
        with pa.OSFile(f["filename"]) as stream:
            for batch in pa.ipc.open_stream(stream):
                n = batch.num_rows
                for j, col in enumerate(("src_ids", "tgt_ids")):
                    out[row:row + n, j] = pc.list_value_length(batch.column(col)).to_numpy()
                row += n
    if row != len(ds):
        raise AssertionError(f"read {row} rows of lengths from {ds.cache_files}, the dataset has {len(ds)}")
    return out


# --------------------------------------------------------------------------------------------------- reading


def _corrupt(root: Path, why: str) -> UserError:
    return UserError(f"prepared data directory {root} is incomplete or corrupt ({why}); delete it and run "
                     f"`transformer-ln data prepare` again (or drop data.prepared to rebuild the cache)")


def read_manifest(root: Path) -> dict:
    """The manifest of a complete prepared directory; one clear error for anything else."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"prepared data directory {root} does not exist; create it with "
                        f"`transformer-ln data prepare CONFIG --out {root}`")
    path = root / MANIFEST
    if not path.is_file():
        raise _corrupt(root, f"no {MANIFEST}: not written by `transformer-ln data prepare`, or interrupted")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise _corrupt(root, f"{MANIFEST} is unreadable: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _corrupt(root, f"{MANIFEST} is not a {FORMAT!r} manifest")
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


class EncodedSplit:
    """One split's token ids, memory-mapped; rows longer than ``max_positions`` are left out (and counted).

    Positions ``0 .. len-1`` address the kept rows in corpus order, exactly as the list-based pipeline numbered
    them; ``batch(positions)`` gathers only those rows from the map and pads them into the training tensors.
    """

    def __init__(self, ds: Dataset, lens: np.ndarray, max_positions: int):
        keep = (lens[:, 0] <= max_positions) & (lens[:, 1] + 1 <= max_positions)
        if keep.all():  # the usual case: positions are rows, and the lengths stay views (no copy per pair)
            self.rows, self.src_lens, self.tgt_lens = None, lens[:, 0], lens[:, 1]
        else:
            self.rows = np.flatnonzero(keep)
            self.src_lens, self.tgt_lens = lens[self.rows, 0], lens[self.rows, 1]
        del keep
        self.n_filtered = int(len(lens) - len(self.src_lens))
        self._ids = ds.with_format("arrow", columns=["src_ids", "tgt_ids"])
        self.dataset = ds

    def __len__(self) -> int:
        return len(self.src_lens)

    def row_of(self, positions) -> np.ndarray:
        """Corpus rows (indices into ``PreparedData.text``) of kept positions."""
        positions = np.asarray(positions, dtype=np.int64)
        return positions if self.rows is None else self.rows[positions]

    def batch(self, positions) -> dict:
        """``collate``'s tensors for the kept rows at ``positions``: src, tgt_in (``<s>`` + tgt[:-1]), tgt_out."""
        positions = np.asarray(positions, dtype=np.int64)
        table = self._ids[self.row_of(positions).tolist()]
        src_lens = self.src_lens[positions].astype(np.int64)
        tgt_lens = self.tgt_lens[positions].astype(np.int64)
        src = _pad(table.column("src_ids"), src_lens)
        tgt_out = _pad(table.column("tgt_ids"), tgt_lens)
        shifted = np.concatenate([np.full((len(positions), 1), BOS, np.int64), tgt_out[:, :-1]], axis=1)
        tgt_in = np.where(np.arange(tgt_out.shape[1]) < tgt_lens[:, None], shifted, PAD)
        return {"src": torch.from_numpy(src), "tgt_in": torch.from_numpy(tgt_in), "tgt_out": torch.from_numpy(tgt_out),
                "ntokens": int(tgt_lens.sum()), "nsentences": len(positions)}


def _pad(column, lens: np.ndarray) -> np.ndarray:
    values = column.combine_chunks().flatten().to_numpy()
    width = int(lens.max()) if len(lens) else 0
    out = np.full((len(lens), width), PAD, dtype=np.int64)
    out[np.arange(width) < lens[:, None]] = values
    return out


class PreparedStore:
    """An opened prepared directory: tokenizer, per-split ``EncodedSplit``, counts, and the eval splits' text."""

    def __init__(self, root: Path, max_positions: int):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        try:
            self.tokenizer = load_tokenizer(self.root / TOKENIZER_FILE)
        except UserError as e:
            raise _corrupt(self.root, str(e)) from None
        self.splits: dict[str, EncodedSplit] = {}
        for split, info in self.manifest["splits"].items():
            try:
                parts = [Dataset.from_file(str(self.root / f)) for f in info["arrow"]]
                ds = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
                lens = np.load(self.root / f"{split}/lengths.npy")
            except Exception as e:  # a truncated or foreign Arrow/npy file
                raise _corrupt(self.root, f"cannot read {split}: {type(e).__name__}: {e}") from None
            if len(ds) != info["rows"] or lens.shape != (info["rows"], 2):
                raise _corrupt(self.root, f"{split} holds {len(ds)} rows, the manifest says {info['rows']}")
            self.splits[split] = EncodedSplit(ds, lens, max_positions)

    @property
    def data_config_dict(self) -> dict:
        return dict(self.manifest["settings"])

    def text(self, split: str) -> list[tuple[str, str]]:
        info = self.manifest["splits"].get(split)
        if info is None or not info.get("text"):
            raise UserError(f"the prepared data in {self.root} keeps no text for the {split!r} split")
        cols = self.splits[split].dataset.select_columns(["src", "tgt"]).to_dict()
        return list(zip(cols["src"], cols["tgt"]))

    def sampler(self, split: str, max_tokens: int, seed: int, **kw) -> TokenBatchSampler:
        s = self.splits[split]
        return TokenBatchSampler(s.src_lens, s.tgt_lens, max_tokens, seed, **kw)
