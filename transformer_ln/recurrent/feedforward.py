"""Ba et al. 2016's feed-forward claims on a real digit set: a permutation-invariant MLP and a small CNN whose hidden
layers are normalized by BatchNorm, LayerNorm, RMSNorm, GroupNorm or nothing, and their training loop.

Why a loop of its own: the claims ("LN is robust to the batch size and converges faster; BN degrades with small
batches; LN is weaker than BN in CNNs") compare norms under one optimiser at several batch sizes, so every row
shares data, batches, Adam and seed and differs only in ``norm``. The norms are torch's own modules; LN follows
the paper's eq. 3-4 over a layer's summed inputs a: mu = mean(a), sigma = sqrt(mean((a - mu)^2)), h = f(g/sigma *
(a - mu) + b); the softmax layer is never normalized. Data: scikit-learn's bundled 8x8 digits (1,797 images, read
from the installed package, no download), split once with a fixed seed; scikit-learn is imported lazily.

    data = load_digits_split()
    summary = train_ff(FFConfig(model="mlp", norm="layernorm", batch_size=4, lr=1e-3), data)
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config.sections import ConfigError, Section
from ..errors import UserError

MODELS = ("mlp", "cnn")
NORMS = ("none", "batchnorm", "layernorm", "rmsnorm", "groupnorm")
MODEL_NORMS = {"mlp": ("none", "batchnorm", "layernorm", "rmsnorm"),
               "cnn": ("none", "batchnorm", "layernorm", "groupnorm")}
SPLIT = {"train": 1197, "valid": 300, "test": 300}  # of the 1,797 digits, in this order after one shuffle
SPLIT_SEED = 0                                       # numpy's PCG64: the same split on every machine
GROUPS = 4                                           # GroupNorm's groups in every conv layer (Wu and He 2018)
CLASSES = 10

Split = dict[str, tuple[torch.Tensor, torch.Tensor]]


def load_digits_split() -> Split:
    """{"train" | "valid" | "test": (images (N, 1, 8, 8) in [0, 1], labels (N,))}: scikit-learn's digits (pixel
    values 0-16 divided by 16), shuffled once with ``numpy.random.default_rng(SPLIT_SEED)`` and cut 1197/300/300."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("the feed-forward study reads scikit-learn's bundled digits; install it with "
                        "`pip install -e .[studies]`") from None
    import numpy as np

    digits = load_digits()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(digits.target))
    x = torch.tensor(digits.data[order] / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
    y = torch.tensor(digits.target[order], dtype=torch.long)
    out, start = {}, 0
    for name, n in SPLIT.items():
        out[name] = (x[start:start + n], y[start:start + n])
        start += n
    return out


def hidden_norm(kind: str, shape: int | tuple[int, int, int]) -> nn.Module:
    """The norm of one hidden layer: ``shape`` is its width (MLP) or (C, H, W) (CNN; LayerNorm normalizes over all
    three, with a gain and bias per unit as in the paper; GroupNorm over GROUPS groups of channels)."""
    if kind == "none":
        return nn.Identity()
    if isinstance(shape, int):
        return {"batchnorm": nn.BatchNorm1d, "layernorm": nn.LayerNorm, "rmsnorm": nn.RMSNorm}[kind](shape)
    c = shape[0]
    return {"batchnorm": lambda: nn.BatchNorm2d(c), "layernorm": lambda: nn.LayerNorm(list(shape)),
            "groupnorm": lambda: nn.GroupNorm(GROUPS, c)}[kind]()


class MLP(nn.Module):
    """Permutation-invariant: the 64 pixels as a flat vector (any fixed permutation of them is the same task).
    64 -> [Linear -> norm -> ReLU] x layers -> Linear -> 10 logits; the norm acts on the summed inputs a = W x + b."""

    def __init__(self, norm: str = "layernorm", hidden: int = 128, layers: int = 2):
        super().__init__()
        blocks, width = [], 64
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), hidden_norm(norm, hidden), nn.ReLU()]
            width = hidden
        self.body = nn.Sequential(nn.Flatten(), *blocks)
        self.out = nn.Linear(width, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x))


class CNN(nn.Module):
    """1x8x8 -> conv3x3(c) -> norm -> ReLU -> conv3x3(2c, stride 2) -> norm -> ReLU -> flatten (2c x 4 x 4) ->
    Linear -> 10 logits."""

    def __init__(self, norm: str = "layernorm", channels: int = 16):
        super().__init__()
        c = channels
        self.body = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), hidden_norm(norm, (c, 8, 8)), nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), hidden_norm(norm, (2 * c, 4, 4)), nn.ReLU(),
            nn.Flatten())
        self.out = nn.Linear(2 * c * 16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x))


