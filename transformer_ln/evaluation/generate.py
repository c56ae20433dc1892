"""Text from a trained decoder-only run: ``sample`` (greedy, temperature, top-k, top-p, with the KV cache) and
the ``generate`` command.

``sample`` feeds the prompt once into a ``DecoderCache`` and then one token a step (``last_only=True``), so a step
costs one position, not the whole prefix. Sampling draws from a seeded CPU ``torch.Generator``: the same seed gives
the same tokens on any device (up to the logits' numerics). Filters apply in the usual order: temperature, then
top-k (keep the k most likely), then top-p (keep the smallest set of most likely tokens whose probability reaches p;
the most likely token is always kept).

The command prepends ``</s>`` to the prompt: the training stream separates documents with it, so the prompt is read
as the start of a document (an empty prompt samples a document unconditionally). A prompt too long for
``model.max_positions`` with the new tokens keeps its last tokens (said on stderr). NaN or +inf logits raise
``search.NonFiniteLogits`` (the command: one line naming the checkpoint) instead of sampling from them.
"""
from __future__ import annotations

import sys
import time
from typing import Optional, Sequence

import torch

from ..config.parser import Parser
from ..errors import UserError
from ..runs import checkpoint as ckpt_lib
from ..runs.rundir import RunDir
from .search import NonFiniteLogits, nonfinite_error


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """1-D ``logits`` with everything outside the top-k and the top-p nucleus set to -inf (0 / 1.0: off)."""
    logits = logits.clone()
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits[logits < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # probability of the tokens more likely than each
        drop = before >= top_p
        drop[0] = False
        logits[order[drop]] = float("-inf")
    return logits


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    """One ``ValueError`` naming the bad setting."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: got {max_new_tokens}, must be >= 0")
    if not temperature >= 0 or temperature == float("inf"):
        raise ValueError(f"temperature: got {temperature}, must be >= 0 and finite (0: greedy)")
    if top_k < 0:
        raise ValueError(f"top_k: got {top_k}, must be >= 0 (0: off)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p: got {top_p}, must be in (0, 1] (1: off)")


@torch.no_grad()
def sample(model, prompt_ids: Sequence[int], max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, greedy: bool = False, seed: int = 0, eos_id: Optional[int] = None) -> list[int]:
    """The new tokens after ``prompt_ids`` (non-empty), at most ``max_new_tokens``; stops after ``eos_id`` (which
    is then the last token returned). ``greedy`` (or ``temperature=0``) takes the argmax; otherwise the tokens are
    drawn from softmax(logits / temperature) after the top-k and top-p filters, with ``torch.Generator`` seeded by
    ``seed``. The prompt and the new tokens must fit in ``model.cfg.max_positions``."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise ValueError("prompt_ids is empty: give at least one token (e.g. </s>, the document separator)")
    limit = getattr(getattr(model, "cfg", None), "max_positions", None)
    if limit is not None and len(prompt) + max_new_tokens > limit:
        raise ValueError(f"the prompt's {len(prompt)} tokens and {max_new_tokens} new ones exceed "
                         f"model.max_positions={limit}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    greedy = greedy or temperature == 0
    cache = model.new_cache()
    out: list[int] = []
    try:
        step = torch.tensor([prompt], dtype=torch.long, device=device)
        for _ in range(max_new_tokens):
            logits = model(step, cache, last_only=True)[0, -1].float()
            if bool(torch.isnan(logits).any() | torch.isposinf(logits).any()):
                raise NonFiniteLogits(f"the model produced non-finite logits (NaN or +inf) at new token "
                                      f"{len(out) + 1}")
            if greedy:
                token = int(logits.argmax())
            else:
                probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1).cpu()
                token = int(torch.multinomial(probs, 1, generator=gen))
            out.append(token)
            if eos_id is not None and token == eos_id:
                break
            step = torch.tensor([[token]], dtype=torch.long, device=device)
    finally:
        model.train(was_training)
    return out


def _read_prompt(arg: Optional[str]) -> str:
    if arg is not None and arg != "-":
        return arg
    data = sys.stdin.buffer.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"the standard input is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                        "convert it, e.g. `iconv -f latin1 -t utf-8`") from None
    return text[:-1] if text.endswith("\n") else text  # the newline `echo` adds is not part of the prompt


def generate_main(argv: list[str]) -> int:
    p = Parser(prog="transformer-ln generate",
               description="Continue a prompt with a trained decoder-only run (KV cache): prints the continuation, "
                           "then tokens/s on stderr.")
    p.add_argument("run_dir", help="a decoder-only training run's train.out_dir")
    p.add_argument("--prompt", default=None, help="the text to continue (default or '-': read from stdin)")
    p.add_argument("--max-new-tokens", type=int, default=100, help="at most this many new tokens (default 100)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default 1; 0: greedy)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens only (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: the most likely tokens up to "
                                                            "probability p (1: off)")
    p.add_argument("--greedy", action="store_true", help="take the most likely token each step")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler (default 0)")
    p.add_argument("--checkpoint", default=RunDir.BEST, help="best (default), last, averaged, or update_<n>")
    p.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is present")
    args = p.parse_args(argv)
    try:
        check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        name, _, why = str(e).partition(":")
        raise UserError(f"--{name.replace('_', '-')}:{why}") from None
    ckpt = ckpt_lib.resolve(args.run_dir, args.checkpoint)
    cfg = ckpt_lib.load_run_config_from(ckpt)
    if cfg.model.arch != "decoder_only":
        raise UserError(f"generate needs a decoder-only run; {args.run_dir} is {cfg.model.arch} (translation): "
                        f"use `transformer-ln translate`")
    limit = cfg.model.max_positions
    if args.max_new_tokens >= limit:
        raise UserError(f"--max-new-tokens: got {args.max_new_tokens}; the model reads at most "
                        f"model.max_positions={limit} tokens, prompt included: ask for fewer")
    tok_path = RunDir(args.run_dir).tokenizer
    if not tok_path.is_file():
        raise UserError(f"{tok_path} is missing; {args.run_dir} is not a finished training run directory")
    from ..data import EOS, load_lm_tokenizer

    tokenizer = load_lm_tokenizer(tok_path)
    prompt = _read_prompt(args.prompt)
    ids = [EOS] + tokenizer.encode(prompt, add_special_tokens=False).ids
    keep = limit - args.max_new_tokens
    if len(ids) > keep:
        print(f"note: the prompt has {len(ids) - 1} tokens; kept its last {keep} so that prompt and "
              f"{args.max_new_tokens} new tokens fit model.max_positions={limit}", file=sys.stderr)
        ids = ids[-keep:]
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    model, _ = ckpt_lib.load_model(args.run_dir, args.checkpoint, device)
    t0 = time.perf_counter()
    try:
        new = sample(model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                     top_p=args.top_p, greedy=args.greedy, seed=args.seed, eos_id=EOS)
    except NonFiniteLogits as e:
        raise nonfinite_error(model, str(ckpt), str(e)) from None
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    sys.stdout.write(tokenizer.decode(new, skip_special_tokens=True) + "\n")
    sys.stdout.flush()
    stop = " (stopped at </s>)" if new and new[-1] == EOS else ""
    print(f"{len(new)} new tokens in {seconds:.3f} s: {len(new) / max(seconds, 1e-9):.1f} tokens/s on {device} "
          f"(prompt {len(ids)} tokens incl. </s>){stop}", file=sys.stderr)
    return 0
