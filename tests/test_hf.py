"""Hugging Face interop (``transformer_ln.interop``): a converted GPT-2 or LLaMA computes what Hugging Face's does.

Tiny random models built from configs (nothing from the hub), every weight drawn at random (norm gains around 1,
biases non-zero, so a swapped or misplaced tensor shows), dropout 0, float64, eval mode. Three checks per family:
logits, the mean next-token cross-entropy that ``model(ids, labels=ids).loss`` gives, and greedy generation.
"""
import math

import pytest
import torch
import torch.nn.functional as F
import transformers  # a test dependency (pyproject's test extra): not skipped when missing
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from transformer_ln import CausalLM, ModelConfig, from_hf, to_hf

V, D, H, L, P = 97, 48, 4, 3, 64  # vocabulary, width, heads, layers, positions
NEW = 10  # greedy tokens


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors this small gain nothing from intra-op threads, and on a busy 2-core machine two spinning threads made
    a 10-token generate 40 times slower (6.6 s against 0.16 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            z = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            is_gain = p.dim() == 1 and name.endswith("weight")  # LayerNorm / RMSNorm gains
            p.copy_(1 + std * z if is_gain else std * z)


def _gpt2(activation: str = "gelu_new", tied: bool = True) -> GPT2LMHeadModel:
    cfg = GPT2Config(n_embd=D, n_head=H, n_layer=L, vocab_size=V, n_positions=P, activation_function=activation,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tied,
                     bos_token_id=None, eos_token_id=None, attn_implementation="eager")
    model = GPT2LMHeadModel(cfg).double().eval()
    _randomize(model)
    return model


def _llama(tied: bool = False, bias: bool = False, attn: str = "sdpa", **kw) -> LlamaForCausalLM:
    cfg = LlamaConfig(hidden_size=D, num_attention_heads=H, intermediate_size=2 * D, num_hidden_layers=L,
                      vocab_size=V, max_position_embeddings=P, rms_norm_eps=1e-6, tie_word_embeddings=tied,
                      attention_bias=bias, mlp_bias=bias, rope_theta=500.0, bos_token_id=None, eos_token_id=None,
                      attn_implementation=attn, **kw)
    model = LlamaForCausalLM(cfg).double().eval()
    _randomize(model, seed=1)
    return model


def _ids(seed: int = 0, batch: int = 2, length: int = 16) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def _loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each position's next token (what HF's labels=ids computes after its shift)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _greedy(model: CausalLM, ids: torch.Tensor, n: int) -> torch.Tensor:
    cache, out, step = model.new_cache(), ids, ids
    for _ in range(n):
        nxt = model(step, cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
        out, step = torch.cat([out, nxt], 1), nxt
    return out


def _hf_greedy(hf, ids: torch.Tensor, n: int) -> torch.Tensor:
    return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)


def _compare(hf, ids):
    """(max |logits ours - HF|, |loss ours - HF|, ours vs. CE of HF's float64 logits, ours, HF outputs)."""
    ours = from_hf(hf)
    assert next(ours.parameters()).dtype == torch.float64 and not ours.training
    with torch.no_grad():
        out = hf(ids, labels=ids)
        logits = ours(ids)
        loss = _loss(logits, ids)
    return ours, logits, loss, out


