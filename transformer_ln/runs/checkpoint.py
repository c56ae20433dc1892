"""Checkpoints that are never half-written and never unpickle arbitrary objects.

A checkpoint is a folder ``<run>/checkpoints/update_<n>`` holding what ``accelerator.save_state`` would (model,
optimizer, RNG per process) plus the trainer's position, in safe formats:

    model.safetensors      the unwrapped model (tied embeddings handled by safetensors' save_model)
    optimizer.pt           optimizer.state_dict(), loaded with torch.load(weights_only=True)
                           (under FSDP both are the whole model's, gathered by ``sharding``: one format for all)
    rng_<rank>.pt          torch (and CUDA) RNG states and Python's random state, weights_only too
    trainer_state.json     update, epoch, batches consumed in the epoch, best valid loss, tokens, wall time
    config.yaml            the run's resolved config

It is written under a temporary name and renamed into place, so a crash leaves either the old or the new one, and
a full disk leaves the old ones and one line naming the folder and the space it needs (every process agrees first).
A reader (``load_model``, ``average_checkpoints``) that finds the checkpoint it chose replaced or pruned by the
running trainer meanwhile reads again from the newest complete one.
``best`` is a copy of the checkpoint with the lowest validation loss; ``averaged`` the mean of the last N. This
module is the format; ``training.checkpointer`` decides when to write, gathers the state under FSDP and keeps
``best``.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model as st_load_model, save_file, save_model as st_save_model

from ..atomic import replace_dir, tree_size
from ..config.run_config import ConfigError, RunConfig
from ..config.parser import Parser
from ..errors import UserError
from .rundir import RunDir, no_space_error

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
    onto the main process first; the other processes pass what they have). Every process must call it. A write
    that lacks space removes the half-written folder and raises one ``UserError`` line on every process.
    """
    is_main = accelerator is None or accelerator.is_main_process
    rank = 0 if accelerator is None else accelerator.process_index
    final = checkpoints_dir(run_dir) / f"{PREFIX}{update:08d}"
    tmp = final.with_name(final.name + ".tmp")
    err = None
    try:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
    except OSError as e:
        err = e
    _barrier(accelerator)
    try:
        if err is None:
            _save_tensors(rng_state(), tmp / f"rng_{rank}.pt")
        if err is None and is_main:
            st_save_model(whole, str(tmp / "model.safetensors"))
            _save_tensors(optim_state, tmp / "optimizer.pt")
            (tmp / RunDir.STATE).write_text(json.dumps(trainer_state, indent=1))
            cfg.save(tmp / RunDir.CONFIG)
    except Exception as e:
        err = e
        if accelerator is None or accelerator.num_processes == 1:  # so the free space reported is a retry's
            shutil.rmtree(tmp, ignore_errors=True)
    needed = (_nbytes(whole.state_dict()) if whole is not None else 0) + _nbytes(optim_state) + (64 << 10)
    full = err and no_space_error(err, final, needed, f"the older checkpoints are kept; free some space, then "
                                                      f"resume: transformer-ln train --resume {run_dir}")
    mine = str(full) if full else (f"process {rank} failed to write {final}: {err!r}" if err else None)
    failed = _agree(accelerator, mine)
    if failed:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if failed == mine and full is None:
            raise err  # not a lack of space: the error itself, with its traceback
        raise UserError(failed)
    if is_main:
        replace_dir(tmp, final)
    _barrier(accelerator)
    return final


def _save_tensors(obj, path: Path) -> None:
    """``torch.save`` through a Python file, so a failed write keeps its ``OSError`` (torch's own writer says only
    "unexpected pos" or "iostream error")."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def _nbytes(obj) -> int:
    """Bytes in the tensors of a (nested) state dict."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _agree(accelerator, failure: Optional[str]) -> Optional[str]:
    """The first process's failure, told to every process (a collective), or None when all succeeded."""
    if accelerator is None or accelerator.num_processes == 1:
        return failure
    from accelerate.utils import gather_object

    return next((f for f in gather_object([failure]) if f), None)


