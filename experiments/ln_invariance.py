"""Weight-rescaling invariance (Ba et al. 2016, Table 1) measured: which single weight matrix can be multiplied by 3
without changing a model's output. Seconds on a CPU; writes ``rescaling.md`` and ``rescaling.csv`` under ``--out``.

    python experiments/ln_invariance.py                 # -> experiments/results/seeds_ln/rescaling.{md,csv}
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transformer_ln import LayerNormLSTM, LayerNormRNN, ModelConfig, Seq2SeqTransformer  # noqa: E402
from transformer_ln.recurrent import study as ln_study  # noqa: E402
from transformer_ln.atomic import write_text  # noqa: E402

FACTOR = 3.0


def recurrent_rows(seed: int) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(20, 8, 32, generator=g, dtype=torch.float64)
    single = ["weight_ih_l0", "weight_hh_l0", "weight_ih_l1", "weight_hh_l1"]
    both = [("weight_ih_l0", "weight_hh_l0")]
    cases = [(LayerNormLSTM, "LN-LSTM", "layernorm", 1e-5, single), (LayerNormLSTM, "LN-LSTM, eps 1e-12", "layernorm",
             1e-12, single), (LayerNormLSTM, "LSTM", None, 1e-5, single),
             (LayerNormRNN, "LN vanilla RNN", "layernorm", 1e-5, single + both),
             (LayerNormRNN, "LN vanilla RNN, eps 1e-12", "layernorm", 1e-12, both),
             (LayerNormRNN, "vanilla RNN", None, 1e-5, single + both)]
    for cls, label, norm, eps, names in cases:
        torch.manual_seed(seed)
        m = cls(32, 64, num_layers=2, norm=norm, eps=eps).double()  # default initialisation
        for name, change in ln_study.rescaling_change(m, lambda mod: mod(x)[0], names, FACTOR).items():
            rows.append({"model": label, "matrix": name if isinstance(name, str) else " and ".join(name),
                         "relative_change": change})
    return rows


def transformer_rows(seed: int) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, 100, (8, 12), generator=g)
    tgt = torch.randint(4, 100, (8, 10), generator=g)
    names = ["encoder.embed.embed_tokens.weight", "encoder.layers.1.self_attn.branch.qkv_proj.weight",
             "encoder.layers.1.self_attn.branch.out_proj.weight", "encoder.layers.1.ffn.branch.fc1.weight",
             "encoder.layers.1.ffn.branch.fc2.weight", "decoder.layers.1.cross_attn.branch.q_proj.weight",
             "decoder.layers.1.cross_attn.branch.kv_proj.weight"]
    for residual in ("post_ln", "pre_ln"):
        torch.manual_seed(seed)
        cfg = ModelConfig(src_vocab_size=100, tgt_vocab_size=100, d_model=64, n_heads=4, d_ff=128, n_enc_layers=3,
                          n_dec_layers=3, dropout=0.0, residual=residual)
        m = Seq2SeqTransformer(cfg).double()
        label = {"post_ln": "Transformer Post-LN", "pre_ln": "Transformer Pre-LN"}[residual]
        for name, change in ln_study.rescaling_change(m, lambda mod: mod(src, tgt), names, FACTOR).items():
            rows.append({"model": label, "matrix": name, "relative_change": change})
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"| model | weight matrix x{FACTOR:g} | max abs change / max abs output |", "|---|---|---:|"]
    lines += [f"| {r['model']} | {' and '.join(f'`{m}`' for m in r['matrix'].split(' and '))} | "
              f"{r['relative_change']:.1e} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("experiments/results/seeds_ln"))
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = recurrent_rows(args.seed) + transformer_rows(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(rows)
    write_text(args.out / "rescaling.md", text)
    ln_study.write_csv(rows, args.out / "rescaling.csv")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
