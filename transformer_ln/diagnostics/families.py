"""Recognisers: the residual sites of the model families ``attach`` knows without a declaration.

Recognised by class name and structure, never by importing ``transformers`` (an optional dependency):

* our own models: every ``Sublayer`` (x, a, s at its ``residual`` combiner, whose ``scales()`` are kept);
* Hugging Face GPT-2 (``GPT2Block``: ln_1, attn, ln_2, mlp) and the LLaMA family (``Llama``/``Mistral``/
  ``Qwen2DecoderLayer``: input_layernorm, self_attn, post_attention_layernorm, mlp): Pre-LN, one stack "decoder";
* BERT/RoBERTa (``BertLayer``...): Post-LN inside ``attention.output`` / ``output`` (dense, dropout,
  LayerNorm(h + input)), the branch term the dropout's output; stack "encoder";
* BART/Marian encoder and decoder layers: Post-LN (self_attn, encoder_attn, fc1/fc2, each followed by its
  ``*_layer_norm``), the branch term the attention's or fc2's output (their dropout is functional: exact in eval);
* T5 (``T5Block``: ``T5LayerSelfAttention``/``T5LayerCrossAttention``/``T5LayerFF``): Pre-LN with T5's RMS norm,
  the branch term the layer's dropout output;
* ``torch.nn.TransformerEncoderLayer``/``TransformerDecoderLayer``, either ``norm_first``; ``batch_first=False``
  stacks are read as (T, B, D) and turned to (B, T, D) by the analyses.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.sublayer import DualSublayer, Sublayer
from .hooks import pad_masks, stack_of
from .output_change import default_tgt_out
from .sites import EXAMPLE, QK, Sites, SitesError, SumTap, Tap, build, declared, mha_qk

LLAMA_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")
BERT_LAYERS = ("BertLayer", "RobertaLayer", "XLMRobertaLayer", "CamembertLayer")
BART_LAYERS = {"BartEncoderLayer": "encoder", "BartDecoderLayer": "decoder", "MarianEncoderLayer": "encoder",
               "MarianDecoderLayer": "decoder"}
FINAL_NORMS = ("ln_f", "norm", "final_layer_norm", "layer_norm", "final_norm")


def attach(model: nn.Module, declaration=None) -> Sites:
    """The residual sites of ``model`` in forward order (``Sites``: iterate it, or ``.stacks()``, ``.blocks()``).

    Recognised without a declaration: our own models (their ``Sublayer``s), Hugging Face GPT-2, LLaMA/Mistral/
    Qwen2, BERT/RoBERTa, BART/Marian and T5, and ``torch.nn.TransformerEncoderLayer``/``TransformerDecoderLayer``
    (both ``norm_first``). Anything else needs ``declaration`` (a ``Declaration``, its dict, or a list of them);
    an unknown model without one raises ``SitesError`` (a ``ValueError``) saying which declaration to write.
    """
    if declaration is not None:
        return declared(model, declaration)
    for recogniser in (_ours, _hugging_face, _torch_layers):
        sites = recogniser(model)
        if sites is not None:
            return sites
    raise SitesError(f"no residual sites recognised in {type(model).__name__}; declare them: {EXAMPLE}")


def _name(m: nn.Module) -> str:
    return type(m).__name__


def _container_norm(model: nn.Module, block_name: str) -> nn.Module | None:
    """The final norm of the stack holding ``block_name`` (``a.b.h.3``: an attribute of ``a.b``), if any."""
    parts = block_name.split(".")
    owner = model.get_submodule(".".join(parts[:-2])) if len(parts) > 2 else model
    for attr in FINAL_NORMS:
        norm = getattr(owner, attr, None)
        if isinstance(norm, nn.Module) and not isinstance(norm, (nn.Identity, nn.ModuleList)):
            return norm
    return None


# ---------------------------------------------------------------------------------------------------- our models
def _ours(model: nn.Module) -> Sites | None:
    subs = [(n, m) for n, m in model.named_modules() if isinstance(m, Sublayer)]
    if not subs:
        return None
    stacks: dict[str, list] = {}
    for name, sub in subs:
        bname = name.rpartition(".")[0]
        blocks = stacks.setdefault(stack_of(name, sub), [])
        if not blocks or blocks[-1][0] != bname:
            blocks.append((bname, model.get_submodule(bname) if bname else model, []))
        res = sub.residual
        kind = sub.site.kind if getattr(sub, "site", None) is not None else name.rpartition(".")[2]
        blocks[-1][2].append({
            "name": name, "kind": kind, "branch": sub.branch, "modules": (sub,),
            "pre_norm": None if isinstance(sub.pre_norm, nn.Identity) else sub.pre_norm,
            "post_norm": None if isinstance(sub.post_norm, nn.Identity) else sub.post_norm,
            "x": Tap(res, "in", 0), "a": Tap(res, "in", 1), "s": Tap(res), "out": Tap(sub, streams=True),
            "scales": getattr(res, "scales", None), "qk": _our_qk(sub.branch, kind, stack_of(name, sub))})
    order = [(s, stacks[s]) for s in ("encoder", "decoder") if s in stacks]
    sites = build(model, "transformer_ln", order, {}, keep_fn=lambda inputs: pad_masks(model, *inputs),
                  loss_fn=_our_loss(model))
    last = {s: v[-1] for s, v in sites.stacks().items()}
    sites.before_final = {s: Tap(site.out.module, cat=True) for s, site in last.items()}
    if hasattr(model, "encoder") and hasattr(model, "decoder"):
        sites.outputs = {s: Tap(getattr(model, s)) for s in last}
    elif hasattr(model, "final_norm") and "decoder" in last:  # CausalLM: scheme.end(x, final_norm)
        sub, norm = last["decoder"].out.module, Tap(model.final_norm)
        sites.outputs = {"decoder": SumTap(Tap(sub), norm) if isinstance(sub, DualSublayer) else norm}
    return sites


def _our_qk(branch: nn.Module, kind: str, stack: str) -> QK | None:
    """Our attentions: self-attention's packed qkv_proj (rope from its ``rope`` keyword; causal in a decoder),
    cross-attention's q_proj and the key half of kv_proj; with per-head QK-norms (``model.qk_norm``, HybridNorm)
    the norms' outputs, which are what the attention multiplies."""
    d_head = getattr(branch, "d_head", None)
    if d_head is None:
        return None
    if not isinstance(getattr(branch, "q_norm", nn.Identity()), nn.Identity):
        return QK(branch, d_head, d_head ** -0.5, q=Tap(branch.q_norm), k=Tap(branch.k_norm), heads=True,
                  rope="ours" if hasattr(branch, "qkv_proj") else None, causal=stack == "decoder" and
                  hasattr(branch, "qkv_proj"))
    if hasattr(branch, "qkv_proj"):
        return QK(branch, d_head, d_head ** -0.5, packed=Tap(branch.qkv_proj), rope="ours", causal=stack == "decoder")
    return QK(branch, d_head, d_head ** -0.5, q=Tap(branch.q_proj), k=Tap(branch.kv_proj), k_cols=branch.d_model)


