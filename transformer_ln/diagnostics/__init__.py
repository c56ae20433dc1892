"""The paper's analysis tools, attached to a model through hooks and ``functional_call`` (it never knows).

Each takes the model and its inputs: ``(model, src, tgt_in)`` for the encoder-decoder, ``(model, ids)`` for a
decoder-only ``CausalLM`` (packed blocks, every position real), and reports the stacks the model has.

* ``residual_dependency``: beta_{i,j}, how much each sub-layer output depends on each residual branch.
* ``output_change``: |F(x, W) - F(x, W*)| for a small perturbation W* of the weights, under a ``Definition``
  (``preset="ours"``: squared, stack output, eval mode; ``preset="reference"``: Transformer-Clinic's).
* ``gradient_norms`` / ``GradNormCallback``: per-sub-layer gradient norms, once or during training.
* ``attach`` (``sites``, ``families``): the residual sites of any Transformer (Hugging Face GPT-2, LLaMA, BERT,
  BART, T5; torch.nn's Transformer layers; ours; or a ``Declaration``), and on them the paper's analyses
  (``attached``: ``site_dependency``, ``site_output_change``, ``site_gradient_norms``) and today's (``depth_stats``:
  ``hidden_state_stats``, ``angular_distances``, ``layer_removal``, ``attention_logits``, ``log_partition``).
* ``depth_sweep``: output change at initialisation against depth over seeds (mean, 95% interval), with linear and
  logarithmic fits per seed (the statistics: ``stats``).
"""
from .attached import (site_components, site_dependency, site_gradient_norms, site_output_change, site_stds,
                       site_values, verify_sites)
from .batch import batch_inputs, random_batch, random_batch_for, random_blocks
from .dependency import beta_from_stds, residual_components, residual_dependency, residual_stds
from .depth_stats import (angular_distances, attention_logits, block_streams, hidden_state_stats, jsonable,
                          layer_removal, log_partition)
from .depth_sweep import build_model, depth_sweep
from .families import attach
from .grad_norms import GradNormCallback, gradient_norms
from .hooks import registered_hooks, sublayers
from .output_change import PRESETS, Definition, definition, output_change, perturbed_names
from .sites import Declaration, Site, Sites, SitesError
from .stats import fit, fit_over_seeds, mean_ci95

__all__ = ["random_batch", "random_blocks", "random_batch_for", "batch_inputs", "beta_from_stds",
           "residual_components", "residual_dependency", "residual_stds", "build_model", "depth_sweep",
           "fit", "fit_over_seeds", "mean_ci95", "GradNormCallback", "gradient_norms", "registered_hooks",
           "sublayers", "output_change", "perturbed_names", "PRESETS", "Definition", "definition",
           "attach", "Declaration", "Site", "Sites", "SitesError", "site_components", "site_dependency",
           "site_gradient_norms", "site_output_change", "site_stds", "site_values", "verify_sites",
           "angular_distances", "attention_logits", "block_streams", "hidden_state_stats", "layer_removal",
           "log_partition", "jsonable"]
