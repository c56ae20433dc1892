"""Checkpoints that are never half-written and never unpickle arbitrary objects.

A checkpoint is a folder ``<run>/checkpoints/update_<n>`` holding what ``accelerator.save_state`` would (model,
optimizer, RNG per process) plus the trainer's position, in safe formats:

    model.safetensors      the unwrapped model (tied embeddings handled by safetensors' save_model)
    optimizer.pt           optimizer.state_dict(), loaded with torch.load(weights_only=True)
                           (under FSDP both are the whole model's, gathered by ``sharding``: one format for all)
    rng_<rank>.pt          torch (and CUDA) RNG states and Python's random state, weights_only too
    trainer_state.json     update, epoch, batches consumed in the epoch, best valid loss, tokens, wall time
    config.yaml            the run's resolved config

It is written under a temporary name and renamed into place, so a crash leaves either the old or the new one.
``best`` is a copy of the checkpoint with the lowest validation loss; ``averaged`` the mean of the last N. This
module is the format; ``training.checkpointer`` decides when to write, gathers the state under FSDP and keeps
``best``.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model as st_load_model, save_file, save_model as st_save_model

from ..atomic import replace_dir
from ..config.run_config import ConfigError, RunConfig
from ..config.parser import Parser
from ..errors import UserError
from .rundir import RunDir

PREFIX = RunDir.UPDATE_PREFIX


def checkpoints_dir(run_dir: Path) -> Path:
    return RunDir(run_dir).checkpoints


def update_checkpoints(run_dir: Path) -> list[Path]:
    """Complete ``update_<n>`` folders, oldest first."""
    return RunDir(run_dir).update_checkpoints()


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(_flatten(random.getstate()))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _flatten(py_state):
    version, internal, gauss = py_state
    return [version, list(internal), gauss]


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, update: int, whole: torch.nn.Module | None, optim_state: dict, cfg: RunConfig,
                    trainer_state: dict, accelerator=None) -> Path:
    """Write ``checkpoints/update_<update>`` atomically; every process writes its RNG, the main one the rest.

    ``whole`` is the whole model and ``optim_state`` the whole optimizer's ``state_dict()`` (under FSDP gathered
    onto the main process first; the other processes pass what they have). Every process must call it.
    """
    is_main = accelerator is None or accelerator.is_main_process
    rank = 0 if accelerator is None else accelerator.process_index
    final = checkpoints_dir(run_dir) / f"{PREFIX}{update:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(accelerator)
    torch.save(rng_state(), tmp / f"rng_{rank}.pt")
    if is_main:
        st_save_model(whole, str(tmp / "model.safetensors"))
        torch.save(optim_state, tmp / "optimizer.pt")
        (tmp / RunDir.STATE).write_text(json.dumps(trainer_state, indent=1))
        cfg.save(tmp / RunDir.CONFIG)
    _barrier(accelerator)
    if is_main:
        replace_dir(tmp, final)
    _barrier(accelerator)
    return final


def _barrier(accelerator) -> None:
    if accelerator is not None:
        accelerator.wait_for_everyone()


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    for old in update_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def copy_as(src: Path, name: str) -> Path:
    """Copy a checkpoint to ``checkpoints/<name>`` atomically (used for ``best``)."""
    final = src.parent / name
    tmp = src.parent / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    replace_dir(tmp, final)
    return final


def resolve(run_dir: str | Path, which: str = RunDir.BEST) -> Path:
    """``best``, ``last``, ``averaged``, ``update_<n>`` or a checkpoint folder path -> the folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist; pass the train.out_dir of a training run")
    direct = Path(which)
    if direct.is_dir() and (direct / "model.safetensors").is_file():
        return direct
    if which == "last":
        found = update_checkpoints(run_dir)
        if not found:
            raise UserError(f"{run_dir} has no checkpoints yet (expected {checkpoints_dir(run_dir)}/update_*)")
        return found[-1]
    path = checkpoints_dir(run_dir) / which
    if which == RunDir.BEST and not path.is_dir():
        return resolve(run_dir, "last")
    if not (path / "model.safetensors").is_file():
        have = sorted(p.name for p in checkpoints_dir(run_dir).glob("*") if p.is_dir())
        raise UserError(f"no checkpoint {which!r} in {run_dir}; available: {', '.join(have) or 'none'} "
                        "(or best/last; run `transformer-ln average RUN --last N` for averaged)")
    return path


def load_run_config_from(ckpt_or_run: Path) -> RunConfig:
    for candidate in (Path(ckpt_or_run) / RunDir.CONFIG, RunDir(Path(ckpt_or_run).parent.parent).config):
        if candidate.is_file():
            try:
                return RunConfig.load(candidate)
            except ConfigError as e:
                raise UserError(f"{candidate} is not a valid run config: {e}") from None
    raise UserError(f"no config.yaml found for {ckpt_or_run}")


