"""Perplexity, bits per byte and word perplexity of a trained decoder-only run on a split of its text.

Every block of the split is scored once, as training cuts it (``data.block_size`` tokens, each block on its own: no
context carried over from the block before, no sliding window, the number nanoGPT reports; a sliding window would
give lower values). With N the summed next-token negative log-likelihood in nats over the S target tokens scored:

    perplexity      exp(N / S)                      per token of the run's tokenizer
    bits per byte   N / ln 2 / (B * S / S_split)    B: UTF-8 bytes of the split's documents (separators not counted)
    word perplexity exp(N / (W * S / S_split))      W: whitespace-separated words of the split's documents

S_split is the split's token count (every document's tokens and its ``</s>``). Blocks drop the stream's tail (fewer
than ``block_size + 1`` tokens), so the bytes and words are scaled by the fraction of the stream scored,
``coverage = S / S_split`` (recorded in the JSON, next to the raw counts); the ``</s>`` targets are scored like any
token and their bytes count as zero. Bits per byte and word perplexity compare runs with different tokenizers.

Logits are computed in float32 without autocast, in eval mode, with no gradient. Under several processes each takes
every N-th batch of blocks (disjoint), and the three sums are added with one ``accelerator.reduce``: every process
loads the whole model (it is never sharded here).

A non-finite summed NLL (NaN or +inf logits: non-finite weights, or an overflow) is never printed as a perplexity:
``evaluate_lm`` raises ``search.NonFiniteLogits`` after the shards are summed (so every process raises it), and
``evaluate_lm_run`` makes it one line naming the checkpoint; nothing is written.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import write_text
from ..errors import UserError
from ..runs import checkpoint as ckpt_lib
from ..runs.rundir import RunDir
from .search import NonFiniteLogits, nonfinite_error

EVAL_MAX_TOKENS = 8192  # the least tokens a batch by default (logits: EVAL_MAX_TOKENS x vocabulary floats)


def run_arch(run_dir: str | Path, checkpoint: str = RunDir.BEST) -> str:
    """``model.arch`` of the run's checkpoint config (``encoder_decoder`` or ``decoder_only``)."""
    return ckpt_lib.load_run_config_from(ckpt_lib.resolve(run_dir, checkpoint)).model.arch


@torch.no_grad()
def score_batches(model, batches: Iterable[dict], device=None) -> tuple[float, int]:
    """(summed next-token NLL in nats, target tokens) of ``model`` over batches ``{"input", "target"}`` of int64
    ``(B, T)`` tensors; eval mode, float32 logits, summed in float64."""
    device = device if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    try:
        for b in batches:
            x, y = b["input"].to(device), b["target"].to(device)
            logits = model(x).float()
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").double()
            tokens += y.numel()
    finally:
        model.train(was_training)
    return float(nll), tokens


def lm_scores(nll: float, tokens: int, n_bytes: float, n_words: float) -> dict:
    """Perplexity, bits per token and per byte, word perplexity from a summed NLL (nats) over ``tokens`` targets
    and the bytes and words of the text those targets cover."""
    if tokens <= 0:
        raise ValueError("no tokens were scored")
    return {"nll": nll, "tokens": tokens, "loss": nll / tokens, "ppl": math.exp(min(nll / tokens, 700.0)),
            "bits_per_token": nll / tokens / math.log(2),
            "bits_per_byte": nll / math.log(2) / n_bytes if n_bytes > 0 else None,
            "word_ppl": math.exp(min(nll / n_words, 700.0)) if n_words > 0 else None}


