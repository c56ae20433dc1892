"""Batched greedy and beam search over a ``Seq2SeqTransformer``, with fairseq's semantics.

Why fairseq's: the paper's BLEU figures come from fairseq's ``SequenceGenerator``, so the same rules give comparable
scores. Per sentence, the output holds at most ``int(max_len_a * src_len + max_len_b)`` tokens (``src_len`` counts
the sentence's non-pad source tokens, so a sentence's translation does not depend on what it is batched with), at
least one token, never BOS or pad. A beam hypothesis that ends with EOS is finished with the score
``sum(log p) / (len + 1) ** lenpen`` (``len + 1`` counts the EOS, as fairseq); a sentence stops once ``beam``
hypotheses are finished or its maximum length is reached, and the best finished one is returned. Candidates are
the top ``2 * beam`` extensions of all beams; EOS among the top ``beam`` of them are finished, the best ``beam``
non-EOS ones continue. Finished sentences leave the batch, so the rest decode faster.

``use_cache=True`` feeds one new token per step and keeps keys and values in a ``DecoderCache``;
``use_cache=False`` recomputes the whole prefix each step. Both give the same output; the second is the baseline
of ``benchmarks/decode.py``.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["greedy_search", "beam_search", "max_lengths"]


@contextlib.contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """Eval mode and inference mode for the search; the caller's train/eval mode comes back afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def max_lengths(model: nn.Module, src: torch.Tensor, max_len_a: float, max_len_b: int) -> list[int]:
    """Per-sentence maximum output length (tokens, EOS excluded), at least 1 and within the position table."""
    src_len = src.ne(model.cfg.pad_id).sum(dim=1).tolist()
    limit = model.cfg.max_positions - 1  # BOS plus max_len tokens must have positions
    return [max(1, min(int(max_len_a * n + max_len_b), limit)) for n in src_len]


def _step_lprobs(model: nn.Module, tokens: torch.Tensor, step: int, memory: torch.Tensor, src: torch.Tensor,
                 cache, banned: list[int], eos: int, forced_end: torch.Tensor) -> torch.Tensor:
    """Log-probabilities (rows, V) of the token after position ``step``, with fairseq's bans applied.

    ``forced_end`` (rows,) bool marks rows at their maximum length: only EOS is allowed there.
    """
    inp = tokens[:, step:step + 1] if cache is not None else tokens[:, :step + 1]
    logits = model.decode(inp, memory, src, cache, last_only=True)[:, -1]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    lprobs = F.log_softmax(logits, dim=-1)
    lprobs[:, banned] = -torch.inf
    if step == 0:  # min length 1
        lprobs[:, eos] = -torch.inf
    not_eos = torch.ones(lprobs.shape[1], dtype=torch.bool, device=lprobs.device)
    not_eos[eos] = False
    return lprobs.masked_fill(forced_end[:, None] & not_eos[None, :], -torch.inf)


def greedy_search(model: nn.Module, src: torch.Tensor, max_len_a: float = 1.2, max_len_b: int = 10, bos: int = 1,
                  eos: int = 2, use_cache: bool = True) -> list[list[int]]:
    """Best token at every step; equals ``beam_search(..., beam=1)``. Returns token ids without BOS/EOS."""
    with _inference(model):
        B = src.shape[0]
        pad, dev = model.cfg.pad_id, src.device
        max_lens = max_lengths(model, src, max_len_a, max_len_b)
        max_len = torch.tensor(max_lens, device=dev)
        T = max(max_lens)
        memory = model.encode(src)
        cache = model.new_cache() if use_cache else None
        tokens = torch.full((B, T + 2), pad, dtype=torch.long, device=dev)
        tokens[:, 0] = bos
        finished = torch.zeros(B, dtype=torch.bool, device=dev)
        banned = sorted({pad, bos} - {eos})
        for step in range(T + 1):
            lprobs = _step_lprobs(model, tokens, step, memory, src, cache, banned, eos, max_len <= step)
            nxt = lprobs.argmax(dim=-1).masked_fill(finished, pad)
            tokens[:, step + 1] = nxt
            finished |= nxt == eos
            if bool(finished.all()):
                break
        out = []
        for row in tokens[:, 1:].tolist():
            out.append(row[:row.index(eos)] if eos in row else [t for t in row if t != pad])
        return out


