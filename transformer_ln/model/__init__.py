"""The model, and nothing that trains or observes it: norms (``norms``), attention and FFN branches (``layers``),
the residual sub-layer and the scheme interface (``sublayer``), the schemes themselves (``schemes``, Admin's in
``admin``) and the stacks (``seq2seq``: the encoder-decoder).

Nothing here imports from the rest of the package: the config, training and analysis build on the model, never the
other way round.
"""
from .admin import admin_init
from .layers import CrossAttention, FeedForward, SelfAttention
from .norms import NORMS, make_norm
from .schemes import SCHEMES, OmegaResidual, Residual, ResidualScheme, Site, Sublayer, calculate_init, get_scheme
from .seq2seq import DecoderCache, DecoderLayer, EncoderLayer, Seq2SeqTransformer, init_weights

__all__ = ["admin_init", "CrossAttention", "FeedForward", "SelfAttention", "NORMS", "make_norm", "SCHEMES",
           "OmegaResidual", "Residual", "ResidualScheme", "Site", "Sublayer", "calculate_init", "get_scheme",
           "DecoderCache", "DecoderLayer", "EncoderLayer", "Seq2SeqTransformer", "init_weights"]
