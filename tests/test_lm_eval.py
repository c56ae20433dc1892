"""Scoring and sampling a decoder-only run: generation with the KV cache equals recomputing the prefix, seeded
sampling and its filters, perplexity equals an independent cross-entropy, and `evaluate` / `generate` on a real
tiny run through the command line."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from transformer_ln import ModelConfig, build_model
from transformer_ln.evaluation.generate import filter_logits, sample
from transformer_ln.evaluation.lm_eval import block_batches, evaluate_lm, lm_scores, score_batches

V = 60


def tiny_lm(preset: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = ModelConfig(preset=preset, d_model=32, n_heads=4, d_ff=64, n_dec_layers=2, tgt_vocab_size=V, dropout=0.0,
                      max_positions=64)
    return build_model(cfg).eval()


@pytest.fixture(params=["llama", "gpt2"], scope="module")
def lm(request):
    return tiny_lm(request.param)


PROMPT = [2, 17, 5, 33, 8]


@torch.no_grad()
def greedy_without_cache(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_with_the_cache_equals_recomputing_the_whole_prefix(lm):
    assert sample(lm, PROMPT, 30, greedy=True) == greedy_without_cache(lm, PROMPT, 30)
    assert sample(lm, PROMPT, 30, temperature=0) == greedy_without_cache(lm, PROMPT, 30)


def test_sampling_is_seeded_and_its_filters_reduce_to_greedy(lm):
    a = sample(lm, PROMPT, 24, temperature=1.5, seed=1)
    assert a == sample(lm, PROMPT, 24, temperature=1.5, seed=1) and len(a) == 24
    assert a != sample(lm, PROMPT, 24, temperature=1.5, seed=2)
    greedy = sample(lm, PROMPT, 20, greedy=True)
    assert sample(lm, PROMPT, 20, top_k=1, seed=3) == greedy
    assert sample(lm, PROMPT, 20, top_p=1e-6, seed=3) == greedy
    top5 = set(torch.topk(lm(torch.tensor([PROMPT]))[0, -1], 5).indices.tolist())
    assert all(sample(lm, PROMPT, 1, top_k=5, temperature=3.0, seed=s)[0] in top5 for s in range(10))
    # stops after eos, which ends the list
    eos = greedy[3]
    out = sample(lm, PROMPT, 20, greedy=True, eos_id=eos)
    assert out == greedy[:greedy.index(eos) + 1]
    with pytest.raises(ValueError, match="max_positions"):
        sample(lm, PROMPT, 64 - len(PROMPT) + 1)
    for bad in ({"temperature": -1.0}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            sample(lm, PROMPT, 3, **bad)


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = lambda p: torch.isfinite(filter_logits(logits, top_p=p)).nonzero().flatten().tolist()
    assert kept(0.5) == [0] and kept(0.6) == [0, 1] and kept(0.8) == [0, 1] and kept(0.81) == [0, 1, 2]
    assert kept(1.0) == [0, 1, 2, 3]
    assert torch.isfinite(filter_logits(logits, top_k=2)).sum() == 2


class FakeSplit:
    """``LMSplit``'s protocol over an in-memory stream."""

    def __init__(self, tokens, block_size, n_bytes, n_words):
        self.tokens, self.block_size = tokens, block_size
        self.n_tokens, self.n_bytes, self.n_words, self.n_docs = len(tokens), n_bytes, n_words, 3

    def __len__(self):
        return (self.n_tokens - 1) // self.block_size

    def batch(self, positions):
        x = torch.stack([self.tokens[p * self.block_size:(p + 1) * self.block_size + 1] for p in positions])
        return {"input": x[:, :-1], "target": x[:, 1:], "ntokens": x.numel() - len(positions)}


class FakeData:
    def __init__(self, split):
        self.splits, self.block_size = {"test": split}, split.block_size

    def batch(self, split, positions):
        return self.splits[split].batch(positions)


def test_perplexity_equals_exp_of_an_independent_mean_cross_entropy(lm):
    g = torch.Generator().manual_seed(0)
    T = 16
    stream = torch.randint(1, V, (7 * T + 5,), generator=g)  # 7 blocks and a dropped tail
    data = FakeData(FakeSplit(stream, T, n_bytes=1000, n_words=200))
    scores = evaluate_lm(lm, data, "test", max_tokens=3 * T)  # 3 batches: 3, 3, 1 blocks
    x = stream[:7 * T + 1]
    with torch.no_grad():
        ce = F.cross_entropy(lm(x[:-1].view(7, T)).reshape(-1, V), x[1:].reshape(7, T).reshape(-1))
    assert scores["tokens"] == 7 * T and scores["blocks"] == 7
    assert scores["ppl"] == pytest.approx(math.exp(ce.item()), rel=1e-5)
    assert scores["nll"] == pytest.approx(ce.item() * 7 * T, rel=1e-5)
    coverage = 7 * T / len(stream)
    assert scores["coverage"] == pytest.approx(coverage)
    assert scores["bits_per_byte"] == pytest.approx(ce.item() * 7 * T / math.log(2) / (1000 * coverage), rel=1e-5)
    assert scores["word_ppl"] == pytest.approx(math.exp(ce.item() * 7 * T / (200 * coverage)), rel=1e-5)
    limited = evaluate_lm(lm, data, "test", max_tokens=1000, limit=2)
    assert limited["tokens"] == 2 * T
    assert limited["nll"] == pytest.approx(score_batches(lm, [data.batch("test", [0, 1])])[0], rel=1e-6)
    assert lm_scores(math.log(5) * 10, 10, 0, 0)["ppl"] == pytest.approx(5.0)


