"""The LSTM language model learns the built-in corpus, its config refuses bad values, and its run files are whole."""
import json
import math

import pytest

from transformer_ln.config.sections import ConfigError
from transformer_ln.errors import UserError
from transformer_ln.recurrent.lm import LMConfig, train_lm


def _tiny(**kw) -> LMConfig:
    base = dict(source="synthetic", synthetic_train_size=600, vocab_size=200, min_frequency=1, emb_size=32,
                hidden_size=48, batch_size=16, max_updates=60, eval_every=30, lr=1e-2, seed=3)
    base.update(kw)
    return LMConfig(**base)


@pytest.mark.parametrize("norm", ["layernorm", None])
def test_lm_measurably_learns_the_builtin_corpus(norm, tmp_path):
    summary = train_lm(_tiny(norm=norm), out_dir=tmp_path)
    hist = summary["history"]
    assert summary["status"] == "completed" and [r["update"] for r in hist] == [0, 30, 60]
    vocab = summary["vocab_size"]
    # at the start about uniform over the vocabulary; after 60 updates far below it (the corpus has few words)
    assert abs(math.log(hist[0]["valid_ppl"]) - math.log(vocab)) < 0.5, hist[0]
    assert hist[-1]["valid_ppl"] < 0.25 * vocab, hist
    assert hist[-1]["valid_nll"] < hist[1]["valid_nll"] < hist[0]["valid_nll"]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == hist
    assert json.loads((tmp_path / "summary.json").read_text())["final_valid_ppl"] == hist[-1]["valid_ppl"]
    assert json.loads((tmp_path / "config.json").read_text())["norm"] == norm


@pytest.mark.parametrize("kw, word", [(dict(lr=float("nan")), "lm.lr"), (dict(norm="batchnorm"), "lm.norm"),
                                      (dict(hidden_size=0), "lm.hidden_size"), (dict(source="hub"), "lm.source"),
                                      (dict(source="files", train_path="/nonexistent/x.en"), "lm.train_path")])
def test_lm_config_refuses_bad_values(kw, word):
    with pytest.raises(UserError, match=word):
        _tiny(**kw)


@pytest.mark.parametrize("kw, field", [(dict(lr=-1e-3), "lm.lr"), (dict(dropout=float("nan")), "lm.dropout"),
                                       (dict(clip_norm=float("inf")), "lm.clip_norm"),
                                       (dict(batch_size=-4), "lm.batch_size"), (dict(clip_norm=-1.0), "lm.clip_norm")])
def test_lm_config_refuses_nan_infinity_and_negatives_in_one_line_naming_the_field(kw, field):
    with pytest.raises(ConfigError) as e:
        _tiny(**kw)
    assert str(e.value).startswith(f"{field}: got ") and "\n" not in str(e.value), str(e.value)


def test_lm_config_round_trips_through_its_dict():
    cfg = _tiny(norm=None, lr=3)  # an int where a float goes is read as that float
    assert cfg.lr == 3.0 and LMConfig.from_dict(cfg.to_dict()) == cfg


def test_lm_config_from_dict_names_unknown_keys():
    with pytest.raises(UserError, match="hiden_size"):
        LMConfig.from_dict({"hiden_size": 3})
