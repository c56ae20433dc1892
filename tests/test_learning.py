"""Training measurably learns the built-in corpus (a short budget; the README's demo run goes much further)."""
import json
import math

import sacrebleu

from transformer_ln.runs.checkpoint import load_model
from transformer_ln.data import load_corpus
from transformer_ln.evaluation.evaluate import translate_sentences
from transformer_ln.config import RunConfig, apply_overrides
from transformer_ln.train import DEMO, Trainer


def test_small_model_learns_the_synthetic_language(tmp_path):
    cfg = RunConfig.from_dict(apply_overrides(DEMO, [
        f"train.out_dir={tmp_path}", "train.max_updates=300", "train.max_minutes=0", "train.bleu_at_end=false",
        "optim.warmup_updates=150", "optim.lr=2e-3", "model.dropout=0.0"]))
    summary = Trainer(cfg, cpu=True, quiet=True).run()
    assert summary["status"] == "completed" and summary["updates"] == 300
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
              if r["kind"] == "train"]
    assert losses[0] > 9.0 and sum(losses[-10:]) / 10 < 0.4 * losses[0]  # bits per token, from ~log2(V) down

    model, run_cfg = load_model(tmp_path, "last")
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    test = load_corpus(run_cfg.data)["test"][:100]
    hyps = translate_sentences(model, tok, [s for s, _ in test], beam=1)
    refs = [t for _, t in test]
    exact = sum(h == r for h, r in zip(hyps, refs)) / len(refs)
    bleu = sacrebleu.corpus_bleu(hyps, [refs]).score
    copy = sacrebleu.corpus_bleu([s for s, _ in test], [refs]).score
    assert bleu > 40 > 10 > copy and math.isfinite(bleu)  # measured: about 80 BLEU, 56% exact
    print(f"learning: BLEU {bleu:.1f}, exact {exact:.0%}, loss {losses[0]:.2f} -> {sum(losses[-10:]) / 10:.2f}")
    assert exact >= 0.2, f"greedy output matched {exact:.0%} of references exactly (BLEU {bleu:.1f})"
