"""Nothing silent at evaluation and analysis (issue 26, items 5 and 6): a model with non-finite weights or logits is
one error naming the checkpoint (translation and language model), a line cut to model.max_positions is one warning,
search settings without a meaning are refused with one line, and a metrics.jsonl with a non-UTF-8 byte is read
with one warning naming the line. Two tiny runs (translation and language model), a few seconds each."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from transformer_ln.runs.rundir import RunDir

from conftest import tiny_model
from test_train_safety import cli, copy_of, finished, one_line  # noqa: F401 (fixtures)


def poison(run: Path, value: float, only: str | None = None) -> None:
    """Every checkpoint of ``run`` with its float weights (those whose name contains ``only``) set to ``value``."""
    for f in (run / "checkpoints").glob("*/model.safetensors"):
        tensors = load_file(f)
        for name, t in tensors.items():
            if t.is_floating_point() and (only is None or only in name):
                t.fill_(value)
        save_file(tensors, f)


def evaluations(run: Path) -> list[str]:
    return sorted(p.name for p in run.glob("eval_*.json"))


def warnings_of(res) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.startswith("warning:")]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A decoder-only run of one update (its evaluation at the end off)."""
    from transformer_ln.train import main as train_main

    out = tmp_path_factory.mktemp("lm") / "run"
    assert train_main(["--cpu", "model.arch=decoder_only", "model.residual=pre_ln", "model.d_model=32",
                       "model.n_heads=4", "model.d_ff=64", "model.n_dec_layers=1", "data.synthetic_size=100",
                       "data.vocab_size=300", "data.block_size=32", "model.max_positions=64", "train.max_updates=1",
                       "train.max_tokens=256", "train.bleu_at_end=false", f"train.out_dir={out}"]) == 0
    return out


# ------------------------------------------------------------------------------------------ non-finite models


def test_nan_weights_are_one_error_in_evaluate_and_translate_not_bleu_0(finished, tmp_path, cli):
    run = copy_of(finished, tmp_path)
    poison(run, float("nan"))
    best = str(run / "checkpoints" / "best")
    for res in (cli("evaluate", run, "--cpu", "--limit", "3"), cli("translate", run, "--cpu", stdin="a dog .\n")):
        line = one_line(res, f"checkpoint {best} has non-finite weights")
        assert "non-finite logits" in line and "--checkpoint" in line and "BLEU" not in res.stdout
        assert res.stdout.strip() == ""  # no (empty) translations
    assert evaluations(run) == []  # no "BLEU 0.00" written
    line = one_line(cli("translate", run, "--cpu", "--checkpoint", "update_00000002", stdin="a dog .\n"),
                    "non-finite weights")
    assert "update_00000002" in line


def test_finite_weights_that_overflow_are_said_to_be_finite(finished, tmp_path, cli):
    run = copy_of(finished, tmp_path)
    poison(run, 3e38, only="embed_tokens")  # finite, but the embedding scale and the sums overflow
    line = one_line(cli("translate", run, "--cpu", "--beam", "2", stdin="a dog .\n"), "non-finite logits")
    assert "although its weights are finite" in line and "non-finite weights" not in line


def test_search_raises_on_non_finite_logits_instead_of_returning_empty_hypotheses():
    from transformer_ln.evaluation.search import NonFiniteLogits, beam_search, greedy_search

    model = tiny_model()
    with torch.no_grad():
        model.decoder.embed.embed_tokens.weight.fill_(float("nan"))
    src = torch.tensor([[5, 6, 7, 2]])
    for search in (lambda: beam_search(model, src, beam=2), lambda: greedy_search(model, src)):
        with pytest.raises(NonFiniteLogits, match="non-finite logits"):
            search()


def test_language_model_nan_nll_is_one_error_not_a_nan_perplexity(lm_run, tmp_path, cli):
    run = copy_of(lm_run, tmp_path)
    poison(run, float("nan"))
    res = cli("evaluate", run, "--cpu", "--limit", "4")
    line = one_line(res, f"checkpoint {run / 'checkpoints' / 'best'} has non-finite weights")
    assert "negative log-likelihood" in line and "is nan" in line and "perplexity nan" not in res.stdout
    assert evaluations(run) == []
    line = one_line(cli("generate", run, "--cpu", "--prompt", "the", "--max-new-tokens", "4", "--greedy"),
                    "non-finite logits")
    assert "non-finite weights" in line
    one_line(cli("generate", run, "--cpu", "--prompt", "the", "--max-new-tokens", "4"), "non-finite weights")


