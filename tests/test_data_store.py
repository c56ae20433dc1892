"""The memory-mapped data path against the list-based one it replaced: same tokenizer, same batches, same tensors."""
import os
import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from transformer_ln import RunConfig
from transformer_ln.data import EOS, SPECIALS, TokenBatchSampler, collate, generate_synthetic, prepare_data

TYPED = [  # written for these tests: accents, punctuation, digits; one pair with an empty side; two too long
    ("Der Bäcker öffnet um 7 Uhr, nicht später!", "The baker opens at 7 o'clock, not later!"),
    ("  Zwei Kühe grasen am Fluß; die dritte schläft. ", "Two cows graze by the river; the third sleeps."),
    ("   ", "An empty source side."),
    ("Ein sehr langer Satz " * 12, "Short."),
    ("Kurz.", "A very long target sentence " * 12),
]


def write_corpus(tmp_path: Path, n_train: int = 700) -> dict:
    """Train/valid/test files: synthetic pairs plus the typed ones, through the `files` source."""
    splits = {"train": generate_synthetic(n_train, 7) + TYPED, "valid": generate_synthetic(120, 8) + TYPED[:3],
              "test": generate_synthetic(40, 9)}
    data = {"source": "files", "vocab_size": 400}
    for split, pairs in splits.items():
        for side, col in (("src", 0), ("tgt", 1)):
            path = tmp_path / f"{split}.{side}"
            path.write_text("".join(p[col] + "\n" for p in pairs))
            data[f"{split}_{side}"] = str(path)
    return {"raw": splits, "data": data}


def reference_encode(raw: dict, vocab_size: int, max_positions: int):
    """The list-based pipeline as it was: stripped non-empty pairs, joint BPE on train, ids + </s>, length filter."""
    pairs = {k: [(s.strip(), t.strip()) for s, t in v if s.strip() and t.strip()] for k, v in raw.items()}
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIALS),
                                  show_progress=False)
    tok.train_from_iterator((x for pair in pairs["train"] for x in pair), trainer=trainer)
    encoded = {}
    for split, rows in pairs.items():
        out = []
        for s, t in rows:
            src = tok.encode(s, add_special_tokens=False).ids + [EOS]
            tgt = tok.encode(t, add_special_tokens=False).ids + [EOS]
            if len(src) <= max_positions and len(tgt) + 1 <= max_positions:
                out.append({"src_ids": src, "tgt_ids": tgt})
        encoded[split] = out
    return tok, pairs, encoded


def reference_batches(rows: list[dict], max_tokens: int, seed: int, epoch: int, shuffle: bool, num_shards: int,
                      shard_id: int) -> list[dict]:
    sampler = TokenBatchSampler([len(r["src_ids"]) for r in rows], [len(r["tgt_ids"]) for r in rows], max_tokens,
                                seed, shuffle=shuffle, num_shards=num_shards, shard_id=shard_id)
    sampler.set_epoch(epoch)
    return [collate([rows[i] for i in ix]) for ix in sampler]


def new_batches(data, split: str, max_tokens: int, seed: int, epoch: int, shuffle: bool, num_shards: int,
                shard_id: int) -> list[dict]:
    sampler = data.sampler(split, max_tokens, seed, shuffle=shuffle, num_shards=num_shards, shard_id=shard_id)
    sampler.set_epoch(epoch)
    return [data.batch(split, ix) for ix in sampler]


def assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want) and len(want) > 2
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in w:
            if isinstance(w[k], torch.Tensor):
                assert g[k].dtype == w[k].dtype and torch.equal(g[k], w[k]), k
            else:
                assert g[k] == w[k], k


