"""Our decoder-only ``CausalLM`` against Hugging Face's ``GPT2LMHeadModel`` and ``LlamaForCausalLM`` of the same shape.

Why this design: as ``throughput.py``, every figure is a ratio measured in one process with the models' steps
interleaved, so a noisy shared machine slows both sides alike. Each pair is built once: our gpt2- or llama-shaped
model, the Hugging Face model of its config (``interop.hf.hf_config_of``, SDPA attention), and our model then loaded
with the Hugging Face weights (``from_hf``, strict): the shape is the same by construction, the parameter counts are
printed, and both sides compute the same function (the largest logit difference in eval mode is printed, and the
greedy tokens of the two sides are compared).

Shape (``small``): d_model 256, 4 heads (d_head 64), 4 layers, d_ff 1024 for GPT-2 (4 d) and 688 for LLaMA (about
8/3 d, SwiGLU's three matrices), vocabulary 8000 (GPT-2 tied, LLaMA untied, as those models), batch 8 x 256 tokens.
GPT-2 on the Hugging Face side has its own checkpoints' activation ``gelu_new`` (a Python tanh-GELU);
``--hf-gelu gelu_pytorch_tanh`` gives it the fused kernel ours uses, to see how much of the gap that is.

- Training step: forward, cross-entropy of the next token (computed the same way outside both models), backward,
  fused AdamW. The four models step in turn, round-robin (A, B, C, D, A, ...: none runs twice in a row), warm-up
  steps excluded, median reported. Dropout: ``--dropout`` (0.1) on the GPT-2 pair wherever GPT-2 has it
  (embeddings, residual branches, attention weights); none on the LLaMA pair, which has no residual dropout (as
  LLaMA trains). Hugging Face runs with ``use_cache=False`` (no cache built in training).
- Generation: greedy, batch 1, a ``--prompt``-token prompt then ``--new`` tokens. Ours: a plain loop over
  ``model(tok, cache, last_only=True)``; Hugging Face: ``generate(do_sample=False, max_new_tokens=N,
  min_new_tokens=N)``. Tokens/s count the new tokens over the whole call (prefill included), median of
  ``--repeats``.

Eager, CPU, float32. ``--quick`` is a smoke run of tiny sizes (the test suite's).

    python benchmarks/lm_speed.py
    python benchmarks/lm_speed.py --threads 1 --steps 20 --json lm_speed.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transformer_ln import CausalLM, ModelConfig  # noqa: E402
from transformer_ln.interop.hf import from_hf, hf_config_of  # noqa: E402

FAMILIES = ("gpt2", "llama")
HF_NAMES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}


@dataclass(frozen=True)
class Shape:
    d_model: int
    n_heads: int
    layers: int
    d_ff_gpt2: int   # 4 d
    d_ff_llama: int  # about 8/3 d, a multiple of 16 (LLaMA's ratio; SwiGLU has three d x d_ff matrices)
    vocab: int
    batch: int
    seq_len: int
    max_positions: int


SHAPES = {
    "small": Shape(256, 4, 4, 1024, 688, 8000, 8, 256, 512),
    "quick": Shape(64, 2, 2, 256, 176, 512, 2, 32, 64),
}


def build_pair(family: str, shape: Shape, dropout: float, seed: int,
               hf_gelu: str = "gelu_new") -> tuple[CausalLM, torch.nn.Module]:
    """Our model and the Hugging Face one of the same config, holding the same weights."""
    import transformers

    torch.manual_seed(seed)
    p = dropout if family == "gpt2" else 0.0
    cfg = ModelConfig(preset=family, d_model=shape.d_model, n_heads=shape.n_heads, n_dec_layers=shape.layers,
                      d_ff=shape.d_ff_gpt2 if family == "gpt2" else shape.d_ff_llama, tgt_vocab_size=shape.vocab,
                      max_positions=shape.max_positions, dropout=p, attn_dropout=p, act_dropout=0.0)
    ours = CausalLM(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        overrides = {"activation_function": hf_gelu} if family == "gpt2" else {}
        hf = transformers.AutoModelForCausalLM.from_config(hf_config_of(ours, **overrides),
                                                           attn_implementation="sdpa")
    ours.load_state_dict(from_hf(hf).state_dict(), strict=True)
    # no eos: generation runs the full length and needs no min-length processor; pad id only to silence a warning
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return ours, hf


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights counted once (parameters() deduplicates)


class Trainer:
    """One model, its fused AdamW and its training step."""

    def __init__(self, name: str, model: torch.nn.Module, hf: bool):
        self.name, self.model, self.hf = name, model.train(), hf
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
        self.ms: list[float] = []
        self.loss = float("nan")

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids, use_cache=False).logits if self.hf else self.model(ids)

    def step(self, ids: torch.Tensor, targets: torch.Tensor) -> None:
        t = time.perf_counter()
        logits = self.logits(ids)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.ms.append((time.perf_counter() - t) * 1e3)
        self.loss = loss.item()


@torch.inference_mode()
def greedy_ours(model: CausalLM, prompt: torch.Tensor, new: int) -> torch.Tensor:
    """The plain greedy loop a user writes with our cache: prompt once, then one token at a time."""
    cache = model.new_cache()
    tok = model(prompt, cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
    out = [tok]
    for _ in range(new - 1):
        tok = model(tok, cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
        out.append(tok)
    return torch.cat(out, dim=1)


@torch.inference_mode()
def greedy_hf(model, prompt: torch.Tensor, new: int) -> torch.Tensor:
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=new,
                         min_new_tokens=new)
    return out[:, prompt.shape[1]:]


def bench_training(pairs: dict, shape: Shape, steps: int, warmup: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, shape.vocab, (shape.batch, shape.seq_len + 1), generator=g)
    ids, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    trainers = []
    for family, (ours, hf) in pairs.items():
        trainers += [Trainer(f"ours-{family}", ours, False), Trainer(f"HF-{family}", hf, True)]
    for i in range(warmup + steps):
        for t in trainers:  # round-robin: load and memory state fall on every model alike
            t.step(ids, targets)
    rows = {}
    for t in trainers:
        ms = t.ms[warmup:]
        rows[t.name] = dict(ms_per_step=statistics.median(ms), ms_all=ms, last_loss=t.loss,
                            tokens_per_s=shape.batch * shape.seq_len / statistics.median(ms) * 1e3)
    for family in pairs:
        add_ratios(rows[f"ours-{family}"], rows[f"HF-{family}"]["ms_all"], rows[f"ours-{family}"]["ms_all"])
    return rows


def bench_generation(pairs: dict, shape: Shape, prompt_len: int, new: int, repeats: int, warmup: int,
                     seed: int) -> dict:
    g = torch.Generator().manual_seed(seed + 1)
    prompt = torch.randint(0, shape.vocab, (1, prompt_len), generator=g)
    runs = []
    for family, (ours, hf) in pairs.items():
        ours.load_state_dict(from_hf(hf).state_dict())  # the same weights again (dropout made training diverge)
        ours.eval(), hf.eval()
        runs += [(f"ours-{family}", lambda m=ours: greedy_ours(m, prompt, new)),
                 (f"HF-{family}", lambda m=hf: greedy_hf(m, prompt, new))]
    times = {name: [] for name, _ in runs}
    outputs = {}
    for i in range(warmup + repeats):
        for name, fn in runs:
            t = time.perf_counter()
            out = fn()
            dt = time.perf_counter() - t
            if i >= warmup:
                times[name].append(dt)
            outputs[name] = out
            assert out.shape == (1, new), (name, out.shape)
    rows = {}
    for name, secs in times.items():
        med = statistics.median(secs)
        rows[name] = dict(tokens_per_s=new / med, ms_per_token=med / new * 1e3, s_all=secs)
    for family in pairs:
        rows[f"ours-{family}"]["same_tokens_as_hf"] = bool(torch.equal(outputs[f"ours-{family}"],
                                                                       outputs[f"HF-{family}"]))
        add_ratios(rows[f"ours-{family}"], times[f"HF-{family}"], times[f"ours-{family}"])
    return rows


def add_ratios(row: dict, theirs: list[float], ours: list[float]) -> None:
    """HF's time over ours (above 1: ours faster): ``ratio``, the median of the rounds' ratios (HF and ours ran one
    after the other, so each ratio sees one load; what the table shows), and ``ratio_of_medians``.

    Why both: on a shared machine another job can start or stop mid-run, and on a 2-core machine a run with 2 threads
    then slows several-fold (a parallel region waits for a descheduled thread); medians taken over such bimodal
    series can land in different modes, the paired ratio stays with like for like.
    """
    row["ratio"] = statistics.median(h / o for h, o in zip(theirs, ours))
    row["ratio_of_medians"] = statistics.median(theirs) / statistics.median(ours)


@torch.no_grad()
def max_logit_diff(ours, hf, shape: Shape, seed: int) -> float:
    ours.eval(), hf.eval()
    ids = torch.randint(0, shape.vocab, (2, min(shape.seq_len, 64)), generator=torch.Generator().manual_seed(seed))
    return (ours(ids) - hf(ids, use_cache=False).logits).abs().max().item()


def markdown(info: dict) -> str:
    s, tr, gen = info["shape"], info["training"], info["generation"]
    lines = [f"`{info['command']}` ({info['threads']} threads, torch {info['torch']}, transformers "
             f"{info['transformers']}, load average {info['load_before']} before / {info['load_after']} after)", "",
             f"Training step (batch {s['batch']} x {s['seq_len']} tokens, fused AdamW, median of {info['steps']} "
             f"steps after {info['warmup']}) and greedy generation (batch 1, prompt {info['prompt']}, "
             f"{info['new']} new tokens, median of {info['repeats']}); ratios: median over rounds of the "
             f"HF/ours time ratio of one round (above 1: ours faster):", "",
             "| model | parameters | train ms/step | train ratio HF/ours | generation tokens/s | "
             "generation ratio ours/HF |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for family in info["families"]:
        o, h = f"ours-{family}", f"HF-{family}"
        tr_ratio, gen_ratio = tr[o]["ratio"], gen[o]["ratio"]
        theirs = HF_NAMES[family] + (f" ({info['hf_gelu']})" if family == "gpt2" and info["hf_gelu"] != "gelu_new"
                                     else "")
        for name, label in ((o, f"ours, {family} shape"), (h, theirs)):
            mine = name == o
            lines.append(f"| {label} | {info['params'][name]:,} | {tr[name]['ms_per_step']:,.1f} | "
                         f"{f'{tr_ratio:.2f}x' if mine else '1.00x'} | {gen[name]['tokens_per_s']:,.0f} | "
                         f"{f'{gen_ratio:.2f}x' if mine else '1.00x'} |")
    return "\n".join(lines)


def ratios(row: dict) -> str:
    if "ratio" not in row:
        return ""
    return f"  HF/ours {row['ratio']:.2f}x paired ({row['ratio_of_medians']:.2f}x of the medians)"


QUICK = dict(steps=2, warmup=1, repeats=2, prompt=8, new=8)  # --quick: what is left unset
FULL = dict(steps=10, warmup=2, repeats=10, prompt=32, new=128)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model, 2 steps, 8 new tokens")
    p.add_argument("--steps", type=int, default=None, help="timed training steps per model (default 10)")
    p.add_argument("--warmup", type=int, default=None, help="untimed training steps / generations (default 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed generations per model (default 10)")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 32)")
    p.add_argument("--new", type=int, default=None, help="generated tokens (default 128)")
    p.add_argument("--dropout", type=float, default=0.1, help="the GPT-2 pair's dropout (the LLaMA pair has none)")
    p.add_argument("--hf-gelu", default="gelu_new", choices=["gelu_new", "gelu_pytorch_tanh"],
                   help="activation of Hugging Face's GPT-2 (default gelu_new, GPT-2's own)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write every figure here")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.steps, args.repeats, args.prompt, args.new) < 1 or args.warmup < 0 or not 0 <= args.dropout < 1:
        p.error(f"--steps, --repeats, --prompt and --new must be >= 1, --warmup >= 0 and --dropout in [0, 1) (got "
                f"{args.steps}, {args.repeats}, {args.prompt}, {args.new}, {args.warmup}, {args.dropout})")
    args.command = "python benchmarks/lm_speed.py" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)  # as it was: the test suite calls main in its own process


def run(args) -> int:
    shape = SHAPES["quick" if args.quick else "small"]
    steps, warmup, repeats, prompt, new = args.steps, args.warmup, args.repeats, args.prompt, args.new
    if prompt + new > shape.max_positions:
        shape = replace(shape, max_positions=prompt + new)
    import transformers

    info = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), torch=torch.__version__,
                transformers=transformers.__version__, cpu=platform.processor() or platform.machine(),
                threads=torch.get_num_threads(), command=args.command,
                load_before=", ".join(f"{x:.2f}" for x in os.getloadavg()), shape=asdict(shape),
                families=list(FAMILIES), steps=steps, warmup=warmup, repeats=repeats, prompt=prompt, new=new,
                dropout={"gpt2": args.dropout, "llama": 0.0}, hf_gelu=args.hf_gelu)
    pairs = {family: build_pair(family, shape, args.dropout, args.seed, args.hf_gelu) for family in FAMILIES}
    info["params"] = {}
    info["max_logit_diff"] = {}
    for family, (ours, hf) in pairs.items():
        info["params"][f"ours-{family}"], info["params"][f"HF-{family}"] = n_params(ours), n_params(hf)
        info["max_logit_diff"][family] = max_logit_diff(ours, hf, shape, args.seed)
    print(f"{info['cpu']}, torch {info['torch']}, transformers {info['transformers']}, {info['threads']} threads; "
          f"d_model {shape.d_model}, {shape.n_heads} heads, {shape.layers} layers, d_ff {shape.d_ff_gpt2} (gpt2) / "
          f"{shape.d_ff_llama} (llama), vocab {shape.vocab}")
    for family in FAMILIES:
        o, h = info["params"][f"ours-{family}"], info["params"][f"HF-{family}"]
        print(f"  {family}: parameters ours {o:,}, {HF_NAMES[family]} {h:,} ({'same' if o == h else 'DIFFERENT'}); "
              f"largest logit difference {info['max_logit_diff'][family]:.1e}")
    info["training"] = bench_training(pairs, shape, steps, warmup, args.seed)
    print(f"\ntraining step, batch {shape.batch} x {shape.seq_len}, median of {steps} (after {warmup} warm-up):")
    for name, r in info["training"].items():
        print(f"  {name:<12}{r['ms_per_step']:>9.1f} ms/step (min {min(r['ms_all']):.1f})"
              f"{r['tokens_per_s']:>10,.0f} tokens/s  loss {r['last_loss']:.3f}" + ratios(r))
    info["generation"] = bench_generation(pairs, shape, prompt, new, repeats, warmup, args.seed)
    print(f"\ngreedy generation, batch 1, prompt {prompt}, {new} new tokens, median of {repeats}:")
    for name, r in info["generation"].items():
        same = r.get("same_tokens_as_hf")
        print(f"  {name:<12}{r['tokens_per_s']:>9,.0f} tokens/s (max {new / min(r['s_all']):,.0f})"
              f"{r['ms_per_token']:>8.2f} ms/token" + ("" if same is None else f"  same tokens as HF: {same}")
              + ratios(r))
    info["load_after"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    table = markdown(info)
    info["markdown"] = table
    print("\n" + table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(info, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
