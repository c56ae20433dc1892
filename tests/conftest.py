"""Shared fixtures: tiny models so the suite stays fast on 2 CPU cores."""
import pytest
import torch

from transformer_ln import ModelConfig, Seq2SeqTransformer

SCHEME_NAMES = ("post_ln", "pre_ln", "admin")


def tiny_config(residual: str = "post_ln", **kw) -> ModelConfig:
    base = dict(src_vocab_size=50, tgt_vocab_size=50, d_model=32, n_heads=4, d_ff=64, n_enc_layers=2,
                n_dec_layers=2, dropout=0.0, residual=residual,
                admin_omega="O(logn)" if residual == "admin" else "profile")
    base.update(kw)
    return ModelConfig(**base)


def tiny_model(residual: str = "post_ln", seed: int = 0, **kw) -> Seq2SeqTransformer:
    torch.manual_seed(seed)
    return Seq2SeqTransformer(tiny_config(residual, **kw))


@pytest.fixture(params=SCHEME_NAMES)
def scheme(request) -> str:
    return request.param
