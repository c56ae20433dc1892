"""Corpus loading (files, .gz, JSON lines, hub errors), the joint BPE, encoding, prepare_data and `data stats`."""
import gzip
import json
from pathlib import Path

import pytest

from transformer_ln import DataConfig, RunConfig, UserError
from transformer_ln.data import (BOS, EOS, PAD, UNK, TokenBatchSampler, build_tokenizer, generate_synthetic,
                                 load_corpus, prepare_data)
from transformer_ln.data.cli import main as data_main

MULTI30K = Path(__file__).parents[2] / "shared/data/multi30k"

TYPED = [  # written for these tests: accents, punctuation, digits, quotes
    ("Der Bäcker öffnet um 7 Uhr, nicht später!", "The baker opens at 7 o'clock, not later!"),
    ("Élodie a reçu « trois » lettres — très étrange ?", "Élodie received \"three\" letters - very odd?"),
    ("Zwei Kühe grasen am Fluß; die dritte schläft.", "Two cows graze by the river; the third sleeps."),
    ("Naïve Ideen kosten 12,50 € (ungefähr).", "Naive ideas cost 12.50 EUR (roughly)."),
]


@pytest.fixture(scope="module")
def synthetic_pairs():
    return generate_synthetic(20000, 1234)


@pytest.fixture(scope="module")
def synthetic_tokenizer(synthetic_pairs):
    return build_tokenizer(synthetic_pairs + TYPED, 8000, None)


def files_config(tmp_path, train, valid=None, **kw) -> DataConfig:
    valid = valid or train
    return DataConfig(source="files", train_src=str(train[0]), train_tgt=str(train[1]), valid_src=str(valid[0]),
                      valid_tgt=str(valid[1]), cache_dir=str(tmp_path / "hf"), **kw)


def write_lines(path: Path, lines, gz=False) -> Path:
    text = "".join(line + "\n" for line in lines).encode()
    path.write_bytes(gzip.compress(text) if gz else text)
    return path


# ---------------------------------------------------------------------------------------------------------------
# local files


def test_text_gz_and_json_lines_give_the_same_pairs(tmp_path):
    pairs = generate_synthetic(50, 2) + TYPED
    src = [f"  {s} " for s, _ in pairs] + ["", "only source"]  # stripped; the pair with an empty side dropped
    tgt = [t for _, t in pairs] + ["", "   "]
    txt = files_config(tmp_path, (write_lines(tmp_path / "a.de", src), write_lines(tmp_path / "a.en", tgt)))
    gz = files_config(tmp_path, (write_lines(tmp_path / "b.de.gz", src, gz=True),
                                 write_lines(tmp_path / "b.en.gz", tgt, gz=True)))
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"translation": {"de": s, "en": t}}, ensure_ascii=False) + "\n"
                             for s, t in zip(src, tgt)))
    js = files_config(tmp_path, (jsonl, jsonl), src_lang="de", tgt_lang="en")
    expected = [(s.strip(), t.strip()) for s, t in pairs]
    for cfg in (txt, gz, js):
        corpus = load_corpus(cfg)
        assert corpus["train"] == expected, cfg.train_src
        assert corpus["valid"] == expected
        assert "test" not in corpus


def test_mismatched_line_counts_name_both_files_and_counts(tmp_path):
    cfg = files_config(tmp_path, (write_lines(tmp_path / "x.de", ["a", "b", "c"]),
                                  write_lines(tmp_path / "x.en", ["a", "b"])))
    with pytest.raises(UserError, match=r"x\.de has 3 lines but .*x\.en has 2"):
        load_corpus(cfg)


def test_bad_utf8_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.de"
    bad.write_bytes("gut\nauch gut\n".encode() + b"schlecht \xff\xfe\n")
    cfg = files_config(tmp_path, (bad, write_lines(tmp_path / "ok.en", ["good", "also good", "bad"])))
    with pytest.raises(UserError, match=r"bad\.de is not valid UTF-8 at line 3"):
        load_corpus(cfg)


def test_empty_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "e.de").write_text("")
    (tmp_path / "e.en").write_text("")
    with pytest.raises(UserError, match=r"train split is empty: .*e\.de and .*e\.en"):
        load_corpus(files_config(tmp_path, (tmp_path / "e.de", tmp_path / "e.en")))
    blank = files_config(tmp_path, (write_lines(tmp_path / "b.de", ["", " "]),
                                    write_lines(tmp_path / "b.en", ["x", ""])))
    with pytest.raises(UserError, match="train split is empty"):
        load_corpus(blank)


def test_missing_file_and_missing_json_language_are_named(tmp_path):
    with pytest.raises(UserError, match=r"data.train_src: file .*nope\.de does not exist"):
        load_corpus(files_config(tmp_path, (tmp_path / "nope.de", tmp_path / "nope.en")))
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps({"translation": {"de": "a", "en": "b"}}) + "\n")
    with pytest.raises(UserError, match="no language 'fr'.*found: de, en"):
        load_corpus(files_config(tmp_path, (jsonl, jsonl), src_lang="de", tgt_lang="fr"))
    with pytest.raises(UserError, match="set data.src_lang and data.tgt_lang"):
        load_corpus(files_config(tmp_path, (jsonl, jsonl)))


