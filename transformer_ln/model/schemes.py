"""The one place where residual schemes differ, and the registry of them (``SCHEMES``).

A sub-layer i with branch function f_i and a_i = Dropout(f_i(.)) computes, per scheme (N encoder layers, M decoder
layers; LN stands for the norm ``model.norm`` picks)::

    post_ln        x_i = LN(x_{i-1} + a_i)                                    no final norm
    pre_ln         x_i = x_{i-1} + Dropout(f_i(LN(x_{i-1})))                  final norm per stack
    admin          x_i = LN(omega_i * x_{i-1} + a_i)                          (``transformer_ln.model.admin``)
    deepnorm       x_i = LN(alpha * x_{i-1} + a_i), beta-scaled init          no final norm
    subln          x_i = x_{i-1} + Dropout(f'_i(LN(x_{i-1}))), f' with inner norms, gamma-scaled init; final norm
    rezero         x_i = x_{i-1} + alpha_i * a_i, alpha_i = 0 at init         no norm at all
    rezero_postln  x_i = LN(x_{i-1} + alpha_i * a_i)                          no final norm
    sandwich       x_i = x_{i-1} + Dropout(LN_out(f_i(LN_in(x_{i-1}))))       final norm per stack
    tfixup         x_i = x_{i-1} + a_i, depth-scaled init                     no norm at all
    resi_dual      p_i = LN(p_{i-1} + a_i), d_i = d_{i-1} + a_i, a_i from p   output p_N + LN(d_N)
    mix_ln         Post-LN in a stack's first floor(a L) layers, Pre-LN after   final norm per stack
    lns            x_i = x_{i-1} + Dropout(f_i(LN(x_{i-1}) / sqrt(l)))       l the 1-based layer; final norm
    hybridnorm     attention y = x + a(QKV-norm), FFN x' = LN(y) + Dropout(F(LN(y)))   final norm per stack

Every scheme also takes ``qk_norm`` (per-head norms on q and k) and depth-scaled branches (``branch_scale``:
``transformer_ln.model.depth_scaling``), settings of ``ResidualScheme`` itself.

Each scheme is a ``ResidualScheme`` (``transformer_ln.model.sublayer``): class attributes place the norms, ``residual``
picks the shortcut combiner, ``init_sublayer``/``init_model``/``calibrate`` are its initialisation. Its formula, paper
and initialisation are in its docstring. A new scheme is a subclass here and an entry in ``SCHEMES``; config,
plots, analysis, sweeps and benchmarks read the registry (label and colour live on the scheme). A scheme's own
settings are ``options`` (each a ``SchemeOption``, the config key ``model.<name>``), what it logs per update is
``update_stats`` and what it adds to the curves figure is ``curve_panels``: Admin's omega uses all three.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .admin import Admin, OmegaResidual, calculate_init
from .norms import ScaledNorm, apply_norm
from .sublayer import (GENERAL_OPTIONS, DualSublayer, GatedResidual, Residual, ResidualScheme, ScaledResidual,
                       SchemeOption, Site, Sublayer)

__all__ = ["SCHEMES", "get_scheme", "scheme_from_config", "deepnorm_constants", "ResidualScheme", "Residual",
           "OmegaResidual", "ScaledResidual", "GatedResidual", "Sublayer", "DualSublayer", "Site", "calculate_init",
           "PostLN", "PreLN", "Admin", "DeepNorm", "SubLN", "ReZero", "ReZeroPostLN", "Sandwich", "TFixup", "ResiDual",
           "MixLN", "LNS", "HybridNorm", "SchemeOption"]


class PostLN(ResidualScheme):
    """Post-LN (Vaswani et al. 2017, arXiv 1706.03762): x_i = LN(x_{i-1} + a_i); no final norm. Default init."""


class PreLN(ResidualScheme):
    """Pre-LN (Xiong et al. 2020, arXiv 2002.04745): x_i = x_{i-1} + Dropout(f_i(LN(x_{i-1}))); LN ends each stack.
    Default init."""

    name, label, color = "pre_ln", "Pre-LN", "tab:blue"
    pre_norm, post_norm, final_norm = True, False, True


# ---------------------------------------------------------------------------------------------------------------
# the schemes after Admin (``../shared/reference/variants.md``; N encoder layers, M decoder layers)


def deepnorm_constants(n_enc_layers: int, n_dec_layers: int) -> dict[str, tuple[float, float]]:
    """DeepNorm's ``{"encoder": (alpha, beta), "decoder": (alpha, beta)}`` for an N-layer/M-layer encoder-decoder.

    Wang et al. 2022, Table 1: encoder alpha = 0.81 (N^4 M)^(1/16), beta = 0.87 (N^4 M)^(-1/16); decoder
    alpha = (3M)^(1/4), beta = (12M)^(-1/4). N = 0 is a decoder-only model (Table 1's row): ``{"decoder":
    ((2M)^(1/4), (8M)^(-1/4))}``.
    """
    for name, v, low in (("n_enc_layers", n_enc_layers, 0), ("n_dec_layers", n_dec_layers, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name}: got {v!r}, must be an integer >= {low}")
    if n_enc_layers == 0:
        return {"decoder": ((2 * n_dec_layers) ** 0.25, (8 * n_dec_layers) ** -0.25)}
    nm = n_enc_layers ** 4 * n_dec_layers
    return {"encoder": (0.81 * nm ** (1 / 16), 0.87 * nm ** (-1 / 16)),
            "decoder": ((3 * n_dec_layers) ** 0.25, (12 * n_dec_layers) ** -0.25)}


def _blocks(sub: Sublayer) -> dict[str, torch.Tensor]:
    """The branch's weight blocks that depth-scaled inits touch: q, k, v, out (attention) or fc1, fc2 (FFN)."""
    return sub.branch.projection_blocks() if hasattr(sub.branch, "projection_blocks") else {}