def test_the_shards_of_blocks_are_disjoint_and_cover_every_block():
    batches = block_batches(23, 8, 40)  # 5 blocks a batch
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    shards = [np.concatenate(batches[r::3]) for r in range(3)]
    assert sorted(np.concatenate(shards).tolist()) == list(range(23))


# ------------------------------------------------------------------------------------------- a real tiny run


def test_evaluate_and_generate_a_tiny_decoder_only_run_from_the_command_line(tmp_path, capsys, monkeypatch):
    import io

    from safetensors.torch import save_model

    from transformer_ln.cli import main as cli
    from transformer_ln.config import RunConfig
    from transformer_ln.runs.rundir import RunDir
    from transformer_ln.train import main as train_main

    out = tmp_path / "lm"
    assert train_main(["--cpu", "model.arch=decoder_only", "model.residual=pre_ln", "model.d_model=32",
                       "model.n_heads=4", "model.d_ff=64", "model.n_dec_layers=2", "data.synthetic_size=300",
                       "data.vocab_size=300", "data.block_size=32", "model.max_positions=64", "train.max_updates=3",
                       "train.max_tokens=2048", "train.log_every=1", "train.valid_every=3", "train.max_minutes=2",
                       f"train.out_dir={out}"]) == 0
    # the trainer scored the test split with the best checkpoint at the end
    found = RunDir(out).find_eval("test")
    assert found is not None
    at_end = json.loads(found.read_text())
    assert at_end["task"] == "language_model" and math.isfinite(at_end["ppl"]) and at_end["ppl"] > 1
    assert 0 < at_end["coverage"] <= 1 and at_end["bits_per_byte"] > 0 and math.isfinite(at_end["word_ppl"])
    capsys.readouterr()

    assert cli(["evaluate", str(out), "--split", "test", "--cpu"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("test: perplexity ") and "bits/byte" in line
    again = json.loads(found.read_text())
    assert again["ppl"] == pytest.approx(at_end["ppl"], rel=1e-6)  # the same blocks, the same number
    assert again["update"] == 3 and len(again["weights_sha256"]) == 64  # which weights were scored
    assert cli(["evaluate", str(out), "--split", "valid", "--limit", "2", "--max-tokens", "32"]) == 0
    valid = json.loads(RunDir(out).eval_file("valid", "best", 2).read_text())
    assert valid["blocks"] == 2 and valid["tokens"] == 64 and math.isfinite(valid["ppl"])
    assert cli(["evaluate", str(out), "--beam", "4"]) == 2
    assert "decoder-only" in capsys.readouterr().err

    assert cli(["generate", str(out), "--prompt", "the old", "--max-new-tokens", "12", "--greedy", "--cpu"]) == 0
    res = capsys.readouterr()
    assert res.out.endswith("\n") and "tokens/s" in res.err
    first = res.out
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"the old\n")))
    assert cli(["generate", str(out), "--max-new-tokens", "12", "--greedy"]) == 0
    assert capsys.readouterr().out == first  # stdin's trailing newline is not part of the prompt
    assert cli(["generate", str(out), "--prompt", "a", "--max-new-tokens", "12", "--top-p", "0.9", "--seed", "4",
                "--temperature", "0.8", "--top-k", "20"]) == 0
    capsys.readouterr()
    assert cli(["generate", str(out), "--prompt", "word " * 80, "--max-new-tokens", "8", "--greedy"]) == 0
    assert "kept its last 56" in capsys.readouterr().err
    assert cli(["generate", str(out), "--prompt", "a", "--top-p", "0"]) == 2
    assert "--top-p" in capsys.readouterr().err
    assert cli(["generate", str(out), "--prompt", "a", "--max-new-tokens", "64"]) == 2
    assert "max_positions=64" in capsys.readouterr().err

    # a translation run: a clean error, exit 2
    tr = tmp_path / "mt" / "checkpoints" / "update_00000001"
    tr.mkdir(parents=True)
    cfg = RunConfig.from_dict({"model": {"d_model": 32, "n_heads": 4, "d_ff": 64, "n_enc_layers": 1,
                                         "n_dec_layers": 1, "src_vocab_size": 50, "tgt_vocab_size": 50}})
    cfg.save(tr / "config.yaml")
    save_model(build_model(cfg.model), str(tr / "model.safetensors"))
    assert cli(["generate", str(tmp_path / "mt"), "--prompt", "x"]) == 2
    assert "generate needs a decoder-only run" in capsys.readouterr().err
