"""The built-in language pair: deterministic, fast, a real translation task (copying fails), modest vocabulary."""
import re

import sacrebleu

from transformer_ln import DataConfig
from transformer_ln.data import generate_synthetic, load_corpus


def test_same_seed_same_corpus_other_seed_other_corpus():
    a, b, c = generate_synthetic(300, 7), generate_synthetic(300, 7), generate_synthetic(300, 8)
    assert a == b
    assert a != c
    assert generate_synthetic(100, 7) == a[:100]  # a prefix: a bigger corpus extends a smaller one


def test_twenty_thousand_pairs_with_lengths_3_to_40():
    pairs = generate_synthetic(20000, 1234)  # its speed is a figure: benchmarks/synthetic_speed.py
    lens = [len(s.split()) for s, _ in pairs] + [len(t.split()) for _, t in pairs]
    assert min(lens) >= 3 and max(lens) <= 40
    assert max(lens) >= 30  # long sentences occur, not just short ones
    words = {w for s, t in pairs for w in re.findall(r"\w+", s + " " + t)}
    assert len(words) < 1000, "a small model must learn the vocabulary in minutes"


def test_copy_baseline_scores_under_10_bleu():
    pairs = generate_synthetic(2000, 1234)
    bleu = sacrebleu.corpus_bleu([s for s, _ in pairs], [[t for _, t in pairs]], force=True)
    assert bleu.score < 10, bleu


def test_target_is_a_function_of_the_source():
    """No noise: the same source sentence always gets the same translation (the mapping is learnable)."""
    seen = {}
    for s, t in generate_synthetic(20000, 3):
        assert seen.setdefault(s, t) == t, (s, seen[s], t)


def test_rules_need_reordering_and_agreement():
    pairs = generate_synthetic(5000, 11)
    # the target is not a word-by-word substitution: aligned word counts differ often ("does not see" -> 2 words)
    assert sum(len(s.split()) != len(t.split()) for s, t in pairs) > 500
    # subordinate clauses exist in the source
    assert any(" that " in s for s, _ in pairs) and any(s.startswith(("Because", "When", "If")) for s, _ in pairs)


def test_load_corpus_synthetic_splits_do_not_overlap():
    splits = load_corpus(DataConfig(source="synthetic", synthetic_size=1000, synthetic_seed=5))
    assert {k: len(v) for k, v in splits.items()} == {"train": 1000, "valid": 500, "test": 500}
    train = {s for s, _ in splits["train"]}
    assert not train & {s for s, _ in splits["valid"]}
    assert not train & {s for s, _ in splits["test"]}
    assert not {s for s, _ in splits["valid"]} & {s for s, _ in splits["test"]}


def test_corpus_is_pinned_across_python_versions():
    """Results in the README are only comparable if seed 1234 keeps producing the very same corpus."""
    pairs = generate_synthetic(75, 1234)
    assert pairs[37] == ("She believes that he does not build a ball.", "Sa verumemat ke lu unon borur ne rugebat.")
    assert pairs[74] == ("Because the mouse sleeps, the children sleep.",
                         "Porke lo nugim rodifat, rodifant li vonenoten.")
