"""Honest first results (issue 27, part A): a demo that stops on updates, BLEU on detokenized text, any test set,
evaluations that name the weights they scored, and the sweep as a command."""
import contextlib
import hashlib
import io
import json
import re

import pytest
import torch

from transformer_ln.cli import main as cli_main
from transformer_ln.config import DEMO, DataConfig
from transformer_ln.config.parser import resolve_config

from conftest import TINY_RUN

SMALL = [f"model.{k}={v}" for k, v in TINY_RUN["model"].items()] + [
    "train.max_tokens=600", "train.bleu_at_end=false", "data.synthetic_size=300", "train.beam=1"]

# Moses-tokenized lines (as IWSLT's cleaned releases ship them) and the plain text they came from
TOKENIZED = ["it &apos;s a small world , isn &apos;t it ?",
             "he said &quot; hello &quot; and left .",
             "the price is $ 5 ( or 6 ) , not 7 !",
             "we don &apos;t know what they &apos;re doing ; nobody does .",
             "she &apos;ll come at 3.5 % interest : really ?"]
PLAIN = ["it's a small world, isn't it?",
         "he said \"hello\" and left.",
         "the price is $5 (or 6), not 7!",
         "we don't know what they're doing; nobody does.",
         "she'll come at 3.5% interest: really?"]


def one_line_error(capsys, argv) -> str:
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


# --------------------------------------------------------------------------------------------------- the demo


def test_the_demo_stops_on_a_number_of_updates_and_keeps_enough_checkpoints_to_average():
    cfg = resolve_config([]).cfg  # `transformer-ln train --cpu`, as `make demo` runs it
    assert cfg.train.max_minutes == 0, "a wall-clock limit makes the demo's score the machine's load"
    assert cfg.train.max_updates > 0 and cfg.train.max_updates == DEMO["train"]["max_updates"]
    # README's next command, `transformer-ln average runs/demo --last 5`, needs 5 update checkpoints
    assert cfg.train.save_every and cfg.train.max_updates // cfg.train.save_every >= 5 and cfg.train.keep_last >= 5


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A demo-like run (the demo's settings, a tiny model): 12 updates, a checkpoint every 2; what it printed."""
    from transformer_ln.train import main as train_main

    out = tmp_path_factory.mktemp("sweep") / "post_ln-2L-lr0.002-w300-s1"  # the name the sweep gives this point
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert train_main(["--cpu", *SMALL, "train.max_updates=12", "train.save_every=2", f"train.out_dir={out}"]) == 0
    return out, printed.getvalue()


@pytest.fixture
def run(trained):
    return trained[0]


def test_a_demo_like_run_reaches_exactly_its_update_count_and_can_be_averaged(run, capsys):
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["updates"], summary["stopped"]) == (12, "max_updates")
    assert len(list((run / "checkpoints").glob("update_*"))) == 5
    assert cli_main(["average", str(run), "--last", "5"]) == 0
    assert (run / "checkpoints" / "averaged" / "model.safetensors").is_file()


def test_training_on_updates_prints_a_time_estimate_from_the_first_updates(trained):
    line = next(x for x in trained[1].splitlines() if x.startswith("estimate:"))
    m = re.search(r"([\d.]+) s/update over updates 2-11, so about ([\d.]+) min for the 1 left", line)
    assert m and float(m[1]) > 0 and abs(float(m[2]) - float(m[1]) / 60) < 0.06, line


# --------------------------------------------------------------------------------------------------- detokenization


def test_moses_tokenized_text_detokenized_scores_above_99_against_its_plain_reference():
    from transformer_ln.data.hygiene import detokenizer
    from transformer_ln.evaluation.evaluate import bleu_and_chrf

    detok = detokenizer("en")
    assert [detok(x) for x in TOKENIZED] == PLAIN
    assert bleu_and_chrf([detok(x) for x in TOKENIZED], PLAIN)["bleu"] > 99
    assert bleu_and_chrf(TOKENIZED, PLAIN)["bleu"] < 60  # the tokenized text itself, as scored before


