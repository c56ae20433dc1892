"""Output change at initialisation against depth: the paper's O(N) (Post-LN) versus O(log N) (Pre-LN, Admin).

For each scheme and encoder depth L (N = 2L sub-layers) a fresh model is built with a fixed seed and calibrated by
its scheme (Admin's omega profiled by ``admin_init``, dropout on, as the reference), and ``output_change`` is
measured on the encoder in eval mode. Both y = a*N + b and y = a*log(N) + b are fitted by least squares; the one
with the higher R^2 "fits better".
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch

from ..config import ModelConfig
from ..model import Seq2SeqTransformer
from ..residual import SCHEMES
from .batch import random_batch
from .output_change import output_change


def fit(n: Iterable[float], y: Iterable[float]) -> dict[str, dict[str, float] | str]:
    """Least-squares fits y ~ a*N + b and y ~ a*log(N) + b, with residual sum of squares and R^2 each."""
    n, y = np.asarray(list(n), float), np.asarray(list(y), float)
    out: dict = {}
    tss = float(((y - y.mean()) ** 2).sum())
    for kind, x in (("linear", n), ("log", np.log(n))):
        A = np.stack([x, np.ones_like(x)], axis=1)
        (a, b), *_ = np.linalg.lstsq(A, y, rcond=None)
        rss = float(((A @ np.array([a, b]) - y) ** 2).sum())
        out[kind] = {"a": float(a), "b": float(b), "rss": rss, "r2": 1.0 - rss / tss if tss > 0 else 1.0}
    out["better"] = "linear" if out["linear"]["r2"] > out["log"]["r2"] else "log"
    return out


def build_model(residual: str, n_enc_layers: int, d_model: int = 512, n_heads: int = 8, d_ff: int | None = None,
                vocab_size: int = 1000, n_dec_layers: int = 1, dropout: float = 0.1, seed: int = 0,
                batch: dict[str, torch.Tensor] | None = None, **model_kw) -> Seq2SeqTransformer:
    """A freshly initialised model, calibrated by its scheme (Admin's profiling) on ``batch`` or a random one."""
    cfg = ModelConfig(src_vocab_size=vocab_size, tgt_vocab_size=vocab_size, d_model=d_model, n_heads=n_heads,
                      d_ff=d_ff or 4 * d_model, n_enc_layers=n_enc_layers, n_dec_layers=n_dec_layers,
                      dropout=dropout, residual=residual, **model_kw)
    torch.manual_seed(seed)
    model = Seq2SeqTransformer(cfg)
    if batch is None:
        batch = random_batch(vocab_size, seed=seed)
    model.scheme.calibrate(model, batch["src"], batch["tgt_in"], seed=seed)
    return model.eval()


def depth_sweep(residuals: Iterable[str] = tuple(SCHEMES),
                depths: Iterable[int] = (1, 2, 4, 8, 16, 32, 50), d_model: int = 512, n_heads: int = 8,
                d_ff: int | None = None, vocab_size: int = 1000, batch_size: int = 4, seq_len: int = 20,
                eps: float = 1e-4, mode: str = "random", n_samples: int = 1, seed: int = 0,
                progress: bool = True, **model_kw) -> dict:
    """Encoder output change at initialisation for every (scheme, depth); each model is built once.

    ``residuals`` defaults to every registered scheme. ``model_kw`` are further ``ModelConfig`` fields (``norm``,
    ``dropout``, ``activation``, ``admin_omega``, ``pad_id``...).

    Returns ``{"config": {...}, "results": {scheme: {"depths", "sublayers", "output_change", "fit", "ratio"}}}``
    with ``ratio`` = output change at the deepest / at the shallowest depth.
    """
    from tqdm.auto import tqdm

    residuals, depths = list(residuals), sorted(set(int(d) for d in depths))
    if not depths or depths[0] < 1:
        raise ValueError(f"depths: got {depths}, need encoder layer counts >= 1")
    pad_id = model_kw.get("pad_id", 0)
    batch = random_batch(vocab_size, batch_size, seq_len, pad_id=pad_id, seed=seed)
    config = dict(residuals=residuals, depths=depths, d_model=d_model, n_heads=n_heads, d_ff=d_ff or 4 * d_model,
                  vocab_size=vocab_size, batch_size=batch_size, seq_len=seq_len, eps=eps, mode=mode,
                  n_samples=n_samples, seed=seed, n_tokens=int(batch["src"].ne(pad_id).sum()), **model_kw)
    results: dict = {}
    bar = tqdm(total=len(residuals) * len(depths), desc="output change", disable=not progress)
    try:
        for residual in residuals:
            values = []
            for depth in depths:
                bar.set_postfix(scheme=residual, layers=depth)
                model = build_model(residual, depth, d_model, n_heads, d_ff, vocab_size, seed=seed, batch=batch,
                                    **model_kw)
                change = output_change(model, batch["src"], batch["tgt_in"], eps=eps, mode=mode,
                                       n_samples=n_samples, seed=seed, tgt_out=batch["tgt_out"],
                                       stacks=("encoder",))
                values.append(change["encoder"])
                del model
                bar.update()
            sub = [2 * d for d in depths]
            results[residual] = {"depths": depths, "sublayers": sub, "output_change": values,
                                 "fit": fit(sub, values) if len(depths) > 2 else None,
                                 "ratio": values[-1] / values[0] if values[0] > 0 else math.inf}
    finally:
        bar.close()
    return {"config": config, "results": results}
