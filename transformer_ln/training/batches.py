"""The training batches of a run, epoch by epoch: this process's shard of the sampler's order, as index arrays into
the memory-mapped split, padded with ``None`` so every process runs the same number of micro-batches."""
from __future__ import annotations

import torch


class EpochBatches:
    """Batches of the ``train`` split of ``data`` (a task's prepared data) for one process of ``accelerator``."""

    def __init__(self, data, max_tokens: int, seed: int, accelerator):
        self.data, self.max_tokens, self.seed, self.accelerator = data, max_tokens, seed, accelerator
        self.sampler = data.sampler("train", max_tokens, seed=seed, shuffle=True,
                                    num_shards=accelerator.num_processes, shard_id=accelerator.process_index)
        self._cached: tuple[int, list] = (-1, [])

    def of_epoch(self, epoch: int) -> list:
        """This process's batches for ``epoch`` (index arrays, views of the sampler's order; ``None`` pads)."""
        if self._cached[0] != epoch:
            self.sampler.set_epoch(epoch)
            mine: list = self.sampler.shard_arrays()
            per_shard = getattr(self.sampler, "batches_per_shard", len(mine))
            self._cached = (epoch, mine + [None] * (per_shard - len(mine)))
        return self._cached[1]

    def to_device(self, batch: dict) -> dict:
        dev = self.accelerator.device
        pin = dev.type == "cuda"
        return {k: (v.pin_memory().to(dev, non_blocking=True) if pin else v.to(dev))
                if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def collate(self, ix) -> dict | None:
        """The training batch at positions ``ix``, gathered from the memory-mapped split, on the device."""
        return None if ix is None else self.to_device(self.data.batch("train", ix))

    def next_group(self, epoch: int, done: int, k: int) -> list[dict | None]:
        """The ``k`` micro-batches the next update would train on, ``done`` batches into ``epoch`` (the next
        epoch's first when this one is done)."""
        batches = self.of_epoch(epoch)
        if done < len(batches):
            return [self.collate(ix) for ix in batches[done:done + k]]
        return [self.collate(ix) for ix in self.of_epoch(epoch + 1)[:k]]

    def first_global_batch(self) -> dict:
        """The first batch of epoch 1 over the whole split, the same on every process (for a scheme's
        calibration)."""
        whole = self.data.sampler("train", self.max_tokens, seed=self.seed, shuffle=True)
        whole.set_epoch(1)
        return self.to_device(self.data.batch("train", next(iter(whole))))