def test_offline_hub_says_there_is_no_network_and_to_use_files(tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = DataConfig(source="hub", hub_name="nobody-here/made-up-parallel-corpus", hub_config="de-en",
                     cache_dir=str(tmp_path))
    with pytest.raises(UserError, match="no network.*data.source=files") as info:
        load_corpus(cfg)
    assert info.value.__suppress_context__  # no chained traceback from inside datasets


# ---------------------------------------------------------------------------------------------------------------
# tokenizer and encoding


def test_bpe_round_trip_and_special_ids(synthetic_pairs, synthetic_tokenizer):
    tok = synthetic_tokenizer
    assert [tok.token_to_id(s) for s in ("<pad>", "<s>", "</s>", "<unk>")] == [PAD, BOS, EOS, UNK] == [0, 1, 2, 3]
    for s, t in synthetic_pairs[::97] + TYPED:
        for text in (s, t):
            ids = tok.encode(text).ids
            assert UNK not in ids
            assert tok.decode(ids) == text


def test_tokenizer_is_saved_and_reloaded_with_the_same_ids(tmp_path, synthetic_pairs):
    path = tmp_path / "tokenizer.json"
    tok = build_tokenizer(synthetic_pairs[:2000], 500, path)
    assert path.is_file()
    again = build_tokenizer([], 500, path)  # the file exists: loaded, not retrained
    text = synthetic_pairs[0][1]
    assert again.encode(text).ids == tok.encode(text).ids
    assert again.get_vocab_size() == tok.get_vocab_size() <= 500


def test_padding_efficiency_on_the_synthetic_corpus(synthetic_pairs, synthetic_tokenizer):
    src = [len(synthetic_tokenizer.encode(s).ids) + 1 for s, _ in synthetic_pairs]
    tgt = [len(synthetic_tokenizer.encode(t).ids) + 1 for _, t in synthetic_pairs]
    assert TokenBatchSampler(src, tgt, 4096, seed=1).padding_efficiency() >= 0.90


@pytest.mark.skipif(not (MULTI30K / "train.de").is_file(), reason="../shared/data/multi30k is not here")
def test_padding_efficiency_on_multi30k(tmp_path):
    cfg = RunConfig.from_dict({"data": {"source": "files", "train_src": str(MULTI30K / "train.de"),
                                        "train_tgt": str(MULTI30K / "train.en"), "valid_src": str(MULTI30K / "val.de"),
                                        "valid_tgt": str(MULTI30K / "val.en")},
                               "train": {"max_tokens": 4096, "max_epochs": 1}})
    data = prepare_data(cfg, tmp_path)
    assert data.n_pairs["train"] == len(data.splits["train"]) == 29000
    assert data.sampler("train", 4096, seed=1).padding_efficiency() >= 0.95


# ---------------------------------------------------------------------------------------------------------------
# prepare_data and the stats command


def small_run_config(tmp_path) -> RunConfig:
    return RunConfig.from_dict({"data": {"synthetic_size": 300, "vocab_size": 300},
                                "model": {"max_positions": 64}, "train": {"max_epochs": 1}})


def test_prepare_data_trains_then_reuses_the_tokenizer(tmp_path):
    cfg = small_run_config(tmp_path)
    data = prepare_data(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "tokenizer.json").is_file()
    assert set(data.splits) == {"train", "valid", "test"}
    assert len(data.splits["train"]) + data.n_filtered["train"] == data.n_pairs["train"] == 300
    pos = len(data.splits["valid"]) // 2
    row = data.batch("valid", [pos])
    src_text = data.text("valid")[int(data.splits["valid"].row_of([pos])[0])][0]
    ids = row["src"][0].tolist()
    assert ids[ids.index(EOS) - 1] != PAD and data.tokenizer.decode(ids[:ids.index(EOS)]) == src_text
    again = prepare_data(cfg, tmp_path / "run")
    assert again.tokenizer.to_str() == data.tokenizer.to_str() and again.directory == data.directory
    assert again.batch("train", range(len(again.splits["train"])))["src"].equal(
        data.batch("train", range(len(data.splits["train"])))["src"])


def test_data_stats_prints_and_writes_json(tmp_path, capsys):
    out = tmp_path / "stats.json"
    rc = data_main(["stats", "data.synthetic_size=300", "data.vocab_size=300", "train.max_tokens=1024",
                    "--out", str(tmp_path / "run"), "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "padding eff" in printed and "train" in printed
    stats = json.loads(out.read_text())
    train = stats["splits"]["train"]
    assert train["pairs"] == 300 and train["batches"] >= 1 and 0 < train["padding_efficiency"] <= 1
    assert train["unk_rate"] == 0.0 and stats["max_tokens"] == 1024
    assert {"p50", "p95", "p99", "max", "mean"} <= set(train["src_tokens"])


def test_data_stats_rejects_a_stray_argument(tmp_path):
    with pytest.raises(UserError, match="unexpected argument 'oops'"):
        data_main(["stats", "oops"])