# ------------------------------------------------------------------------------------------ truncated input


def test_a_line_longer_than_max_positions_is_translated_with_one_warning(finished, cli):
    res = cli("translate", finished, "--cpu", "--beam", "1", stdin="a dog .\n" + "the cat " * 150 + "\n")
    assert res.returncode == 0 and len(res.stdout.splitlines()) == 2
    [warning] = warnings_of(res)
    assert "1 of 2 input line(s)" in warning and "input line 2, has 4" in warning
    assert "truncated to their first 127" in warning and "model.max_positions=128" in warning
    res = cli("translate", finished, "--cpu", "--beam", "1", stdin="a dog .\n")
    assert res.returncode == 0 and warnings_of(res) == []


# ------------------------------------------------------------------------------------------ options


@pytest.mark.parametrize("command,args,needle", [
    ("translate", ["--beam", "0"], "--beam: got 0, must be a whole number >= 1"),
    ("translate", ["--beam", "-3"], "--beam: got -3"),
    ("translate", ["--lenpen", "-1"], "--lenpen: got -1.0, must be a finite number >= 0"),
    ("translate", ["--lenpen", "nan"], "--lenpen: got nan"),
    ("evaluate", ["--beam", "0"], "--beam: got 0"),
    ("evaluate", ["--lenpen", "inf"], "--lenpen: got inf"),
    ("evaluate", ["--limit", "0"], "--limit: got 0, must be a positive number"),
    ("evaluate", ["--limit", "-2"], "--limit: got -2"),
])
def test_nonsensical_search_options_are_refused_with_one_line(finished, cli, command, args, needle):
    before = evaluations(finished)
    one_line(cli(command, finished, "--cpu", *args, stdin="a dog .\n"), needle)
    assert evaluations(finished) == before


def test_a_bad_setting_in_the_run_config_names_the_setting_and_the_override(finished, tmp_path, cli):
    run = copy_of(finished, tmp_path)
    for cfg in [run / RunDir.CONFIG, *(run / "checkpoints").glob("*/config.yaml")]:
        cfg.write_text(cfg.read_text().replace("lenpen: 1.0", "lenpen: -2.0"))
    line = one_line(cli("translate", run, "--cpu", stdin="a dog .\n"),
                    "train.lenpen in the run's config.yaml: got -2.0")
    assert "pass --lenpen" in line
    res = cli("translate", run, "--cpu", "--beam", "1", "--lenpen", "1", stdin="a dog .\n")
    assert res.returncode == 0 and res.stdout.strip()
    from transformer_ln.evaluation.search import check_search

    with pytest.raises(ValueError, match="max_len_a: got inf"):
        check_search(2, 1.0, math.inf, 10)


# ------------------------------------------------------------------------------------------ analyze curves


def test_curves_read_a_metrics_file_with_a_non_utf8_byte_with_one_warning(finished, tmp_path, cli):
    run = copy_of(finished, tmp_path)
    metrics = run / RunDir.METRICS
    lines = metrics.read_bytes().splitlines(keepends=True)
    n_train = sum(b'"kind": "train"' in line for line in lines)
    metrics.write_bytes(lines[0] + b'{"kind": "train", "loss": 1\xff}\n' + b"".join(lines[1:]))
    res = cli("analyze", "curves", run, "--out", tmp_path / "out")
    assert res.returncode == 0, res.stderr[-2000:]
    [warning] = warnings_of(res)
    assert str(metrics) in warning and "line 2: not UTF-8 (byte 0xff" in warning and "skipped 1" in warning
    record = json.loads((tmp_path / "out" / "curves.json").read_text())["runs"][0]
    assert record["n_train"] == n_train and len(record["skipped_lines"]) == 1
    assert record["skipped_lines"][0].startswith("line 2: not UTF-8")
    assert (tmp_path / "out" / "curves.png").is_file()
