"""Layer-normalized recurrent networks of Ba, Kiros and Hinton (2016, arXiv 1607.06450, Sec. 3.1 and appendix).

Layer normalization computes its statistics over the hidden units of one example at one time step, so unlike
BatchNorm it needs no batch, no running averages and no per-time-step statistics: an example's output does not
depend on its batch-mates, training and evaluation compute the same thing, and rescaling a whole weight matrix
leaves the output unchanged. The recurrent networks are where the paper made that case.

LN-LSTM (the input and recurrent contributions normalized separately; gate order i, f, g, o as ``nn.LSTM``)::

    (i, f, g, o)_t = LN(W_hh h_{t-1}; g1, b1) + LN(W_ih x_t; g2, b2) + b        b = b_ih + b_hh
    c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
    h_t = sigmoid(o) * tanh(LN(c_t; g3, b3))

LN-RNN (the paper's vanilla form: one LN over the summed inputs a_t, then the nonlinearity)::

    h_t = tanh(LN(W_hh h_{t-1} + W_ih x_t; g, b) + b_ih + b_hh)

Each LN normalizes over all of its vector's units (4H for the LSTM's gate pre-activations, H for c_t and the RNN's
a_t) and starts with gains 1 and biases 0. ``norm=None`` drops the LNs and nothing else: the same code is then
``nn.LSTM`` / ``nn.RNN``, and the parameter names are theirs, so ``load_state_dict`` of an ``nn.LSTM`` works.

Why the time loop looks as it does: ``W_ih x_t`` and its LN depend on the input only, so every time step's input
projection is one matrix product and one ``layer_norm`` before the loop; inside it remain one product with W_hh, one
LN of it, the gates, and the LN of c_t. On the CPU the step is bound by those matrix products; ``torch.jit.script``
of the loop, ``torch.compile`` of the step and summing the W_hh gradient over all steps in one product all measured
no faster (``benchmarks/RESULTS.md``), so the loop stays plain Python. ``nn.LSTM`` remains faster: its oneDNN kernel
fuses the whole recurrence, which admits no normalization.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

CELL_NORMS = ("layernorm", None)  # what a cell's norm= accepts: its LayerNorms, or None (the plain cell)
Tensor = torch.Tensor


def _ln(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    return x if weight is None else F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def _lstm_loop(xg: Tensor, h: Tensor, c: Tensor, w_hh: Tensor, g_hh: Optional[Tensor], b_hh: Optional[Tensor],
               g_c: Optional[Tensor], b_c: Optional[Tensor], mask: Optional[Tensor], eps: float):
    """Run one layer over time. ``xg`` (T, B, 4H) holds LN(W_ih x_t) + b for every step; ``mask`` (T, B, 1) is True
    where a sequence still runs (its state is frozen, its output zero, after its end)."""
    w_t = w_hh.t()
    outs = []
    for t, xg_t in enumerate(xg.unbind(0)):  # unbind: one backward op; xg[t] would zero-fill all of xg per step
        gates = torch.addmm(xg_t, h, w_t) if g_hh is None else xg_t + _ln(h @ w_t, g_hh, b_hh, eps)
        i, f, g, o = gates.chunk(4, 1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(_ln(c_new, g_c, b_c, eps))
        if mask is not None:
            m = mask[t]
            h, c = torch.where(m, h_new, h), torch.where(m, c_new, c)
            h_new = h_new * m
        else:
            h, c = h_new, c_new
        outs.append(h_new)
    return torch.stack(outs), h, c


def _rnn_loop(xa: Tensor, h: Tensor, w_hh: Tensor, g: Optional[Tensor], b: Optional[Tensor], bias: Optional[Tensor],
              relu: bool, mask: Optional[Tensor], eps: float):
    """Vanilla RNN over time: ``xa`` (T, B, H) holds W_ih x_t for every step (no bias: it goes after the LN)."""
    w_t = w_hh.t()
    outs = []
    for t, xa_t in enumerate(xa.unbind(0)):
        a = _ln(torch.addmm(xa_t, h, w_t), g, b, eps)
        if bias is not None:
            a = a + bias
        h_new = torch.relu(a) if relu else torch.tanh(a)
        if mask is not None:
            m = mask[t]
            h = torch.where(m, h_new, h)
            h_new = h_new * m
        else:
            h = h_new
        outs.append(h_new)
    return torch.stack(outs), h


def _shape(t) -> str:
    return "(" + ", ".join(str(s) for s in t) + ")"


class _NormRecurrent(nn.Module):
    """What ``LayerNormLSTM`` and ``LayerNormRNN`` share: arguments, parameters, the ``nn.LSTM`` input/output
    conventions (batch_first, unbatched input, packed sequences or ``lengths``), dropout between layers, checks."""

    gates: int = 1           # summed inputs per hidden unit: 4 for the LSTM, 1 for the RNN
    has_cell: bool = False

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, norm: Optional[str] = "layernorm",
                 eps: float = 1e-5):
        super().__init__()
        name = type(self).__name__
        for key, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: {key} must be an integer >= 1, got {value!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"{name}: dropout must be a number in [0, 1), got {dropout!r}")
        if norm not in CELL_NORMS:
            raise ValueError(f"{name}: norm must be one of {', '.join(map(repr, CELL_NORMS))}, got {norm!r}")
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
            raise ValueError(f"{name}: eps must be a finite number > 0, got {eps!r}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bool(bias), bool(batch_first), float(dropout)
        self.norm, self.eps = norm, float(eps)
        G = self.gates * hidden_size
        for k in range(num_layers):
            d_in = input_size if k == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{k}", nn.Parameter(torch.empty(G, d_in)))
            self.register_parameter(f"weight_hh_l{k}", nn.Parameter(torch.empty(G, hidden_size)))
            if self.bias:
                self.register_parameter(f"bias_ih_l{k}", nn.Parameter(torch.empty(G)))
                self.register_parameter(f"bias_hh_l{k}", nn.Parameter(torch.empty(G)))
            if norm is not None:
                for part, size in self._norm_parts():
                    self.register_parameter(f"norm_{part}_weight_l{k}", nn.Parameter(torch.empty(size)))
                    self.register_parameter(f"norm_{part}_bias_l{k}", nn.Parameter(torch.empty(size)))
        self.reset_parameters()

    def _norm_parts(self) -> list[tuple[str, int]]:
        raise NotImplementedError

    def reset_parameters(self) -> None:
        """Weights U(-1/sqrt(H), 1/sqrt(H)) as ``nn.LSTM``; with a norm, LN gains 1 and every bias 0 (the paper)."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for name, p in self.named_parameters():
            if name.startswith("norm_") and "_weight_" in name:
                nn.init.ones_(p)
            elif name.startswith("norm_") or (self.norm is not None and name.startswith("bias_")):
                nn.init.zeros_(p)
            else:
                nn.init.uniform_(p, -bound, bound)

    def flatten_parameters(self) -> None:
        """No-op, for code written against ``nn.LSTM`` (there is no cuDNN weight buffer to compact)."""

    def _param(self, name: str, k: int) -> Optional[Tensor]:
        return getattr(self, f"{name}_l{k}", None)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, norm={self.norm!r}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        return s

    # ---- input handling shared by both cells ----

    def _error(self, msg: str) -> ValueError:
        return ValueError(f"{type(self).__name__}: {msg}")

    def _prepare(self, input, lengths):
        """-> x (T, B, F), lengths or None, batched, packed input or None."""
        if isinstance(input, PackedSequence):
            if lengths is not None:
                raise self._error("give either a PackedSequence or lengths, not both")
            x, lengths = pad_packed_sequence(input, batch_first=False)
            self._check_features(x)
            return x, lengths, True, input
        if not isinstance(input, Tensor):
            raise self._error(f"input must be a tensor or a PackedSequence, got {type(input).__name__}")
        layout = "(batch, seq, feature)" if self.batch_first else "(seq, batch, feature)"
        if input.dim() not in (2, 3):
            raise self._error(f"input must be 3-D {layout} or 2-D (seq, feature) unbatched, "
                              f"got shape {_shape(input.shape)}")
        self._check_features(input)
        batched = input.dim() == 3
        x = input if not batched else (input.transpose(0, 1) if self.batch_first else input)
        if not batched:
            x = x.unsqueeze(1)
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise self._error(f"input has no time steps or no sequences: shape {_shape(input.shape)}")
        if lengths is not None:
            lengths = self._check_lengths(lengths, x.shape[0], x.shape[1], batched)
        return x, lengths, batched, None

    def _check_features(self, x: Tensor) -> None:
        if x.shape[-1] != self.input_size:
            raise self._error(f"input has {x.shape[-1]} features (last dimension of shape {_shape(x.shape)}), "
                              f"expected input_size={self.input_size}")
        w = self.weight_ih_l0
        if not x.is_floating_point() or x.dtype != w.dtype:
            raise self._error(f"input dtype {x.dtype} does not match the parameters' {w.dtype}; convert one of them")
        if x.device != w.device:
            raise self._error(f"input is on {x.device}, the parameters on {w.device}")

    def _check_lengths(self, lengths, T: int, B: int, batched: bool) -> Tensor:
        if not batched:
            raise self._error("lengths needs batched input (an unbatched input is one whole sequence)")
        try:
            lengths = torch.as_tensor(lengths)
        except (TypeError, ValueError, RuntimeError):
            raise self._error(f"lengths must be a sequence of integers, got {type(lengths).__name__}") from None
        if lengths.dim() != 1 or lengths.numel() != B or lengths.is_floating_point() or lengths.is_complex():
            raise self._error(f"lengths must be {B} integers (one per sequence), got shape {_shape(lengths.shape)} "
                              f"of {lengths.dtype}")
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 1 or hi > T:
            raise self._error(f"lengths must lie in [1, {T}] (the padded length), got min {lo}, max {hi}")
        return lengths

    def _initial_state(self, hx, x: Tensor, batched: bool) -> list[Tensor]:
        """-> [h0] or [h0, c0], each (num_layers, B, H), zeros when ``hx`` is None."""
        B, H, L = x.shape[1], self.hidden_size, self.num_layers
        n = 2 if self.has_cell else 1
        if hx is None:
            z = x.new_zeros(L, B, H)
            return [z] * n
        names = ("h0", "c0")[:n]
        parts = list(hx) if self.has_cell and isinstance(hx, (tuple, list)) else [hx]
        if len(parts) != n or not all(isinstance(p, Tensor) for p in parts):
            want = "a tuple (h0, c0) of tensors" if self.has_cell else "a tensor h0"
            raise self._error(f"the initial state must be {want}")
        want = (L, B, H) if batched else (L, H)
        for name, p in zip(names, parts):
            if tuple(p.shape) != want:
                got = ", ".join(f"{nm} {_shape(q.shape)}" for nm, q in zip(names, parts))
                raise self._error(f"initial state shapes {got}; each must be (num_layers, batch, hidden_size) = "
                                  f"{_shape(want)}")
            if p.dtype != x.dtype or p.device != x.device:
                raise self._error(f"{name} is {p.dtype} on {p.device}, the input {x.dtype} on {x.device}")
        return parts if batched else [p.unsqueeze(1) for p in parts]

    def forward(self, input: Union[Tensor, PackedSequence], hx=None,
                lengths: Optional[Union[Tensor, Sequence[int]]] = None):
        """Like ``nn.LSTM`` / ``nn.RNN``: ``out, h_n`` (RNN) or ``out, (h_n, c_n)`` (LSTM).

        ``lengths`` (one per sequence, for a padded batch) or a ``PackedSequence`` input: every sequence stops at
        its own length; its outputs beyond it are 0 and ``h_n`` is its state at its last step, as if run alone.
        """
        x, lengths, batched, packed = self._prepare(input, lengths)
        state = self._initial_state(hx, x, batched)
        T = x.shape[0]
        mask = None
        if lengths is not None and int(lengths.min()) < T:
            mask = (torch.arange(T).unsqueeze(1) < lengths.cpu().unsqueeze(0)).unsqueeze(-1).to(x.device)
        finals = []
        layer_in = x
        for k in range(self.num_layers):
            if k > 0 and self.dropout > 0.0 and self.training:
                layer_in = F.dropout(layer_in, self.dropout, True)
            layer_in, *last = self._layer(k, layer_in, [s[k] for s in state], mask)
            finals.append(last)
        h_n = [torch.stack([f[i] for f in finals]) for i in range(len(state))]
        out = layer_in
        if packed is not None:
            idx = packed.sorted_indices
            out_sorted = out if idx is None else out.index_select(1, idx)
            sorted_lengths = lengths if idx is None else lengths[idx.cpu()]
            data = pack_padded_sequence(out_sorted, sorted_lengths, enforce_sorted=True).data
            out = PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
        elif not batched:
            out = out.squeeze(1)
            h_n = [h.squeeze(1) for h in h_n]
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, (tuple(h_n) if self.has_cell else h_n[0])

    def _layer(self, k: int, x: Tensor, state: list[Tensor], mask: Optional[Tensor]):
        raise NotImplementedError


