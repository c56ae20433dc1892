"""``attach``: the residual sites of models we did not write (tiny random Hugging Face models built from configs,
torch.nn's Transformer layers, a declared hand-written block) and of ours, checked against the models' own hidden
states and hand computations in float64; the analyses on them; hook hygiene."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transformer_ln import ModelConfig, build_model
from transformer_ln.diagnostics import (SitesError, angular_distances, attach, attention_logits, gradient_norms,
                                        hidden_state_stats, jsonable, layer_removal, log_partition, output_change,
                                        random_batch, random_blocks, residual_dependency, site_components,
                                        site_dependency, site_gradient_norms, site_output_change, site_values,
                                        verify_sites)

T = pytest.importorskip("transformers")
T.logging.set_verbosity_error()
V, L = 40, 3  # vocabulary, layers
EXACT = 1e-10


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def hooks_of(model: nn.Module) -> dict:
    """Every module's hook ids: Hugging Face installs hooks of its own (``output_hidden_states``), ours must go."""
    return {n: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for n, m in model.named_modules()}


def close(a, b, tol: float = EXACT) -> bool:
    a, b = ((t.detach() if torch.is_tensor(t) else torch.as_tensor(np.asarray(t))).double() for t in (a, b))
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


def batch(encdec: bool = False, pad: bool = True) -> dict:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, V, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    if pad:
        mask[1, 5:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if encdec:
        out["decoder_input_ids"] = torch.randint(2, V, (2, 6), generator=g)
    return out


def hf(family: str):
    """(model, batch) of a tiny float64 eval-mode model of ``family``, dropout 0."""
    torch.manual_seed(0)
    small = dict(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=L, num_attention_heads=4)
    llama_like = dict(small, num_key_value_heads=2, max_position_embeddings=32)
    bart = dict(vocab_size=V, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, dropout=0.0, attention_dropout=0.0,
                activation_dropout=0.0, max_position_embeddings=32, pad_token_id=1)
    bert = dict(small, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=32)
    build = {
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=V, n_positions=32, n_embd=16, n_layer=L, n_head=2,
                                                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**llama_like)),
        "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**llama_like)),
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**llama_like)),
        "bert": lambda: T.BertModel(T.BertConfig(**bert)),
        "roberta": lambda: T.RobertaModel(T.RobertaConfig(**bert)),
        "bart": lambda: T.BartForConditionalGeneration(T.BartConfig(**bart)),
        "marian": lambda: T.MarianMTModel(T.MarianConfig(**bart, decoder_start_token_id=1)),
        "t5": lambda: T.T5ForConditionalGeneration(T.T5Config(vocab_size=V, d_model=16, d_kv=8, d_ff=32,
                                                              num_layers=2, num_heads=2, dropout_rate=0.0)),
    }
    model = build[family]().double().eval()
    with torch.no_grad():  # norm gains away from 1, so the decomposition's scale is exercised (biases stay 0)
        for name, p in model.named_parameters():
            if "norm" in name.lower() and name.endswith("weight"):
                p.mul_(1 + 0.3 * torch.rand_like(p))
    return model, batch(encdec=family in ("bart", "marian", "t5"))


def hidden_states(model, kw) -> dict[str, tuple]:
    encoder_only = isinstance(model, (T.BertModel, T.RobertaModel))
    with torch.no_grad():
        out = model(**kw, output_hidden_states=True, **({} if encoder_only else {"use_cache": False}))
    if getattr(out, "encoder_hidden_states", None) is not None:
        return {"encoder": out.encoder_hidden_states, "decoder": out.decoder_hidden_states}
    return {"encoder" if encoder_only else "decoder": out.hidden_states}


FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "bert", "roberta", "bart", "marian", "t5")


