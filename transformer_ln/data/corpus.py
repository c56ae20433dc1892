"""Parallel text per split from the built-in generator, local files or the hub, as Arrow datasets.

Loading goes through ``datasets.load_dataset`` (its cache, its ``.gz`` handling, its JSON reader), and the result
stays a memory-mapped Arrow table with columns ``src`` and ``tgt``: a corpus of WMT size is never a Python list.
What ``datasets`` does not give is an error a user can act on, so every failure here becomes a ``UserError`` that
names the file, the line or the fix, never a traceback from inside ``datasets``.
"""
from __future__ import annotations

import gzip
import logging
import os
import re
from pathlib import Path
from typing import Optional

import numpy as np
from datasets import Dataset, Features, Value, concatenate_datasets

from ..config.run_config import DataConfig
from ..errors import UserError
from . import hygiene
from .synthetic import synthetic_splits

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
SYNTHETIC_EVAL_SIZE = 500
_TEXT_PAIR = Features({"src": Value("string"), "tgt": Value("string")})
_HUB_SPLITS = {"train": "train", "validation": "valid", "valid": "valid", "dev": "valid", "test": "test"}


def load_raw(data_cfg: DataConfig, cache_dir: str | Path | None = None) -> tuple[dict[str, Dataset], dict[str, str]]:
    """``({split: Dataset with string columns src, tgt}, {split: where it came from})``, text as in the files.

    Stripping and dropping pairs with an empty side happen later, while encoding (``store.py``).
    """
    cache = str(cache_dir or data_cfg.cache_dir) if (cache_dir or data_cfg.cache_dir) else None
    if data_cfg.source == "synthetic":
        splits = synthetic_splits(data_cfg.synthetic_size, data_cfg.synthetic_seed, SYNTHETIC_EVAL_SIZE)
        raw = {k: Dataset.from_dict({"src": [s for s, _ in v], "tgt": [t for _, t in v]}) for k, v in splits.items()}
        origin = {k: f"the synthetic corpus (seed {data_cfg.synthetic_seed})" for k in raw}
    elif data_cfg.source == "files":
        raw, origin = _load_files(data_cfg, cache)
    elif data_cfg.source == "hub":
        raw, origin = _load_hub(data_cfg, cache)
    else:  # DataConfig validates this already
        raise UserError(f"data.source: got {data_cfg.source!r}, allowed: 'synthetic', 'files', 'hub'")
    if data_cfg.source != "synthetic":  # text tokenized for another toolkit: warn, or clean (data.detokenize/unescape)
        raw = {k: hygiene.check(ds, f"{k} ({origin[k]})", data_cfg) for k, ds in raw.items()}
    return raw, origin


def load_corpus(data_cfg: DataConfig, cache_dir: str | Path | None = None) -> dict[str, list[tuple[str, str]]]:
    """Stripped, non-empty sentence pairs per split as Python lists: for small corpora and tests only."""
    return load_corpus_counted(data_cfg, cache_dir)[0]


def load_corpus_counted(data_cfg: DataConfig, cache_dir: str | Path | None = None
                        ) -> tuple[dict[str, list[tuple[str, str]]], dict[str, int]]:
    """Like ``load_corpus``, plus the number of pairs dropped per split because one side was empty."""
    raw, origin = load_raw(data_cfg, cache_dir)
    pairs, dropped = {}, {}
    for split, ds in raw.items():
        rows = [(s.strip(), t.strip()) for s, t in zip(ds["src"], ds["tgt"])]
        pairs[split] = [(s, t) for s, t in rows if s and t]
        dropped[split] = len(rows) - len(pairs[split])
        report_empty(split, dropped[split], len(pairs[split]), origin[split])
    return pairs, dropped


def check_sources(data_cfg: DataConfig) -> None:
    """Cheap checks that the corpus can be found (every configured file exists and is readable), made before a
    run deletes anything; the full load reports everything else."""
    if data_cfg.prepared:
        if not (Path(data_cfg.prepared) / "manifest.json").is_file():
            raise UserError(f"data.prepared: {data_cfg.prepared} is not a prepared data directory (no manifest.json); "
                            f"create it with `transformer-ln data prepare CONFIG --out {data_cfg.prepared}`")
        return
    if data_cfg.source != "files":
        return
    for split in SPLITS:
        for side in ("src", "tgt"):
            path = getattr(data_cfg, f"{split}_{side}")
            if path is None:
                continue
            if Path(path).is_dir():
                raise UserError(f"data.{split}_{side}: {path} is a directory; give a text file (one sentence a "
                                "line; .gz or .jsonl too)")
            if not Path(path).is_file():
                raise UserError(f"data.{split}_{side}: file {path} does not exist")
            if not os.access(path, os.R_OK):
                raise UserError(f"data.{split}_{side}: file {path} is not readable")


