"""Named recipes on top of the library defaults: the model presets (``model.preset``) and the demo's settings.

Plain dicts, so the config module reads them without this module knowing any config class.
"""
from __future__ import annotations

__all__ = ["PRESETS", "DEMO"]

# Named shapes: the component settings a preset fills in; any field given next to model.preset overrides it.
PRESETS = {
    "gpt2": {"arch": "decoder_only", "residual": "pre_ln", "norm": "layernorm", "positions": "learned",
             "activation": "gelu_tanh", "bias": True, "tie_embeddings": True, "scale_embeddings": False},
    "llama": {"arch": "decoder_only", "residual": "pre_ln", "norm": "rmsnorm", "positions": "rope",
              "activation": "swiglu", "bias": False, "tie_embeddings": False, "scale_embeddings": False},
}

# The demo's settings, on top of the library defaults (``run_config``): a small model on the built-in corpus, a few CPU
# minutes. They apply only to the demo (no CONFIG and the built-in corpus, or ``train --demo``); a run on the user's
# own data starts from the library defaults (the base recipe) instead. See ``transformer_ln.cli.resolve_config``.
# It stops on a number of updates, never on wall clock, so its score is the same on a busy machine (a 4-minute limit
# gave 42 updates and BLEU 0 under load); a checkpoint every 50 updates leaves ``average --last 5`` its 5.
DEMO = {
    "model": {"d_model": 128, "n_heads": 4, "d_ff": 512, "n_enc_layers": 3, "n_dec_layers": 3, "dropout": 0.1,
              "share_embeddings": True, "max_positions": 256},
    "data": {"source": "synthetic", "vocab_size": 1000},
    "optim": {"lr": 2e-3, "warmup_updates": 300},
    "train": {"out_dir": "runs/demo", "max_tokens": 4096, "max_epochs": 30, "max_updates": 550, "save_every": 50,
              "log_every": 20},
}