def _our_loss(model: nn.Module):
    def loss(output: torch.Tensor, inputs) -> torch.Tensor:
        """Mean next-token cross-entropy over non-pad targets (the toolkit's ``token_loss``)."""
        pad = model.cfg.pad_id
        target = default_tgt_out(inputs[-1], pad)
        logits = output.float() if output.dtype in (torch.float16, torch.bfloat16) else output
        return F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=pad)
    return loss


# ------------------------------------------------------------------------------------------------ Hugging Face
def _hf_qk(attn: nn.Module, q: str, k: str, head_dim: int, causal: bool, rope: str | None = None,
           scale: float | None = None) -> QK:
    scale = getattr(attn, "scaling", head_dim ** -0.5) if scale is None else scale
    return QK(attn, head_dim, float(scale), q=Tap(getattr(attn, q)), k=Tap(getattr(attn, k)), rope=rope,
              causal=causal)


def _gpt2(block: nn.Module) -> list[dict]:
    if hasattr(block, "crossattention"):
        raise SitesError("GPT-2 with add_cross_attention: its cross-attention site is not recognised; declare the "
                         f"blocks: {EXAMPLE}")
    attn = block.attn
    qk = QK(attn, attn.head_dim, float(getattr(attn, "scaling", attn.head_dim ** -0.5)), packed=Tap(attn.c_attn),
            causal=True)
    return [{"kind": "self_attn", "branch": attn, "pre_norm": block.ln_1, "post_norm": None, "qk": qk},
            {"kind": "ffn", "branch": block.mlp, "pre_norm": block.ln_2, "post_norm": None}]


