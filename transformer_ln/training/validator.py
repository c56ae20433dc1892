"""Validation loss over the valid split (its first ``train.valid_max_sentences`` pairs or blocks, 0: all), and the
probe that checks weights before they are checkpointed.

Both run every process through the same number of forward passes (uncounted fillers where a process has no batch
left: FSDP all-gathers parameters in each), in eval mode, without drawing from the RNG, so neither changes the run.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from . import update as upd
from .divergence import DivergenceGuard
from .state import State


class Validator:
    """Measures ``model`` on the ``valid`` split of ``data`` and judges new weights with the divergence guard."""

    def __init__(self, data, task, accelerator, max_tokens: int, guard: DivergenceGuard, to_device: Callable,
                 max_examples: int = 0):
        self.data, self.task, self.accelerator = data, task, accelerator
        self.max_tokens, self.guard, self.to_device = max_tokens, guard, to_device
        self.max_examples = max_examples  # 0: the whole split

    def sampler(self):
        """The valid split's batches in a fixed order, cut to its first ``max_examples`` pairs (blocks): the same
        examples at every validation, whatever the order the batches are packed in."""
        acc = self.accelerator
        sampler = self.data.sampler("valid", self.max_tokens, seed=0, shuffle=False,
                                    num_shards=acc.num_processes, shard_id=acc.process_index)
        if self.max_examples:
            kept = (b[b < self.max_examples] for b in sampler.batches)
            sampler.batches = [b for b in kept if len(b)]
        return sampler

    @torch.no_grad()
    def validate(self, model, st: State, record: Callable[[dict], None], log: Callable[[str], None]) -> dict | None:
        """Validation loss, nll and perplexity (bits) into the metrics; a new lowest loss marks ``best_pending``
        unless it failed the divergence check (then ``bad_valid_update``)."""
        if not len(self.data.splits.get("valid") or ()):
            return None
        acc = self.accelerator
        st.last_valid_update = st.update
        sampler = self.sampler()
        mine = sampler.shard_arrays()
        mine += [None] * (sampler.batches_per_shard - len(mine))  # the same forward passes on every process
        model.eval()
        batches = (self.to_device(self.data.batch("valid", ix)) if ix is not None else None for ix in mine)
        sums = upd.loss_sums(acc, model, batches, self.task).tolist()
        loss = sums[0] / max(sums[2], 1) / math.log(2)
        nll = sums[1] / max(sums[2], 1) / math.log(2)
        rec = {"kind": "valid", "update": st.update, "epoch": st.epoch, "loss": loss, "nll": nll,
               "ppl": 2 ** min(nll, 1000.0), "examples": sum(len(b) for b in sampler.batches)}
        bad = self.guard.verdict(loss)
        if bad:
            rec["diverged"] = bad
            st.bad_valid_update = st.update
        record(rec)
        log(f"valid @ update {st.update}: loss {loss:.3f}  nll {nll:.3f}  ppl {rec['ppl']:.2f}"
            + (f"  (first {rec['examples']}: train.valid_max_sentences)" if self.max_examples else "")
            + (f"  ({bad}: not a candidate for best)" if bad else ""))
        if not bad and (st.best_valid_loss is None or loss < st.best_valid_loss):
            st.best_valid_loss, st.best_valid_nll = loss, nll
            st.best_pending = True
        return rec

    def verdict(self, model, st: State, next_group: Callable[[], list]) -> Optional[str]:
        """Why the current weights must not be checkpointed, or None: their validation loss failed the guard, or
        the loss of the batches the next update would train on (the probe) does."""
        if st.bad_valid_update == st.update:
            return "the validation loss failed the divergence check"
        why = self.guard.verdict(upd.probe_loss(self.accelerator, model, next_group(), self.task))
        return f"the next batch's {why}" if why else None