@pytest.mark.parametrize("family", FAMILIES)
def test_sites_sum_to_the_models_own_hidden_states(family):
    model, kw = hf(family)
    sites = attach(model)
    hs = hidden_states(model, kw)
    before = hooks_of(model)
    values = {v["name"]: v for v in site_values(sites, kw)}
    for stack, subs in sites.stacks().items():
        assert stack in hs and subs[0].index == 1
        assert close(values[subs[0].name]["x"], hs[stack][0])  # the first shortcut is the embedding output
        blocks = [b for _, b in sites.blocks()[stack]]
        assert len(blocks) == len(hs[stack]) - 1
        for site in subs:
            v = values[site.name]
            assert close(v["x"] + v["a"], v["s"]), site.name
        for i, block in enumerate(blocks):
            last = [s for s in subs if s.block is block][-1]
            out = values[last.name]["out"]
            final = sites.outputs[stack].module
            if i == len(blocks) - 1 and final is not block:  # HF's last entry is after the final norm
                with torch.no_grad():
                    out = final(out)
            assert close(out, hs[stack][i + 1]), (stack, i)
        for prev, nxt in zip(subs, subs[1:]):  # the stream goes from one site to the next
            assert close(values[prev.name]["out"], values[nxt.name]["x"])
    pre = {"gpt2", "llama", "mistral", "qwen2", "t5"}
    assert all((s.pre_norm is not None) == (family in pre) != (s.post_norm is not None) for s in sites)
    assert hooks_of(model) == before


def test_gpt2_beta_through_attach_equals_beta_by_hand(tmp_path):
    model, kw = hf("gpt2")
    model.save_pretrained(tmp_path)
    model = T.GPT2LMHeadModel.from_pretrained(tmp_path).double().eval()  # a saved and reloaded model
    branches = []
    handles = [m.register_forward_hook(lambda m, i, o: branches.append(o[0] if isinstance(o, tuple) else o))
               for block in model.transformer.h for m in (block.attn, block.mlp)]
    x0 = hidden_states(model, kw)["decoder"][0]
    [h.remove() for h in handles]
    before = hooks_of(model)
    comps = [x0] + branches
    keep = kw["attention_mask"].bool()
    n = len(branches)
    s = np.zeros((n, n + 1))
    for i in range(n):
        for j in range(i + 2):
            s[i, j] = comps[j].std(dim=-1, unbiased=False)[keep].mean().item()
    beta = s / np.sqrt((s ** 2).sum(axis=1, keepdims=True))
    got = site_dependency(attach(model), kw)["decoder"]
    assert got.shape == (2 * L, 2 * L + 1) and close(got, beta)
    assert hooks_of(model) == before


def test_post_ln_components_sum_to_each_sub_layer_output():
    """BERT's LayerNorm decomposed per component: with zero biases the components of x_i sum to x_i."""
    model, kw = hf("bert")
    sites = attach(model)
    comps = site_components(sites, kw)["encoder"]
    values = {v["name"]: v for v in site_values(sites, kw)}
    for i, site in enumerate(sites):
        assert comps[i].shape[0] == i + 2
        assert close(comps[i].sum(0), values[site.name]["out"])
    beta = site_dependency(sites, kw)["encoder"]
    assert close((beta ** 2).sum(1), np.ones(len(sites))) and np.all(np.triu(beta, 2) == 0)


def test_foreign_rms_norms_decompose_exactly():
    from transformer_ln.diagnostics.attached import decompose

    model, _ = hf("llama")
    norm = model.model.layers[0].input_layernorm
    parts = [torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i in range(3)]
    x = sum(parts)
    exact = norm.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    assert close(sum(decompose(norm, parts, x)), exact)
    assert close(sum(decompose(norm, parts, x)), norm(x), 1e-6)  # LlamaRMSNorm itself squares in float32