def _llama(block: nn.Module) -> list[dict]:
    attn = block.self_attn
    qk = _hf_qk(attn, "q_proj", "k_proj", attn.head_dim, True, rope="hf")
    return [{"kind": "self_attn", "branch": attn, "pre_norm": block.input_layernorm, "post_norm": None, "qk": qk},
            {"kind": "ffn", "branch": block.mlp, "pre_norm": block.post_attention_layernorm, "post_norm": None}]


def _bert(block: nn.Module) -> list[dict]:
    def attention(att: nn.Module, kind: str) -> dict:
        s = att.self
        return {"kind": kind, "branch": att.output.dropout, "pre_norm": None, "post_norm": att.output.LayerNorm,
                "modules": (att,), "qk": _hf_qk(s, "query", "key", s.attention_head_size,
                                               kind == "self_attn" and bool(getattr(block, "is_decoder", False)))}
    specs = [attention(block.attention, "self_attn")]
    if hasattr(block, "crossattention"):
        specs.append(attention(block.crossattention, "cross_attn"))
    specs.append({"kind": "ffn", "branch": block.output.dropout, "pre_norm": None,
                  "post_norm": block.output.LayerNorm, "modules": (block.intermediate, block.output)})
    return specs


def _bart(block: nn.Module, stack: str) -> list[dict]:
    def attention(attn: nn.Module, norm: nn.Module, kind: str) -> dict:
        return {"kind": kind, "branch": attn, "pre_norm": None, "post_norm": norm, "modules": (attn, norm),
                "qk": _hf_qk(attn, "q_proj", "k_proj", attn.head_dim, kind == "self_attn" and stack == "decoder")}
    specs = [attention(block.self_attn, block.self_attn_layer_norm, "self_attn")]
    if hasattr(block, "encoder_attn"):
        specs.append(attention(block.encoder_attn, block.encoder_attn_layer_norm, "cross_attn"))
    specs.append({"kind": "ffn", "branch": block.fc2, "pre_norm": None, "post_norm": block.final_layer_norm,
                  "modules": (block.fc1, block.fc2, block.final_layer_norm)})
    return specs


def _t5(block: nn.Module) -> list[dict]:
    specs = []
    for layer in block.layer:
        attn = getattr(layer, "SelfAttention", None) or getattr(layer, "EncDecAttention", None)
        kind = "ffn" if attn is None else ("self_attn" if hasattr(layer, "SelfAttention") else "cross_attn")
        qk = None if attn is None else _hf_qk(attn, "q", "k", attn.key_value_proj_dim,
                                               kind == "self_attn" and bool(block.is_decoder), scale=1.0)
        specs.append({"kind": kind, "branch": layer.dropout, "pre_norm": layer.layer_norm, "post_norm": None,
                      "modules": (layer,), "qk": qk})
    return specs


def _hf_keep(encdec: bool, stack: str):
    def keep(inputs) -> dict:
        if not isinstance(inputs, dict):
            return {}
        mask = {"encoder": inputs.get("attention_mask"), "decoder": inputs.get("decoder_attention_mask")} if encdec \
            else {stack: inputs.get("attention_mask")}
        return {s: m for s, m in mask.items() if isinstance(m, torch.Tensor) and m.dim() == 2}
    return keep


def _hf_loss(task: str):
    def loss(output, inputs) -> torch.Tensor:
        """The model's own loss when the batch has labels; else next-token cross-entropy of the logits on the
        (decoder) input ids, masked positions left out."""
        if getattr(output, "loss", None) is not None:
            return output.loss
        if task == "encoder":
            raise SitesError("an encoder-only model's loss: put labels in the batch or pass loss_fn=")
        batch = inputs if isinstance(inputs, dict) else {"input_ids": inputs[0]}
        key, mkey = ("input_ids", "attention_mask") if task == "causal" else ("decoder_input_ids",
                                                                               "decoder_attention_mask")
        ids, mask = batch[key], batch.get(mkey)
        target = ids[:, 1:] if mask is None else ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        logits = output.logits if hasattr(output, "logits") else output[0]
        logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), target.flatten(), ignore_index=-100)
    return loss