class LayerNormLSTM(_NormRecurrent):
    """Drop-in ``nn.LSTM`` (unidirectional, no projection) with Ba et al.'s layer normalization; ``norm=None`` is
    the plain LSTM.

    Parameters per layer k: ``weight_ih_lk`` (4H, in), ``weight_hh_lk`` (4H, H), ``bias_ih_lk``, ``bias_hh_lk``
    (4H; their sum is the paper's b), and with a norm ``norm_ih_*`` / ``norm_hh_*`` (4H: g2, b2 / g1, b1) and
    ``norm_c_*`` (H: g3, b3), each a ``_weight_lk`` gain and a ``_bias_lk`` bias.
    """

    gates, has_cell = 4, True

    def _norm_parts(self):
        return [("ih", 4 * self.hidden_size), ("hh", 4 * self.hidden_size), ("c", self.hidden_size)]

    def _layer(self, k, x, state, mask):
        p = lambda name: self._param(name, k)  # noqa: E731
        T, B, _ = x.shape
        xg = (x.reshape(T * B, -1) @ p("weight_ih").t()).view(T, B, -1)  # every step's input projection at once
        xg = _ln(xg, p("norm_ih_weight"), p("norm_ih_bias"), self.eps)
        if self.bias:
            xg = xg + (p("bias_ih") + p("bias_hh"))
        return _lstm_loop(xg, state[0], state[1], p("weight_hh"), p("norm_hh_weight"), p("norm_hh_bias"),
                          p("norm_c_weight"), p("norm_c_bias"), mask, self.eps)