class DeepNorm(ResidualScheme):
    """DeepNorm (Wang et al. 2022, "DeepNet: Scaling Transformers to 1,000 Layers", arXiv 2203.00555; torchscale).

        x_i = LN(alpha * x_{i-1} + a_i)       no final norm; (alpha, beta) = ``deepnorm_constants(N, M)[stack]``

    alpha multiplies the shortcut, never the branch. Init: xavier-normal with gain beta on the v and out_proj
    blocks of every attention and on fc1, fc2; gain 1 on the q and k blocks (each block of the packed QKV
    initialised on its own, the matmul stays packed); biases 0.
    """

    name, label, color = "deepnorm", "DeepNorm", "tab:purple"
    custom_init = True

    def needs_depths(self) -> bool:
        return True

    def _constants(self, site: Site) -> tuple[float, float]:
        return deepnorm_constants(site.n_enc_layers, site.n_dec_layers)[site.stack]

    def residual(self, site: Site) -> ScaledResidual:
        return ScaledResidual(self._constants(site)[0])

    def init_sublayer(self, sub: Sublayer) -> None:
        beta = self._constants(sub.site)[1]
        for name, w in _blocks(sub).items():
            nn.init.xavier_normal_(w, gain=1.0 if name in ("q", "k") else beta)


class SubLN(ResidualScheme):
    """Sub-LN (Magneto: Wang et al. 2022, "Foundation Transformers", arXiv 2210.06423; torchscale's ``subln``).

        x_i = x_{i-1} + Dropout(f'_i(LN(x_{i-1})))       final norm per stack

    f' has one more norm inside: before the attention's out_proj (self-attention only, as torchscale's
    ``inner_attn_ln``, over d_model) and before fc2 (``ffn_layernorm``, over the d_ff hidden units). Init: the
    default, then the v, out_proj, fc1 and fc2 weights times gamma, encoder sqrt(ln(3M) ln(2N) / 3), decoder
    sqrt(ln(3M)); the decoder's cross-attention keeps its default (torchscale skips ``encoder_attn``). A
    decoder-only model (no encoder): gamma = sqrt(ln(2M)) (Magneto's decoder-only form, torchscale's ``Decoder``).
    """

    name, label, color = "subln", "Sub-LN", "tab:brown"
    pre_norm, post_norm, final_norm = True, False, True
    custom_init = True

    def needs_depths(self) -> bool:
        return True

    def build_sublayer(self, branch: nn.Module, site: Site, dropout: float = 0.0) -> Sublayer:
        if site.kind != "cross_attn":
            branch.inner_norm = self.make_norm(branch.inner_width)
        return super().build_sublayer(branch, site, dropout)

    @staticmethod
    def gamma(site: Site) -> float:
        n, m = site.n_enc_layers, site.n_dec_layers
        if n == 0:  # decoder-only
            return math.sqrt(math.log(2 * m))
        if site.stack == "encoder":
            return math.sqrt(math.log(3 * m) * math.log(2 * n) / 3)
        return math.sqrt(math.log(3 * m))

    def init_sublayer(self, sub: Sublayer) -> None:
        if sub.site.kind == "cross_attn":
            return
        gamma = self.gamma(sub.site)
        for name, w in _blocks(sub).items():
            if name in ("v", "out", "fc1", "fc2"):
                w.mul_(gamma)


