"""Token-budget batching: budget respected, every example once per epoch, disjoint shards, seeded epoch order."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from transformer_ln.data import BOS, EOS, PAD, TokenBatchSampler, collate


def random_lengths(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    src = rng.integers(2, 60, n)
    tgt = np.clip(src + rng.integers(-5, 6, n), 2, None)
    return src, tgt


def test_every_batch_respects_max_tokens_including_padding():
    src, tgt = random_lengths()
    sampler = TokenBatchSampler(src, tgt, max_tokens=1024, seed=1)
    for batch in sampler:
        assert len(batch) * max(max(src[batch]), max(tgt[batch]) + 1) <= 1024
        examples = [{"src_ids": [5] * src[i], "tgt_ids": [6] * tgt[i]} for i in batch]
        b = collate(examples)
        assert b["src"].numel() <= 1024 and b["tgt_in"].numel() <= 1024


def test_each_example_exactly_once_per_epoch():
    src, tgt = random_lengths()
    sampler = TokenBatchSampler(src, tgt, max_tokens=2048, seed=3)
    for epoch in (1, 2):
        sampler.set_epoch(epoch)
        seen = [i for batch in sampler for i in batch]
        assert sorted(seen) == list(range(len(src)))
        assert len(list(sampler)) == len(sampler)


def test_two_shards_are_disjoint_and_cover_the_one_shard_set():
    src, tgt = random_lengths()
    one = TokenBatchSampler(src, tgt, 2048, seed=5)
    shards = [TokenBatchSampler(src, tgt, 2048, seed=5, num_shards=2, shard_id=r) for r in range(2)]
    for s in [one, *shards]:
        s.set_epoch(4)
    sets = [{tuple(b) for b in s} for s in shards]
    assert not sets[0] & sets[1]
    assert sets[0] | sets[1] == {tuple(b) for b in one}
    assert sum(len(s) for s in shards) == len(one)
    assert shards[0].batches_per_shard == -(-len(one) // 2)
    even = [TokenBatchSampler(src, tgt, 2048, seed=5, num_shards=3, shard_id=r, even=True) for r in range(3)]
    assert len({len(list(s)) for s in even}) == 1  # equal step counts for DDP


def test_order_changes_between_epochs_and_repeats_for_same_seed_and_epoch():
    src, tgt = random_lengths()
    a = TokenBatchSampler(src, tgt, 2048, seed=9)
    b = TokenBatchSampler(src, tgt, 2048, seed=9)
    a.set_epoch(1)
    b.set_epoch(1)
    first = list(a)
    assert first == list(b)
    a.set_epoch(2)
    assert list(a) != first
    assert sorted(map(tuple, a)) == sorted(map(tuple, first))  # same batches, other order
    c = TokenBatchSampler(src, tgt, 2048, seed=10)
    c.set_epoch(1)
    assert list(c) != first


def test_no_shuffle_is_length_sorted_and_fixed():
    src, tgt = random_lengths(500)
    s = TokenBatchSampler(src, tgt, 1024, seed=0, shuffle=False)
    s.set_epoch(1)
    e1 = list(s)
    s.set_epoch(2)
    assert list(s) == e1
    firsts = [max(src[b].max(), tgt[b].max() + 1) for b in e1]
    assert firsts == sorted(firsts)


def test_an_over_long_sentence_gets_a_batch_of_its_own_and_is_not_dropped():
    src, tgt = [5, 5, 300, 5], [5, 5, 5, 5]
    s = TokenBatchSampler(src, tgt, max_tokens=100, seed=0)
    batches = list(s)
    assert [2] in batches
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3]


def test_bad_arguments_are_rejected_with_the_value():
    with pytest.raises(ValueError, match="max_tokens: got 0"):
        TokenBatchSampler([1], [1], 0, seed=0)
    with pytest.raises(ValueError, match="2/2"):
        TokenBatchSampler([1], [1], 10, seed=0, num_shards=2, shard_id=2)
    with pytest.raises(ValueError, match="equally long"):
        TokenBatchSampler([1, 2], [1], 10, seed=0)


def test_padding_efficiency_is_one_without_padding():
    s = TokenBatchSampler([4] * 10, [4] * 10, 100, seed=0)
    assert s.padding_efficiency() == 1.0


def test_collate_shifts_targets_and_pads():
    b = collate([{"src_ids": [7, 8, EOS], "tgt_ids": [9, EOS]}, {"src_ids": [7, EOS], "tgt_ids": [4, 5, 6, EOS]}])
    assert b["src"].dtype == torch.int64
    assert b["src"].tolist() == [[7, 8, EOS], [7, EOS, PAD]]
    assert b["tgt_out"].tolist() == [[9, EOS, PAD, PAD], [4, 5, 6, EOS]]
    assert b["tgt_in"].tolist() == [[BOS, 9, PAD, PAD], [BOS, 4, 5, 6]]
    assert b["ntokens"] == 6 and b["nsentences"] == 2


def test_dataloader_with_sampler_and_collate():
    from datasets import Dataset

    src, tgt = random_lengths(200)
    ds = Dataset.from_dict({"src_ids": [[5] * n for n in src], "tgt_ids": [[6] * n for n in tgt]})
    sampler = TokenBatchSampler(src, tgt, 512, seed=0)
    sampler.set_epoch(1)
    n = sum(batch["nsentences"] for batch in DataLoader(ds, batch_sampler=sampler, collate_fn=collate))
    assert n == 200


def test_an_epoch_of_index_arrays_is_the_epoch_and_costs_no_python_int_per_example():
    import tracemalloc

    rng = np.random.default_rng(0)
    n = 200_000
    src, tgt = rng.integers(3, 60, n), rng.integers(3, 60, n)
    for shard in (0, 1):
        s = TokenBatchSampler(src, tgt, max_tokens=2000, seed=3, shuffle=True, num_shards=2, shard_id=shard)
        s.set_epoch(2)
        assert [a.tolist() for a in s.shard_arrays()] == list(s)  # the same batches, in the same order
    tracemalloc.start()
    s.shard_arrays()
    arrays = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    list(s)
    lists = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert arrays < 2 * n / 2 < lists  # per example of the shard: under 2 bytes as views, over 2 as Python lists