def report_empty(split: str, dropped: int, kept: int, origin: str) -> None:
    """Warn about pairs with an empty side; refuse a split that has nothing left."""
    if dropped:
        log.warning("%s: dropped %d pair(s) with an empty side, from %s", split, dropped, origin)
    if not kept:
        raise UserError(f"the {split} split is empty: {origin} holds no pair with text on both sides")


# ---------------------------------------------------------------------------------------------------------------
# local files


def _is_json(path: str) -> bool:
    name = path[:-3] if path.endswith(".gz") else path
    return name.endswith((".jsonl", ".json"))


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _find_bad_utf8(path: str) -> Optional[str]:
    """Where the first undecodable line is, as "line N (reason)"; only run after loading failed."""
    try:
        with _open_binary(path) as f:
            for n, line in enumerate(f, 1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as e:
                    return f"line {n} (byte {e.start + 1} of that line: {e.reason})"
    except (OSError, EOFError) as e:
        return f"the file cannot be read ({e})"
    return None


def _chain(e: BaseException) -> list[BaseException]:
    out = [e]
    while (nxt := out[-1].__cause__ or out[-1].__context__) is not None and nxt not in out:
        out.append(nxt)
    return out


def load_file(builder: str, path: str, what: str, cache_dir: Optional[str]) -> Dataset:
    """``datasets.load_dataset(builder)`` of one local file (text, json or parquet), its failures as one line: not
    UTF-8 (with where), unreadable (the innermost cause); an empty file is an empty ``text`` dataset, which the
    caller reports as an empty split."""
    from datasets import load_dataset

    try:
        return load_dataset(builder, data_files={"data": [path]}, split="data", cache_dir=cache_dir)
    except Exception as e:  # datasets wraps the real cause several levels deep
        where = _find_bad_utf8(path) if builder != "parquet" else None
        if where:
            raise UserError(f"{what}: {path} is not valid UTF-8 at {where}; re-encode it, e.g. "
                            f"`iconv -f latin1 -t utf-8`") from None
        causes = _chain(e)
        if any(type(c).__name__ == "SchemaInferenceError" for c in causes):
            return Dataset.from_dict({"text": []})
        cause = causes[-1]
        raise UserError(f"{what}: could not read {path} as {builder} ({type(cause).__name__}: "
                        f"{str(cause).splitlines()[0] if str(cause) else ''})") from None


def _load_dataset_column(path: str, field: Optional[str], cache_dir: Optional[str], what: str) -> Dataset:
    """One column of one file through ``datasets``, as a one-column ``Dataset`` named ``text``: the lines of a
    text file, or ``translation.<field>`` of JSON lines. Memory-mapped; nothing is read into Python lists."""
    from datasets import load_dataset

    if not Path(path).is_file():
        raise UserError(f"{what}: {path} is a directory; give a text file" if Path(path).is_dir() else
                        f"{what}: file {path} does not exist")
    if _is_json(path) and not field:
        raise UserError(f"{what}: {path} is JSON lines; set data.src_lang and data.tgt_lang to the keys of its "
                        f"'translation' objects (e.g. data.src_lang=de data.tgt_lang=en)")
    builder = "json" if _is_json(path) else "text"
    ds = load_file(builder, path, what, cache_dir)
    if builder == "text":
        return ds.select_columns(["text"])
    flat = ds.flatten()
    column = f"translation.{field}"
    if column in flat.column_names:
        values = flat.select_columns([column]).rename_column(column, "text")
    elif "translation" in ds.column_names:  # rows with different keys load as one untyped Json column
        values = Dataset.from_dict({"text": [row.get(field) if isinstance(row, dict) else None
                                             for row in ds["translation"]]})
    else:
        raise UserError(f"{what}: {path} has no 'translation' objects; each line must look like "
                        f'{{"translation": {{"de": "...", "en": "..."}}}}')
    col = values.data.column("text")
    if len(values) and col.null_count == len(values):
        keys = sorted({c.split(".", 1)[1] for c in flat.column_names if c.startswith("translation.")})
        raise UserError(f"{what}: {path} has no language {field!r} in its 'translation' objects"
                        + (f"; found: {', '.join(keys)}" if keys else ""))
    if col.null_count:
        import pyarrow.compute as pc

        missing = int(np.flatnonzero(pc.is_null(col).to_numpy(zero_copy_only=False))[0])
        raise UserError(f"{what}: {path} line {missing + 1} has no text for {field!r} in its 'translation' object")
    return values


def _load_files(cfg: DataConfig, cache_dir: Optional[str]):
    raw, origin = {}, {}
    for split in SPLITS:
        src, tgt = getattr(cfg, f"{split}_src"), getattr(cfg, f"{split}_tgt")
        if src is None and tgt is None:
            continue  # only test may be absent; DataConfig checks the rest
        src_col = _load_dataset_column(src, cfg.src_lang, cache_dir, f"data.{split}_src")
        tgt_col = _load_dataset_column(tgt, cfg.tgt_lang, cache_dir, f"data.{split}_tgt")
        if len(src_col) != len(tgt_col):
            raise UserError(f"the {split} files do not line up: {src} has {len(src_col)} lines but {tgt} has "
                            f"{len(tgt_col)}; each line of one must translate the same line of the other")
        if len(src_col) == 0:
            raw[split] = Dataset.from_dict({"src": [], "tgt": []}, features=_TEXT_PAIR)
        else:
            raw[split] = concatenate_datasets([src_col.rename_column("text", "src"),
                                               tgt_col.rename_column("text", "tgt")], axis=1)
        origin[split] = src if src == tgt else f"{src} and {tgt}"
    return raw, origin


# ---------------------------------------------------------------------------------------------------------------
# hub

_OFFLINE_HINT = ("use data.source=files with local paths instead (data.train_src=... data.train_tgt=... "
                 "data.valid_src=... data.valid_tgt=...)")


def _is_network_error(e: BaseException) -> bool:
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
           for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")):
        return True
    for c in _chain(e):
        name = type(c).__name__
        if isinstance(c, (ConnectionError, TimeoutError)) or any(k in name for k in ("Connect", "Offline", "Timeout")) \
                or "Couldn't reach" in str(c):
            return True
    return False


def _hub_langs(cfg: DataConfig) -> tuple[Optional[str], Optional[str]]:
    if cfg.src_lang and cfg.tgt_lang:
        return cfg.src_lang, cfg.tgt_lang
    m = re.search(r"([a-z]{2,3})-([a-z]{2,3})$", cfg.hub_config or "")
    return (cfg.src_lang or (m and m.group(1))), (cfg.tgt_lang or (m and m.group(2)))


def _load_hub(cfg: DataConfig, cache_dir: Optional[str]):
    from datasets import load_dataset

    label = repr(cfg.hub_name) + (f" (config {cfg.hub_config!r})" if cfg.hub_config else "")
    try:
        dd = load_dataset(cfg.hub_name, cfg.hub_config, cache_dir=cache_dir)
    except Exception as e:
        if _is_network_error(e):
            raise UserError(f"cannot load dataset {label} from the Hugging Face hub: there is no network (or "
                            f"offline mode is on) and it is not in the cache; {_OFFLINE_HINT}") from None
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot load dataset {label} from the hub ({first}); check data.hub_name and "
                        f"data.hub_config, or {_OFFLINE_HINT}") from None
    src_lang, tgt_lang = _hub_langs(cfg)
    raw, origin = {}, {}
    for hub_split, ds in dd.items():
        split = _HUB_SPLITS.get(hub_split)
        if split is None or split in raw:
            continue
        flat = ds.flatten()
        cols = [f"translation.{src_lang}", f"translation.{tgt_lang}"]
        if not src_lang or not tgt_lang or any(c not in flat.column_names for c in cols):
            raise UserError(f"dataset {label}: need data.src_lang and data.tgt_lang among the keys of its "
                            f"'translation' column; columns are {', '.join(flat.column_names)}")
        raw[split] = flat.select_columns(cols).rename_columns({cols[0]: "src", cols[1]: "tgt"})
        origin[split] = f"hub dataset {label} split {hub_split!r}"
    for split in ("train", "valid"):
        if split not in raw:
            raise UserError(f"dataset {label} has no {split} split (it has: {', '.join(dd)})")
    return raw, origin