def beam_search(model: nn.Module, src: torch.Tensor, beam: int = 5, lenpen: float = 1.0, max_len_a: float = 1.2,
                max_len_b: int = 10, bos: int = 1, eos: int = 2, use_cache: bool = True) -> list[list[int]]:
    """Batched beam search (module docstring); one best hypothesis per source row, without BOS/EOS."""
    if beam < 1:
        raise ValueError(f"beam: got {beam}, must be >= 1")
    with _inference(model):
        return _beam_search(model, src, beam, lenpen, max_len_a, max_len_b, bos, eos, use_cache)


def _beam_search(model: nn.Module, src: torch.Tensor, K: int, lenpen: float, max_len_a: float, max_len_b: int,
                 bos: int, eos: int, use_cache: bool) -> list[list[int]]:
    B = src.shape[0]
    pad, dev = model.cfg.pad_id, src.device
    max_lens = max_lengths(model, src, max_len_a, max_len_b)
    T = max(max_lens)
    max_len_t = torch.tensor(max_lens, device=dev)
    banned = sorted({pad, bos} - {eos})

    sent = list(range(B))                      # original index of each active sentence
    sent_t = torch.arange(B, device=dev)
    rows = sent_t.repeat_interleave(K)         # row r = sentence r // K, beam r % K
    memory = model.encode(src).index_select(0, rows)
    src_rows = src.index_select(0, rows)
    tokens = torch.full((B * K, T + 2), pad, dtype=torch.long, device=dev)
    tokens[:, 0] = bos
    cum = torch.zeros(B * K, device=dev)       # cumulative log-probability of each live hypothesis
    finals: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    cache = model.new_cache() if use_cache else None
    beam_ids = torch.arange(K, device=dev)
    rank = torch.arange(2 * K, device=dev)

    for step in range(T + 1):
        n = len(sent)
        forced = (max_len_t[sent_t] <= step).repeat_interleave(K)
        lprobs = _step_lprobs(model, tokens, step, memory, src_rows, cache, banned, eos, forced)
        V = lprobs.shape[1]
        if step == 0:  # all beams hold the same prefix: expand only the first
            lprobs.view(n, K, V)[:, 1:] = -torch.inf
        cand = (lprobs + cum.to(lprobs.dtype)[:, None]).view(n, K * V)
        cand_scores, cand_idx = cand.topk(min(2 * K, K * V), dim=1)
        cand_rows = cand_idx // V + (torch.arange(n, device=dev) * K)[:, None]
        cand_tokens = cand_idx % V
        is_eos = (cand_tokens == eos) & (cand_scores > -torch.inf)

        # finish EOS hypotheses among the top K candidates
        fin = is_eos[:, :K].nonzero().tolist()
        if fin:
            fin_t = torch.tensor(fin, device=dev)
            fin_rows = cand_rows[fin_t[:, 0], fin_t[:, 1]]
            fin_scores = (cand_scores[fin_t[:, 0], fin_t[:, 1]] / (step + 1) ** lenpen).tolist()
            fin_tokens = tokens[fin_rows, 1:step + 1].tolist()
            for (i, _), score, toks in zip(fin, fin_scores, fin_tokens):
                if len(finals[sent[i]]) < K:
                    finals[sent[i]].append((score, toks))
        done = [len(finals[s]) >= K or step >= max_lens[s] for s in sent]
        if all(done):
            break

        # the best K non-EOS candidates of each sentence continue (fairseq's ordering trick)
        n_cand = cand_scores.shape[1]
        _, pick = (is_eos.long() * n_cand + rank[:n_cand]).topk(K, dim=1, largest=False)
        sel_rows, sel_tokens = cand_rows.gather(1, pick), cand_tokens.gather(1, pick)
        sel_scores = cand_scores.gather(1, pick)
        if any(done):  # finished sentences leave the batch
            keep = [i for i, d in enumerate(done) if not d]
            keep_t = torch.tensor(keep, device=dev)
            sel_rows, sel_tokens, sel_scores = sel_rows[keep_t], sel_tokens[keep_t], sel_scores[keep_t]
            sent = [sent[i] for i in keep]
            sent_t = sent_t[keep_t]
            kept_rows = (keep_t[:, None] * K + beam_ids).view(-1)
            memory, src_rows = memory.index_select(0, kept_rows), src_rows.index_select(0, kept_rows)
        order = sel_rows.view(-1)
        tokens = tokens.index_select(0, order)
        tokens[:, step + 1] = sel_tokens.view(-1)
        cum = sel_scores.view(-1)
        if cache is not None:
            cache.reorder(order)

    return [max(f, key=lambda h: h[0])[1] if f else [] for f in finals]
