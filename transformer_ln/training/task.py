"""The task seam: what the training loop needs from a model and its data, and nothing about how it trains.

A ``Task`` prepares the data (and completes the config with what the data decides, such as the vocabulary), builds
the model from ``cfg.model``, turns a batch into the summed loss the update divides by the global token count, says
what the model is fed (for a scheme's calibration), and runs the end-of-run evaluation. The trainer, checkpoints,
resume, divergence guard, FSDP and trackers call these and never ask which task runs. ``train.task`` picks one from
``TASKS``; ``translation`` (source -> target pairs, label-smoothed cross-entropy, BLEU at the end) is the one today.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..config.run_config import RunConfig
from ..errors import UserError
from ..runs.rundir import RunDir
from .losses import label_smoothed_nll_loss


class Task:
    """The interface; a batch is a dict of tensors holding at least ``ntokens`` (the tokens its loss sums over)."""

    name = ""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    def prepare(self, run_dir: Path, accelerator, progress: bool = True):
        """The prepared data (``sampler(split, ...)``, ``batch(split, positions)``, ``splits``); ``self.cfg`` is
        completed by it (the vocabulary, the data settings a prepared directory fixes)."""
        raise NotImplementedError

    def build_model(self, model_cfg) -> nn.Module:
        raise NotImplementedError

    def inputs(self, batch: dict) -> tuple:
        """What the model is called with for ``batch`` (also what a scheme's calibration feeds it)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(label-smoothed loss, nll), each summed over the batch's ``ntokens`` target tokens."""
        raise NotImplementedError

    def empty_batch(self, device) -> dict:
        """A one-token batch with ``ntokens`` 0: a process without data still joins the collective operations."""
        raise NotImplementedError

    def describe(self) -> str:
        """A few words for the progress bar."""
        return self.cfg.model.residual

    def summary_fields(self) -> dict:
        """What ``summary.json`` records about the model besides the loop's own fields."""
        return {"residual": self.cfg.model.residual}

    def evaluate_at_end(self, run_dir: Path, accelerator) -> None:
        """The task's score of the finished run (written into the run directory); nothing by default."""


class TranslationTask(Task):
    """Source -> target pairs into an encoder-decoder; fairseq's recipe: label-smoothed cross-entropy over target
    tokens, sacreBLEU on the test split with the best checkpoint at the end (``train.bleu_at_end``)."""

    name = "translation"

    def prepare(self, run_dir: Path, accelerator, progress: bool = True):
        from ..data import prepare_data

        cfg = self.cfg
        data = prepare_data(cfg, run_dir, accelerator, progress=progress)  # memory-mapped prepared data
        vocab = data.tokenizer.get_vocab_size()
        model = {**cfg.model.to_dict(), "src_vocab_size": vocab, "tgt_vocab_size": vocab}
        self.cfg = RunConfig.from_dict({**cfg.to_dict(), "model": model, "data": data.data_config.to_dict()})
        if not len(data.splits["train"]):
            raise UserError("the training split is empty after filtering; check the data paths and "
                            "model.max_positions")
        return data

    def build_model(self, model_cfg) -> nn.Module:
        from ..model.seq2seq import Seq2SeqTransformer

        return Seq2SeqTransformer(model_cfg)

    def inputs(self, batch: dict) -> tuple:
        return batch["src"], batch["tgt_in"]

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(batch["src"], batch["tgt_in"])
        return label_smoothed_nll_loss(logits, batch["tgt_out"], self.cfg.optim.label_smoothing,
                                       self.cfg.model.pad_id)

    def empty_batch(self, device) -> dict:
        one = torch.full((1, 2), 4, dtype=torch.long, device=device)
        return {"src": one, "tgt_in": one, "tgt_out": one, "ntokens": 0}

    def describe(self) -> str:
        m = self.cfg.model
        return f"{m.residual} {m.n_enc_layers}L-{m.n_dec_layers}L"

    def summary_fields(self) -> dict:
        m = self.cfg.model
        return {"residual": m.residual, "n_enc_layers": m.n_enc_layers, "n_dec_layers": m.n_dec_layers}

    def evaluate_at_end(self, run_dir: Path, accelerator) -> None:
        from ..evaluation.evaluate import evaluate_run

        evaluate_run(run_dir, split="test", checkpoint=RunDir.BEST, accelerator=accelerator, model=None)


TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (TranslationTask,)}


def get_task(cfg: RunConfig) -> Task:
    """The task ``cfg.task`` names (``train.task``, or the one ``model.arch`` implies), bound to ``cfg``."""
    try:
        return TASKS[cfg.task](cfg)
    except KeyError:
        raise UserError(f"train.task: got {cfg.task!r}, allowed: {', '.join(map(repr, TASKS))}") from None