class LayerNormRNN(_NormRecurrent):
    """Drop-in ``nn.RNN`` with the paper's layer-normalized vanilla RNN; ``norm=None`` is the plain RNN.

    h_t = f(LN(W_hh h_{t-1} + W_ih x_t) + b_ih + b_hh), f = tanh (default) or relu; parameters as ``nn.RNN`` plus
    ``norm_a_weight_lk`` / ``norm_a_bias_lk`` (H: the paper's g and b).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: str = "tanh",
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 norm: Optional[str] = "layernorm", eps: float = 1e-5):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"LayerNormRNN: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, norm, eps)

    def _norm_parts(self):
        return [("a", self.hidden_size)]

    def extra_repr(self) -> str:
        return super().extra_repr() + (", nonlinearity='relu'" if self.nonlinearity == "relu" else "")

    def _layer(self, k, x, state, mask):
        p = lambda name: self._param(name, k)  # noqa: E731
        T, B, _ = x.shape
        xa = (x.reshape(T * B, -1) @ p("weight_ih").t()).view(T, B, -1)
        bias = p("bias_ih") + p("bias_hh") if self.bias else None
        if self.norm is None and bias is not None:  # no LN in between: fold b into the precomputed projection
            xa, bias = xa + bias, None
        return _rnn_loop(xa, state[0], p("weight_hh"), p("norm_a_weight"), p("norm_a_bias"), bias,
                         self.nonlinearity == "relu", mask, self.eps)
