"""Will the model fit? Its parameter count from the config, without allocating it, and the memory training needs
against what the machine has: a size that cannot fit is one line before the trainer builds the model, not a
600 GB allocation or a ``MemoryError`` deep in ``torch.nn``.

The count builds the model with one layer per stack on the ``meta`` device (shapes, no storage: exact for every
architecture, scheme and component, and as fast for 100,000 layers as for 6) and counts the other layers as copies
of that one. The need is about ``BYTES_PER_PARAMETER`` per parameter (fp32 weights, gradients and Adam's two
moments; mixed precision keeps fp32 master weights), activations not included, so a model refused here could never
train, and one let through may still run out of memory on its batches. Under FSDP every process builds the whole
model once before sharding it and then keeps a share of the rest. On CPU the processes of one machine share its
physical memory (``os.sysconf``); on a GPU each process has its own device's free memory
(``torch.cuda.mem_get_info``).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional

import torch
from torch import nn

from ..errors import UserError

BYTES_PER_PARAMETER = 4 * 4  # fp32 weights, gradients, Adam's first and second moments


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def lower_bound(m) -> int:
    """The weight matrices alone (attention, FFN, embeddings): what ``parameter_count`` falls back on for a model
    too large for even the meta device (a tensor of more than 2^63 bytes)."""
    d, f, vocab = m.d_model, m.d_ff, m.tgt_vocab_size or 0
    if getattr(m, "arch", "") == "decoder_only":
        return m.n_dec_layers * (4 * d * d + 2 * d * f) + vocab * d
    return m.n_enc_layers * (4 * d * d + 2 * d * f) + m.n_dec_layers * (8 * d * d + 2 * d * f) + vocab * d


def parameter_count(build_model: Callable, model_cfg) -> int:
    """Parameters of ``build_model(model_cfg)`` without allocating them (``lower_bound`` where the meta device
    cannot build the model either)."""
    depths = {"n_enc_layers": model_cfg.n_enc_layers, "n_dec_layers": model_cfg.n_dec_layers}
    one = dataclasses.replace(model_cfg, **{k: min(v, 1) for k, v in depths.items()})
    try:
        with torch.device("meta"):
            model = build_model(one)
    except (RuntimeError, NotImplementedError):
        return lower_bound(model_cfg)
    if hasattr(model, "encoder") and hasattr(model, "decoder"):  # encoder-decoder
        stacks = [(model.encoder.layers, depths["n_enc_layers"]), (model.decoder.layers, depths["n_dec_layers"])]
    else:  # decoder-only
        stacks = [(model.layers, depths["n_dec_layers"])]
    return _numel(model) + sum((n - len(layers)) * _numel(layers[0]) for layers, n in stacks if len(layers))


def available(device: torch.device) -> Optional[tuple[int, str]]:
    """(bytes, what they are) this process may use on ``device``, or None where it cannot be told."""
    try:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return free, f"free on the GPU ({torch.cuda.get_device_name(device)})"
        if device.type == "cpu":
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "of physical memory (CPU)"
    except (AttributeError, ValueError, OSError, RuntimeError):
        pass
    return None


def local_processes(accelerator) -> int:
    """The processes of a launch on this machine (they share its memory)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB"):
        if n < 1024 or unit == "YiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def check_fits(build_model: Callable, model_cfg, device: torch.device, processes: int = 1,
               sharded: bool = False) -> int:
    """Refuse (one line) a model whose training cannot fit in ``device``'s memory; returns the parameter count.

    ``processes``: processes on this machine (they share a CPU's memory); ``sharded``: FSDP over them.
    """
    n = parameter_count(build_model, model_cfg)
    have = available(device)
    if have is None:
        return n
    rest = BYTES_PER_PARAMETER - 4
    per_process = n * 4 + n * rest / processes if sharded else n * BYTES_PER_PARAMETER
    need = per_process * (processes if device.type == "cpu" else 1)
    if need <= have[0]:
        return n
    m = model_cfg
    layers = (f"{m.n_dec_layers} layers" if getattr(m, "arch", "") == "decoder_only" else
              f"{m.n_enc_layers}+{m.n_dec_layers} layers")
    raise UserError(f"the model cannot fit: {n:.3g} parameters (model.d_model={m.d_model}, model.d_ff={m.d_ff}, "
                    f"{layers}) need about {_size(need)} to train (4 bytes each for weights, gradients and Adam's "
                    f"two moments{f', {processes} processes' if processes > 1 else ''}, before activations), but "
                    f"this machine has {_size(have[0])} {have[1]}; make model.d_model, model.d_ff or the layer "
                    "counts smaller")
