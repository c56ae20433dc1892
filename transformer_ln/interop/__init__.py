"""Other libraries' checkpoints in and out of our models; for now Hugging Face's GPT-2 and LLaMA (``hf``).

``from_hf(path_or_model)`` -> ``CausalLM``; ``to_hf(model, path)`` writes a checkpoint directory ``from_pretrained``
loads. ``transformers`` (the ``hf`` extra) is imported only when they run, so importing this needs nothing extra.
Nothing in the library imports this package except the top level; it builds on the model and the config.
"""
from .hf import from_hf, hf_config_of, model_config_from_hf, to_hf

__all__ = ["from_hf", "to_hf", "hf_config_of", "model_config_from_hf"]
