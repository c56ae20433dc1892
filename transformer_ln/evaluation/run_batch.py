"""A trained run's own validation sentences as the batch its analyses measure on, and ``transformer-ln analyze``'s
entry that hands this reader to them.

The diagnostics sit below the corpus readers on the package's floors (they never import ``data``), so the command
passes ``valid_batch`` in (``diagnostics.cli.main(argv, valid_batch=...)``). A run is measured where it was trained
to work: the first N pairs of its validation split (a decoder-only run: blocks of ``data.block_size`` tokens), the
tensors its trainer validated on, read from the run's prepared data.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import UserError


def valid_batch(run_dir: str | Path, cfg, n: int = 16, device: torch.device | str = "cpu") -> dict:
    """The first ``n`` pairs (blocks) of the validation split of the run in ``run_dir`` (``cfg``: its ``RunConfig``)
    in the trainer's format, with ``"about"``: "valid[:16], 16 sentence pairs" or "valid blocks[:16], 16 blocks of
    256 tokens" (fewer when the split is shorter)."""
    if n < 1:
        raise UserError(f"--batch-size {n}: need at least 1 sentence (block)")
    if cfg.task == "language_model":
        from ..data.lm_prepare import prepare_lm_data

        data = prepare_lm_data(cfg, Path(run_dir))
    else:
        from ..data import prepare_data

        data = prepare_data(cfg, Path(run_dir))
    have = len(data.splits.get("valid") or ())
    if not have:
        raise UserError(f"{run_dir}: its corpus has no validation split to measure on; pass --random-ids for a batch "
                        "of random token ids")
    batch = data.batch("valid", np.arange(min(n, have)))
    k = int(batch["nsentences"])
    if "input" in batch:  # a language model's packed blocks
        about = f"valid blocks[:{k}], {k} blocks of {batch['input'].shape[1]} tokens"
    else:
        about = f"valid[:{k}], {k} sentence pairs"
    return {**{key: v.to(device) for key, v in batch.items() if torch.is_tensor(v)}, "about": about}


def analyze_main(argv: list[str] | None = None) -> int:
    """``transformer-ln analyze``: the analyses' command line, able to read a run's validation sentences."""
    from ..diagnostics.cli import main

    return main(argv, valid_batch=valid_batch)