def test_data_detokenize_cleans_every_split_and_tokenized_text_is_detected(tmp_path, caplog):
    from transformer_ln.data.corpus import load_corpus

    for side, lines in (("src", TOKENIZED[::-1]), ("tgt", TOKENIZED)):
        (tmp_path / f"t.{side}").write_text("\n".join(lines) + "\n")
    files = {f"{s}_{side}": str(tmp_path / f"t.{side}") for s in ("train", "valid") for side in ("src", "tgt")}
    plain = load_corpus(DataConfig(source="files", detokenize="moses", **files), tmp_path / "c1")
    assert plain["valid"] == plain["train"] == list(zip(PLAIN[::-1], PLAIN))  # both sides, every split
    with caplog.at_level("WARNING"):
        raw = load_corpus(DataConfig(source="files", **files), tmp_path / "c2")
    assert [t for _, t in raw["valid"]] == TOKENIZED  # nothing changes without the setting...
    assert "Moses-tokenized" in caplog.text and "data.detokenize=moses" in caplog.text  # ...but it is named
    caplog.clear()
    for side in ("src", "tgt"):
        (tmp_path / f"t.{side}").write_text("\n".join(PLAIN) + "\n")
    with caplog.at_level("WARNING"):
        load_corpus(DataConfig(source="files", **files), tmp_path / "c3")
    assert "Moses-tokenized" not in caplog.text  # plain prose is not taken for tokenized text


def test_a_directory_given_as_a_data_file_says_it_is_a_directory(tmp_path, capsys):
    (tmp_path / "v.txt").write_text("a b\n")
    err = one_line_error(capsys, ["train", "--cpu", "data.source=files", f"data.train_src={tmp_path}",
                                  *(f"data.{n}={tmp_path / 'v.txt'}" for n in ("train_tgt", "valid_src", "valid_tgt")),
                                  f"train.out_dir={tmp_path / 'run'}"])
    assert "data.train_src" in err and "is a directory" in err and "does not exist" not in err


# --------------------------------------------------------------------------------------------------- evaluate


def test_evaluate_scores_any_test_set_and_records_the_update_and_weights_it_scored(run, tmp_path, capsys):
    from transformer_ln.runs.checkpoint import load_model

    (tmp_path / "x.src").write_text("the old man sees a small dog .\na cat walks .\n")
    (tmp_path / "x.ref").write_text("der alte mann sieht einen kleinen hund .\neine katze geht .\n")
    assert cli_main(["evaluate", str(run), "--cpu", "--src", str(tmp_path / "x.src"), "--ref",
                     str(tmp_path / "x.ref")]) == 0
    printed = capsys.readouterr().out
    assert "nrefs:1|" in printed and "tok:13a" in printed  # sacreBLEU's signature, printed...
    ev = json.loads((run / "eval_test_best_ref-x.ref.json").read_text())
    assert ev["bleu_signature"].startswith("nrefs:1|") and ev["n"] == 2  # ...and stored
    assert ev["src_file"] == str(tmp_path / "x.src") and ev["ref_file"] == str(tmp_path / "x.ref")
    assert (run / "hyps_test_best_ref-x.ref.txt").read_text().count("\n") == 2
    best = int(re.search(r"\(update (\d+)\)", json.loads((run / "summary.json").read_text())["best_checkpoint"])[1])
    model, _ = load_model(run, "best")
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    assert (ev["update"], ev["weights_sha256"]) == (best, h.hexdigest())
    # another checkpoint's evaluation is another row, with its own update and hash
    name = sorted(p.name for p in (run / "checkpoints").glob("update_*"))[0]
    assert cli_main(["evaluate", str(run), "--cpu", "--checkpoint", name, "--src", str(tmp_path / "x.src"),
                     "--ref", str(tmp_path / "x.ref")]) == 0
    other = json.loads((run / f"eval_test_{name}_ref-x.ref.json").read_text())
    assert other["update"] == int(name.split("_")[1]) != best and other["weights_sha256"] != ev["weights_sha256"]
    table = (run / "results.md").read_text()
    assert "| update | weights sha256 |" in table
    assert f"| best | {best} | {ev['weights_sha256'][:12]} |" in table
    assert f"| {name} | {other['update']} | {other['weights_sha256'][:12]} |" in table


