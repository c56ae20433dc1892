"""Today's depth analyses on the sites ``attach`` finds, through hooks only (every hook removed, error or not).

h_0 is a stack's input (the embedding output entering its first block), h_l the output of block l (l = 1..L),
before the stack's final norm: Hugging Face's ``hidden_states[l]`` except its last entry, which for GPT-2, LLaMA
and T5 is already after the final norm. Tokens are the real ones (attention masks; ours: non-pad), in float64.

* ``hidden_state_stats``: per layer the variance of h_l over (tokens, channels) of each sequence (biased), averaged
  over the sequences (the Curse-of-Depth / LayerNorm-Scaling growth), and the mean per-token L2 norm.
* ``angular_distances``: d(l, n) = arccos(cos(h_l, h_{l+n})) / pi per token (Gromov et al. 2024; Mix-LN),
  averaged over all real tokens (``token="all"``) or over each sequence's last real token (``"last"``, as Gromov
  and Mix-LN's ``angular_distance.py``; they sum over documents where we average). A zero vector counts as
  cosine 0 (distance 0.5, Mix-LN's NaN replacement). n = 1 is the distance between block l+1's input and output.
* ``layer_removal``: the loss with block l skipped (a forward hook returns the block's input: the same as a copy
  without the block) minus the loss of the whole model (Mix-LN's ``layer_remove.py`` deletes the block and
  evaluates elsewhere).
* ``attention_logits``: the largest q.k * scale per attention (over batch, heads, real queries and the keys each
  may attend to), scale as the model's (1/sqrt(d_head); T5 1), rotary positions applied (LLaMA's
  ``position_embeddings``, our ``rope``); additive biases (T5's relative buckets, ALiBi) are not included.
  Wortsman et al. 2023 plot its growth during training.
* ``log_partition``: log Z = logsumexp of the output logits per real token: mean, max, min, std and mean of
  (log Z)^2 (the z-loss term); its drift is these numbers compared across checkpoints.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from .attached import _loss, as_sites
from .hooks import mode as train_mode
from .hooks import registered_hooks
from .sites import QK, SitesError, Tap, block_in

TOKENS = ("all", "last")


def jsonable(value):
    """A result of these analyses as plain JSON: arrays to lists, NaN and infinities to None (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value.item() if isinstance(value, np.generic) else value


@torch.no_grad()
def block_streams(sites, inputs) -> dict[str, list[torch.Tensor]]:
    """``{stack: [h_0, h_1, ..., h_L]}``: float64 (B, T, D) tensors of one eval forward (module docstring)."""
    sites = as_sites(sites)
    found: dict[str, list] = {}
    with registered_hooks() as hooks, train_mode(sites.model, False):
        for stack, blocks in sites.blocks().items():
            out = found.setdefault(stack, [None] * (len(blocks) + 1))
            put = (lambda i, s=stack, out=out: (lambda v: out.__setitem__(i, sites.layout(s, v).double())))
            block_in(blocks[0][1]).register(hooks, put(0))
            for i, (_, block) in enumerate(blocks):
                Tap(block).register(hooks, put(i + 1))
        sites.run(inputs)
    return found


def _mask(keep: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
    return torch.ones(h.shape[:2], dtype=torch.bool, device=h.device) if keep is None else keep.to(h.device)


def hidden_state_stats(sites, inputs, keep=None) -> dict[str, dict[str, Any]]:
    """``{stack: {"layer": [0..L], "variance": (L+1,), "norm": (L+1,)}}`` (module docstring)."""
    sites = as_sites(sites)
    masks = sites.keep(inputs, keep)
    result = {}
    for stack, hs in block_streams(sites, inputs).items():
        keep_s = _mask(masks[stack], hs[0])
        var = [np.mean([h[b][keep_s[b]].var(unbiased=False).item() for b in range(h.shape[0])]) for h in hs]
        norm = [h[keep_s].norm(dim=-1).mean().item() for h in hs]
        result[stack] = {"layer": list(range(len(hs))), "variance": np.array(var), "norm": np.array(norm)}
    return result


def _angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-300)
    return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


def angular_distances(sites, inputs, gaps=None, token: str = "all", keep=None) -> dict[str, dict[str, Any]]:
    """``{stack: {"gaps": [n...], "distance": (len(gaps), L) array, "token": token}}``: ``distance[k, l]`` is
    d(l, gaps[k]) between h_l and h_{l+n} (NaN where l + n > L); ``gaps`` default 1..L."""
    if token not in TOKENS:
        raise ValueError(f"token: got {token!r}, allowed: {', '.join(map(repr, TOKENS))}")
    sites = as_sites(sites)
    masks = sites.keep(inputs, keep)
    result = {}
    for stack, hs in block_streams(sites, inputs).items():
        L = len(hs) - 1
        ns = list(range(1, L + 1)) if gaps is None else [int(n) for n in gaps]
        if any(n < 1 or n > L for n in ns):
            raise ValueError(f"gaps: got {ns}, each must be in 1..{L} (the {stack}'s blocks)")
        keep_s = _mask(masks[stack], hs[0])
        if token == "last":  # the last real position of each sequence
            pos = torch.arange(keep_s.shape[1], device=keep_s.device).expand_as(keep_s)
            last = torch.where(keep_s, pos, -1).amax(dim=1)
            pick = torch.zeros_like(keep_s).scatter_(1, last.clamp_min(0)[:, None], True) & (last >= 0)[:, None]
        else:
            pick = keep_s
        dist = np.full((len(ns), L), np.nan)
        for k, n in enumerate(ns):
            for l in range(L + 1 - n):
                dist[k, l] = _angle(hs[l][pick], hs[l + n][pick]).mean().item()
        result[stack] = {"gaps": ns, "distance": dist, "token": token}
    return result


def _skip(block: nn.Module):
    """A forward hook making ``block`` the identity: its output replaced by its stream input."""
    tap = block_in(block)

    def hook(module, args, kwargs, output):
        x = tap.raw(args, kwargs)
        if isinstance(x, tuple) or not isinstance(output, tuple):
            return x
        return (x,) + tuple(output[1:])
    return hook


@torch.no_grad()
def layer_removal(sites, inputs, loss_fn=None) -> dict[str, dict[str, Any]]:
    """``{stack: {"base_loss": float, "loss": (L,), "delta": (L,)}}``: the loss (``loss_fn(output, inputs)``, default
    the family's) with each block skipped in turn, in eval mode, and its change from the whole model's."""
    sites = as_sites(sites)
    fn = _loss(sites, loss_fn)
    with train_mode(sites.model, False):
        base = float(fn(sites.run(inputs), inputs))
        result = {}
        for stack, blocks in sites.blocks().items():
            losses = []
            for _, block in blocks:
                with registered_hooks() as hooks:
                    hooks.handles.append(block.register_forward_hook(_skip(block), with_kwargs=True))
                    losses.append(float(fn(sites.run(inputs), inputs)))
            result[stack] = {"base_loss": base, "loss": np.array(losses), "delta": np.array(losses) - base}
    return result


def _rotate(x: torch.Tensor, rope) -> torch.Tensor:
    """x (B, H, T, Dh) rotated LLaMA's way by (cos, sin) of shape (T, Dh) or (B, T, Dh)."""
    cos, sin = (t.to(x.dtype) for t in rope)
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def _heads(t: torch.Tensor, d: int) -> torch.Tensor:
    B, T, W = t.shape
    return t.reshape(B, T, W // d, d).transpose(1, 2)


def _mha_qk(qk: QK, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """q, k (B, T, E) of an nn.MultiheadAttention from its inputs, and its mask (True = may attend) or None."""
    m = qk.attention
    query, key = (args[i] if len(args) > i else kwargs[n] for i, n in ((0, "query"), (1, "key")))
    if not m.batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    E = m.embed_dim
    wq, wk = (m.in_proj_weight[:E], m.in_proj_weight[E:2 * E]) if m.in_proj_weight is not None \
        else (m.q_proj_weight, m.k_proj_weight)
    bias = m.in_proj_bias if m.in_proj_bias is not None else torch.zeros(3 * E, dtype=query.dtype)
    q, k = query @ wq.T + bias[:E], key @ wk.T + bias[E:2 * E]
    allowed = None
    attn_mask, pad = kwargs.get("attn_mask"), kwargs.get("key_padding_mask")
    if attn_mask is not None:
        allowed = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask > float("-inf")
        allowed = allowed[None, None] if allowed.dim() == 2 else allowed[:, None] if allowed.dim() == 3 else allowed
    elif kwargs.get("is_causal"):
        T, S = q.shape[1], k.shape[1]
        allowed = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)[None, None]
    if pad is not None:
        ok = (~pad if pad.dtype == torch.bool else pad > float("-inf"))[:, None, None, :]
        allowed = ok if allowed is None else allowed & ok
    return q, k, allowed


def _logits_max(qk: QK, got: dict, keep_q: torch.Tensor | None, keep_k: torch.Tensor | None) -> np.ndarray:
    """Per-head max of q.k * scale over the allowed (query, key) pairs of one call."""
    allowed = None
    if qk.mha:
        q, k, allowed = _mha_qk(qk, got["args"], got["kwargs"])
    elif qk.packed is not None:
        q, k, _ = got["packed"].chunk(3, dim=-1)
    else:
        q, k = got["q"], got["k"][..., :qk.k_cols] if qk.k_cols else got["k"]
    q, k = (q.double(), k.double()) if qk.heads else (_heads(q.double(), qk.head_dim), _heads(k.double(), qk.head_dim))
    rope = got["kwargs"].get("position_embeddings") if qk.rope == "hf" else \
        got["kwargs"].get("rope") if qk.rope == "ours" else None
    if rope is not None:
        q, k = _rotate(q, rope), _rotate(k, rope)
    if q.shape[1] != k.shape[1]:  # grouped keys: each serves H_q / H_k query heads
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q @ k.transpose(-1, -2)) * qk.scale  # (B, H, T, S)
    B, _, T, S = logits.shape
    ok = torch.ones(B, 1, T, S, dtype=torch.bool, device=logits.device)
    if qk.causal:
        ok = ok & torch.ones(T, S, dtype=torch.bool, device=ok.device).tril(S - T)
    if allowed is not None:
        ok = ok & allowed.to(ok.device)
    if keep_q is not None and keep_q.shape == (B, T):
        ok = ok & keep_q[:, None, :, None]
    if keep_k is not None and keep_k.shape == (B, S):
        ok = ok & keep_k[:, None, None, :]
    return logits.masked_fill(~ok, float("-inf")).amax(dim=(0, 2, 3)).cpu().numpy()


@torch.no_grad()
def attention_logits(sites, inputs, keep=None) -> dict[str, dict[str, Any]]:
    """``{stack: {"names": [...], "kinds": [...], "max": (n_attn,), "per_head": [(H,) arrays]}}``: the largest
    attention logit of each attention sub-layer (module docstring); a ``SitesError`` if no site exposes q and k."""
    sites = as_sites(sites)
    attn = [site for site in sites if site.qk is not None]
    if not attn:
        raise SitesError(f"no attention with readable queries and keys among {sites.family}'s sites")
    masks = sites.keep(inputs, keep)
    results: dict[int, np.ndarray] = {}

    def watch(site, hooks) -> None:
        qk, got = site.qk, {}

        def pre(module, args, kwargs):
            got.clear()
            got.update(args=args, kwargs=kwargs)
        hooks.handles.append(qk.attention.register_forward_pre_hook(pre, with_kwargs=True))
        for key in ("q", "k", "packed"):
            if getattr(qk, key) is not None:
                getattr(qk, key).register(hooks, lambda v, key=key: got.__setitem__(key, v))
        keys = masks.get("encoder") if site.kind == "cross_attn" else masks[site.stack]

        def post(module, args, output):
            results[id(site)] = _logits_max(qk, got, masks[site.stack], keys)
        hooks.handles.append(qk.attention.register_forward_hook(post))

    with registered_hooks() as hooks, train_mode(sites.model, False):
        for site in attn:
            watch(site, hooks)
        sites.run(inputs)
    out: dict[str, dict[str, Any]] = {}
    for site in attn:
        entry = out.setdefault(site.stack, {"names": [], "kinds": [], "max": [], "per_head": []})
        entry["names"].append(site.name)
        entry["kinds"].append(site.kind)
        entry["per_head"].append(results[id(site)])
        entry["max"].append(float(results[id(site)].max()))
    for entry in out.values():
        entry["max"] = np.array(entry["max"])
    return out


@torch.no_grad()
def log_partition(sites, inputs, keep=None) -> dict[str, float]:
    """``{"mean", "max", "min", "std", "mean_square", "n_tokens"}`` of log Z = logsumexp(logits) over the real
    tokens of the output (the logits' stack: the decoder's if the model has one); eval mode."""
    sites = as_sites(sites)
    with train_mode(sites.model, False):
        output = sites.run(inputs)
    logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    if logits is None:
        raise SitesError(f"{type(sites.model).__name__} returns no logits; analyse its language-model head class")
    log_z = torch.logsumexp(logits.double(), dim=-1)  # (B, T)
    masks = sites.keep(inputs, keep)
    mask = masks.get("decoder", masks.get("encoder"))
    if mask is not None and mask.shape == log_z.shape:
        log_z = log_z[mask.to(log_z.device)]
    z = log_z.flatten()
    return {"mean": z.mean().item(), "max": z.max().item(), "min": z.min().item(),
            "std": z.std(unbiased=False).item(), "mean_square": z.pow(2).mean().item(), "n_tokens": z.numel()}