@torch.no_grad()
@pytest.mark.parametrize("activation,tied", [("gelu_new", True), ("gelu", False)])
def test_gpt2_matches_hugging_face(activation, tied):
    hf, ids = _gpt2(activation, tied), _ids()
    ours, logits, loss, out = _compare(hf, ids)
    assert ours.cfg.activation == {"gelu_new": "gelu_tanh", "gelu": "gelu"}[activation]
    assert (logits - out.logits).abs().max() < 1e-10  # measured 4.9e-15 (gelu_new), 6.2e-15 (gelu)
    # HF's ForCausalLMLoss upcasts with logits.float(), which for a float64 model is a cast DOWN to float32: its loss
    # is float32 (measured |ours - HF| 2.9e-7 and 5.3e-7: float32 rounding of a loss near 5). Ours agrees with the
    # float64 cross-entropy of HF's own logits under its label shift to 1e-10 (measured 9e-16, 2.7e-15), and HF's
    # loss is that cross-entropy of its logits cast to float32.
    assert out.loss.dtype == torch.float32 and abs(loss.item() - out.loss.item()) < 2e-6
    assert abs(loss - _loss(out.logits, ids)) < 1e-10
    assert abs(_loss(out.logits.float(), ids) - out.loss) < 1e-6
    prompt = ids[:, :8]
    assert torch.equal(_greedy(ours, prompt, NEW), _hf_greedy(hf, prompt, NEW))


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _llama_reference(hf, ids: torch.Tensor) -> torch.Tensor:
    """LLaMA's forward written out in float64 from the HF model's own weights: RMSNorm, RoPE (rotate_half), causal
    softmax attention, SwiGLU, final norm, lm_head; everything HF's code runs in float32 is float64 here."""
    c, w = hf.config, {k: v.double() for k, v in hf.state_dict().items()}
    B, T = ids.shape
    Dh, eps = D // H, c.rms_norm_eps
    inv = 500.0 ** -(torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def rotate(x):
        return x * cos + torch.cat([-x[..., Dh // 2:], x[..., :Dh // 2]], -1) * sin

    def linear(x, name):
        b = w.get(name + ".bias")
        return x @ w[name + ".weight"].T + (0 if b is None else b)

    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    x = w["model.embed_tokens.weight"][ids]
    for i in range(L):
        p = f"model.layers.{i}."
        h = _rms(x, w[p + "input_layernorm.weight"], eps)
        q, k, v = (linear(h, p + f"self_attn.{n}_proj").view(B, T, H, Dh).transpose(1, 2) for n in "qkv")
        scores = (rotate(q) @ rotate(k).transpose(-1, -2) / math.sqrt(Dh)).masked_fill(future, -math.inf)
        a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D)
        x = x + linear(a, p + "self_attn.o_proj")
        h = _rms(x, w[p + "post_attention_layernorm.weight"], eps)
        x = x + linear(F.silu(linear(h, p + "mlp.gate_proj")) * linear(h, p + "mlp.up_proj"), p + "mlp.down_proj")
    x = _rms(x, w["model.norm.weight"], eps)
    return x @ w["model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"].T


@torch.no_grad()
@pytest.mark.parametrize("tied,bias,attn", [(False, False, "sdpa"), (True, True, "eager")])
def test_llama_matches_hugging_face(tied, bias, attn):
    hf, ids = _llama(tied, bias, attn), _ids(1)
    ours, logits, loss, out = _compare(hf, ids)
    assert (ours.cfg.rope_theta, ours.cfg.norm_eps, ours.cfg.bias, ours.cfg.tie_embeddings) == (500.0, 1e-6, bias,
                                                                                                  tied)
    # HF's LLaMA is float32 inside a float64 model: LlamaRMSNorm casts to float32, the rotary cos/sin come from
    # float32 angles, eager attention's softmax runs in float32. Measured max |ours - HF| on logits up to ~6 (float32
    # rounding ~7e-7 there, compounded over 3 layers): 5.9e-6 (sdpa case), 2.8e-6 (eager case). HF differs from the
    # float64 reference below by the same amount, while ours agrees with it to 8e-15. So: 2e-5 against HF, 1e-10
    # against the exact float64 formula.
    ref = _llama_reference(hf, ids)
    assert (logits - out.logits).abs().max() < 2e-5
    assert (out.logits - ref).abs().max() > 1e-9  # the gap is HF's float32 (if this fails, tighten the line above)
    assert (logits - ref).abs().max() < 1e-10
    # the loss: HF's is float32 (see the GPT-2 test); float64 against the reference to 1e-10
    assert out.loss.dtype == torch.float32 and abs(loss.item() - out.loss.item()) < 2e-6
    assert abs(loss - _loss(ref, ids)) < 1e-10
    prompt = ids[:, :8]
    # greedy tokens agree exactly: the smallest top-2 logit gap on this draw (measured 4e-3) is far above HF's 6e-6
    assert torch.equal(_greedy(ours, prompt, NEW), _hf_greedy(hf, prompt, NEW))


# --------------------------------------------------------------------------------------------------------------
# converter round trips


def _ours(preset: str, **kw) -> CausalLM:
    torch.manual_seed(0)
    cfg = ModelConfig(preset=preset, d_model=D, n_heads=H, d_ff=2 * D, n_dec_layers=2, tgt_vocab_size=V,
                      max_positions=P, dropout=0.0, **kw)
    model = CausalLM(cfg).double().eval()
    _randomize(model, seed=2)
    return model


@torch.no_grad()
@pytest.mark.parametrize("preset,kw", [("gpt2", {}), ("gpt2", {"activation": "relu", "tie_embeddings": False}),
                                       ("llama", {}), ("llama", {"bias": True, "tie_embeddings": True})])
def test_to_hf_then_from_hf_round_trip(tmp_path, preset, kw):
    ours, ids = _ours(preset, **kw), _ids(2)
    assert to_hf(ours, tmp_path) == tmp_path
    back = from_hf(str(tmp_path))
    assert back.cfg.to_dict() == ours.cfg.to_dict()
    a, b = ours.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(back(ids), ours(ids))
    # and Hugging Face itself reads the directory and computes the same function
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), local_files_only=True).eval()
    assert next(hf.parameters()).dtype == torch.float64
    assert (hf(ids).logits - ours(ids)).abs().max() < (1e-10 if preset == "gpt2" else 2e-5)  # HF LLaMA: float32 inside


@torch.no_grad()
@pytest.mark.parametrize("make", [_gpt2, _llama])
def test_from_hf_reads_a_save_pretrained_directory(tmp_path, make):
    hf, ids = make(), _ids(3)
    hf.save_pretrained(str(tmp_path))
    ours = from_hf(tmp_path)
    assert torch.equal(ours(ids), from_hf(hf)(ids))
    assert from_hf(tmp_path, dtype=torch.float32).embed.embed_tokens.weight.dtype == torch.float32


def test_from_hf_refuses_what_it_cannot_represent(tmp_path):
    gqa = LlamaConfig(hidden_size=D, num_attention_heads=H, num_key_value_heads=2, intermediate_size=2 * D,
                      num_hidden_layers=1, vocab_size=V, max_position_embeddings=P)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        from_hf(LlamaForCausalLM(gqa))
    gqa.save_pretrained(str(tmp_path / "gqa"))  # refused from the config alone, before any weights are read
    with pytest.raises(ValueError, match="num_key_value_heads"):
        from_hf(tmp_path / "gqa")
    other = transformers.GPTNeoXConfig(hidden_size=D, num_attention_heads=H, intermediate_size=2 * D,
                                       num_hidden_layers=1, vocab_size=V)
    other.save_pretrained(str(tmp_path / "neox"))
    with pytest.raises(ValueError, match="model_type.*gpt_neox"):
        from_hf(tmp_path / "neox")
    with pytest.raises(ValueError, match="rope"):
        from_hf(_llama(rope_scaling={"rope_type": "linear", "factor": 2.0}))
    for option in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        cfg = GPT2Config(n_embd=D, n_head=H, n_layer=1, vocab_size=V, n_positions=P, **{option: True})
        with pytest.raises(ValueError, match=option):
            from_hf(GPT2LMHeadModel(cfg))
    with pytest.raises(ValueError, match="config.json"):
        from_hf(tmp_path / "nowhere")


@pytest.mark.parametrize("preset,kw,field", [
    ("gpt2", {"residual": "post_ln"}, "model.residual"),
    ("gpt2", {"residual": "subln"}, "model.residual"),
    ("gpt2", {"positions": "sinusoidal"}, "model.positions"),
    ("gpt2", {"scale_embeddings": True}, "model.scale_embeddings"),
    ("gpt2", {"norm": "rmsnorm"}, "model.norm"),
    ("gpt2", {"activation": "swiglu"}, "model.activation"),
    ("gpt2", {"bias": False}, "model.bias"),
    ("llama", {"activation": "gelu"}, "model.activation"),
])
def test_to_hf_refuses_models_hugging_face_cannot_represent(tmp_path, preset, kw, field):
    with pytest.raises(ValueError, match=field):
        to_hf(_ours(preset, **kw), tmp_path)
    assert not any(tmp_path.iterdir())


def test_transformers_is_imported_only_when_a_converter_runs(monkeypatch, tmp_path):
    import ast
    import sys

    import transformer_ln.interop.hf as hf_module

    top = [n for n in ast.parse(open(hf_module.__file__).read()).body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not any("transformers" in ast.unparse(n) for n in top)  # so `import transformer_ln` works without it
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install transformer_ln\[hf\]"):
        from_hf(tmp_path)
    with pytest.raises(ImportError, match=r"pip install transformer_ln\[hf\]"):
        to_hf(_ours("gpt2"), tmp_path)