def load_weights(model: torch.nn.Module, ckpt: Path,
                 hint: str | None = "pick another checkpoint with --checkpoint") -> None:
    """Load ``model.safetensors`` into ``model``; a corrupt or mismatched file is one line naming the tensor."""
    from safetensors import safe_open

    path = Path(ckpt) / "model.safetensors"
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise UserError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]} (the file is corrupt or "
                        f"incomplete{'; ' + hint if hint else ''})") from None
    own = model.state_dict()
    for name, shape in shapes.items():
        if name in own and tuple(own[name].shape) != shape:
            raise UserError(f"checkpoint {path} does not match the model: tensor {name} has shape {list(shape)} "
                            f"there but {list(own[name].shape)} in the model built from the config")
    try:
        missing, unexpected = st_load_model(model, str(path), strict=False)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise UserError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]} (the file is corrupt or "
                        f"from another model{'; ' + hint if hint else ''})") from None
    if missing or unexpected:
        raise UserError(f"checkpoint {path} does not match the model: missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]}")


def load_model(run_dir: str | Path, which: str = RunDir.BEST, device: str | torch.device = "cpu"):
    """Rebuild a trained model from its run directory: ``(model in eval mode, RunConfig)``."""
    from ..model.causal_lm import build_model

    ckpt = resolve(run_dir, which)
    cfg = load_run_config_from(ckpt)
    model = build_model(cfg.model)  # the model of the run's task (``training.task`` builds the same)
    load_weights(model, ckpt)
    return model.to(device).eval(), cfg


def _load_tensors(path: Path):
    """``torch.load`` restricted to tensors and plain containers; anything else is refused, never unpickled."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path.parent} is incomplete ({path.name} is missing)") from None
    except pickle.UnpicklingError:
        raise UserError(f"{path} holds objects other than tensors, so it was not written by transformer-ln; it is "
                        "not loaded (loading it could run arbitrary code)") from None
    except (RuntimeError, ValueError, EOFError, OSError) as e:
        raise UserError(f"checkpoint {path.parent} is corrupt: {path.name}: {str(e).splitlines()[0]}") from None


def read_optimizer_and_rng(ckpt: Path, rank: int = 0) -> tuple[dict, dict]:
    """The optimizer state and process ``rank``'s RNG state of a checkpoint, read (not applied)."""
    ckpt = Path(ckpt)
    return _load_tensors(ckpt / "optimizer.pt"), _load_tensors(ckpt / f"rng_{rank}.pt")


def average_checkpoints(run_dir: str | Path, last: int) -> Path:
    """Mean of the float parameters of the last ``last`` update checkpoints -> ``checkpoints/averaged``."""
    if not Path(run_dir).is_dir():
        raise UserError(f"run directory {run_dir} does not exist; pass the train.out_dir of a training run")
    found = update_checkpoints(Path(run_dir))
    if last < 1:
        raise UserError(f"--last: got {last}, must be >= 1")
    if len(found) < last:
        raise UserError(f"{run_dir} holds {len(found)} update checkpoints, fewer than --last {last}; "
                        "raise train.keep_last to keep more")
    chosen = found[-last:]
    total: dict[str, torch.Tensor] = {}
    for ckpt in chosen:
        try:
            tensors = load_file(str(ckpt / "model.safetensors"))
        except (SafetensorError, OSError) as e:
            raise UserError(f"cannot read {ckpt}/model.safetensors: {e}") from None
        for k, v in tensors.items():
            total[k] = total[k] + v.double() if k in total else v.double()
    first = load_file(str(chosen[0] / "model.safetensors"))
    averaged = {k: (v / last).to(first[k].dtype) for k, v in total.items()}
    out = checkpoints_dir(Path(run_dir)) / RunDir.AVERAGED
    tmp = out.with_name(f".{RunDir.AVERAGED}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(averaged, str(tmp / "model.safetensors"), metadata={"averaged": ",".join(p.name for p in chosen)})
    shutil.copy(chosen[-1] / RunDir.CONFIG, tmp / RunDir.CONFIG)
    replace_dir(tmp, out)
    return out


def average_main(argv: list[str]) -> int:
    p = Parser(prog="transformer-ln average",
               description="Average the parameters of a run's last N checkpoints (fairseq's "
                           "average_checkpoints) into RUN_DIR/checkpoints/averaged.")
    p.add_argument("run_dir", help="a training run's train.out_dir")
    p.add_argument("--last", type=int, default=5, help="how many of the latest update checkpoints (default 5)")
    args = p.parse_args(argv)
    out = average_checkpoints(args.run_dir, args.last)
    print(f"averaged checkpoint written to {out}")
    return 0
