"""The paper's analysis tools, attached to a model through hooks and ``functional_call`` (it never knows).

Each takes the model and its inputs: ``(model, src, tgt_in)`` for the encoder-decoder, ``(model, ids)`` for a
decoder-only ``CausalLM`` (packed blocks, every position real), and reports the stacks the model has.

* ``residual_dependency``: beta_{i,j}, how much each sub-layer output depends on each residual branch.
* ``output_change``: |F(x, W) - F(x, W*)| for a small perturbation W* of the weights, under a ``Definition``
  (``preset="ours"``: squared, stack output, eval mode; ``preset="reference"``: Transformer-Clinic's).
* ``gradient_norms`` / ``GradNormCallback``: per-sub-layer gradient norms, once or during training.
* ``depth_sweep``: output change at initialisation against depth over seeds (mean, 95% interval), with linear and
  logarithmic fits per seed (the statistics: ``stats``).
"""
from .batch import batch_inputs, random_batch, random_batch_for, random_blocks
from .dependency import beta_from_stds, residual_components, residual_dependency, residual_stds
from .depth_sweep import build_model, depth_sweep
from .grad_norms import GradNormCallback, gradient_norms
from .hooks import registered_hooks, sublayers
from .output_change import PRESETS, Definition, definition, output_change, perturbed_names
from .stats import fit, fit_over_seeds, mean_ci95

__all__ = ["random_batch", "random_blocks", "random_batch_for", "batch_inputs", "beta_from_stds",
           "residual_components", "residual_dependency", "residual_stds", "build_model", "depth_sweep",
           "fit", "fit_over_seeds", "mean_ci95", "GradNormCallback", "gradient_norms", "registered_hooks",
           "sublayers", "output_change", "perturbed_names", "PRESETS", "Definition", "definition"]
