"""The task seam: what the training loop needs from a model and its data, and nothing about how it trains.

A ``Task`` prepares the data (and completes the config with what the data decides, such as the vocabulary), builds
the model from ``cfg.model``, turns a batch into the summed loss the update divides by the global token count, says
what the model is fed (for a scheme's calibration), and runs the end-of-run evaluation. The trainer, checkpoints,
resume, divergence guard, FSDP and trackers call these and never ask which task runs. ``cfg.task`` picks one from
``TASKS``: ``translation`` (source -> target pairs into the encoder-decoder, BLEU at the end) or ``language_model``
(text packed into blocks for the decoder-only model, perplexity at the end), which ``model.arch`` implies.
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

    def check_sources(self) -> None:
        """A cheap check that the configured data exists, before a run deletes or builds anything."""

    def prepare(self, run_dir: Path, accelerator, progress: bool = True):
        """The prepared data (``sampler(split, ...)``, ``batch(split, positions)``, ``splits``); ``self.cfg`` is
        completed by it (the vocabulary, the data settings a prepared directory fixes)."""
        raise NotImplementedError

    def build_model(self, model_cfg) -> nn.Module:
        raise NotImplementedError

    def over_budget(self, data, max_tokens: int) -> str | None:
        """One line when some training batches must exceed ``max_tokens`` (a batch holds at least one example or
        block, whatever the budget), else None."""
        return None

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

    def check_sources(self) -> None:
        from ..data.corpus import check_sources

        check_sources(self.cfg.data)

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

    def over_budget(self, data, max_tokens: int) -> str | None:
        from ..data.batching import token_cost

        cost = token_cost(*data.lengths("train"))
        over = int((cost > max_tokens).sum())
        if not over:
            return None
        return (f"train.max_tokens={max_tokens} is below the size of {over} of {len(cost)} training pairs (up to "
                f"{int(cost.max())} tokens with padding): each of those is a batch of its own, larger than the limit; "
                f"raise train.max_tokens to at least {int(cost.max())} to keep every batch within it")

    def inputs(self, batch: dict) -> tuple:
        return batch["src"], batch["tgt_in"]

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(batch["src"], batch["tgt_in"])
        return label_smoothed_nll_loss(logits, batch["tgt_out"], self.cfg.optim.label_smoothing,
                                       self.cfg.model.pad_id, self.cfg.optim.z_loss)

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


class LanguageModelTask(Task):
    """Text packed into fixed-length blocks (``data.block_size``) for a decoder-only ``CausalLM``: next-token
    cross-entropy over every position of a block (``optim.label_smoothing`` as for translation; 0 is the usual
    choice for a language model), test perplexity with the best checkpoint at the end (``train.bleu_at_end``)."""

    name = "language_model"

    def check_sources(self) -> None:
        from ..data.lm_text import check_lm_sources

        check_lm_sources(self.cfg.data)

    def prepare(self, run_dir: Path, accelerator, progress: bool = True):
        from ..data.lm_prepare import prepare_lm_data

        cfg = self.cfg
        if cfg.data.block_size > cfg.model.max_positions:
            raise UserError(f"data.block_size: got {cfg.data.block_size}, more than model.max_positions="
                            f"{cfg.model.max_positions}; lower the block or raise max_positions")
        data = prepare_lm_data(cfg, run_dir, accelerator, progress=progress)
        model = {**cfg.model.to_dict(), "tgt_vocab_size": data.vocab_size}
        self.cfg = RunConfig.from_dict({**cfg.to_dict(), "model": model, "data": data.data_config.to_dict()})
        return data

    def build_model(self, model_cfg) -> nn.Module:
        from ..model.causal_lm import CausalLM

        return CausalLM(model_cfg)

    def over_budget(self, data, max_tokens: int) -> str | None:
        if max_tokens >= data.block_size:
            return None
        return (f"train.max_tokens={max_tokens} is below one block (data.block_size={data.block_size} tokens): "
                f"every batch holds one block, larger than the limit; raise train.max_tokens to at least "
                f"{data.block_size} or lower data.block_size")

    def inputs(self, batch: dict) -> tuple:
        return (batch["input"],)

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return label_smoothed_nll_loss(model(batch["input"]), batch["target"], self.cfg.optim.label_smoothing,
                                       self.cfg.model.pad_id, self.cfg.optim.z_loss)

    def empty_batch(self, device) -> dict:
        one = torch.full((1, 2), 4, dtype=torch.long, device=device)
        return {"input": one, "target": one, "ntokens": 0}

    def describe(self) -> str:
        m = self.cfg.model
        return f"{m.residual} LM {m.n_dec_layers}L"

    def summary_fields(self) -> dict:
        m = self.cfg.model
        return {"residual": m.residual, "arch": m.arch, "n_dec_layers": m.n_dec_layers}

    def evaluate_at_end(self, run_dir: Path, accelerator) -> None:
        from ..evaluation.lm_eval import evaluate_lm_run

        evaluate_lm_run(run_dir, split="test", checkpoint=RunDir.BEST, accelerator=accelerator)


TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (TranslationTask, LanguageModelTask)}


def get_task(cfg: RunConfig) -> Task:
    """The task ``cfg.task`` names (``train.task``, or the one ``model.arch`` implies), bound to ``cfg``."""
    try:
        return TASKS[cfg.task](cfg)
    except KeyError:
        raise UserError(f"train.task: got {cfg.task!r}, allowed: {', '.join(map(repr, TASKS))}") from None
