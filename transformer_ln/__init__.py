"""transformer_ln: encoder-decoder and decoder-only Transformers under every residual scheme and norm, and the analysis of why they
train (Post-LN, Pre-LN, Admin and the schemes after them; see ``transformer_ln.model.schemes``)."""
from .model.admin import admin_init
from .model.causal_lm import CausalLayer, CausalLM, build_model
from .config import ConfigError, DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig, load_run_config
from .errors import UserError
from .interop import from_hf, to_hf  # transformers itself is imported only when they run
from .model.layers import CrossAttention, FeedForward, SelfAttention
from .model.seq2seq import DecoderCache, DecoderLayer, EncoderLayer, Seq2SeqTransformer, init_weights
from .model.norms import NORMS, make_norm
from .model.schemes import SCHEMES, OmegaResidual, Residual, ResidualScheme, Sublayer, calculate_init, get_scheme
from .recurrent.rnn import LayerNormLSTM, LayerNormRNN

__all__ = [
    "admin_init", "CausalLayer", "CausalLM", "build_model", "ConfigError", "DataConfig", "ModelConfig", "OptimConfig", "RunConfig", "TrainConfig",
    "load_run_config", "UserError", "from_hf", "to_hf", "CrossAttention", "FeedForward", "SelfAttention", "DecoderCache", "DecoderLayer",
    "EncoderLayer", "Seq2SeqTransformer", "init_weights", "SCHEMES", "OmegaResidual", "Residual", "ResidualScheme",
    "Sublayer",
    "calculate_init", "get_scheme", "NORMS", "make_norm", "LayerNormLSTM", "LayerNormRNN",
]
