"""Which weights an evaluation scored: the checkpoint's update and a hash of the weights themselves.

A resumed run replaces ``checkpoints/best``; without these two fields ``results.md`` would list a BLEU of update 38
beside one of update 99 as if they were one model. The hash is taken of the loaded state dict (every tensor's name,
dtype, shape and bytes, in name order), so it names exactly what was translated, whatever file it came from and
however that file was written (an averaged checkpoint has no update: it records the checkpoints it averages).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..runs import checkpoint as ckpt_lib
from ..runs.rundir import RunDir


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 of the model's state dict: names, dtypes, shapes and raw bytes, in name order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def checkpoint_update(folder: Path) -> dict:
    """``{"update": n}`` from the checkpoint's trainer state, or ``{"update": None, "averaged": "update_a,..."}``
    for an averaged one (safetensors metadata), or ``{"update": None}`` when neither says."""
    state = Path(folder) / RunDir.STATE
    try:
        return {"update": int(json.loads(state.read_text())["update"])}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        from safetensors import safe_open

        with safe_open(str(Path(folder) / "model.safetensors"), framework="pt") as f:
            averaged = (f.metadata() or {}).get("averaged")
    except Exception:  # noqa: BLE001 - an unreadable file was already refused by the load; here it only lacks a name
        averaged = None
    return {"update": None, **({"averaged": averaged} if averaged else {})}


def load_scored(run_dir: str | Path, which: str, device) -> tuple[torch.nn.Module, object, dict]:
    """``(model in eval mode, RunConfig, {"update", "weights_sha256"[, "averaged"]})`` of the checkpoint ``which``
    names, the update read from the same folder as the weights (``checkpoint.read_settled``)."""
    from ..model.causal_lm import build_model

    def read(folder: Path):
        cfg = ckpt_lib.load_run_config_from(folder)
        model = build_model(cfg.model)
        ckpt_lib.load_weights(model, folder)
        return model, cfg, checkpoint_update(folder)

    model, cfg, where = ckpt_lib.read_settled(run_dir, which, read)
    return model.to(device).eval(), cfg, {**where, "weights_sha256": weights_sha256(model)}
