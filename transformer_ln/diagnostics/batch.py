"""Random token batches for measurements at initialisation (no corpus needed; seeded, so runs are comparable)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