class ReZero(ResidualScheme):
    """ReZero (Bachlechner et al. 2020, "ReZero is All You Need", arXiv 2003.04887).

        x_i = x_{i-1} + alpha_i * a_i,   alpha_i a learnable scalar starting at 0;  no norm anywhere

    One alpha per sub-layer (the paper's one per residual connection; Transformer-Clinic shares one per layer), so at
    initialisation every layer is exactly the identity map. Default init otherwise.
    """

    name, label, color = "rezero", "ReZero", "tab:olive"
    post_norm, has_norms = False, False

    def residual(self, site: Site) -> GatedResidual:
        return GatedResidual(0.0)


class ReZeroPostLN(ReZero):
    """ReZero with Post-LN's norm (Transformer-Clinic's ``rezero_postln``): x_i = LN(x_{i-1} + alpha_i * a_i),
    alpha_i = 0 at init; no final norm."""

    name, label, color = "rezero_postln", "ReZero+Post-LN", "tab:pink"
    post_norm, has_norms = True, True


class Sandwich(ResidualScheme):
    """Sandwich-LN (Ding et al. 2021, CogView, arXiv 2105.13290), a.k.a. Peri-LN (Kim et al. 2025, arXiv 2502.02732).

        x_i = x_{i-1} + Dropout(LN_out(f_i(LN_in(x_{i-1}))))       final norm per stack; default init

    Dropout comes after LN_out, so the residual hook's branch term is exactly what is added to the stream.
    """

    name, label, color = "sandwich", "Sandwich (Peri-LN)", "tab:cyan"
    pre_norm, branch_norm, post_norm, final_norm = True, True, False, True


class TFixup(ResidualScheme):
    """T-Fixup (Huang et al. ICML 2020, "Improving Transformer Optimization Through Better Initialization";
    layer6ai-labs/T-Fixup).

        x_i = x_{i-1} + a_i        no norm anywhere, meant to train without warmup

    Init (applied on construction, after the default xavier with embeddings N(0, d^-1/2)): encoder fc1, fc2 and
    out_proj x 0.67 N^(-1/4), v x 0.67 N^(-1/4) sqrt(2) (the sqrt(2) undoes the default 1/sqrt(2) v gain); decoder
    fc1, fc2 and both out_proj x (9M)^(-1/4), both v x (9M)^(-1/4) sqrt(2); the encoder token embedding x (9N)^(-1/4)
    and the decoder's x (9M)^(-1/4) when it is a separate matrix.

    Decoder-only: T-Fixup gives no form (its code has none). We use the encoder's, since a decoder-only layer is
    an encoder layer with a causal mask (self-attention and FFN, no cross-attention): v, out, fc1, fc2 as the
    encoder's with N = M layers, and the token embedding x (9M)^(-1/4). An extrapolation, stated as one.
    """

    name, label, color = "tfixup", "T-Fixup", "tab:gray"
    post_norm, has_norms, custom_init = False, False, True

    def needs_depths(self) -> bool:
        return True

    @staticmethod
    def scale(site: Site) -> float:
        if site.n_enc_layers == 0:  # decoder-only: the encoder's form (see the docstring)
            return 0.67 * site.n_dec_layers ** -0.25
        if site.stack == "encoder":
            return 0.67 * site.n_enc_layers ** -0.25
        return (9 * site.n_dec_layers) ** -0.25

    def init_sublayer(self, sub: Sublayer) -> None:
        s = self.scale(sub.site)
        for name, w in _blocks(sub).items():
            if name in ("out", "fc1", "fc2"):
                w.mul_(s)
            elif name == "v":
                w.mul_(s * math.sqrt(2))

    def init_model(self, model: nn.Module) -> None:
        if hasattr(model, "layers") and hasattr(model, "embed"):  # a decoder-only model
            model.embed.embed_tokens.weight.mul_((9 * len(model.layers)) ** -0.25)
            return
        if not (hasattr(model, "encoder") and hasattr(model, "decoder")):
            return
        enc, dec = model.encoder.embed.embed_tokens, model.decoder.embed.embed_tokens
        enc.weight.mul_((9 * len(model.encoder.layers)) ** -0.25)
        if dec is not enc:
            dec.weight.mul_((9 * len(model.decoder.layers)) ** -0.25)


