"""LayerNormLSTM / LayerNormRNN: Ba et al.'s equations by hand in float64, nn.LSTM / nn.RNN with copied weights, and
the properties the paper proves (batch independence, train == eval, invariance to rescaling a weight matrix)."""
import math

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence, pad_packed_sequence

from transformer_ln import LayerNormLSTM, LayerNormRNN


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial gains and biases everywhere, so a misplaced gain or bias cannot cancel out."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("norm_") and "_weight_" in name:
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            elif "bias" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) / math.sqrt(p.shape[1]))
    return model


def _ln(v, g, b, eps=1e-5):
    mu = v.mean(-1, keepdim=True)
    var = ((v - mu) ** 2).mean(-1, keepdim=True)
    return g * (v - mu) / torch.sqrt(var + eps) + b


def _hand_lstm(m: LayerNormLSTM, x, h0, c0):
    """The paper's equations step by step, one layer after the other (x: (T, B, in))."""
    P = dict(m.named_parameters())
    inp, hs, cs = x, [], []
    for k in range(m.num_layers):
        h, c = h0[k], c0[k]
        b = P[f"bias_ih_l{k}"] + P[f"bias_hh_l{k}"]
        outs = []
        for t in range(x.shape[0]):
            pre = (_ln(h @ P[f"weight_hh_l{k}"].T, P[f"norm_hh_weight_l{k}"], P[f"norm_hh_bias_l{k}"])
                   + _ln(inp[t] @ P[f"weight_ih_l{k}"].T, P[f"norm_ih_weight_l{k}"], P[f"norm_ih_bias_l{k}"]) + b)
            H = m.hidden_size
            i, f, g, o = pre[:, :H], pre[:, H:2 * H], pre[:, 2 * H:3 * H], pre[:, 3 * H:]
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(_ln(c, P[f"norm_c_weight_l{k}"], P[f"norm_c_bias_l{k}"]))
            outs.append(h)
        inp = torch.stack(outs)
        hs.append(h)
        cs.append(c)
    return inp, torch.stack(hs), torch.stack(cs)


