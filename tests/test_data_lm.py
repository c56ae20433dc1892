"""The decoder-only data pipeline: documents packed into one token stream, cut into blocks, batched by block."""
import gzip
import json

import numpy as np
import pytest
import torch
from datasets import Dataset

from transformer_ln.config.run_config import RunConfig
from transformer_ln.data import (EOS, SPECIALS, LMData, load_lm_tokenizer, prepare_lm_data, synthetic_splits,
                                 train_byte_bpe)
from transformer_ln.data import lm_prepare
from transformer_ln.data.cli import main as data_main
from transformer_ln.data.corpus import SYNTHETIC_EVAL_SIZE
from transformer_ln.data.tokenizer import save_tokenizer
from transformer_ln.errors import UserError

T = 16
SYNTH = {"synthetic_size": 300, "vocab_size": 300, "block_size": T}
DOCS = ["The quick brown fox jumps over the lazy dog.", "Grüße aus Köln: Straße, Äpfel und Übermut!",
        "日本語のテキストも一行の文書です。", "  indented line with\ttabs and  double spaces", "",
        "Emoji 🙂 and a literal </s> tag stay text.", "Numbers 3.14159 and 2,718 and -42."] * 3


def lm_cfg(**data) -> RunConfig:
    return RunConfig.from_dict({"model": {"arch": "decoder_only"}, "data": data})


def encode_docs(tok, docs) -> np.ndarray:
    """The stream recomputed independently: each non-blank document's ids, then </s>."""
    out = []
    for d in docs:
        if d.strip():
            out += tok.encode(d, add_special_tokens=False).ids + [EOS]
    return np.array(out, dtype=np.int64)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> LMData:
    return prepare_lm_data(lm_cfg(**SYNTH), tmp_path_factory.mktemp("run"))


def test_blocks_are_slices_of_the_packed_documents(synth):
    pairs = synthetic_splits(SYNTH["synthetic_size"], RunConfig().data.synthetic_seed, SYNTHETIC_EVAL_SIZE)
    for split in ("train", "valid"):
        docs = [side for pair in pairs[split] for side in pair]
        stream = encode_docs(synth.tokenizer, docs)
        s = synth.splits[split]
        np.testing.assert_array_equal(np.asarray(s.tokens), stream)
        assert (s.n_tokens, s.n_docs) == (len(stream), len(docs))
        assert s.n_bytes == sum(len(d.encode()) for d in docs) and s.n_words == sum(len(d.split()) for d in docs)
        assert len(s) == (len(stream) - 1) // T
        ks = [0, 5, len(s) - 1]
        b = synth.batch(split, ks)
        assert b["input"].dtype == b["target"].dtype == torch.int64
        assert b["input"].shape == b["target"].shape == (3, T) and (b["ntokens"], b["nsentences"]) == (3 * T, 3)
        for row, k in enumerate(ks):
            np.testing.assert_array_equal(b["input"][row].numpy(), stream[k * T:k * T + T])
            np.testing.assert_array_equal(b["target"][row].numpy(), stream[k * T + 1:k * T + T + 1])
    assert synth.tokenizer.decode(list(synth.splits["train"].tokens[:200]), skip_special_tokens=False) \
        .startswith(pairs["train"][0][0] + "</s>" + pairs["train"][0][1] + "</s>")


def test_the_stream_is_memory_mapped_and_small(synth):
    tokens = synth.splits["train"].tokens
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
    assert synth.manifest["splits"]["train"]["tokens"] == len(tokens) and synth.vocab_size <= 300


def test_byte_level_bpe_round_trips_any_text(tmp_path):
    tok = train_byte_bpe([d for d in DOCS if d], 300)
    assert [tok.token_to_id(s) for s in SPECIALS] == [0, 1, 2, 3]
    save_tokenizer(tok, tmp_path / "tokenizer.json")
    tok = load_lm_tokenizer(tmp_path / "tokenizer.json")
    for text in DOCS + ["never seen: ŉ Ωmega ∑ 𝔘 \u00a0nbsp", " <s> </s> <pad>", "a\nb\r\nc"]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == text
        assert EOS not in ids and 3 not in ids  # a literal </s> is text, and no byte is unknown


