"""Issue 26, items 3-6 and 8: `best` holds validated weights, a resume keeps the training trajectory (or is told to
change it), absurd sizes and learning rates are one line before any allocation, a batch budget below one example is
said once, and a standalone layer is never silently given the constants of a 1-layer model."""
import json
from pathlib import Path

import pytest

from transformer_ln import DecoderLayer, EncoderLayer
from transformer_ln.model.causal_lm import CausalLayer
from transformer_ln.model.schemes import deepnorm_constants

D, H, F = 32, 4, 64


# ---------------------------------------------------------------------------------------- 8 standalone layers


@pytest.mark.parametrize("scheme", ["deepnorm", "subln", "tfixup"])
@pytest.mark.parametrize("cls", [EncoderLayer, DecoderLayer, CausalLayer])
def test_a_standalone_layer_of_a_depth_dependent_scheme_asks_for_its_depths(cls, scheme):
    with pytest.raises(ValueError, match=r"give depths=\(") as e:
        cls(D, H, F, residual=scheme)
    assert "\n" not in str(e.value) and scheme in str(e.value).lower().replace("-", "")
    if cls is EncoderLayer:  # n_sublayers alone cannot say N and M
        with pytest.raises(ValueError, match=r"depths=\(N, M\)"):
            cls(D, H, F, residual=scheme, n_sublayers=12)
    cls(D, H, F, residual=scheme, depths=(0, 6) if cls is CausalLayer else (6, 6))  # told: built


def test_standalone_layers_with_depths_get_their_models_constants():
    assert EncoderLayer(D, H, F, residual="deepnorm", depths=(6, 6)).ffn.residual.alpha == pytest.approx(
        deepnorm_constants(6, 6)["encoder"][0])
    causal = deepnorm_constants(0, 6)["decoder"][0]
    assert CausalLayer(D, H, F, residual="deepnorm", depths=(0, 6)).ffn.residual.alpha == pytest.approx(causal)
    assert CausalLayer(D, H, F, residual="deepnorm", n_sublayers=12).ffn.residual.alpha == pytest.approx(causal)
    with pytest.raises(ValueError, match=r"depths=\(0, M\) or n_sublayers=2M"):
        CausalLayer(D, H, F, residual="admin", admin_omega="O(logn)")
    site = CausalLayer(D, H, F, residual="pre_ln").ffn.site  # no depth-dependent constant: the layer alone
    assert (site.n_enc_layers, site.n_dec_layers, site.n_sublayers) == (0, 1, 2)
    for scheme in ("post_ln", "pre_ln", "rezero", "sandwich", "resi_dual", "admin"):
        EncoderLayer(D, H, F, residual=scheme)  # admin's profiled omega needs no size
