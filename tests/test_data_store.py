"""The memory-mapped data path against the list-based one it replaced: same tokenizer, same batches, same tensors."""
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
