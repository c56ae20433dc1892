"""Greedy and beam search: the cache changes nothing, greedy is beam 1, lengths hold, batching changes nothing."""
import pytest
import torch

from conftest import tiny_model
from transformer_ln.evaluation.search import beam_search, greedy_search, max_lengths

BOS, EOS = 1, 2


def _model(scheme: str, seed: int = 0):
    """A random tiny model in float64 (near-ties cannot flip between the cached and uncached computations).

    EOS's embedding row, which is also its output row, is scaled up so that hypotheses end at varied lengths and
    the finishing, length-penalty and early-stopping paths run, not only the maximum-length one.
    """
    model = tiny_model(scheme, seed=seed, max_positions=64).double()
    with torch.no_grad():
        model.decoder.embed.embed_tokens.weight[EOS] *= 3.5
    return model


def _src(lengths: list[int], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    src = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        src[i, :n - 1] = torch.randint(3, 50, (n - 1,), generator=g)
        src[i, n - 1] = EOS
    return src


def test_cached_beam_equals_uncached_beam(any_scheme):
    model = _model(any_scheme, seed=2)
    src = _src([7, 4, 9, 5, 6, 8], seed=2)
    for beam, lenpen in ((4, 1.0), (3, 0.6)):
        cached = beam_search(model, src, beam=beam, lenpen=lenpen, max_len_a=0.5, max_len_b=4)
        uncached = beam_search(model, src, beam=beam, lenpen=lenpen, max_len_a=0.5, max_len_b=4, use_cache=False)
        assert cached == uncached
    kw = dict(max_len_a=0.5, max_len_b=4)
    assert greedy_search(model, src, **kw) == greedy_search(model, src, use_cache=False, **kw)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_equals_beam_one(seed):
    model = _model("post_ln", seed)
    src = _src([6, 3, 8, 5, 2], seed)
    assert greedy_search(model, src, max_len_a=1.0, max_len_b=3) == beam_search(
        model, src, beam=1, max_len_a=1.0, max_len_b=3)


def test_output_respects_length_limits_and_bans():
    model = _model("pre_ln")
    src = _src([3, 10, 6])
    limits = max_lengths(model, src, 1.2, 2)
    assert limits == [int(1.2 * 3 + 2), int(1.2 * 10 + 2), int(1.2 * 6 + 2)]
    for out in (beam_search(model, src, beam=3, max_len_a=1.2, max_len_b=2),
                greedy_search(model, src, max_len_a=1.2, max_len_b=2)):
        for hyp, limit in zip(out, limits):
            assert 1 <= len(hyp) <= limit
            assert not {0, BOS, EOS} & set(hyp)
    # with no room left the model must stop after exactly one token (min length 1, max length 1)
    assert all(len(h) == 1 for h in beam_search(model, src, beam=2, max_len_a=0.0, max_len_b=1))


def test_batch_independence(any_scheme):
    """A sentence alone translates as it does next to a longer one (padding, lengths and early finishing)."""
    model = _model(any_scheme, seed=2)
    batch = _src([5, 11, 3], seed=4)
    together = beam_search(model, batch, beam=3, max_len_a=1.0, max_len_b=3)
    for i in range(3):
        n = int(batch[i].ne(0).sum())
        alone = beam_search(model, batch[i:i + 1, :n], beam=3, max_len_a=1.0, max_len_b=3)
        assert alone == together[i:i + 1]
    greedy = greedy_search(model, batch, max_len_a=1.0, max_len_b=3)
    assert greedy[0:1] == greedy_search(model, batch[0:1, :5], max_len_a=1.0, max_len_b=3)


def test_search_restores_training_mode_and_uses_no_grad():
    model = _model("admin")
    seen = []  # (grad mode, module in train mode) at every forward call inside the search
    for stack in (model.encoder, model.decoder):
        stack.register_forward_hook(lambda m, args, out: seen.append((torch.is_grad_enabled(), m.training)))
    model.train()
    beam_search(model, _src([4]), beam=2)
    assert model.training
    model.eval()
    greedy_search(model, _src([4]))
    assert not model.training
    assert seen and all(grad is False and training is False for grad, training in seen), seen


def _reference_beam(model, src_row: torch.Tensor, K: int, lenpen: float, max_len: int) -> list[int]:
    """fairseq's rules for one sentence, written plainly: no batch, no cache, Python lists."""
    memory = model.encode(src_row[None])
    live, finished = [([], 0.0)], []
    for step in range(max_len + 1):
        cands = []
        for b, (toks, score) in enumerate(live):
            tgt = torch.tensor([[BOS] + toks])
            lp = torch.log_softmax(model.decode(tgt, memory, src_row[None])[0, -1], -1).tolist()
            for v, p in enumerate(lp):
                allowed = v == EOS if step == max_len else (v not in (0, BOS) and (v != EOS or step > 0))
                if allowed:
                    cands.append((score + p, b, v))
        top = sorted(cands, key=lambda c: -c[0])[:2 * K]
        for score, b, v in top[:K]:
            if v == EOS and len(finished) < K:
                finished.append((score / (step + 1) ** lenpen, live[b][0]))
        if len(finished) >= K or step >= max_len:
            break
        live = [(live[b][0] + [v], score) for score, b, v in top if v != EOS][:K]
    return max(finished, key=lambda h: h[0])[1]


@torch.no_grad()
def test_beam_matches_a_plain_reference():
    model = _model("post_ln", seed=2).eval()
    src = _src([7, 4, 9, 5], seed=2)
    for beam, lenpen in ((3, 1.0), (2, 0.5)):
        out = beam_search(model, src, beam=beam, lenpen=lenpen, max_len_a=0.5, max_len_b=3)
        for i, limit in enumerate(max_lengths(model, src, 0.5, 3)):
            n = int(src[i].ne(0).sum())
            assert out[i] == _reference_beam(model, src[i, :n], beam, lenpen, limit)


def test_static_cache_path_equals_dynamic_cache(any_scheme):
    """The fixed-shape path that CUDA graphs replay (run here without a graph) gives the same hypotheses."""
    model = _model(any_scheme, seed=2)
    src = _src([7, 4, 9, 5, 6, 8], seed=2)
    kw = dict(beam=3, lenpen=0.8, max_len_a=0.5, max_len_b=4)
    assert beam_search(model, src, cuda_graph=True, **kw) == beam_search(model, src, cuda_graph=False, **kw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_beam_equals_eager_beam():
    model = _model("post_ln", seed=2).cuda()
    src = _src([7, 4, 9, 5, 6, 8], seed=2).cuda()
    kw = dict(beam=3, max_len_a=0.5, max_len_b=4)
    assert beam_search(model, src, cuda_graph=True, **kw) == beam_search(model, src, cuda_graph=False, **kw)
