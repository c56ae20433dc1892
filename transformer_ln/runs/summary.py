"""``summary.json``: how a run ended (status, updates, best and last good checkpoints, stop reason), one record."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..atomic import write_text
from ..errors import UserError


@dataclass
class Summary:
    """``summary.json``: how a run ended. Written by the trainer, read by the sweep and the plots.

    ``last_good_update`` is the last update whose weights passed the divergence checks; ``last_good_checkpoint``
    the newest checkpoint written (only good weights are ever written), ``best_checkpoint`` the update that
    ``checkpoints/best`` holds.
    """

    status: str
    updates: int = 0
    diverged_at: Optional[int] = None
    best_valid_loss: Optional[float] = None
    best_valid_nll: Optional[float] = None
    last_good_update: Optional[int] = None
    last_good_checkpoint: Optional[str] = None
    best_checkpoint: Optional[str] = None
    stop_reason: Optional[str] = None
    stopped: Optional[str] = None  # the rule that ended a completed run: max_updates, max_epochs or max_minutes
    epochs_started: Optional[int] = None
    tokens: Optional[int] = None
    wall_time_s: Optional[float] = None
    residual: Optional[str] = None
    arch: Optional[str] = None  # decoder_only for a language model (absent: the encoder-decoder)
    n_enc_layers: Optional[int] = None
    n_dec_layers: Optional[int] = None
    lr: Optional[float] = None
    warmup_updates: Optional[int] = None
    seed: Optional[int] = None
    processes: Optional[int] = None
    distributed: Optional[str] = None  # accelerate's distributed type: NO, MULTI_CPU, MULTI_GPU, FSDP, ...

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Summary":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})  # older summaries lack fields; newer add some

    @classmethod
    def load(cls, path: str | Path) -> "Summary":
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise UserError(f"{path} is not a readable run summary ({e}); delete it to let the run finish "
                            "again with --resume") from None

    def save(self, path: str | Path) -> None:
        write_text(path, json.dumps(self.to_dict(), indent=1))