def _barrier(accelerator) -> None:
    if accelerator is not None:
        accelerator.wait_for_everyone()


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    for old in update_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def copy_as(src: Path, name: str) -> Path:
    """Copy a checkpoint to ``checkpoints/<name>`` atomically (used for ``best``); lacking space, one line."""
    final = src.parent / name
    tmp = src.parent / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(src, tmp)
    except (OSError, shutil.Error) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        err = no_space_error(e, final, tree_size(src), f"{src.name} itself is complete; free some space, then "
                                                       f"resume: transformer-ln train --resume {src.parent.parent}")
        raise err or e from None
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
    run = RunDir(run_dir)
    if not (run.config.is_file() or checkpoints_dir(run_dir).is_dir() or (run_dir / RunDir.MARKER).is_file()):
        raise UserError(f"{run_dir} is not a training run directory (no {RunDir.CONFIG}, no {RunDir.CHECKPOINTS}/); "
                        "pass the train.out_dir of a run of `transformer-ln train`")
    if which == "last":
        found = update_checkpoints(run_dir)
        if not found:
            raise UserError(f"{run_dir} has no checkpoints yet (expected {checkpoints_dir(run_dir)}/update_*)")
        return found[-1]
    path = _settled(checkpoints_dir(run_dir) / which)
    if which == RunDir.BEST and not path.is_dir():
        return resolve(run_dir, "last")
    if not (path / "model.safetensors").is_file():
        have = sorted(p.name for p in checkpoints_dir(run_dir).glob("*") if p.is_dir())
        raise UserError(f"no checkpoint {which!r} in {run_dir}; available: {', '.join(have) or 'none'} "
                        "(or best/last; run `transformer-ln average RUN --last N` for averaged)")
    return path


def _settled(path: Path) -> Path:
    """``path``, or while ``replace_dir`` swaps it (an instant: ``path`` absent, ``path.old`` complete) the new one
    once it is in place, or the old one if the writer was killed in between."""
    old = path.with_name(path.name + ".old")
    for _ in range(20):
        if path.is_dir() or not old.is_dir():
            return path
        time.sleep(0.05)
    return old if old.is_dir() else path


def _identity(ckpt: Path) -> tuple:
    """What changes when a checkpoint folder is replaced, pruned or rewritten (inode and time of its weights)."""
    try:
        st, weights = os.stat(ckpt), os.stat(Path(ckpt) / "model.safetensors")
        return str(ckpt), st.st_ino, weights.st_ino, weights.st_mtime_ns, weights.st_size
    except OSError:
        return str(ckpt), None


def read_settled(run_dir: str | Path, which: str, read, tries: int = 10):
    """``read(folder)`` of the checkpoint ``which`` names. A running trainer may replace (``best``) or prune
    (``last``, ``update_<n>``) that folder while it is read: when the read fails and the folder changed meanwhile,
    it is read again from what ``which`` names now (the newest complete one); a corrupt folder fails at once."""
    for attempt in range(tries):
        ckpt = resolve(run_dir, which)
        before = _identity(ckpt)
        try:
            return read(ckpt)
        except UserError:
            if attempt == tries - 1 or (_identity(ckpt) == before and resolve(run_dir, which) == ckpt):
                raise
        time.sleep(0.05 * (attempt + 1))


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

    def read(ckpt: Path):
        cfg = load_run_config_from(ckpt)
        model = build_model(cfg.model)  # the model of the run's task (``training.task`` builds the same)
        load_weights(model, ckpt)
        return model, cfg

    model, cfg = read_settled(run_dir, which, read)
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
    for attempt in range(10):  # the trainer may prune the oldest chosen one meanwhile: then the newest N again
        chosen = update_checkpoints(Path(run_dir))[-last:]
        try:
            averaged = _mean_weights(chosen)
            break
        except UserError:
            now = update_checkpoints(Path(run_dir))[-last:]
            if attempt == 9 or (now == chosen and all(p.is_dir() for p in chosen)):
                raise
    out = checkpoints_dir(Path(run_dir)) / RunDir.AVERAGED
    tmp = out.with_name(f".{RunDir.AVERAGED}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(averaged, str(tmp / "model.safetensors"), metadata={"averaged": ",".join(p.name for p in chosen)})
    shutil.copy(chosen[-1] / RunDir.CONFIG, tmp / RunDir.CONFIG)
    replace_dir(tmp, out)
    return out


def _mean_weights(chosen: list[Path]) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for ckpt in chosen:
        try:
            tensors = load_file(str(ckpt / "model.safetensors"))
        except (SafetensorError, OSError) as e:
            raise UserError(f"cannot read {ckpt}/model.safetensors: {e}") from None
        for k, v in tensors.items():
            dtypes.setdefault(k, v.dtype)
            total[k] = total[k] + v.double() if k in total else v.double()
    return {k: (v / len(chosen)).to(dtypes[k]) for k, v in total.items()}


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