def test_evaluate_cleans_another_test_set_as_the_run_s_corpus_was(tmp_path):
    from transformer_ln.evaluation.evaluate import test_set_from_files

    (tmp_path / "s").write_text("\n".join(TOKENIZED[::-1]) + "\n")
    (tmp_path / "r").write_text("\n".join(TOKENIZED) + "\n")
    pairs = test_set_from_files(tmp_path / "s", tmp_path / "r", DataConfig(detokenize="moses"))
    assert pairs == list(zip(PLAIN[::-1], PLAIN))
    assert [r for _, r in test_set_from_files(tmp_path / "s", tmp_path / "r", DataConfig())] == TOKENIZED


def test_evaluate_bad_test_sets_and_splits_are_one_line_each(run, tmp_path, capsys):
    (tmp_path / "a.txt").write_text("one\ntwo\n")
    (tmp_path / "b.txt").write_text("eins\n")
    base = ["evaluate", str(run), "--cpu"]
    err = one_line_error(capsys, [*base, "--src", str(tmp_path), "--ref", str(tmp_path / "a.txt")])
    assert "--src" in err and "is a directory" in err
    err = one_line_error(capsys, [*base, "--src", str(tmp_path / "a.txt"), "--ref", str(tmp_path / "no.txt")])
    assert "--ref" in err and "does not exist" in err
    err = one_line_error(capsys, [*base, "--src", str(tmp_path / "a.txt"), "--ref", str(tmp_path / "b.txt")])
    assert "2 lines" in err and "1" in err
    err = one_line_error(capsys, [*base, "--src", str(tmp_path / "a.txt")])
    assert "--ref" in err
    err = one_line_error(capsys, [*base, "--split", "dev"])
    assert "'dev'" in err and "test, valid" in err and "test_src" not in err
    err = one_line_error(capsys, ["translate", str(run), "--cpu", "--input", str(tmp_path)])
    assert "is a directory" in err


# --------------------------------------------------------------------------------------------------- sweep


def test_sweep_is_a_command_and_its_table_names_the_update_each_score_is_from(run, capsys):
    from transformer_ln.evaluation.evaluate import evaluate_run

    evaluate_run(run, "test", "best", limit=None)  # eval_test_best.json: the score the sweep collects
    ev = json.loads((run / "eval_test_best.json").read_text())
    grid = ["--grid", "residual=post_ln", "depth=2", "lr=0.002", "warmup=300", "seed=1"]
    assert cli_main(["sweep", "--out", str(run.parent), "--cpu", "--no-plots", *grid]) == 0
    out = capsys.readouterr().out
    assert "finished, skipped" in out and "| BLEU of update | weights sha256 |" in out
    assert f"| {ev['bleu']:.2f} | {ev['update']} | {ev['weights_sha256'][:12]} |" in out
    # a resume that moved best on since this evaluation: the table says so instead of passing it off as the new one
    summary = json.loads((run / "summary.json").read_text())
    summary["best_checkpoint"] = "checkpoints/best (update 99)"
    (run / "summary.json").write_text(json.dumps(summary))
    assert cli_main(["sweep", "--out", str(run.parent), "--cpu", "--no-plots", *grid]) == 0
    assert f"| {ev['update']} (best: 99) |" in capsys.readouterr().out
    err = one_line_error(capsys, ["sweep", "--out", str(run.parent), "--grid", "depth=x"])
    assert "depth" in err
