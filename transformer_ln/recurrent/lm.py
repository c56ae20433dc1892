"""A word-level LSTM language model and its training loop: the LN-LSTM against the plain LSTM (Ba et al. 2016).

Why a separate, small loop instead of the Transformer trainer: the paper's recurrent claim is about convergence
speed under the same optimizer, so both models share everything here (data, batches, Adam, clipping, seed) and
differ only in ``LayerNormLSTM(norm=...)``. Perplexity is per word including ``</s>``, on the whole validation set.

    cfg = LMConfig(source="files", train_path=".../train.en", valid_path=".../val.en", norm=None, lr=1e-3)
    summary = train_lm(cfg, out_dir="runs/lm/lstm-lr1e-3-s1")
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Optional

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from torch import nn

from ..atomic import write_text
from ..config.sections import ConfigError, Section
from ..data.synthetic import synthetic_splits
from ..data.tokenizer import BOS, EOS, PAD, SPECIALS
from ..errors import UserError
from ..runs.rundir import RunDir
from .rnn import CELL_NORMS, LayerNormLSTM

SOURCES = ("synthetic", "files")
CONFIG_JSON = "config.json"  # the LM's config (RunDir.CONFIG is the Transformer's config.yaml; RunDir has no name)


@dataclass
class LMConfig(Section):
    """Everything one LM run depends on; checked on construction (``Section``): a bad value, NaN and infinity
    included, is one ``ConfigError`` line naming the field (``lm.<field>``), the value and what is allowed."""

    _prefix = "lm."
    source: Literal[SOURCES] = "synthetic"  # the English-like side of the built-in corpus, or "files": one
    train_path: str = ""                    # sentence per line (e.g. Multi30k's train.en / val.en), read by path
    valid_path: str = ""
    synthetic_train_size: int = 5000
    vocab_size: int = 6000           # word-level vocabulary cap (including the 4 specials)
    min_frequency: int = 3
    max_len: int = 50                # training sentences longer than this (in words) are skipped
    emb_size: int = 128
    hidden_size: int = 256
    num_layers: int = 1
    norm: Literal[CELL_NORMS] = "layernorm"  # or None: the plain LSTM, same code
    dropout: float = 0.0
    lr: float = 1e-3                 # Adam, constant
    batch_size: int = 32             # sentences per update
    max_updates: int = 1000
    eval_every: int = 50
    clip_norm: float = 1.0           # 0: no clipping
    seed: int = 1

    def __post_init__(self):
        self.check()
        self.positive("synthetic_train_size", "min_frequency", "max_len", "emb_size", "hidden_size", "num_layers",
                      "batch_size", "max_updates", "eval_every", "lr")
        self.at_least("vocab_size", len(SPECIALS) + 1, f"the {len(SPECIALS)} special tokens plus a word")
        self.probability("dropout")
        self.non_negative("clip_norm")
        if self.source == "files":
            for key in ("train_path", "valid_path"):
                path = getattr(self, key)
                if not path or not Path(path).is_file():
                    raise ConfigError(f"{self._prefix}{key}: got {path!r}, must be an existing text file, one "
                                      f"sentence per line ({self._prefix}source='files')")


def load_texts(cfg: LMConfig) -> dict[str, list[str]]:
    """Training and validation sentences (the files are read, never copied)."""
    if cfg.source == "synthetic":
        splits = synthetic_splits(cfg.synthetic_train_size, cfg.seed)
        return {"train": [s for s, _ in splits["train"]], "valid": [s for s, _ in splits["valid"]]}
    out = {}
    for split, path in (("train", cfg.train_path), ("valid", cfg.valid_path)):
        with open(path, encoding="utf-8") as f:
            out[split] = [line.strip() for line in f if line.strip()]
        if not out[split]:
            raise UserError(f"lm.{split}_path: {path} has no non-empty lines")
    return out


def train_word_tokenizer(texts: list[str], vocab_size: int, min_frequency: int) -> Tokenizer:
    """Lower-cased words and punctuation (HF ``tokenizers`` WordLevel), the specials at the project's fixed ids."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=list(SPECIALS), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def encode(tok: Tokenizer, texts: list[str], max_len: Optional[int] = None) -> list[list[int]]:
    ids = [e.ids for e in tok.encode_batch(texts)]
    return [s for s in ids if s and (max_len is None or len(s) <= max_len)]


