"""The one typed configuration tree (``RunConfig``: model, data, optim, train), its generic machinery and the
command-line grammar every command reads configs with.

``run_config`` holds the sections and the demo's settings, ``sections`` the typed ``Section`` machinery (strict
``from_dict``, YAML round trip, dotted overrides), ``parser`` the ``[CONFIG.yaml] [section.key=value ...]`` grammar
and ``cli`` the ``transformer-ln config`` command. Allowed values of the model's choices come from the registries
in ``transformer_ln.model``; nothing here imports anything above the model.
"""
from .run_config import (ACTIVATIONS, DEMO, NORM_NAMES, RESIDUALS, TRACKERS, DataConfig, ModelConfig, OptimConfig,
                         RunConfig, TrainConfig, load_run_config, scheme_option_specs)
from .sections import CONFIG_FILE, ConfigError, Section, apply_overrides, parse_override, read_yaml_mapping

__all__ = ["ACTIVATIONS", "scheme_option_specs", "DEMO", "NORM_NAMES", "RESIDUALS", "TRACKERS", "DataConfig",
           "ModelConfig", "OptimConfig", "RunConfig", "TrainConfig", "load_run_config", "CONFIG_FILE", "ConfigError",
           "Section", "apply_overrides", "parse_override", "read_yaml_mapping"]