@dataclass
class FFConfig(Section):
    """One run of the study; checked on construction (a bad value, NaN or infinity is one ``ConfigError`` line)."""

    _prefix = "ff."
    model: Literal[MODELS] = "mlp"
    norm: Literal[NORMS] = "layernorm"
    batch_size: int = 64          # images per update, every batch full (consecutive chunks of reshuffled epochs)
    lr: float = 1e-3              # Adam, constant, no weight decay
    updates: int = 1000
    eval_every: int = 50
    hidden: int = 128             # MLP width (two hidden layers)
    channels: int = 16            # CNN: 16 then 32 channels
    seed: int = 1                 # initialisation and batch order

    def __post_init__(self):
        self.check()
        self.positive("batch_size", "lr", "updates", "eval_every", "hidden", "channels")
        if self.norm not in MODEL_NORMS[self.model]:
            raise ConfigError(f"ff.norm: got {self.norm!r} for model {self.model!r}, allowed: "
                              f"{', '.join(MODEL_NORMS[self.model])}")
        if self.model == "cnn" and self.norm == "groupnorm" and self.channels % GROUPS:
            raise ConfigError(f"ff.channels: got {self.channels}, must be a multiple of {GROUPS} for groupnorm")


def build_model(cfg: FFConfig) -> nn.Module:
    return MLP(cfg.norm, cfg.hidden) if cfg.model == "mlp" else CNN(cfg.norm, cfg.channels)


def batch_indices(n: int, batch_size: int, generator: torch.Generator):
    """Endless batches of exactly ``batch_size`` indices: consecutive chunks of one reshuffled epoch after another
    (a batch may span two epochs), so BatchNorm never sees a short last batch."""
    buf = torch.empty(0, dtype=torch.long)
    while True:
        while len(buf) < batch_size:
            buf = torch.cat([buf, torch.randperm(n, generator=generator)])
        yield buf[:batch_size]
        buf = buf[batch_size:]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(error, mean nll) in eval mode, the whole split in one batch (BatchNorm uses its running averages)."""
    was = model.training
    model.eval()
    logits = model(x)
    model.train(was)
    return float((logits.argmax(1) != y).float().mean()), float(F.cross_entropy(logits, y))


@torch.no_grad()
def batch_stats_error(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int = 0) -> float:
    """Error in train mode: each example classified inside a batch of ``batch_size`` examples of the same split
    (shuffled; the last batch is filled up by wrapping around to the first examples), so BatchNorm normalizes with
    that batch's own statistics, as in training. A copy is run: the running averages are left as they were."""
    m = copy.deepcopy(model).train()
    n = len(y)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    idx = order.repeat(math.ceil(math.ceil(n / batch_size) * batch_size / n))[:math.ceil(n / batch_size) * batch_size]
    pred = torch.cat([m(x[chunk]).argmax(1) for chunk in idx.split(batch_size)])[:n]
    return float((pred != y[idx[:n]]).float().mean())


def train_ff(cfg: FFConfig, data: Split, progress: bool = False) -> dict:
    """Train one model; return its summary with ``history``: one row per evaluation (update 0 included) with the
    eval-mode nll on the whole training set, the mean minibatch loss since the last row, and valid/test error and
    nll. At the end, ``test_err_batch_stats`` (``batch_stats_error`` at the training batch size). A non-finite loss
    ends the run with status ``diverged``."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    (xtr, ytr), (xva, yva), (xte, yte) = data["train"], data["valid"], data["test"]
    batches = batch_indices(len(ytr), cfg.batch_size, torch.Generator().manual_seed(cfg.seed))
    history, losses, status, t0 = [], [], "completed", time.perf_counter()

    def record(update: int) -> None:
        row = {"update": update, "train_nll": evaluate(model, xtr, ytr)[1],
               "batch_loss": (sum(losses) / len(losses)) if losses else None}
        row["valid_err"], row["valid_nll"] = evaluate(model, xva, yva)
        row["test_err"], row["test_nll"] = evaluate(model, xte, yte)
        history.append(row)
        losses.clear()

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.updates, desc=f"{cfg.model} {cfg.norm} b{cfg.batch_size}", leave=False)
    record(0)
    model.train()
    for update in range(1, cfg.updates + 1):
        ix = next(batches)
        loss = F.cross_entropy(model(xtr[ix]), ytr[ix])
        if not torch.isfinite(loss):
            status = "diverged"
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
        if update % cfg.eval_every == 0 or update == cfg.updates:
            record(update)
    if bar is not None:
        bar.close()
    last = history[-1]
    return {"config": cfg.to_dict(), "status": status, "updates": last["update"],
            "final_valid_err": last["valid_err"], "final_valid_nll": last["valid_nll"],
            "final_test_err": last["test_err"], "final_train_nll": last["train_nll"],
            "test_err_batch_stats": batch_stats_error(model, xte, yte, cfg.batch_size, cfg.seed),
            "parameters": sum(p.numel() for p in model.parameters()),
            "seconds": time.perf_counter() - t0, "history": history}