def test_memory_mapped_batches_equal_the_list_based_ones(tmp_path):
    corpus = write_corpus(tmp_path)
    max_positions, max_tokens = 40, 400
    cfg = RunConfig.from_dict({"data": corpus["data"], "model": {"max_positions": max_positions},
                               "train": {"max_epochs": 1}})
    data = prepare_data(cfg, tmp_path / "run")
    tok, pairs, rows = reference_encode(corpus["raw"], 400, max_positions)
    assert data.tokenizer.to_str() == tok.to_str()
    assert data.n_filtered == {k: len(pairs[k]) - len(rows[k]) for k in pairs} and data.n_filtered["train"] >= 2
    assert data.n_empty == {"train": 1, "valid": 1, "test": 0}
    for split, seed, epoch, shuffle, shards in (("train", 3, 1, True, 1), ("train", 3, 2, True, 1),
                                                ("train", 11, 1, True, 2), ("valid", 0, 1, False, 2)):
        for shard in range(shards):
            want = reference_batches(rows[split], max_tokens, seed, epoch, shuffle, shards, shard)
            got = new_batches(data, split, max_tokens, seed, epoch, shuffle, shards, shard)
            assert_same_batches(got, want)
    assert data.text("test") == pairs["test"]


# ---------------------------------------------------------------------------------------------------------------
# the cache and prepared directories: reuse, invalidation, corruption


def files_run_config(corpus: dict, cache: Path, *overrides) -> RunConfig:
    from transformer_ln.config import apply_overrides

    base = {"data": {**corpus["data"], "cache_dir": str(cache)}, "model": {"max_positions": 64},
            "train": {"max_epochs": 1}}
    return RunConfig.from_dict(apply_overrides(base, list(overrides)))


def built_entries(cache: Path) -> dict[str, float]:
    return {p.name: (p / "manifest.json").stat().st_mtime_ns for p in cache.glob("prepared-*")}


def test_cache_is_reused_and_invalidated_by_vocab_size_or_a_changed_file(tmp_path, caplog):
    import logging

    corpus = write_corpus(tmp_path, n_train=300)
    cache = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="transformer_ln.data")
    first = prepare_data(files_run_config(corpus, cache), tmp_path / "run1")
    assert "training the tokenizer" in caplog.text and "encoding train" in caplog.text
    entries = built_entries(cache)
    assert len(entries) == 1
    caplog.clear()
    second = prepare_data(files_run_config(corpus, cache), tmp_path / "run2")  # another run, same data
    assert "training the tokenizer" not in caplog.text and "encoding" not in caplog.text
    assert "reusing the prepared data" in caplog.text and built_entries(cache) == entries
    assert second.directory == first.directory
    assert (tmp_path / "run2" / "tokenizer.json").read_text() == (tmp_path / "run1" / "tokenizer.json").read_text()
    caplog.clear()
    other = prepare_data(files_run_config(corpus, cache, "data.vocab_size=300"), tmp_path / "run3")
    assert "training the tokenizer" in caplog.text and other.directory != first.directory
    assert other.vocab_size <= 300 < first.vocab_size
    caplog.clear()
    with open(corpus["data"]["train_tgt"], "a") as f:  # same settings, edited data: a new entry
        f.write("One more line.\n")
    with open(corpus["data"]["train_src"], "a") as f:
        f.write("Noch eine Zeile.\n")
    edited = prepare_data(files_run_config(corpus, cache), tmp_path / "run4")
    assert "training the tokenizer" in caplog.text and edited.directory not in (first.directory, other.directory)
    assert edited.n_pairs["train"] == first.n_pairs["train"] + 1
    assert len(built_entries(cache)) == 3