def our_model(arch: str, residual: str):
    torch.manual_seed(0)
    cfg = dict(d_model=16, n_heads=2, d_ff=32, dropout=0.1, residual=residual, max_positions=32,
               admin_omega="O(logn)" if residual == "admin" else "profile")
    if arch == "decoder_only":
        cfg.update(arch=arch, n_dec_layers=2, tgt_vocab_size=V, positions="rope")
        inputs = (random_blocks(V, 3, 9, seed=2)["input"],)
    else:
        cfg.update(n_enc_layers=2, n_dec_layers=2, src_vocab_size=V, tgt_vocab_size=V)
        b = random_batch(V, 3, 9, seed=2)
        inputs = (b["src"], b["tgt_in"])
    return build_model(ModelConfig(**cfg)).double(), inputs


@pytest.mark.parametrize("arch,residual", [("encoder_decoder", "admin"), ("encoder_decoder", "pre_ln"),
                                           ("decoder_only", "pre_ln"), ("decoder_only", "resi_dual")])
def test_our_models_give_todays_numbers_through_attach(arch, residual):
    model, inputs = our_model(arch, residual)
    sites = attach(model)
    assert sites.family == "transformer_ln"
    ours, theirs = site_dependency(sites, inputs), residual_dependency(model, *inputs)
    assert ours.keys() == theirs.keys() and all(close(ours[s], theirs[s]) for s in ours)
    for options in ({}, {"perturbation": "grad_sign"}, {"read": "before_final_norm", "n_samples": 2}):
        a, b = site_output_change(sites, inputs, **options), output_change(model, *inputs, **options)
        assert a.keys() == b.keys() and all(abs(a[s] - b[s]) <= EXACT * b[s] for s in a), options
    a, b = site_gradient_norms(sites, inputs), gradient_norms(model, *inputs)
    assert list(a) == list(b) and all(np.isfinite(v["max"]).all() for v in attention_logits(sites, inputs).values())
    for name in a:
        for key in ("output_grad_norm", "param_grad_norm", "output_grad_rel", "param_grad_rel"):
            assert abs(a[name][key] - b[name][key]) <= EXACT * max(1.0, b[name][key]), (name, key)
    assert no_hooks(model)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_skipping_a_layer_equals_deleting_it(family):
    model, kw = hf(family)
    kw = {**kw, "labels": kw["input_ids"].masked_fill(kw["attention_mask"] == 0, -100)}
    result = layer_removal(attach(model), kw)["decoder"]
    with torch.no_grad():
        assert math.isclose(result["base_loss"], model(**kw, use_cache=False).loss.item(), rel_tol=EXACT)
    for i in range(L):
        cut = copy.deepcopy(model)
        layers = cut.transformer.h if family == "gpt2" else cut.model.layers
        del layers[i]
        setattr(cut.config, *(("n_layer", L - 1) if family == "gpt2" else ("num_hidden_layers", L - 1)))
        for j, layer in enumerate(layers):
            (layer.attn if family == "gpt2" else layer.self_attn).layer_idx = j
        with torch.no_grad():
            loss = cut(**kw, use_cache=False).loss.item()
        assert abs(result["loss"][i] - loss) <= EXACT * loss and math.isclose(
            result["delta"][i], loss - result["base_loss"], rel_tol=1e-9, abs_tol=1e-12)
    assert no_hooks(model)