class ResiDual(ResidualScheme):
    """ResiDual (Xie et al. 2023, "ResiDual: Transformer with Dual Residual Connections", arXiv 2304.14802).

        p_i = LN(p_{i-1} + a_i),  d_i = d_{i-1} + a_i,  a_i = Dropout(f_i(p_{i-1})),  p_0 = d_0 = x_0
        stack output p_N + LN(d_N)

    The Post-LN stream p and the accumulated branch sum d (Pre-LN's stream) travel as a ``(p, d)`` pair inside the
    stack (``DualSublayer``); the analysis hooks see p's shortcut and branch. Default init.
    """

    name, label, color = "resi_dual", "ResiDual", "tab:orange"
    final_norm = True
    sublayer_class = DualSublayer

    def begin(self, x0: torch.Tensor):
        return x0, x0

    def end(self, stream, final_norm: nn.Module, keep: torch.Tensor | None = None) -> torch.Tensor:
        p, d = stream
        return p + apply_norm(final_norm, d, keep)


# ---------------------------------------------------------------------------------------------------------------
# the schemes of 2024-2025 (``../shared/reference/variants-2025.md``); Peri-LN is ``Sandwich`` above


class MixLN(ResidualScheme):
    """Mix-LN (Li et al. 2025, "Mix-LN: Unleashing the Power of Deeper Layers by Combining Pre-LN and Post-LN",
    arXiv 2412.13795; pixeli99/MixLN's ``post_pre``).

        layers l < floor(a L):  x_i = LN(x_{i-1} + a_i)                      (Post-LN)
        layers after:           x_i = x_{i-1} + Dropout(f_i(LN(x_{i-1})))    (Pre-LN)      final norm per stack

    l counts a stack's layers from 0 (the code's ``layer_index < POST_NUM``), L is the stack's depth and
    a = ``mix_ln_fraction``, 0.25 by default (the paper's scripts: 3 of 12 and 6 of 24 layers). The final norm is
    always applied; no extra scalars. Default init: the toolkit's, the same as the Post-LN and Pre-LN it mixes (the
    paper's code draws every Linear from N(0, 0.02) for all its schemes).
    """

    name, label, color = "mix_ln", "Mix-LN", "goldenrod"
    final_norm = True
    options = {"mix_ln_fraction": SchemeOption(0.25, "Mix-LN: fraction of each stack's layers, from the input, that "
                                               "are Post-LN (the rest Pre-LN)", bounds=(0.0, 1.0))}

    def needs_depths(self) -> bool:
        return True

    def n_post(self, site: Site) -> int:
        """floor(a L): how many of the stack's first layers are Post-LN."""
        return math.floor(self.mix_ln_fraction * self.stack_depth(site) + 1e-9)

    def placement(self, site: Site) -> tuple[bool, bool, bool]:
        post = site.layer < self.n_post(site)
        return not post, False, post


class LNS(ResidualScheme):
    """LayerNorm Scaling (Sun et al. 2025, "The Curse of Depth in Large Language Models", arXiv 2502.05795, Sec. 4;
    lmsdss/LayerNorm-Scaling, OLMo-core's ``LayerNormScaledTransformerBlock``).

        x_i = x_{i-1} + Dropout(f_i(LN(x_{i-1}) / sqrt(l)))        final norm per stack, not scaled

    l is the layer's 1-based index in its stack, the same for every sub-layer of the layer; 1/sqrt(l) is a constant
    (``ScaledNorm``), not a parameter. Init: the paper's is plain, without the depth-scaled ("scaled
    initialisation") projections its Table 4 finds harmful with LNS. The toolkit's default init has no depth term,
    so LNS keeps it, the same as Pre-LN's: the comparison is scaled against unscaled at equal init (the paper's
    code draws every Linear from N(0, 0.02), for its Pre-LN baseline too).
    """

    name, label, color = "lns", "LayerNorm Scaling", "teal"
    pre_norm, post_norm, final_norm = True, False, True

    @staticmethod
    def scale(site: Site) -> float:
        return 1.0 / math.sqrt(site.layer + 1)

    def build_sublayer(self, branch: nn.Module, site: Site, dropout: float = 0.0) -> Sublayer:
        sub = super().build_sublayer(branch, site, dropout)
        sub.pre_norm = ScaledNorm(sub.pre_norm, self.scale(site))
        return sub