def test_data_prepare_then_train_reads_it_and_refuses_a_corrupt_directory(tmp_path, capsys, caplog):
    import logging

    from transformer_ln import UserError
    from transformer_ln.data.cli import main as data_main

    corpus = write_corpus(tmp_path, n_train=300)
    config = tmp_path / "c.yaml"
    files_run_config(corpus, tmp_path / "unused-cache").save(config)
    out = tmp_path / "prepared"
    assert data_main(["prepare", str(config), "data.vocab_size=350", "--out", str(out)]) == 0
    assert "data.prepared=" in capsys.readouterr().out
    assert not list(tmp_path.glob(".prepared.partial-*")) and not (out / "raw").exists()
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert data_main(["prepare", str(config), "data.vocab_size=350", "--out", str(out)]) == 0
    assert "nothing to do" in capsys.readouterr().out and (out / "manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match="other settings"):
        data_main(["prepare", str(config), "data.vocab_size=300", "--out", str(out)])
    caplog.set_level(logging.INFO, logger="transformer_ln.data")
    cfg = RunConfig.from_dict({"data": {"prepared": str(out)}, "model": {"max_positions": 64},
                               "train": {"max_epochs": 1}})
    data = prepare_data(cfg, tmp_path / "run")
    assert "training the tokenizer" not in caplog.text and "encoding" not in caplog.text
    assert data.data_config.source == "files" and data.data_config.vocab_size == 350 == data.vocab_size
    assert not (tmp_path / "unused-cache").exists() and not (tmp_path / "run" / "cache").exists()
    # corruption: a truncated Arrow file, a missing manifest (an interrupted or foreign directory)
    arrow = next((out / "train").glob("*.arrow"))
    blob = arrow.read_bytes()
    arrow.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(UserError, match=r"incomplete or corrupt \(train/.*arrow has \d+ bytes"):
        prepare_data(cfg, tmp_path / "run")
    arrow.write_bytes(blob)
    (out / "manifest.json").unlink()
    with pytest.raises(UserError, match="incomplete or corrupt .*no manifest.json"):
        prepare_data(cfg, tmp_path / "run")
    with pytest.raises(UserError, match="not empty"):
        data_main(["prepare", str(config), "--out", str(out)])


def test_parallel_encoding_gives_the_same_rows(tmp_path):
    corpus = write_corpus(tmp_path, n_train=4200)
    one = prepare_data(files_run_config(corpus, tmp_path / "c1"), None)
    two = prepare_data(files_run_config(corpus, tmp_path / "c2", "data.num_proc=2"), None)
    assert len(list((two.directory / "train").glob("*.arrow"))) == 2
    everything = range(len(one.splits["train"]))
    for k, v in one.batch("train", everything).items():
        w = two.batch("train", everything)[k]
        assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w


def test_data_scale_benchmark_numbers_every_repeated_pair(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import data_scale

    (tmp_path / "a.de").write_text("".join(s + "\n" for s, _ in TYPED[:2]))
    (tmp_path / "a.en").write_text("".join(t + "\n" for _, t in TYPED[:2]))
    (tmp_path / "out").mkdir()
    src, tgt = data_scale.write_corpus(tmp_path / "a.de", tmp_path / "a.en", tmp_path / "out", 5)
    de, en = src.read_text().splitlines(), tgt.read_text().splitlines()
    assert len(de) == len(en) == 5 and len(set(de)) == 5
    assert de[4] == f"4 {TYPED[0][0]}" and en[3] == f"3 {TYPED[1][1]}"


def test_tokenizer_trained_in_its_own_process_is_the_same(tmp_path, monkeypatch):
    from transformer_ln.data import store

    corpus = write_corpus(tmp_path)
    here = prepare_data(files_run_config(corpus, tmp_path / "c1"), None)
    monkeypatch.setattr(store, "OWN_PROCESS_PAIRS", 1)  # every sample trains in a spawned process
    there = prepare_data(files_run_config(corpus, tmp_path / "c2"), None)
    assert there.tokenizer.to_str() == here.tokenizer.to_str()
    everything = range(len(here.splits["train"]))
    for k, v in here.batch("train", everything).items():
        w = there.batch("train", everything)[k]
        assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w


def test_a_killed_tokenizer_process_is_one_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    import signal
    import threading

    from transformer_ln.data import store
    from transformer_ln.errors import UserError

    corpus = write_corpus(tmp_path)
    monkeypatch.setattr(store, "OWN_PROCESS_PAIRS", 1)
    done = threading.Event()
    children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children")  # this (main) thread starts it

    def kill_the_child():  # an injected fault: the OOM killer's SIGKILL, as soon as the process exists
        while not done.is_set():
            for pid in children.read_text().split():
                os.kill(int(pid), signal.SIGKILL)
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_the_child)
    killer.start()
    try:
        with pytest.raises(UserError, match="tokenizer training process failed .*out of memory"):
            prepare_data(files_run_config(corpus, tmp_path / "cache"), None)
    finally:
        done.set()
        killer.join()
    assert not any((tmp_path / "cache").iterdir())
