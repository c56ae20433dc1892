"""What FSDP changes for the trainer: whole-model state in and out of a sharded model.

Under ``accelerate``'s FSDP2 (``fully_shard``) each process holds a shard of every parameter and optimizer moment,
and a forward pass all-gathers parameters: every process must run the same number of forward passes. The trainer
keeps one checkpoint format for every launch (``checkpoint``): the *full* state, gathered here with
``torch.distributed.checkpoint.state_dict`` (``full_state_dict=True``, offloaded to the main process's CPU) and
written by the main process, so a run trained sharded resumes sharded, under DDP or in one process, and
``evaluate``/``analyze`` read it as any other. Loading goes the other way: every process reads the full state
and keeps its shard.

Without FSDP every function here is the plain ``state_dict`` / ``load_state_dict`` of the module, so the trainer has
one code path.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from ..errors import UserError

FSDP1_UNSUPPORTED = (
    "this run was launched with FSDP version 1 (accelerate's default); the trainer supports accelerate's FSDP2 "
    "(fully_shard): launch with `accelerate launch --use_fsdp --fsdp_version 2 ...` (or `fsdp_version: 2` in the "
    "accelerate config)")
FSDP_NOT_ENABLED = (
    "this run was launched with FSDP (`--use_fsdp` / ACCELERATE_USE_FSDP=true) but accelerate did not shard the "
    "model: accelerate enables FSDP only on accelerator devices (GPUs), never for CPU processes, and would train "
    "plain DDP instead. On CPUs launch with `accelerate launch --multi_gpu --num_processes N ... --cpu` (DDP)")


def is_sharded(acc) -> bool:
    """True when ``acc`` shards the model (accelerate's FSDP; ``check_launch`` admits version 2 only)."""
    from accelerate.utils import DistributedType

    return acc is not None and acc.distributed_type == DistributedType.FSDP


def fsdp_requested() -> bool:
    """Whether the launch asked for FSDP (``accelerate launch --use_fsdp`` or an FSDP config set this)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def check_request() -> None:
    """Before the accelerator is built: FSDP1 (accelerate's default version) is one line, not a failure inside
    accelerate's plugin."""
    if fsdp_requested() and os.environ.get("FSDP_VERSION", "1") != "2":
        raise UserError(FSDP1_UNSUPPORTED)


def check_launch(acc) -> None:
    """After: one line instead of a silent change of plan when FSDP was asked for and accelerate did not shard."""
    if is_sharded(acc) and not acc.is_fsdp2:
        raise UserError(FSDP1_UNSUPPORTED)
    if fsdp_requested() and not is_sharded(acc):
        raise UserError(FSDP_NOT_ENABLED)


def describe(model: nn.Module, acc) -> str:
    """One line for the log: how much of the model this process holds."""
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    return (f"FSDP2: {acc.num_processes} processes, process {acc.process_index} holds {local:,} of the "
            f"{total:,} parameter values ({local / max(total, 1):.0%})")


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps torch's


def full_model_state(model: nn.Module, acc) -> dict[str, torch.Tensor]:
    """The unsharded ``state_dict`` on the main process's CPU ({} elsewhere); collective under FSDP."""
    if not is_sharded(acc):
        return model.state_dict()
    return acc.get_state_dict(model)  # FSDP2: get_model_state_dict(full_state_dict, cpu_offload)


def full_optimizer_state(model: nn.Module, optimizer, acc) -> dict:
    """``optimizer.state_dict()`` of the whole model (integer parameter ids, as torch writes it) on the main
    process ({} elsewhere); collective under FSDP."""
    if not is_sharded(acc):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    by_name = get_optimizer_state_dict(model, _inner(optimizer),
                                       options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not acc.is_main_process:
        return {}
    ids = {name: i for i, name in enumerate(n for g in by_name["param_groups"] for n in g["params"])}
    return {"state": {ids[name]: s for name, s in by_name["state"].items()},
            "param_groups": [{**g, "params": [ids[n] for n in g["params"]]} for g in by_name["param_groups"]]}


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], acc) -> None:
    """Load a full ``state_dict`` (every process passes it); each process keeps its shard under FSDP."""
    if not is_sharded(acc):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    # A tied weight (shared embeddings) is one parameter under several names; torch shards it under its first
    # name only, so it is loaded under that name and the other names are expected to be missing.
    keys = set(model.state_dict())
    first = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    own, tied = keys & first, keys - first
    missing, unexpected = set(own - set(state)), set(state) - own - tied
    if missing or unexpected:
        raise ValueError(f"state does not fit the model: missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]}")
    result = set_model_state_dict(model, {k: v for k, v in state.items() if k in own},
                                  options=StateDictOptions(full_state_dict=True, strict=False))
    left = set(result.missing_keys) - tied
    if left or result.unexpected_keys:
        raise ValueError(f"state does not fit the model: missing {sorted(left)[:3]}, "
                         f"unexpected {sorted(result.unexpected_keys)[:3]}")


def load_optimizer_state(model: nn.Module, optimizer, state: dict, acc) -> None:
    """Load a full ``optimizer.state_dict()`` written by ``full_optimizer_state`` (or by an unsharded run)."""
    if not is_sharded(acc):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = [n for n, p in model.named_parameters() if p.requires_grad]  # the optimizer's order (build_optimizer)
    n_ids = sum(len(g["params"]) for g in state["param_groups"])
    if n_ids != len(names):
        raise ValueError(f"the checkpoint's optimizer holds {n_ids} parameters, the model {len(names)}")
    by_name = {"state": {names[i]: s for i, s in state["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, _inner(optimizer), by_name, options=StateDictOptions(full_state_dict=True))


def full_copy(model: nn.Module, acc, build) -> nn.Module | None:
    """An unsharded copy of ``model`` on the main process's CPU (``build()`` makes the empty module), None
    elsewhere; collective under FSDP. Without FSDP, ``model`` itself."""
    if not is_sharded(acc):
        return model
    state = full_model_state(model, acc)
    if not acc.is_main_process:
        return None
    copy = fresh(build)
    copy.load_state_dict(state)
    return copy.train(model.training)


def fresh(build) -> nn.Module:
    """``build()`` without drawing from the global RNG: a copy made on one process must not change that process's
    dropout masks (and with them the run) from the update it was made at."""
    with torch.random.fork_rng(devices=[]):
        return build()
