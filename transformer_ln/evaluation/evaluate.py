"""Translation and sacreBLEU evaluation of a trained run.

BLEU is sacreBLEU on detokenized output against the raw references (signature printed, chrF beside it), the score
the field reports. Under several processes each takes every N-th sentence, the translations are gathered back
into input order and the score is computed once, on exactly the N test sentences.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..runs import checkpoint as ckpt_lib
from ..atomic import write_text
from ..config.parser import Parser
from ..errors import UserError
from ..runs.rundir import RunDir


def _tokenizer(run_dir: Path):
    from ..data.tokenizer import load_tokenizer

    path = RunDir(run_dir).tokenizer
    if not path.is_file():
        raise UserError(f"{path} is missing; {run_dir} is not a finished training run directory")
    return load_tokenizer(path)


def _decode_lines(data: bytes, where: str) -> list[str]:
    """UTF-8 text -> stripped lines; anything else is one line saying where and how to convert it."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UserError(f"{where} is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}); convert it, "
                        "e.g. `iconv -f latin1 -t utf-8`") from None
    return [line.strip() for line in text.splitlines()]


@torch.no_grad()
def translate_sentences(model, tokenizer, sentences: list[str], beam: int = 5, lenpen: float = 1.0,
                        max_len_a: float = 1.2, max_len_b: int = 10, max_tokens: int = 4096,
                        progress: bool = False) -> list[str]:
    """Detokenized translations of ``sentences``, in order; batched by length, beam search with the KV cache."""
    from tqdm.auto import tqdm

    from ..data import BOS, EOS
    from .search import beam_search

    device = next(model.parameters()).device
    limit = model.cfg.max_positions
    ids = [tokenizer.encode(s).ids[:limit - 1] + [EOS] for s in sentences]
    order = sorted((i for i in range(len(ids)) if sentences[i].strip()), key=lambda i: len(ids[i]))  # "" -> ""
    out: list[str] = [""] * len(ids)
    i = 0
    bar = tqdm(total=len(order), disable=not progress, desc="translating", unit="sent")
    while i < len(order):
        longest = len(ids[order[i]])
        n = max(1, min(len(order) - i, max_tokens // max(longest * beam, 1)))
        chunk = order[i:i + n]
        longest = max(len(ids[j]) for j in chunk)
        src = torch.full((len(chunk), longest), model.cfg.pad_id, dtype=torch.long)
        for r, j in enumerate(chunk):
            src[r, :len(ids[j])] = torch.tensor(ids[j])
        hyps = beam_search(model, src.to(device), beam=beam, lenpen=lenpen, max_len_a=max_len_a,
                           max_len_b=max_len_b, bos=BOS, eos=EOS)
        for j, h in zip(chunk, hyps):
            out[j] = tokenizer.decode(h, skip_special_tokens=True)
        i += n
        bar.update(len(chunk))
    bar.close()
    return out


def bleu_and_chrf(hyps: list[str], refs: list[str]) -> dict:
    import sacrebleu

    bleu = sacrebleu.BLEU()
    chrf = sacrebleu.CHRF()
    b = bleu.corpus_score(hyps, [refs])
    c = chrf.corpus_score(hyps, [refs])
    return {"bleu": round(b.score, 2), "bleu_signature": str(bleu.get_signature()), "bleu_detail": str(b),
            "chrf": round(c.score, 2), "chrf_signature": str(chrf.get_signature()), "n": len(hyps)}


def evaluate_run(run_dir: str | Path, split: str = "test", checkpoint: str = RunDir.BEST, beam: int | None = None,
                 lenpen: float | None = None, accelerator=None, model=None, limit: int | None = None) -> dict:
    """Translate ``split`` of the run's corpus, score it, write ``eval_<split>_<checkpoint>[_limit<N>].json`` and
    the hypotheses beside it (``RunDir.eval_file``), refresh ``results.md``; returns the scores."""
    from ..data import prepare_data

    run = RunDir(run_dir)
    run_dir = run.path
    is_main = accelerator is None or accelerator.is_main_process
    rank, world = (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)
    device = accelerator.device if accelerator is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if model is None:
        model, cfg = ckpt_lib.load_model(run_dir, checkpoint, device)
    else:
        cfg = ckpt_lib.load_run_config_from(run_dir)
    data = prepare_data(cfg, run_dir, accelerator)  # the run's prepared data (or its cache), memory-mapped
    pairs = data.text(split) if split in data.splits else None
    if not pairs:
        raise UserError(f"the corpus of {run_dir} has no {split!r} split (data.test_src/test_tgt unset?)")
    pairs = pairs[:limit] if limit else pairs
    srcs = [s for s, _ in pairs]
    mine = list(range(rank, len(srcs), world))
    t = cfg.train
    hyps_mine = translate_sentences(model, _tokenizer(run_dir), [srcs[i] for i in mine],
                                    beam=beam or t.beam, lenpen=t.lenpen if lenpen is None else lenpen,
                                    max_len_a=t.max_len_a, max_len_b=t.max_len_b, progress=is_main)
    if world > 1:
        from accelerate.utils import gather_object

        gathered = gather_object([(i, h) for i, h in zip(mine, hyps_mine)])
        hyps = [h for _, h in sorted(gathered)]
    else:
        hyps = hyps_mine
    scores = bleu_and_chrf(hyps, [r for _, r in pairs])
    scores.update(split=split, checkpoint=checkpoint, beam=beam or t.beam, limit=limit or None,
                  lenpen=t.lenpen if lenpen is None else lenpen)
    if is_main:
        names = (split, checkpoint, limit, beam, lenpen)  # one file per distinct evaluation: nothing overwritten
        write_text(run.hyps_file(*names), "\n".join(hyps) + "\n")
        write_text(run.eval_file(*names), json.dumps(scores, indent=1))
        results = run.write_results()
        print(f"{split}: BLEU {scores['bleu']:.2f}  chrF {scores['chrf']:.2f}  ({scores['n']} sentences)\n"
              f"  {scores['bleu_signature']}\n  {scores['chrf_signature']}\n"
              f"  wrote {run.eval_file(*names).name}, {run.hyps_file(*names).name}; all evaluations: {results}")
    return scores


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a training run's train.out_dir")
    p.add_argument("--checkpoint", default=RunDir.BEST, help="best (default), last, averaged, or update_<n>")
    p.add_argument("--beam", type=int, default=None, help="beam size (default: the run's train.beam)")
    p.add_argument("--lenpen", type=float, default=None, help="length penalty: score / len^lenpen")
    p.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is present")


def translate_main(argv: list[str]) -> int:
    p = Parser(prog="transformer-ln translate",
               description="Translate sentences (one per line, stdin or --input) with a trained "
                           "run; prints detokenized translations in input order.")
    _common(p)
    p.add_argument("--input", help="a text file with one sentence per line (default: stdin)")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    model, cfg = ckpt_lib.load_model(args.run_dir, args.checkpoint, device)
    tokenizer = _tokenizer(Path(args.run_dir))
    if args.input:
        path = Path(args.input)
        if not path.is_file():
            raise UserError(f"--input {path} does not exist")
        lines = _decode_lines(path.read_bytes(), f"--input {path}")
    else:
        lines = _decode_lines(sys.stdin.buffer.read(), "the standard input")
    t = cfg.train
    out = translate_sentences(model, tokenizer, lines, beam=args.beam or t.beam,
                              lenpen=t.lenpen if args.lenpen is None else args.lenpen, max_len_a=t.max_len_a,
                              max_len_b=t.max_len_b)
    sys.stdout.write("".join(o + "\n" for o in out))
    return 0


def evaluate_main(argv: list[str]) -> int:
    p = Parser(prog="transformer-ln evaluate",
               description="Translate a split of the run's corpus and print sacreBLEU and chrF "
                           "(with signatures); a decoder-only run: perplexity, bits per byte and word perplexity "
                           "of every block of the split (evaluation.lm_eval). Writes "
                           "RUN_DIR/eval_<split>_<checkpoint>[_limit<N>].json (never over another evaluation's) "
                           "and lists them all in RUN_DIR/results.md.")
    _common(p)
    p.add_argument("--split", default="test", help="test (default) or valid")
    p.add_argument("--limit", type=int, default=None, help="only the first N sentences (decoder-only: blocks)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="decoder-only runs: tokens a batch (default: 8192 or the run's train.max_tokens, "
                        "the larger)")
    args = p.parse_args(argv)
    from .lm_eval import evaluate_lm_run, run_arch

    lm = run_arch(args.run_dir, args.checkpoint) == "decoder_only"  # scored by perplexity, not BLEU
    if lm and (args.beam is not None or args.lenpen is not None):
        raise UserError(f"--beam/--lenpen: {args.run_dir} is a decoder-only run, scored by perplexity (no search)")
    if not lm and args.max_tokens is not None:
        raise UserError("--max-tokens: only for decoder-only runs (translation batches by --beam and the run's "
                        "settings)")
    accelerator = None
    try:
        from accelerate import Accelerator
        from accelerate.state import PartialState

        if PartialState().num_processes > 1 or args.cpu:
            accelerator = Accelerator(cpu=args.cpu)
    except ImportError:
        pass
    if lm:
        evaluate_lm_run(args.run_dir, args.split, args.checkpoint, accelerator=accelerator,
                        max_tokens=args.max_tokens, limit=args.limit)
        return 0
    evaluate_run(args.run_dir, args.split, args.checkpoint, args.beam, args.lenpen, accelerator=accelerator,
                 limit=args.limit)
    return 0
