"""Translation and sacreBLEU evaluation of a trained run.

BLEU is sacreBLEU on detokenized output against the raw references (signature printed, chrF beside it), the score
the field reports. Under several processes each takes every N-th sentence, the translations are gathered back
into input order and the score is computed once, on exactly the N test sentences.

Nothing is silent: a sentence longer than ``model.max_positions - 1`` tokens is cut to that length with one
warning on stderr (how many, to what length, which setting limits it); a model that produces non-finite logits is
one error naming the checkpoint (and whether its weights are non-finite) instead of a BLEU of 0 over empty
translations; search settings without a meaning (``--beam 0``, a negative ``--lenpen``, ``--limit 0``) are refused
with one line.

``evaluate RUN --src FILE --ref FILE`` scores any test set, its lines cleaned as the run's corpus was
(``data.detokenize``/``data.unescape``, ``data.hygiene.cleaner``), so a Moses-tokenized reference is compared as
plain text. Every evaluation records the checkpoint's update and the sha256 of the weights it translated
(``scored_weights``), and ``results.md`` shows both, so evaluations of different weights are never mixed silently.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from ..runs import checkpoint as ckpt_lib
from ..atomic import write_text
from ..config.parser import Parser
from ..errors import UserError
from ..runs.rundir import RunDir
from .search import NonFiniteLogits, check_search, nonfinite_error


def search_settings(beam, lenpen, cfg, given: tuple[bool, bool] = (True, True)) -> tuple[int, float]:
    """The beam and length penalty to use (``None``: the run's ``train.beam`` / ``train.lenpen``), checked with
    the run's ``train.max_len_a/b``; a value without a meaning is one ``UserError`` naming its option or setting."""
    t = cfg.train
    beam = t.beam if beam is None else beam
    lenpen = t.lenpen if lenpen is None else lenpen
    try:
        check_search(beam, lenpen, t.max_len_a, t.max_len_b)
    except ValueError as e:
        name, _, why = str(e).partition(":")
        if (name, True) in (("beam", given[0]), ("lenpen", given[1])):
            raise UserError(f"--{name}:{why}") from None
        fix = f"pass --{name} to override it" if name in ("beam", "lenpen") else "correct it there"
        raise UserError(f"train.{name} in the run's config.yaml:{why}; {fix}") from None
    return beam, lenpen


def _check_options(args) -> None:
    """The command line's own values, before anything is loaded."""
    try:
        check_search(1 if args.beam is None else args.beam, 1.0 if args.lenpen is None else args.lenpen)
    except ValueError as e:
        raise UserError(f"--{e}") from None
    if getattr(args, "limit", None) is not None and args.limit <= 0:
        raise UserError(f"--limit: got {args.limit}, must be a positive number of sentences (decoder-only runs: "
                        "blocks); leave it out for the whole split")


def truncation_warning(lengths: list[int], limit: int, what: str = "input line") -> str | None:
    """The warning for sentences (``lengths`` in tokens) longer than ``limit - 1`` tokens, which are cut to that
    length, or ``None``."""
    long = [i for i, n in enumerate(lengths) if n > limit - 1]
    if not long:
        return None
    worst = max(long, key=lambda i: lengths[i])
    return (f"warning: {len(long)} of {len(lengths)} {what}(s) had more than {limit - 1} tokens (the longest, "
            f"{what} {worst + 1}, has {lengths[worst]}) and were truncated to their first {limit - 1}, the most the "
            f"run's model.max_positions={limit} allows; their translations cover only that beginning (split long "
            f"lines into sentences)")


def _tokenizer(run_dir: Path):
    from ..data.tokenizer import load_tokenizer

    path = RunDir(run_dir).tokenizer
    if not path.is_file():
        raise UserError(f"{path} is missing; {run_dir} is not a finished training run directory")
    return load_tokenizer(path)


def read_text_file(path: str | Path, option: str) -> list[str]:
    """The stripped lines of a UTF-8 text file given on the command line; a missing file, a directory or anything
    unreadable is one ``UserError`` naming ``option``."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} {path} is a directory; give a text file with one sentence a line")
    if not path.is_file():
        raise UserError(f"{option} {path} does not exist")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{option} {path} cannot be read ({e.strerror})") from None
    return _decode_lines(data, f"{option} {path}")


def test_set_from_files(src: str | Path, ref: str | Path, data_cfg) -> list[tuple[str, str]]:
    """``(source, reference)`` pairs of two line-aligned files, each side cleaned as the run's corpus was
    (``data.detokenize``/``data.unescape``); different line counts are one ``UserError``."""
    from ..data.hygiene import cleaner

    srcs, refs = read_text_file(src, "--src"), read_text_file(ref, "--ref")
    for lines in (srcs, refs):  # a final empty line is the file's last newline, not a sentence
        while lines and not lines[-1]:
            lines.pop()
    if len(srcs) != len(refs):
        raise UserError(f"--src {src} has {len(srcs)} lines but --ref {ref} has {len(refs)}; they must be "
                        "line-aligned (one reference per source sentence)")
    if not srcs:
        raise UserError(f"--src {src} holds no sentence")
    fns = cleaner(data_cfg)
    if fns is not None:
        srcs, refs = [fns["src"](x) for x in srcs], [fns["tgt"](x) for x in refs]
    return list(zip(srcs, refs))


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
                        progress: bool = False, warn: str | None = "input line") -> list[str]:
    """Detokenized translations of ``sentences``, in order; batched by length, beam search with the KV cache.

    A sentence longer than ``model.cfg.max_positions - 1`` tokens is cut to that length; with ``warn`` (what to
    call a sentence) one warning on stderr says so (``truncation_warning``). Non-finite logits raise
    ``search.NonFiniteLogits``."""
    from tqdm.auto import tqdm

    from ..data import BOS, EOS
    from .search import beam_search

    device = next(model.parameters()).device
    check_search(beam, lenpen, max_len_a, max_len_b)
    limit = model.cfg.max_positions
    encoded = [tokenizer.encode(s).ids for s in sentences]
    message = truncation_warning([len(e) for e in encoded], limit, warn) if warn else None
    if message:
        print(message, file=sys.stderr, flush=True)
    ids = [e[:limit - 1] + [EOS] for e in encoded]
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
                 lenpen: float | None = None, accelerator=None, model=None, limit: int | None = None,
                 src: str | Path | None = None, ref: str | Path | None = None) -> dict:
    """Translate ``split`` of the run's corpus (or the files ``src``/``ref``), score it, write
    ``eval_<split>_<checkpoint>[_limit<N>][_ref-<name>].json`` and the hypotheses beside it (``RunDir.eval_file``),
    refresh ``results.md``; returns the scores, with the checkpoint's update and the weights' sha256.

    ``beam``/``lenpen`` ``None``: the run's ``train.beam``/``train.lenpen``. A model that produces non-finite
    logits is a ``UserError`` (``nonfinite_error``) on every process, and nothing is written."""
    from ..data import prepare_data
    from .scored_weights import load_scored, weights_sha256

    run = RunDir(run_dir)
    run_dir = run.path
    is_main = accelerator is None or accelerator.is_main_process
    rank, world = (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)
    device = accelerator.device if accelerator is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if limit is not None and limit <= 0:
        raise UserError(f"--limit: got {limit}, must be a positive number of sentences; leave it out for the whole "
                        "split")
    check_split(split)
    if (src is None) != (ref is None):
        raise UserError("--src/--ref: give both (the source sentences and their references, line by line)")
    if model is None:
        ckpt = ckpt_lib.resolve(run_dir, checkpoint)
        where, cfg = str(ckpt), ckpt_lib.load_run_config_from(ckpt)
    else:
        where, cfg = f"{checkpoint} of {run_dir}", ckpt_lib.load_run_config_from(run_dir)
    beam_used, lenpen_used = search_settings(beam, lenpen, cfg, (beam is not None, lenpen is not None))
    pairs = test_set_from_files(src, ref, cfg.data) if src is not None else None  # bad files: refused before loading
    if model is None:  # after the settings are checked: a refusal is quick
        model, cfg, scored = load_scored(run_dir, checkpoint, device)
    else:
        scored = {"update": None, "weights_sha256": weights_sha256(model)}
    if pairs is None:
        data = prepare_data(cfg, run_dir, accelerator)  # the run's prepared data (or its cache), memory-mapped
        pairs = data.text(split) if split in data.splits else None
    if not pairs:
        raise UserError(f"the corpus of {run_dir} has no {split!r} split: data.test_src/test_tgt were not set for "
                        "this run; score any test set with --src FILE --ref FILE")
    pairs = pairs[:limit] if limit else pairs
    srcs = [s for s, _ in pairs]
    mine = list(range(rank, len(srcs), world))
    t = cfg.train
    tokenizer = _tokenizer(run_dir)
    warn: str | None = f"{split} sentence"
    if world > 1:  # one warning for the whole split, from the main process
        message = truncation_warning([len(e.ids) for e in tokenizer.encode_batch(srcs)], cfg.model.max_positions,
                                     warn) if is_main else None
        if message:
            print(message, file=sys.stderr, flush=True)
        warn = None
    failure = None
    try:
        hyps_mine = translate_sentences(model, tokenizer, [srcs[i] for i in mine], beam=beam_used,
                                        lenpen=lenpen_used, max_len_a=t.max_len_a, max_len_b=t.max_len_b,
                                        progress=is_main, warn=warn)
    except NonFiniteLogits as e:
        hyps_mine, failure = [], str(e)
    if world > 1:  # every process learns of a failure anywhere, so none waits for the others in vain
        from accelerate.utils import gather_object

        gathered = gather_object([(i, h) for i, h in zip(mine, hyps_mine)] if failure is None else [(-1, failure)])
        failure = next((h for i, h in gathered if i < 0), None)
        hyps = [h for _, h in sorted(gathered)]
    else:
        hyps = hyps_mine
    if failure is not None:
        raise nonfinite_error(model, where, failure)
    scores = bleu_and_chrf(hyps, [r for _, r in pairs])
    scores.update(split=split, checkpoint=checkpoint, beam=beam_used, limit=limit or None, lenpen=lenpen_used,
                  **scored, **({"src_file": str(src), "ref_file": str(ref)} if src is not None else {}))
    if is_main:
        names = (split, checkpoint, limit, beam, lenpen)  # one file per distinct evaluation: nothing overwritten
        eval_path, hyps_path = run.eval_file(*names), run.hyps_file(*names)
        if ref is not None:  # another test set: its own file, named after the reference
            tag = "_ref-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(ref).name)
            eval_path, hyps_path = (p.with_name(p.stem + tag + p.suffix) for p in (eval_path, hyps_path))
        write_text(hyps_path, "\n".join(hyps) + "\n")
        write_text(eval_path, json.dumps(scores, indent=1))
        results = run.write_results()
        what = f"--ref {ref}" if ref is not None else split
        at = f"update {scores['update']}" if scores["update"] is not None else scores.get("averaged", "weights")
        print(f"{what}: BLEU {scores['bleu']:.2f}  chrF {scores['chrf']:.2f}  ({scores['n']} sentences; "
              f"{checkpoint} = {at}, sha256 {scores['weights_sha256'][:12]})\n"
              f"  {scores['bleu_signature']}\n  {scores['chrf_signature']}\n"
              f"  wrote {eval_path.name}, {hyps_path.name}; all evaluations: {results}")
    return scores


def check_split(split: str) -> None:
    """``--split`` names one of the run's evaluation splits; anything else is one line with the choices."""
    if split not in RunDir.EVAL_SPLITS:
        raise UserError(f"--split: got {split!r}; choose one of {', '.join(RunDir.EVAL_SPLITS)} (another test set: "
                        "--src FILE --ref FILE)")


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
    _check_options(args)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    where = ckpt_lib.resolve(args.run_dir, args.checkpoint)
    beam, lenpen = search_settings(args.beam, args.lenpen, ckpt_lib.load_run_config_from(where),
                                   (args.beam is not None, args.lenpen is not None))
    model, cfg = ckpt_lib.load_model(args.run_dir, args.checkpoint, device)
    tokenizer = _tokenizer(Path(args.run_dir))
    if args.input:
        lines = read_text_file(args.input, "--input")
    else:
        lines = _decode_lines(sys.stdin.buffer.read(), "the standard input")
    t = cfg.train
    try:
        out = translate_sentences(model, tokenizer, lines, beam=beam, lenpen=lenpen, max_len_a=t.max_len_a,
                                  max_len_b=t.max_len_b)
    except NonFiniteLogits as e:
        raise nonfinite_error(model, str(where), str(e)) from None
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
    p.add_argument("--src", default=None, help="score another test set: its source sentences, one a line (with --ref;"
                   " cleaned as the run's corpus was: data.detokenize/unescape)")
    p.add_argument("--ref", default=None, help="the references of --src, line by line")
    p.add_argument("--limit", type=int, default=None, help="only the first N sentences (decoder-only: blocks)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="decoder-only runs: tokens a batch (default: 8192 or the run's train.max_tokens, "
                        "the larger)")
    args = p.parse_args(argv)
    _check_options(args)
    check_split(args.split)
    from .lm_eval import evaluate_lm_run, run_arch

    lm = run_arch(args.run_dir, args.checkpoint) == "decoder_only"  # scored by perplexity, not BLEU
    if lm and args.src is not None or lm and args.ref is not None:
        raise UserError(f"--src/--ref: {args.run_dir} is a decoder-only run, scored by perplexity on its own splits")
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
                 limit=args.limit, src=args.src, ref=args.ref)
    return 0
