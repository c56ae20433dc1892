"""Joint BPE with HF ``tokenizers``: NFKC, Metaspace pre-tokenizer and decoder, so decoding gives the text back.

One vocabulary for both languages allows shared embeddings. The special tokens have fixed ids (``<pad>``=0, ``<s>``=1,
``</s>``=2, ``<unk>``=3) that the model config and the batching rely on. The tokenizer adds no special tokens itself;
the encoder (``store.py``) appends ``</s>`` and ``collate`` prepends ``<s>``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Sequence

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from ..atomic import write_with
from ..errors import UserError

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
PAD, BOS, EOS, UNK = range(4)


def _texts(pairs: Iterable[tuple[str, str]]) -> Iterator[str]:
    for src, tgt in pairs:
        yield src
        yield tgt


def train_tokenizer(pairs: Iterable[tuple[str, str]], vocab_size: int, n_pairs: int | None = None,
                    show_progress: bool = False) -> Tokenizer:
    """Train a joint BPE on both sides of ``pairs`` (the training split only), read once from any iterable.

    ``train_from_iterator`` consumes the text in chunks, so the corpus itself is never held in memory; what grows
    is the table of distinct words (cap it with ``data.tokenizer_sample``; ``store.build_prepared`` trains large
    samples in their own process, so the table goes back to the OS). ``n_pairs`` only sizes the progress bar.
    """
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIALS),
                                  show_progress=show_progress)
    if n_pairs is None and isinstance(pairs, Sequence):
        n_pairs = len(pairs)
    tok.train_from_iterator(_texts(pairs), trainer=trainer, length=2 * n_pairs if n_pairs else None)
    check_specials(tok, "the trained tokenizer")
    return tok


def check_specials(tok: Tokenizer, where: str) -> None:
    """A tokenizer whose special ids differ would silently corrupt padding and decoding; refuse it."""
    got = {s: tok.token_to_id(s) for s in SPECIALS}
    want = dict(zip(SPECIALS, range(len(SPECIALS))))
    if got != want:
        raise UserError(f"{where}: special token ids are {got}, expected {want}; delete it to train a new one")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json`` written by ``build_tokenizer`` (resume, translation)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"tokenizer file {path} does not exist")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise UserError(f"{path} is not a tokenizers JSON file ({e}); delete it to train a new one") from None
    check_specials(tok, str(path))
    return tok


def save_tokenizer(tok: Tokenizer, path: str | Path) -> None:
    """Write ``tokenizer.json`` atomically: a crash never leaves half a tokenizer behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_with(path, lambda tmp: tok.save(str(tmp)))


def build_tokenizer(pairs: Sequence[tuple[str, str]], vocab_size: int, path: Path | None = None) -> Tokenizer:
    """Load ``path`` if it exists (resume keeps the same ids); otherwise train and, when ``path`` is given, save."""
    if path is not None and Path(path).is_file():
        return load_tokenizer(path)
    if not pairs:
        raise UserError("cannot train a tokenizer: the training split has no sentence pairs")
    tok = train_tokenizer(pairs, vocab_size)
    if path is not None:
        save_tokenizer(tok, path)
    return tok
