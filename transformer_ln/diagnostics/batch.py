"""The batches the analyses measure on: random token ids here; a trained run's own validation sentences from
``transformer_ln.evaluation.run_batch`` (the corpus readers sit above the diagnostics, so the command passes it in).

Random ids (seeded, so runs are comparable) serve fresh models, which have no corpus, or a run when asked. Two
formats, the tasks' own: translation ``{"src", "tgt_in", "tgt_out"}`` (``random_batch``) and language model
``{"input", "target"}`` (``random_blocks``: packed blocks, no padding). ``random_batch_for`` makes the one a model
reads (one token sequence per stack it has), ``batch_inputs`` turns either into (the model's inputs, the targets).
Every batch says what it is in ``"about"`` ("valid[:16], 16 sentence pairs", "random ids 4x20"), which the titles,
JSON and tables repeat (``measured_on``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .hooks import sublayers

VOCAB_FIELDS = {"encoder": "src_vocab_size", "decoder": "tgt_vocab_size"}  # the vocabulary each stack reads


def random_batch(vocab_size: int, batch_size: int = 4, seq_len: int = 20, pad_id: int = 0, seed: int = 0,
                 ragged: bool = True, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """``{"src", "tgt_in", "tgt_out"}`` int64 (B, T) of random non-pad tokens, right-padded when ``ragged``.

    Row 0 always has the full length; with ``ragged`` the others are between T/2 and T tokens long, so pad masking
    is exercised. ``tgt_out`` is ``tgt_in`` shifted left by one (a pad at the end).
    """
    if vocab_size < 2:
        raise ValueError(f"vocab_size: got {vocab_size}, need at least one token besides the pad")
    g = torch.Generator().manual_seed(seed)

    def tokens() -> torch.Tensor:
        t = torch.randint(0, vocab_size - 1, (batch_size, seq_len), generator=g)
        t = t + (t >= pad_id).long()  # skip the pad id
        if ragged and batch_size > 1:
            lengths = torch.randint(max(1, seq_len // 2), seq_len + 1, (batch_size,), generator=g)
            lengths[0] = seq_len
            t = t.masked_fill(torch.arange(seq_len)[None, :] >= lengths[:, None], pad_id)
        return t

    src, tgt_in = tokens(), tokens()
    tgt_out = F.pad(tgt_in[:, 1:], (0, 1), value=pad_id)
    return {k: v.to(device) for k, v in (("src", src), ("tgt_in", tgt_in), ("tgt_out", tgt_out))}


def _tokens(g: torch.Generator, vocab_size: int, shape: tuple[int, int], pad_id: int) -> torch.Tensor:
    t = torch.randint(0, vocab_size - 1, shape, generator=g)
    return t + (t >= pad_id).long()  # skip the pad id


def random_blocks(vocab_size: int, batch_size: int = 4, seq_len: int = 20, pad_id: int = 0, seed: int = 0,
                  device: torch.device | str = "cpu") -> dict[str, torch.Tensor | int]:
    """A language model's batch of packed blocks: ``{"input", "target"}`` int64 (B, T) of random non-pad tokens,
    ``target`` the next token of each input position (a block of T + 1 tokens split as the LM task does), and
    ``ntokens`` = B * T. Every position is real: blocks are not padded."""
    if vocab_size < 2:
        raise ValueError(f"vocab_size: got {vocab_size}, need at least one token besides the pad")
    block = _tokens(torch.Generator().manual_seed(seed), vocab_size, (batch_size, seq_len + 1), pad_id)
    return {"input": block[:, :-1].to(device), "target": block[:, 1:].to(device), "ntokens": batch_size * seq_len}


def random_batch_for(model: nn.Module, batch_size: int = 4, seq_len: int = 20, seed: int = 0,
                     device: torch.device | str = "cpu") -> dict:
    """A random batch of the format ``model`` reads: one token sequence per stack it has. An encoder and a decoder
    read (src, tgt_in), ragged as ``random_batch`` (vocabulary: the smaller of the two); a decoder alone reads packed
    blocks of ids (``random_blocks``, its ``tgt_vocab_size``)."""
    cfg = model.cfg
    stacks = list(sublayers(model))
    vocab = min(getattr(cfg, VOCAB_FIELDS[s]) for s in stacks)
    if len(stacks) == 1:
        batch = random_blocks(vocab, batch_size, seq_len, cfg.pad_id, seed, device=device)
    else:
        batch = random_batch(vocab, batch_size, seq_len, cfg.pad_id, seed, device=device)
    return {**batch, "about": f"random ids {batch_size}x{seq_len}" + (f", seed {seed}" if seed else "")}


def batch_inputs(batch: dict) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """``(inputs, targets)`` of a batch of either format: ``((src, tgt_in), tgt_out)`` or ``((input,), target)``;
    the model is called as ``model(*inputs)`` and the analyses take ``(model, *inputs, tgt_out=targets)``."""
    if "input" in batch:
        return (batch["input"],), batch["target"]
    return (batch["src"], batch["tgt_in"]), batch["tgt_out"]


def measured_on(batch: dict, checkpoint: str) -> str:
    """What a title says: the weights and the batch ("run:best, valid[:16], 16 sentence pairs")."""
    return f"{checkpoint}, {batch['about']}" if batch.get("about") else checkpoint
