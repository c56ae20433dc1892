"""Batched greedy and beam search over a ``Seq2SeqTransformer``, with fairseq's semantics.

Why fairseq's: the paper's BLEU figures come from fairseq's ``SequenceGenerator``, so the same rules give comparable
scores. Per sentence, the output holds at most ``int(max_len_a * src_len + max_len_b)`` tokens (``src_len`` counts
the sentence's non-pad source tokens, so a sentence's translation does not depend on what it is batched with), at
least one token, never BOS or pad. A beam hypothesis that ends with EOS is finished with the score
``sum(log p) / (len + 1) ** lenpen`` (``len + 1`` counts the EOS, as fairseq); a sentence stops once ``beam``
hypotheses are finished or its maximum length is reached, and the best finished one is returned. Candidates are
the top ``2 * beam`` extensions of all beams; EOS among the top ``beam`` of them are finished, the best ``beam``
non-EOS ones continue. Finished sentences leave the batch, so the rest decode faster.

Logits that are NaN or +inf (non-finite weights, or an overflow) cannot rank tokens: the search raises
``NonFiniteLogits`` (checked after the first step and at the end, so without an extra device sync a step) instead of
returning empty or arbitrary hypotheses. ``check_search`` refuses settings without a meaning (beam < 1, a negative or
non-finite length penalty or length limit) with one ``ValueError`` naming the setting.

``use_cache=True`` feeds one new token per step and keeps keys and values in a ``DecoderCache``;
``use_cache=False`` recomputes the whole prefix each step. Both give the same output; the second is the baseline
of ``benchmarks/decode.py``.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError

__all__ = ["greedy_search", "beam_search", "max_lengths", "check_search", "NonFiniteLogits",
           "nonfinite_error"]


class NonFiniteLogits(ValueError):
    """The model produced NaN or +inf logits, so no token can be ranked (its weights are non-finite, or a layer
    overflowed). The evaluation commands turn it into one line naming the checkpoint."""


def check_search(beam: int = 1, lenpen: float = 1.0, max_len_a: float = 0.0, max_len_b: int = 0) -> None:
    """One ``ValueError`` ``"<setting>: got <value>, must be ..."`` for the first setting without a meaning."""
    if isinstance(beam, bool) or not isinstance(beam, numbers.Integral) or beam < 1:
        raise ValueError(f"beam: got {beam!r}, must be a whole number >= 1 (1: greedy)")
    if isinstance(lenpen, bool) or not isinstance(lenpen, numbers.Real) or not (math.isfinite(lenpen)
                                                                                 and lenpen >= 0):
        raise ValueError(f"lenpen: got {lenpen!r}, must be a finite number >= 0 (finished hypotheses score "
                         "log-probability / length^lenpen: 0 none, 1 per token; < 1 favours shorter output, "
                         "> 1 longer)")
    if isinstance(max_len_a, bool) or not isinstance(max_len_a, numbers.Real) or not (math.isfinite(max_len_a)
                                                                                       and max_len_a >= 0):
        raise ValueError(f"max_len_a: got {max_len_a!r}, must be a finite number >= 0 (longest output: "
                         "max_len_a * source length + max_len_b tokens)")
    if isinstance(max_len_b, bool) or not isinstance(max_len_b, numbers.Integral) or max_len_b < 0:
        raise ValueError(f"max_len_b: got {max_len_b!r}, must be a whole number >= 0 (longest output: "
                         "max_len_a * source length + max_len_b tokens)")


def nonfinite_error(model, checkpoint: str, detail: str) -> UserError:
    """One line for a model that produced non-finite logits (``detail`` says where): the checkpoint's non-finite
    weights (how many, in which tensors) when it has any, else an overflow with finite weights; and what to do."""
    bad = {}
    for name, t in model.state_dict().items():
        if t.is_floating_point():
            n = int((~torch.isfinite(t)).sum())
            if n:
                bad[name] = n
    todo = ("use another checkpoint (--checkpoint update_<n>, one from before the weights went bad) or retrain; "
            "`transformer-ln analyze curves RUN` shows where the run went wrong")
    if bad:
        first = ", ".join(list(bad)[:2]) + (", ..." if len(bad) > 2 else "")
        return UserError(f"checkpoint {checkpoint} has non-finite weights ({sum(bad.values())} NaN/inf values in "
                         f"{len(bad)} tensor(s): {first}): {detail}, so its outputs are meaningless; {todo}")
    return UserError(f"checkpoint {checkpoint}: {detail} although its weights are finite (an overflow in the "
                     f"forward pass), so its outputs are meaningless; {todo}")


def _nonfinite(lprobs: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor (no sync): any NaN among log-probabilities, i.e. a NaN or +inf logit."""
    return torch.isnan(lprobs).any()


