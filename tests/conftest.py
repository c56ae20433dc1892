"""Shared fixtures: tiny models so the suite stays fast on 2 CPU cores.

``make test`` runs the suite on two pytest-xdist workers, one per core (``--dist loadfile``: a file's tests on one
worker, so its module fixtures are built once): each worker, and every process a test starts, uses one thread, so
the two do not fight over the cores. Every ``accelerate launch`` in the tests names a free port of its own
(``fault_injection.free_port``), so launches on the two workers never meet on accelerate's default port.
"""
import os

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch starts its thread pool; children inherit it

import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from transformer_ln import SCHEMES, ModelConfig, Seq2SeqTransformer  # noqa: E402

SCHEME_NAMES = tuple(SCHEMES)  # every registered scheme: a new one is tested by every `any_scheme` test
# the Admin paper's three, for the tests that write their formulas out (each must be registered)
PAPER_SCHEMES = tuple(s for s in ("post_ln", "pre_ln", "admin") if s in SCHEMES)
assert len(PAPER_SCHEMES) == 3, "post_ln, pre_ln and admin must be registered schemes"

# A training run small enough for a test: a few updates of a 2-layer model on 400 synthetic pairs.
TINY_RUN = {
    "model": {"d_model": 32, "n_heads": 4, "d_ff": 64, "n_enc_layers": 2, "n_dec_layers": 2, "dropout": 0.1,
              "share_embeddings": True, "max_positions": 128},
    "data": {"source": "synthetic", "synthetic_size": 400, "vocab_size": 200},
    "optim": {"lr": 1e-3, "warmup_updates": 10},
    "train": {"max_tokens": 600, "max_updates": 6, "bleu_at_end": False, "log_every": 1},
}


def tiny_run_config(out_dir, *overrides):
    from transformer_ln.config import RunConfig, apply_overrides

    return RunConfig.from_dict(apply_overrides(TINY_RUN, [f"train.out_dir={out_dir}", *overrides]))


def tiny_config(residual: str = "post_ln", **kw) -> ModelConfig:
    base = dict(src_vocab_size=50, tgt_vocab_size=50, d_model=32, n_heads=4, d_ff=64, n_enc_layers=2,
                n_dec_layers=2, dropout=0.0, residual=residual,
                admin_omega="O(logn)" if residual == "admin" else "profile")
    base.update(kw)
    return ModelConfig(**base)


def tiny_model(residual: str = "post_ln", seed: int = 0, **kw) -> Seq2SeqTransformer:
    torch.manual_seed(seed)
    return Seq2SeqTransformer(tiny_config(residual, **kw))


@pytest.fixture(params=PAPER_SCHEMES)
def scheme(request) -> str:
    return request.param


@pytest.fixture(params=SCHEME_NAMES)
def any_scheme(request) -> str:
    return request.param