def block_batches(n_blocks: int, block_size: int, max_tokens: int) -> list[np.ndarray]:
    """Blocks ``0 .. n_blocks-1`` in order, ``max(1, max_tokens // block_size)`` a batch."""
    per = max(1, max_tokens // block_size)
    return [np.arange(i, min(i + per, n_blocks)) for i in range(0, n_blocks, per)]


def evaluate_lm(model, data, split: str = "test", max_tokens: int = 4096, accelerator=None,
                limit: Optional[int] = None, progress: bool = False) -> dict:
    """Score every block of ``split`` of ``data`` (an ``LMData``, or anything with ``splits[split]``, ``block_size``
    and ``batch``), or the first ``limit`` blocks; returns ``lm_scores`` with the split's counts and coverage."""
    from tqdm.auto import tqdm

    if split not in data.splits:
        raise UserError(f"the prepared text has no {split!r} split (it has {', '.join(data.splits)}); "
                        f"data.{split}_text unset?")
    s = data.splits[split]
    n_blocks = min(len(s), limit) if limit else len(s)
    rank, world = (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    mine = block_batches(n_blocks, data.block_size, max_tokens)[rank::world]
    bar = tqdm(mine, disable=not progress, desc=f"scoring {split}", unit="batch")
    nll, tokens = score_batches(model, (data.batch(split, ix) for ix in bar), device)
    if world > 1:
        sums = accelerator.reduce(torch.tensor([nll, float(tokens)], dtype=torch.float64, device=device), "sum")
        nll, tokens = float(sums[0]), int(round(float(sums[1])))
    assert tokens == n_blocks * data.block_size, (tokens, n_blocks, data.block_size)
    if not math.isfinite(nll):
        raise NonFiniteLogits(f"the model produced non-finite logits: the summed negative log-likelihood of the "
                              f"{tokens} tokens of {n_blocks} {split} block(s) is {nll}")
    coverage = tokens / s.n_tokens
    scores = lm_scores(nll, tokens, s.n_bytes * coverage, s.n_words * coverage)
    scores.update(blocks=n_blocks, block_size=data.block_size, coverage=coverage, bytes=s.n_bytes * coverage,
                  words=s.n_words * coverage, split_tokens=s.n_tokens, split_bytes=s.n_bytes, split_words=s.n_words,
                  split_docs=s.n_docs)
    return scores


def evaluate_lm_run(run_dir: str | Path, split: str = "test", checkpoint: str = RunDir.BEST, accelerator=None,
                    max_tokens: Optional[int] = None, limit: Optional[int] = None, model=None) -> dict:
    """Score ``split`` of a decoder-only run's text with ``checkpoint``, write ``eval_<split>_<checkpoint>
    [_limit<N>].json`` (``RunDir.eval_file``; ``RunDir.find_eval`` finds the full best one), refresh
    ``results.md`` and print one line; returns the scores. ``max_tokens``: tokens a batch (default the run's
    ``train.max_tokens`` or ``EVAL_MAX_TOKENS``, the larger: without gradients a batch holds little besides its
    logits, and small batches are slow); ``limit``: only the first N blocks."""
    from ..data import prepare_lm_data

    run = RunDir(run_dir)
    is_main = accelerator is None or accelerator.is_main_process
    device = accelerator.device if accelerator is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = ckpt_lib.load_run_config_from(ckpt_lib.resolve(run.path, checkpoint))
    if cfg.model.arch != "decoder_only":
        raise UserError(f"{run.path} is an {cfg.model.arch} (translation) run, scored by BLEU: use "
                        f"`transformer-ln evaluate` (evaluation.evaluate.evaluate_run)")
    if max_tokens is not None and max_tokens <= 0:
        raise UserError(f"max_tokens: got {max_tokens}, must be a positive number of tokens")
    if limit is not None and limit <= 0:
        raise UserError(f"--limit: got {limit}, must be a positive number of blocks")
    from .scored_weights import load_scored, weights_sha256

    where = f"{checkpoint} of {run.path}"
    if model is None:
        where = str(ckpt_lib.resolve(run.path, checkpoint))
        model, cfg, scored = load_scored(run.path, checkpoint, device)  # and which weights: update and hash
    else:
        scored = {"update": None, "weights_sha256": weights_sha256(model)}
    data = prepare_lm_data(cfg, run.path, accelerator, progress=is_main)  # the run's cache, memory-mapped
    max_tokens = max_tokens or max(cfg.train.max_tokens, EVAL_MAX_TOKENS)
    try:
        scores = evaluate_lm(model, data, split, max_tokens, accelerator, limit, progress=is_main)
    except NonFiniteLogits as e:
        raise nonfinite_error(model, where, str(e)) from None
    scores = {"task": "language_model", "split": split, "checkpoint": checkpoint, **scored, "limit": limit or None,
              "n": scores["blocks"], **scores}
    if is_main:
        path = run.eval_file(split, checkpoint, limit)
        write_text(path, json.dumps(scores, indent=1))
        run.write_results()
        bpb = "n/a" if scores["bits_per_byte"] is None else f"{scores['bits_per_byte']:.4f}"
        wppl = "n/a" if scores["word_ppl"] is None else f"{scores['word_ppl']:.2f}"
        print(f"{split}: perplexity {scores['ppl']:.2f}  bits/byte {bpb}  word perplexity {wppl}  "
              f"({scores['tokens']} tokens in {scores['blocks']} blocks of {scores['block_size']}, "
              f"{100 * scores['coverage']:.1f}% of the split; wrote {path.name})", flush=True)
    return scores