def test_lstm_equals_float64_hand_computation_over_3_steps():
    m = _randomize(LayerNormLSTM(5, 4, num_layers=2).double())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 5, generator=g, dtype=torch.float64)
    h0 = torch.randn(2, 2, 4, generator=g, dtype=torch.float64)
    c0 = torch.randn(2, 2, 4, generator=g, dtype=torch.float64)
    out, (h_n, c_n) = m(x, (h0, c0))
    ref_out, ref_h, ref_c = _hand_lstm(m, x, h0, c0)
    for got, want in ((out, ref_out), (h_n, ref_h), (c_n, ref_c)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_rnn_equals_float64_hand_computation_over_3_steps():
    m = _randomize(LayerNormRNN(3, 6).double(), seed=2)
    x = torch.randn(3, 2, 3, dtype=torch.float64)
    h = torch.randn(2, 6, dtype=torch.float64)
    P = dict(m.named_parameters())
    outs = []
    out, h_n = m(x, h.unsqueeze(0))
    for t in range(3):
        a = x[t] @ P["weight_ih_l0"].T + h @ P["weight_hh_l0"].T
        h = torch.tanh(_ln(a, P["norm_a_weight_l0"], P["norm_a_bias_l0"]) + P["bias_ih_l0"] + P["bias_hh_l0"])
        outs.append(h)
    torch.testing.assert_close(out, torch.stack(outs), rtol=0, atol=1e-12)
    torch.testing.assert_close(h_n[0], h, rtol=0, atol=1e-12)


def test_init_gains_one_biases_zero():
    m = LayerNormLSTM(3, 5)
    for name, p in m.named_parameters():
        if name.startswith("norm_") and "_weight_" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        elif "bias" in name:
            assert torch.equal(p, torch.zeros_like(p)), name


@pytest.mark.parametrize("num_layers, batch_first", [(1, False), (2, True)])
def test_norm_none_equals_nn_lstm_with_copied_weights(num_layers, batch_first):
    torch.manual_seed(0)
    ref = nn.LSTM(6, 8, num_layers, batch_first=batch_first)
    m = LayerNormLSTM(6, 8, num_layers, batch_first=batch_first, norm=None)
    m.load_state_dict(ref.state_dict())  # same parameter names: strict load
    x = torch.randn(*((4, 7) if batch_first else (7, 4)), 6, requires_grad=True)  # batch 4, 7 steps
    h0, c0 = torch.randn(num_layers, 4, 8), torch.randn(num_layers, 4, 8)
    x2 = x.detach().clone().requires_grad_()
    out_ref, (h_ref, c_ref) = ref(x, (h0, c0))
    out, (h, c) = m(x2, (h0, c0))
    for got, want in ((out, out_ref), (h, h_ref), (c, c_ref)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    (out_ref.square().sum() + c_ref.sum()).backward()
    (out.square().sum() + c.sum()).backward()
    torch.testing.assert_close(x2.grad, x.grad, rtol=0, atol=1e-5)
    for (name, p), q in zip(ref.named_parameters(), m.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_norm_none_equals_nn_rnn_with_copied_weights(nonlinearity):
    torch.manual_seed(0)
    ref = nn.RNN(5, 7, 2, nonlinearity=nonlinearity)
    m = LayerNormRNN(5, 7, 2, nonlinearity=nonlinearity, norm=None)
    m.load_state_dict(ref.state_dict())
    x = torch.randn(6, 3, 5)
    out_ref, h_ref = ref(x)
    out, h = m(x)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("cls", [LayerNormLSTM, LayerNormRNN])
def test_sample_does_not_depend_on_batch_mates_and_train_equals_eval(cls):
    torch.manual_seed(0)
    m = _randomize(cls(5, 6, num_layers=2))
    x = torch.randn(7, 4, 5)
    out = m(x)[0]
    other = torch.cat([x[:, :1], 10 * torch.randn(7, 3, 5)], 1)  # same first sample, wildly different mates
    torch.testing.assert_close(m(other)[0][:, 0], out[:, 0], rtol=0, atol=1e-6)
    torch.testing.assert_close(m(x[:, :1])[0][:, 0], out[:, 0], rtol=0, atol=1e-6)
    m.eval()
    assert torch.equal(m(x)[0], out)


def _scale(model, name, factor):
    with torch.no_grad():
        getattr(model, name).mul_(factor)


@pytest.mark.parametrize("name", ["weight_ih_l0", "weight_hh_l0", "weight_ih_l1", "weight_hh_l1"])
def test_rescaling_a_weight_matrix_leaves_ln_lstm_unchanged_but_not_plain_lstm(name):
    torch.manual_seed(0)
    x = torch.randn(6, 3, 5)
    outs = {}
    for norm in ("layernorm", None):
        m = _randomize(LayerNormLSTM(5, 8, num_layers=2, norm=norm))
        before = m(x)[0]
        _scale(m, name, 3.0)
        outs[norm] = (m(x)[0] - before).abs().max().item()
    assert outs["layernorm"] < 1e-4, outs
    assert outs[None] > 1e-2, outs


def test_recentering_a_weight_matrix_leaves_ln_lstm_unchanged():
    """W -> W + 1 v^T adds the same v.x to every summed input; LN subtracts it with the mean."""
    torch.manual_seed(0)
    m = _randomize(LayerNormLSTM(5, 8))
    x = torch.randn(6, 3, 5)
    before = m(x)[0]
    with torch.no_grad():
        m.weight_ih_l0.add_(torch.randn(1, 5))
        m.weight_hh_l0.add_(torch.randn(1, 8))
    assert (m(x)[0] - before).abs().max().item() < 1e-4


def _sequences():
    torch.manual_seed(3)
    return [torch.randn(n, 4) for n in (5, 2, 4, 1)]


@pytest.mark.parametrize("cls", [LayerNormLSTM, LayerNormRNN])
@pytest.mark.parametrize("norm", ["layernorm", None])
def test_padded_batch_equals_each_sequence_alone(cls, norm):
    torch.manual_seed(0)
    m = _randomize(cls(4, 6, num_layers=2, batch_first=True, norm=norm))
    seqs = _sequences()
    lengths = [len(s) for s in seqs]
    padded = nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=7.0)  # pad values must not leak
    out, state = m(padded, lengths=lengths)
    packed_out, packed_state = m(pack_sequence(seqs, enforce_sorted=False))
    packed_out, packed_lengths = pad_packed_sequence(packed_out, batch_first=True)
    assert packed_lengths.tolist() == lengths
    states = state if isinstance(state, tuple) else (state,)
    packed_states = packed_state if isinstance(packed_state, tuple) else (packed_state,)
    for b, s in enumerate(seqs):
        alone, alone_state = m(s.unsqueeze(0))
        alone_states = alone_state if isinstance(alone_state, tuple) else (alone_state,)
        n = len(s)
        torch.testing.assert_close(out[b, :n], alone[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(packed_out[b, :n], alone[0], rtol=0, atol=1e-6)
        assert torch.equal(out[b, n:], torch.zeros_like(out[b, n:]))
        for st, pst, ast in zip(states, packed_states, alone_states):
            torch.testing.assert_close(st[:, b], ast[:, 0], rtol=0, atol=1e-6)
            torch.testing.assert_close(pst[:, b], ast[:, 0], rtol=0, atol=1e-6)


def test_packed_input_matches_nn_lstm():
    torch.manual_seed(0)
    ref = nn.LSTM(4, 5, 2)
    m = LayerNormLSTM(4, 5, 2, norm=None)
    m.load_state_dict(ref.state_dict())
    packed = pack_sequence(_sequences(), enforce_sorted=False)
    out_ref, (h_ref, c_ref) = ref(packed)
    out, (h, c) = m(packed)
    assert torch.equal(out.batch_sizes, out_ref.batch_sizes)
    assert torch.equal(out.sorted_indices, out_ref.sorted_indices)
    torch.testing.assert_close(out.data, out_ref.data, rtol=0, atol=1e-6)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(c, c_ref, rtol=0, atol=1e-6)


def test_unbatched_input_like_nn_lstm():
    torch.manual_seed(0)
    ref = nn.LSTM(3, 4)
    m = LayerNormLSTM(3, 4, norm=None)
    m.load_state_dict(ref.state_dict())
    x, h0, c0 = torch.randn(5, 3), torch.randn(1, 4), torch.randn(1, 4)
    out_ref, (h_ref, c_ref) = ref(x, (h0, c0))
    out, (h, c) = m(x, (h0, c0))
    assert out.shape == out_ref.shape and h.shape == h_ref.shape
    torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(c, c_ref, rtol=0, atol=1e-6)


def _one_line_error(fn, *words):
    with pytest.raises((ValueError, TypeError)) as exc:
        fn()
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


def test_bad_input_gets_one_clear_line():
    m = LayerNormLSTM(4, 6, num_layers=2)
    _one_line_error(lambda: m(torch.randn(2, 3, 4, 1)), "3-D", "(2, 3, 4, 1)")
    _one_line_error(lambda: m(torch.randn(5, 2, 3)), "3 features", "input_size=4")
    _one_line_error(lambda: LayerNormLSTM(4, 0), "hidden_size", "0")
    _one_line_error(lambda: LayerNormRNN(4, -2), "hidden_size", "-2")
    _one_line_error(lambda: LayerNormLSTM(4, 6, norm="batchnorm"), "norm", "batchnorm")
    x = torch.randn(5, 3, 4)
    _one_line_error(lambda: m(x, (torch.zeros(2, 3, 6), torch.zeros(2, 3, 5))), "c0 (2, 3, 5)", "(2, 3, 6)")
    _one_line_error(lambda: m(x, (torch.zeros(1, 3, 6), torch.zeros(1, 3, 6))), "h0 (1, 3, 6)", "(2, 3, 6)")
    _one_line_error(lambda: m(x, torch.zeros(2, 3, 6)), "(h0, c0)")
    _one_line_error(lambda: m(x, lengths=[5, 6, 1]), "lengths", "[1, 5]", "max 6")
    _one_line_error(lambda: m(x, lengths=[5, 2]), "3 integers")
    _one_line_error(lambda: m(x.double()), "float64", "float32")
    _one_line_error(lambda: LayerNormRNN(4, 6)(x, torch.zeros(1, 3, 5)), "h0 (1, 3, 5)", "(1, 3, 6)")


def test_benchmark_script_runs_and_agrees_with_itself(tmp_path):
    import json
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import rnn as bench

    out = tmp_path / "rnn.json"
    assert bench.main(["--seq", "3", "--batch", "2", "--input", "4", "--hidden", "5", "--steps", "2",
                       "--warmup", "0", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"nn.LSTM", "ours, norm=None", "ours, LN-LSTM", "textbook LN-LSTM"}
    for r in results.values():
        for mode in ("train", "forward"):
            assert len(r[mode]["ms_all"]) == 2
            assert r[mode]["nn_lstm_over_this"] == pytest.approx(results["nn.LSTM"][mode]["ms"] / r[mode]["ms"])
