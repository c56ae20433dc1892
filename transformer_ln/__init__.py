"""transformer_ln: Post-LN, Pre-LN and Admin encoder-decoder Transformers and the analysis of why they train."""
from .admin import admin_init
from .config import ConfigError, DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig, load_run_config
from .errors import UserError
from .layers import CrossAttention, FeedForward, SelfAttention
from .model import DecoderLayer, EncoderLayer, Seq2SeqTransformer, init_weights
from .rnn import LayerNormLSTM, LayerNormRNN
from .residual import SCHEMES, OmegaResidual, Residual, ResidualScheme, Sublayer, calculate_init

__all__ = [
    "admin_init", "ConfigError", "DataConfig", "ModelConfig", "OptimConfig", "RunConfig", "TrainConfig",
    "load_run_config", "UserError", "CrossAttention", "FeedForward", "SelfAttention", "DecoderLayer", "EncoderLayer",
    "Seq2SeqTransformer", "init_weights", "SCHEMES", "OmegaResidual", "Residual", "ResidualScheme", "Sublayer",
    "calculate_init", "LayerNormLSTM", "LayerNormRNN",
]