class HybridNorm(ResidualScheme):
    """HybridNorm (Zhuo et al. 2025, arXiv 2503.04598; BryceZhuo/HybridNorm's ``OLMoSequentialBlock``).

        attention:  y  = x + Dropout(W_o Attn(N_q(q), N_k(k), N_v(v)))    no input norm; per-head norms on q, k, v
        FFN:        x' = N(y) + Dropout(F(N(y)))                          the skip starts after the norm
        final norm per stack

    The per-head norms (over d_head, one gain for all heads) come before rotary positions. In the slots: the
    attention sub-layer is a Post-LN one (its post norm N(y) is both the FFN's input and its skip) and the FFN
    sub-layer has no norm, so nothing follows the FFN's add. This is not N(y + F(y)) on the FFN (the paper's
    "Post-Norm FFN" naming pitfall). ``hybridnorm_star`` (HybridNorm*): layer 0 is Pre-Norm for the attention
    (keeping its QKV-norm) and for the FFN; ``hybridnorm_v_norm=False`` leaves v un-normed (an ablation: at our
    small scale the v norm is what stalls training, see the README). Cross-attention (encoder-decoder) is treated as attention, its k and v
    normed per head from the encoder output. Default init (the paper's 1.2B config uses Megatron's init; its advice
    for small models is unverified).
    """

    name, label, color = "hybridnorm", "HybridNorm", "indigo"
    final_norm = True
    options = {"hybridnorm_star": SchemeOption(False, "HybridNorm*: layer 0 Pre-Norm (its attention keeps the "
                                               "QKV-norm)"),
               "hybridnorm_v_norm": SchemeOption(True, "HybridNorm: norm v per head too (the paper's QKV-norm); false "
                                                 "norms q and k only (an ablation)")}

    def placement(self, site: Site) -> tuple[bool, bool, bool]:
        if self.hybridnorm_star and site.layer == 0:
            return True, False, False
        return False, False, site.kind != "ffn"

    def build_sublayer(self, branch: nn.Module, site: Site, dropout: float = 0.0) -> Sublayer:
        if hasattr(branch, "add_head_norms"):
            branch.add_head_norms(self.make_norm, ("q", "k", "v") if self.hybridnorm_v_norm else ("q", "k"))
        return super().build_sublayer(branch, site, dropout)


SCHEMES: dict[str, type[ResidualScheme]] = {
    cls.name: cls for cls in (PostLN, PreLN, Admin, DeepNorm, SubLN, ReZero, ReZeroPostLN, Sandwich, TFixup, ResiDual,
                              MixLN, LNS, HybridNorm)}


def get_scheme(name: str, **options) -> ResidualScheme:
    """The scheme ``name`` built with its options (``norm``, Admin's ``admin_omega``...).

    As in ``ModelConfig``, an option of another scheme (``admin_omega`` for Post-LN) is accepted and unused; a name
    no scheme knows is an error.
    """
    try:
        cls = SCHEMES[name]
    except KeyError:
        raise ValueError(f"residual: got {name!r}, allowed: {', '.join(map(repr, SCHEMES))}") from None
    general = {"norm", "norm_eps", *GENERAL_OPTIONS}
    known = general | {o for c in SCHEMES.values() for o in c.options}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown scheme option(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
    return cls(**{k: v for k, v in options.items() if k in general or k in cls.options})


def scheme_from_config(cfg) -> ResidualScheme:
    """The scheme a ``ModelConfig`` names, with its options (and the settings of every scheme) read from it."""
    general = {k: getattr(cfg, k, v) for k, v in GENERAL_OPTIONS.items()}
    return get_scheme(cfg.residual, norm=getattr(cfg, "norm", "layernorm"), norm_eps=getattr(cfg, "norm_eps", None),
                      **general, **{k: getattr(cfg, k) for k in SCHEMES[cfg.residual].options})