def _pad(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> inputs ``<s> w1 .. wn`` and targets ``w1 .. wn </s>``, (B, T) padded with PAD."""
    T = max(len(s) for s in seqs) + 1
    inp = torch.full((len(seqs), T), PAD, dtype=torch.long)
    tgt = torch.full((len(seqs), T), PAD, dtype=torch.long)
    for b, s in enumerate(seqs):
        inp[b, 0] = BOS
        inp[b, 1:len(s) + 1] = torch.tensor(s)
        tgt[b, :len(s)] = torch.tensor(s)
        tgt[b, len(s)] = EOS
    return inp, tgt


def train_batches(data: list[list[int]], batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless seeded epochs of length-bucketed batches in shuffled order (little padding, no order bias)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([len(s) for s in data], dtype=torch.float64)
    while True:
        jitter = torch.rand(len(data), generator=g, dtype=torch.float64)
        order = torch.argsort(lengths + jitter).tolist()  # sorted by length, ties in random order
        chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        for j in torch.randperm(len(chunks), generator=g).tolist():
            yield _pad([data[i] for i in chunks[j]])


class RecurrentLM(nn.Module):
    """Embedding -> (LN-)LSTM -> linear over the vocabulary."""

    def __init__(self, vocab_size: int, emb_size: int, hidden_size: int, num_layers: int = 1,
                 norm: Optional[str] = "layernorm", dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, emb_size, padding_idx=PAD)
        self.rnn = LayerNormLSTM(emb_size, hidden_size, num_layers, batch_first=True, dropout=dropout, norm=norm)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_size, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # padding sits at the end and the LSTM is causal, so it cannot reach a real position: no lengths needed
        return self.out(self.drop(self.rnn(self.drop(self.embed(tokens)))[0]))


def _nll_sum(model: RecurrentLM, inp: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, int]:
    logits = model(inp)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=PAD, reduction="sum")
    return loss, int((tgt != PAD).sum())


@torch.no_grad()
def evaluate_nll(model: RecurrentLM, data: list[list[int]], batch_size: int = 128) -> float:
    """Mean negative log-likelihood per token (nats) over all of ``data``."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(data)), key=lambda i: len(data[i]))
    total, count = 0.0, 0
    for i in range(0, len(order), batch_size):
        loss, n = _nll_sum(model, *_pad([data[j] for j in order[i:i + batch_size]]))
        total, count = total + float(loss), count + n
    model.train(was_training)
    return total / count


def train_lm(cfg: LMConfig, out_dir: Optional[str | Path] = None, progress: bool = False,
             texts: Optional[dict[str, list[str]]] = None) -> dict:
    """Train one LM; return its summary (and write ``config.json``, ``metrics.jsonl``, ``summary.json`` in
    ``out_dir``: ``CONFIG_JSON`` and ``RunDir``'s names).

    ``metrics.jsonl`` has one line per evaluation (update 0 included): update, train loss since the last one,
    valid nll and perplexity, seconds. A non-finite loss ends the run with status ``diverged``.
    """
    torch.manual_seed(cfg.seed)
    texts = texts if texts is not None else load_texts(cfg)
    tok = train_word_tokenizer(texts["train"], cfg.vocab_size, cfg.min_frequency)
    train, valid = encode(tok, texts["train"], cfg.max_len), encode(tok, texts["valid"])
    if not train or not valid:
        raise UserError(f"lm: no training or validation sentences left (train {len(train)}, valid {len(valid)})")
    model = RecurrentLM(tok.get_vocab_size(), cfg.emb_size, cfg.hidden_size, cfg.num_layers, cfg.norm, cfg.dropout)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    run = RunDir(out_dir) if out_dir is not None else None
    metrics_file = None
    if run is not None:
        run.path.mkdir(parents=True, exist_ok=True)
        write_text(run.path / CONFIG_JSON, json.dumps(cfg.to_dict(), indent=1))
        metrics_file = open(run.metrics, "w")
    history, losses, status, diverged_at, t0 = [], [], "completed", None, time.perf_counter()

    def record(update: int) -> None:
        nll = evaluate_nll(model, valid)
        row = {"update": update, "train_loss": (sum(losses) / len(losses)) if losses else None,
               "valid_nll": nll, "valid_ppl": math.exp(min(nll, 50.0)), "seconds": time.perf_counter() - t0}
        losses.clear()
        history.append(row)
        if metrics_file is not None:
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.max_updates, desc=f"{cfg.norm or 'lstm'} lr {cfg.lr:g} seed {cfg.seed}", leave=False)
    try:
        record(0)
        model.train()
        batches = train_batches(train, cfg.batch_size, cfg.seed)
        for update in range(1, cfg.max_updates + 1):
            inp, tgt = next(batches)
            loss_sum, n = _nll_sum(model, inp, tgt)
            loss = loss_sum / n
            if not torch.isfinite(loss):
                status, diverged_at = "diverged", update
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_norm > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
            opt.step()
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.update(1)
            if update % cfg.eval_every == 0 or update == cfg.max_updates:
                record(update)
    finally:
        if bar is not None:
            bar.close()
        if metrics_file is not None:
            metrics_file.close()
    best = min(history, key=lambda r: r["valid_nll"])
    summary = {"status": status, "diverged_at": diverged_at, "updates": history[-1]["update"],
               "final_valid_ppl": history[-1]["valid_ppl"], "best_valid_ppl": best["valid_ppl"],
               "seconds": time.perf_counter() - t0,
               "vocab_size": tok.get_vocab_size(), "train_sentences": len(train), "valid_sentences": len(valid),
               "parameters": sum(p.numel() for p in model.parameters()), "history": history}
    if run is not None:
        write_text(run.summary, json.dumps(summary, indent=1))
    return summary