def _hugging_face(model: nn.Module) -> Sites | None:
    found: list[tuple[str, str, str, nn.Module]] = []  # (family, stack, name, block)
    for name, m in model.named_modules():
        cls = _name(m)
        if cls == "GPT2Block":
            found.append(("gpt2", "decoder", name, m))
        elif cls in LLAMA_LAYERS:
            found.append(("llama", "decoder", name, m))
        elif cls in BERT_LAYERS and hasattr(m, "attention") and hasattr(m.attention, "output"):
            found.append(("bert", "encoder", name, m))
        elif cls in BART_LAYERS:
            found.append(("bart", BART_LAYERS[cls], name, m))
        elif cls == "T5Block":
            found.append(("t5", "decoder" if m.is_decoder else "encoder", name, m))
    if not found:
        return None
    family = found[0][0]
    if any(f != family for f, *_ in found):
        raise SitesError(f"{type(model).__name__} mixes {sorted({f for f, *_ in found})} blocks; declare the "
                         f"sites: {EXAMPLE}")
    make = {"gpt2": _gpt2, "llama": _llama, "bert": _bert, "t5": _t5}
    stacks: dict[str, list] = {}
    finals = {}
    for _, stack, name, block in found:
        specs = _bart(block, stack) if family == "bart" else make[family](block)
        stacks.setdefault(stack, []).append((name, block, specs))
        finals[stack] = _container_norm(model, name)
    order = [(s, stacks[s]) for s in ("encoder", "decoder") if s in stacks]
    encdec = len(order) == 2
    task = "seq2seq" if encdec else ("causal" if "decoder" in stacks else "encoder")
    return build(model, family, order, finals, keep_fn=_hf_keep(encdec, order[0][0]), loss_fn=_hf_loss(task),
                 call_kwargs={} if family == "bert" else {"use_cache": False})


# ------------------------------------------------------------------------------------------------ torch.nn layers
def _torch_layers(model: nn.Module) -> Sites | None:
    stacks: dict[str, list] = {}
    finals, seq_first = {}, set()
    for name, m in model.named_modules():
        if isinstance(m, nn.TransformerEncoderLayer):
            stack, attns = "encoder", [("self_attn", m.self_attn, m.dropout1, m.norm1)]
            ffn = (m.dropout2, m.norm2)
        elif isinstance(m, nn.TransformerDecoderLayer):
            stack = "decoder"
            attns = [("self_attn", m.self_attn, m.dropout1, m.norm1), ("cross_attn", m.multihead_attn, m.dropout2,
                                                                        m.norm2)]
            ffn = (m.dropout3, m.norm3)
        else:
            continue
        first = m.norm_first
        specs = [{"kind": kind, "branch": drop, "pre_norm": norm if first else None,
                  "post_norm": None if first else norm, "modules": (attn, norm),
                  "qk": mha_qk(attn, False)} for kind, attn, drop, norm in attns]
        specs.append({"kind": "ffn", "branch": ffn[0], "pre_norm": ffn[1] if first else None,
                      "post_norm": None if first else ffn[1], "modules": (m.linear1, m.linear2, ffn[1])})
        stacks.setdefault(stack, []).append((name or "layer", m, specs))
        finals[stack] = _container_norm(model, name) if name.count(".") else None
        if not m.self_attn.batch_first:
            seq_first.add(stack)
    if not stacks:
        return None

    def keep(inputs) -> dict:
        if not isinstance(inputs, dict):
            return {}
        masks = {"encoder": inputs.get("src_key_padding_mask"), "decoder": inputs.get("tgt_key_padding_mask")}
        return {s: ~m.bool() for s, m in masks.items() if isinstance(m, torch.Tensor)}

    order = [(s, stacks[s]) for s in ("encoder", "decoder") if s in stacks]
    return build(model, "torch", order, finals, keep_fn=keep, seq_first=frozenset(seq_first))