def _raise_if(flag: torch.Tensor, step: int) -> None:
    if bool(flag):
        raise NonFiniteLogits(f"the model produced non-finite logits (NaN or +inf) by decoding step {step + 1}")


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


def _apply_bans(lprobs: torch.Tensor, step: int, banned: list[int], eos: int,
                forced_end: torch.Tensor) -> torch.Tensor:
    """fairseq's rules on log-probabilities (rows, V): never pad/BOS, no EOS first, only EOS at the length limit.

    ``forced_end`` (rows,) bool marks rows at their maximum length.
    """
    lprobs[:, banned] = -torch.inf
    if step == 0:  # min length 1
        lprobs[:, eos] = -torch.inf
    not_eos = torch.ones(lprobs.shape[1], dtype=torch.bool, device=lprobs.device)
    not_eos[eos] = False
    return lprobs.masked_fill(forced_end[:, None] & not_eos[None, :], -torch.inf)


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the last position, in float32 at least (float64 stays float64)."""
    logits = logits[:, -1]
    return F.log_softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, dim=-1)


def _step_lprobs(model: nn.Module, tokens: torch.Tensor, step: int, memory: torch.Tensor, src: torch.Tensor,
                 cache, banned: list[int], eos: int, forced_end: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """Log-probabilities (rows, V) of the token after position ``step``, with fairseq's bans applied; ``bad``
    (0-d bool) is or-ed in place with whether any of them is NaN."""
    inp = tokens[:, step:step + 1] if cache is not None else tokens[:, :step + 1]
    lprobs = _log_softmax(model.decode(inp, memory, src, cache, last_only=True))
    bad |= _nonfinite(lprobs)
    return _apply_bans(lprobs, step, banned, eos, forced_end)


def greedy_search(model: nn.Module, src: torch.Tensor, max_len_a: float = 1.2, max_len_b: int = 10, bos: int = 1,
                  eos: int = 2, use_cache: bool = True) -> list[list[int]]:
    """Best token at every step; equals ``beam_search(..., beam=1)``. Returns token ids without BOS/EOS."""
    check_search(1, 1.0, max_len_a, max_len_b)
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
        bad = torch.zeros((), dtype=torch.bool, device=dev)
        for step in range(T + 1):
            lprobs = _step_lprobs(model, tokens, step, memory, src, cache, banned, eos, max_len <= step, bad)
            if step == 0:
                _raise_if(bad, step)
            nxt = lprobs.argmax(dim=-1).masked_fill(finished, pad)
            tokens[:, step + 1] = nxt
            finished |= nxt == eos
            if bool(finished.all()):
                break
        _raise_if(bad, step)
        out = []
        for row in tokens[:, 1:].tolist():
            out.append(row[:row.index(eos)] if eos in row else [t for t in row if t != pad])
        return out


def beam_search(model: nn.Module, src: torch.Tensor, beam: int = 5, lenpen: float = 1.0, max_len_a: float = 1.2,
                max_len_b: int = 10, bos: int = 1, eos: int = 2, use_cache: bool = True,
                cuda_graph: bool = False) -> list[list[int]]:
    """Batched beam search (module docstring); one best hypothesis per source row, without BOS/EOS.

    ``cuda_graph=True`` (opt-in, with ``use_cache`` on a CUDA device) decodes with a fixed-shape cache and replays
    one captured CUDA graph per step; finished sentences then stay in the batch (ignored), since shapes must not
    change. Same output; on a CPU it runs the same static path without a graph (for tests). It is off by default
    until ``tests/test_search.py::test_cuda_graph_beam_equals_eager_beam`` has run on a GPU.
    """
    check_search(beam, lenpen, max_len_a, max_len_b)
    with _inference(model):
        return _beam_search(model, src, beam, lenpen, max_len_a, max_len_b, bos, eos, use_cache, cuda_graph)


class _DynamicStep:
    """Decoder steps over the live sentences only; finished sentences leave the batch (and the cache)."""

    def __init__(self, model: nn.Module, memory: torch.Tensor, src_rows: torch.Tensor, use_cache: bool):
        self.model, self.memory, self.src_rows = model, memory, src_rows
        self.cache = model.new_cache() if use_cache else None

    def __call__(self, tokens: torch.Tensor, step: int) -> torch.Tensor:
        inp = tokens[:, step:step + 1] if self.cache is not None else tokens[:, :step + 1]
        return _log_softmax(self.model.decode(inp, self.memory, self.src_rows, self.cache, last_only=True))

    def reorder(self, order: torch.Tensor, reduced: bool) -> None:
        if reduced:
            self.memory, self.src_rows = self.memory.index_select(0, order), self.src_rows.index_select(0, order)
        if self.cache is not None:
            self.cache.reorder(order, cross=reduced)


class _StaticStep:
    """Decoder steps over all rows with a ``StaticDecoderCache``; with ``graph`` one CUDA graph is replayed.

    Step 0 runs eagerly (it also projects the encoder keys and values); the graph is captured at step 1 and holds
    the beam reorder of the cache, the decoder and the log-softmax, reading ``tok``, ``order`` and ``cache.pos``.
    """

    def __init__(self, model: nn.Module, memory: torch.Tensor, src_rows: torch.Tensor, max_len: int, graph: bool):
        rows = memory.shape[0]
        self.model, self.memory, self.src_rows, self.use_graph = model, memory, src_rows, graph
        self.cache = model.new_static_cache(rows, max_len, dtype=memory.dtype, device=memory.device)
        self.tok = torch.zeros(rows, 1, dtype=torch.long, device=memory.device)
        self.order = torch.arange(rows, device=memory.device)
        self.identity = self.order.clone()
        self.graph = None
        self.out: torch.Tensor | None = None

    def _run(self) -> torch.Tensor:
        if self.use_graph:
            self.cache.reorder(self.order)
        return _log_softmax(self.model.decode(self.tok, self.memory, self.src_rows, self.cache, last_only=True))

    def __call__(self, tokens: torch.Tensor, step: int) -> torch.Tensor:
        self.tok.copy_(tokens[:, step:step + 1])
        self.cache.pos.fill_(step)
        if not self.use_graph or step == 0:
            return self._run()
        if self.graph is None:  # capture once; the reorder for this step is done first, so replays are idempotent
            self.cache.reorder(self.order)
            self.order.copy_(self.identity)
            try:
                self._capture()
            except Exception as e:  # a kernel that cannot be captured: same results, eager speed
                warnings.warn(f"beam search: CUDA graph capture failed ({type(e).__name__}: {e}); "
                              "decoding without a graph", RuntimeWarning)
                self.use_graph, self.graph = False, None
                return self._run()
        self.graph.replay()
        return self.out.clone()

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._run()  # warm-up outside the capture, as CUDA graphs require (idempotent, see above)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.out = self._run()
        self.graph = graph

    def reorder(self, order: torch.Tensor, reduced: bool) -> None:
        if self.use_graph:
            self.order.copy_(order)  # applied at the start of the next replay
        else:
            self.cache.reorder(order)


def _beam_search(model: nn.Module, src: torch.Tensor, K: int, lenpen: float, max_len_a: float, max_len_b: int,
                 bos: int, eos: int, use_cache: bool, cuda_graph: bool) -> list[list[int]]:
    B = src.shape[0]
    pad, dev = model.cfg.pad_id, src.device
    max_lens = max_lengths(model, src, max_len_a, max_len_b)
    T = max(max_lens)
    max_len_t = torch.tensor(max_lens, device=dev)
    banned = sorted({pad, bos} - {eos})
    static = use_cache and cuda_graph

    sent = list(range(B))                      # original index of each live sentence
    sent_t = torch.arange(B, device=dev)
    blocks = torch.arange(B, device=dev)       # the block of K rows each live sentence has in the step's layout
    rows = sent_t.repeat_interleave(K)         # row r = block r // K, beam r % K
    memory = model.encode(src).index_select(0, rows)
    src_rows = src.index_select(0, rows)
    slots = -(-(T + 1) // 16) * 16  # positions 0..T, rounded up so the attention mask's rows stay aligned
    stepper = (_StaticStep(model, memory, src_rows, slots, src.device.type == "cuda") if static
               else _DynamicStep(model, memory, src_rows, use_cache))
    tokens = torch.full((B * K, T + 2), pad, dtype=torch.long, device=dev)
    tokens[:, 0] = bos
    cum = None                                 # cumulative log-probability of each hypothesis, by row
    finals: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    beam_ids = torch.arange(K, device=dev)
    rank = torch.arange(2 * K, device=dev)
    bad = torch.zeros((), dtype=torch.bool, device=dev)  # any NaN log-probability so far (checked at 0 and the end)

    for step in range(T + 1):
        n = len(sent)
        live_rows = (blocks[:, None] * K + beam_ids).view(-1)
        lprobs = stepper(tokens, step)
        if static and n * K < lprobs.shape[0]:
            lprobs = lprobs.index_select(0, live_rows)
        bad |= _nonfinite(lprobs)
        if step == 0:
            _raise_if(bad, step)
        forced = (max_len_t[sent_t] <= step).repeat_interleave(K)
        lprobs = _apply_bans(lprobs, step, banned, eos, forced)
        V = lprobs.shape[1]
        if step == 0:  # all beams hold the same prefix: expand only the first
            lprobs.view(n, K, V)[:, 1:] = -torch.inf
            cum = torch.zeros(B * K, dtype=lprobs.dtype, device=dev)
        cand = (lprobs + cum[live_rows][:, None]).view(n, K * V)
        cand_scores, cand_idx = cand.topk(min(2 * K, K * V), dim=1)
        cand_rows = cand_idx // V + (blocks * K)[:, None]  # rows in the step's layout
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
        reduced = any(done)
        if reduced:  # finished sentences leave the search
            keep_t = torch.tensor([i for i, d in enumerate(done) if not d], device=dev)
            sel_rows, sel_tokens, sel_scores = sel_rows[keep_t], sel_tokens[keep_t], sel_scores[keep_t]
            sent = [sent[i] for i, d in enumerate(done) if not d]
            sent_t, blocks = sent_t[keep_t], blocks[keep_t]
        if static:  # rows keep their place; a live block takes its selected rows, others stay as they are
            order = torch.arange(B * K, device=dev)
            new_rows = (blocks[:, None] * K + beam_ids).view(-1)
            order[new_rows] = sel_rows.view(-1)
        else:  # the layout shrinks to the live sentences, in order
            order = sel_rows.view(-1)
            blocks = torch.arange(len(sent), device=dev)
            new_rows = torch.arange(len(sent) * K, device=dev)
        tokens = tokens.index_select(0, order)
        tokens[new_rows, step + 1] = sel_tokens.view(-1)
        cum = cum.index_select(0, order)
        cum[new_rows] = sel_scores.view(-1)
        stepper.reorder(order, reduced)

    _raise_if(bad, step)
    return [max(f, key=lambda h: h[0])[1] if f else [] for f in finals]