def write_formats(tmp_path) -> dict[str, str]:
    (tmp_path / "d.txt").write_text("\n".join(DOCS) + "\n", encoding="utf-8")
    with gzip.open(tmp_path / "d.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(DOCS) + "\n")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"body": d, "n": i}) + "\n" for i, d in enumerate(DOCS)))
    Dataset.from_dict({"body": DOCS}).to_parquet(str(tmp_path / "d.parquet"))
    Dataset.from_dict({"body": DOCS, "n": list(range(len(DOCS)))}).save_to_disk(str(tmp_path / "saved"))
    return {k: str(tmp_path / k) for k in ("d.txt", "d.txt.gz", "d.jsonl", "d.parquet", "saved")}


def test_every_file_format_gives_the_same_stream(tmp_path):
    paths = write_formats(tmp_path)
    streams = {}
    for name, path in paths.items():
        cfg = lm_cfg(source="files", train_text=path, valid_text=path, vocab_size=300, block_size=8,
                     text_field="body")
        data = prepare_lm_data(cfg, tmp_path / f"run-{name}")
        streams[name] = np.asarray(data.splits["train"].tokens)
        info = data.manifest["splits"]["train"]
        assert (info["docs"], info["empty"]) == (len(DOCS) - 3, 3)
        np.testing.assert_array_equal(streams[name], encode_docs(data.tokenizer, DOCS))
    for name in paths:
        np.testing.assert_array_equal(streams[name], streams["d.txt"], err_msg=name)


def test_sampler_covers_every_block_once_per_epoch_across_shards(synth):
    n = len(synth.splits["train"])
    per_batch = 5
    for epoch in (1, 2):
        seen = []
        for r in range(3):
            s = synth.sampler("train", per_batch * T + 3, seed=7, num_shards=3, shard_id=r)
            s.set_epoch(epoch)
            got = list(s)
            assert len(got) == len(s) and [list(a) for a in s.shard_arrays()] == got
            seen += [k for b in got for k in b]
        assert sorted(seen) == list(range(n))
    s = synth.sampler("train", per_batch * T, seed=7)
    assert all(len(b) == per_batch for b in s.batches[:-1]) and s.batches_per_shard == -(-n // per_batch)
    s.set_epoch(1)
    first = list(s)
    s.set_epoch(2)
    second = list(s)
    assert first != second and sorted(map(tuple, first)) == sorted(map(tuple, second))  # order moves, batches stay
    again = synth.sampler("train", per_batch * T, seed=7)
    again.set_epoch(1)
    assert list(again) == first
    other = synth.sampler("train", per_batch * T, seed=8)
    assert sorted(map(tuple, other.batches)) != sorted(map(tuple, s.batches))
    assert all(len(b) == 1 for b in synth.sampler("valid", T // 2, seed=1).batches)  # fewer tokens than a block
    even = synth.sampler("train", 1000 * T, seed=7, num_shards=n // 1000 + 2, shard_id=n // 1000 + 1, even=True)
    assert len(list(even)) == len(even) == even.batches_per_shard


def test_second_prepare_reuses_the_cache_for_any_block_size(tmp_path, monkeypatch):
    cfg = lm_cfg(**SYNTH)
    data = prepare_lm_data(cfg, tmp_path)
    built = []
    monkeypatch.setattr(lm_prepare, "build_lm_prepared", lambda *a, **k: built.append(a))
    mtime = (data.directory / "train.npy").stat().st_mtime_ns
    again = prepare_lm_data(lm_cfg(**{**SYNTH, "block_size": 32}), tmp_path)
    assert built == [] and again.directory == data.directory
    assert (again.directory / "train.npy").stat().st_mtime_ns == mtime
    assert len(again.splits["train"]) == (again.splits["train"].n_tokens - 1) // 32
    assert (tmp_path / "tokenizer.json").is_file()
    other = lm_prepare.lm_prepared_location(lm_cfg(**{**SYNTH, "vocab_size": 320}), tmp_path)
    assert other != data.directory


def test_data_prepare_then_prepared_directory(tmp_path, capsys):
    out = tmp_path / "prep"
    args = ["model.arch=decoder_only", "data.synthetic_size=300", "data.vocab_size=300", "train.max_tokens=64"]
    assert data_main(["prepare", "--out", str(out), *args]) == 0
    assert data_main(["prepare", "--out", str(out), *args]) == 0
    assert "nothing to do" in capsys.readouterr().out
    cfg = lm_cfg(prepared=str(out), block_size=8)
    data = prepare_lm_data(cfg, tmp_path / "run")
    assert data.data_config.synthetic_size == 300 and data.block_size == 8
    assert data_main(["stats", *args, "data.block_size=8"]) == 0
    text = capsys.readouterr().out
    assert "blocks" in text and "train" in text


@pytest.mark.parametrize("key", ["train_text", "valid_text"])
def test_a_missing_file_or_directory_is_one_clear_error(tmp_path, key):
    paths = write_formats(tmp_path)
    missing = tmp_path / "nope" / "gone.jsonl"
    cfg = lm_cfg(source="files", **{"train_text": paths["d.txt"], "valid_text": paths["d.txt"], key: str(missing)})
    with pytest.raises(UserError, match=rf"data\.{key}: .*{missing.name} does not exist"):
        prepare_lm_data(cfg, tmp_path / "run")


def test_bad_input_is_one_clear_error(tmp_path):
    paths = write_formats(tmp_path)
    cfg = lm_cfg(source="files", train_text=paths["d.jsonl"], valid_text=paths["d.jsonl"], vocab_size=300)
    with pytest.raises(UserError, match="no field 'text'.*body"):
        prepare_lm_data(cfg, tmp_path / "a")
    cfg = lm_cfg(source="files", train_text=paths["d.txt"], valid_text=paths["d.txt"], vocab_size=300,
                 block_size=4096)
    with pytest.raises(UserError, match=r"train split has \d+ tokens.*block_size=4096 needs at least 4097"):
        prepare_lm_data(cfg, tmp_path / "b")
    with pytest.raises(UserError, match="at least 260"):
        prepare_lm_data(lm_cfg(synthetic_size=50, vocab_size=100), tmp_path / "c")
    with pytest.raises(UserError, match="hub.*not supported"):
        prepare_lm_data(lm_cfg(source="hub", hub_name="wikitext"), tmp_path / "d")
    translation = tmp_path / "mt"
    assert data_main(["prepare", "--out", str(translation), "data.synthetic_size=300", "data.vocab_size=300"]) == 0
    with pytest.raises(UserError, match="holds translation data"):
        prepare_lm_data(lm_cfg(prepared=str(translation)), tmp_path / "e")