def test_variance_and_angular_distance_from_hidden_states():
    model, kw = hf("gpt2")
    before_final = []
    handle = model.transformer.ln_f.register_forward_hook(lambda m, i, o: before_final.append(i[0]))
    hs, _ = list(hidden_states(model, kw)["decoder"]), handle.remove()
    hs[-1] = before_final[0]  # HF's last entry is after ln_f; ours is the last block's output
    before = hooks_of(model)
    keep = kw["attention_mask"].bool()
    stats = hidden_state_stats(attach(model), kw)["decoder"]
    var = [np.mean([h[b][keep[b]].var(unbiased=False).item() for b in range(2)]) for h in hs]
    assert close(stats["variance"], var) and stats["layer"] == list(range(L + 1))
    assert close(stats["norm"], [h[keep].norm(dim=-1).mean().item() for h in hs])
    last = keep.sum(1) - 1
    for token in ("all", "last"):
        got = angular_distances(attach(model), kw, token=token)["decoder"]
        assert got["gaps"] == list(range(1, L + 1)) and got["distance"].shape == (L, L)
        assert json.loads(json.dumps(jsonable(got)))["distance"][1][-1] is None  # l + n > L: NaN, null in JSON
        for k, n in enumerate(got["gaps"]):
            for i in range(L + 1 - n):
                a, b = (hs[i][keep], hs[i + n][keep]) if token == "all" else (
                    hs[i][torch.arange(2), last], hs[i + n][torch.arange(2), last])
                want = (torch.arccos(F.cosine_similarity(a, b, dim=-1)) / math.pi).mean().item()
                assert abs(got["distance"][k, i] - want) <= EXACT
    assert hooks_of(model) == before


def test_max_attention_logit_by_hand_gpt2_and_llama():
    model, kw = hf("gpt2")
    h0 = hidden_states(model, kw)["decoder"][0]
    attn = model.transformer.h[0].attn
    with torch.no_grad():
        q, k, _ = attn.c_attn(model.transformer.h[0].ln_1(h0)).split(16, dim=-1)
    heads = (lambda t: t.view(2, 7, 2, 8).transpose(1, 2))
    logits = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(8)
    keep = kw["attention_mask"].bool()
    ok = torch.ones(7, 7, dtype=torch.bool).tril() & keep[:, None, :, None] & keep[:, None, None, :]
    got = attention_logits(attach(model), kw)["decoder"]
    assert len(got["max"]) == L and abs(got["max"][0] - logits.masked_fill(~ok, -math.inf).max().item()) <= EXACT

    model, kw = hf("llama")
    rope = []
    handle = model.model.rotary_emb.register_forward_hook(lambda m, i, o: rope.append(o))
    h0, _ = hidden_states(model, kw)["decoder"][0], handle.remove()
    attn = model.model.layers[0].self_attn
    before = hooks_of(model)
    with torch.no_grad():
        x = model.model.layers[0].input_layernorm(h0)
        q, k = attn.q_proj(x).view(2, 7, 4, 4).transpose(1, 2), attn.k_proj(x).view(2, 7, 2, 4).transpose(1, 2)
    cos, sin = (t[:, None] for t in rope[0])
    turn = (lambda t: t * cos + torch.cat([-t[..., 2:], t[..., :2]], dim=-1) * sin)
    q, k = turn(q), turn(k).repeat_interleave(2, dim=1)
    logits = q @ k.transpose(-1, -2) * 4 ** -0.5
    got = attention_logits(attach(model), kw)["decoder"]
    assert abs(got["max"][0] - logits.masked_fill(~ok, -math.inf).max().item()) <= EXACT
    assert got["per_head"][0].shape == (4,)
    z = log_partition(attach(model), kw)
    with torch.no_grad():
        want = torch.logsumexp(model(**kw).logits, -1)[keep]
    assert abs(z["mean"] - want.mean().item()) <= EXACT and abs(z["max"] - want.max().item()) <= EXACT
    assert hooks_of(model) == before


