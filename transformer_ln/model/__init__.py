"""The model, and nothing that trains or observes it: norms (``norms``), attention and FFN branches (``layers``),
the residual sub-layer and the scheme interface (``sublayer``), the schemes themselves (``schemes``, Admin's in
``admin``), positions (``positions``) and the stacks (``seq2seq``: the encoder-decoder; ``causal_lm``: the
decoder-only language model, and ``build_model`` for either).

Nothing here imports from the rest of the package: the config, training and analysis build on the model, never the
other way round.
"""
from .admin import admin_init
from .causal_lm import CausalLayer, CausalLM, build_model
from .layers import CrossAttention, FeedForward, SelfAttention
from .norms import NORMS, make_norm
from .schemes import SCHEMES, OmegaResidual, Residual, ResidualScheme, Site, Sublayer, calculate_init, get_scheme
from .seq2seq import DecoderCache, DecoderLayer, EncoderLayer, Seq2SeqTransformer, init_weights

__all__ = ["admin_init", "CausalLayer", "CausalLM", "build_model", "CrossAttention", "FeedForward", "SelfAttention", "NORMS", "make_norm", "SCHEMES",
           "OmegaResidual", "Residual", "ResidualScheme", "Site", "Sublayer", "calculate_init", "get_scheme",
           "DecoderCache", "DecoderLayer", "EncoderLayer", "Seq2SeqTransformer", "init_weights"]