@pytest.mark.parametrize("norm_first", [True, False])
def test_torch_transformer_layers(norm_first):
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, norm_first=norm_first,
                                                           batch_first=norm_first), 2,
                                enable_nested_tensor=False).double().eval()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    x = x if norm_first else x.transpose(0, 1)  # batch_first=False: (T, B, D)
    sites = attach(enc)
    assert [s.kind for s in sites] == ["self_attn", "ffn"] * 2 and sites.family == "torch"
    assert all((s.pre_norm is not None) == norm_first for s in sites)
    values = site_values(sites, x)  # eval, no grad: the fast path would skip the hooks
    outs = []
    handles = [layer.register_forward_hook(lambda m, i, o: outs.append(o)) for layer in enc.layers]
    with torch.no_grad():
        enc(x)
    [h.remove() for h in handles]
    for v in values:
        assert close(v["x"] + v["a"], v["s"])
    for i in range(2):
        want = outs[i] if norm_first else outs[i].transpose(0, 1)
        assert close(values[2 * i + 1]["out"], want)
    assert torch.backends.mha.get_fastpath_enabled()
    dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, norm_first=norm_first,
                                                           batch_first=True), 1).double().eval()
    kw = {"tgt": torch.randn(2, 4, 16, dtype=torch.float64), "memory": torch.randn(2, 5, 16, dtype=torch.float64)}
    sites = attach(dec)
    assert [s.kind for s in sites] == ["self_attn", "cross_attn", "ffn"]
    assert max(verify_sites(sites, kw).values()) <= EXACT
    assert no_hooks(enc) and no_hooks(dec)


class Block(nn.Module):
    """A hand-written Pre-LN block, as a user would write it."""

    def __init__(self, d: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.fail = False

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        if self.fail:
            raise RuntimeError("injected")
        return x + self.mlp(self.norm2(x))


class Net(nn.Module):
    def __init__(self, d: int = 16, n: int = 2):
        super().__init__()
        self.embed = nn.Embedding(V, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(n))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, V)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


DECLARATION = {"blocks": "layers", "sublayers": [("attn", "norm1", None), ("mlp", "norm2", None)],
               "final_norm": "norm"}


def test_unknown_model_gets_one_line_and_a_declared_block_works():
    mlp = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with pytest.raises(ValueError) as err:
        attach(mlp)
    assert isinstance(err.value, SitesError) and "\n" not in str(err.value) and "declar" in str(err.value)
    assert "import transformers" not in open(attach.__code__.co_filename).read()  # lazy: recognised by names
    torch.manual_seed(0)
    net = Net().double().eval()
    ids = torch.randint(0, V, (2, 6))
    sites = attach(net, DECLARATION)
    assert [s.name for s in sites] == ["layers.0.attn", "layers.0.mlp", "layers.1.attn", "layers.1.mlp"]
    assert max(verify_sites(sites, ids).values()) <= EXACT
    loss = (lambda out, inputs: F.cross_entropy(out.flatten(0, 1), inputs.flatten()))
    assert set(layer_removal(sites, ids, loss_fn=loss)) == {"decoder"}
    assert len(attention_logits(sites, ids)["decoder"]["max"]) == 2
    assert len(site_gradient_norms(sites, ids, loss_fn=loss)) == 4
    wrong = {**DECLARATION, "sublayers": [("attn", "norm2", None), ("mlp", "norm1", None)]}
    with pytest.raises(SitesError):
        site_dependency(attach(net, wrong), ids)  # x + a != s: an error, never a wrong number
    assert no_hooks(net)


def test_hooks_are_gone_also_when_the_analysis_raises():
    torch.manual_seed(0)
    net = Net().double()
    ids = torch.randint(0, V, (2, 6))
    sites = attach(net, DECLARATION)
    net.layers[1].fail = True
    loss = (lambda out, inputs: out.sum())
    for run in (lambda: site_dependency(sites, ids), lambda: site_gradient_norms(sites, ids, loss_fn=loss),
                lambda: site_output_change(sites, ids), lambda: hidden_state_stats(sites, ids),
                lambda: angular_distances(sites, ids), lambda: attention_logits(sites, ids),
                lambda: site_values(sites, ids)):
        with pytest.raises(RuntimeError, match="injected"):
            run()
        assert no_hooks(net) and torch.backends.mha.get_fastpath_enabled()
    net.layers[1].fail = False
    with pytest.raises(RuntimeError, match="boom"):
        layer_removal(sites, ids, loss_fn=lambda out, inputs: (_ for _ in ()).throw(RuntimeError("boom")))
    assert no_hooks(net) and net.training  # train/eval flags restored
