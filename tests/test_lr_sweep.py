"""The learning-rate-sensitivity sweep: Wortsman et al.'s LRS equals a hand computation on a fixture of runs (a
diverged one and one that ended above l0 both counted as l0), the sweep skips a finished run and trains the other,
the traces and depth profiles come from a real run's checkpoints, and the tables and figures are drawn."""
import json
import math
from pathlib import Path

import pytest

from transformer_ln.errors import UserError
from transformer_ln.runs.summary import Summary
from transformer_ln.training.lr_study import analyse, best_runs, claims_markdown
from transformer_ln.training.lr_sweep import (check_points, collect_lr, lr_points, lr_sensitivity, parse_scheme,
                                              run_lr_sweep, sensitivity_table)


def fake_run(run_dir: Path, status: str, l0: float, final: float | None) -> None:
    """A finished run as the trainer leaves it: summary.json and metrics.jsonl (first update, last validation)."""
    run_dir.mkdir(parents=True)
    Summary(status, updates=10, diverged_at=7 if status == "diverged" else None).save(run_dir / "summary.json")
    recs = [{"kind": "train", "update": 1, "loss": l0}, {"kind": "train", "update": 10, "loss": 1.0}]
    if final is not None:
        recs.append({"kind": "valid", "update": 10, "loss": final})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_lrs_equals_the_hand_computation_on_a_fixture_of_final_losses(tmp_path):
    points = lr_points(["pre_ln", "pre_ln+qk_norm"], [2], [1e-3, 1e-2, 1e-1, 1.0], [1], 5)
    # pre_ln: 6.0, 4.5, diverged (no valid loss), 11.0 (above l0 = 9) -> capped 6, 4.5, 9, 9
    # pre_ln+qk_norm: 7.0, 5.0, 5.5, 8.0 (nothing capped)
    finals = {"pre_ln": [6.0, 4.5, None, 11.0], "pre_ln+qk_norm": [7.0, 5.0, 5.5, 8.0]}
    for p in points:
        final = finals[p.scheme][[1e-3, 1e-2, 1e-1, 1.0].index(p.lr)]
        fake_run(tmp_path / p.name, "diverged" if final is None else "completed", 9.0, final)
    rows, sens = collect_lr(points, tmp_path)
    by = {s["scheme"]: s for s in sens}
    assert by["pre_ln"]["lrs"] == pytest.approx((6 + 4.5 + 9 + 9) / 4 - 4.5)  # 2.625
    assert by["pre_ln+qk_norm"]["lrs"] == pytest.approx((7 + 5 + 5.5 + 8) / 4 - 5.0)  # 1.375
    assert by["pre_ln"]["diverged"] == 1 and by["pre_ln"]["best_lr"] == 1e-2 and by["pre_ln"]["best_loss"] == 4.5
    assert [r["capped_loss"] for r in rows if r["scheme"] == "pre_ln"] == [6.0, 4.5, 9.0, 9.0]
    assert "2.625" in (tmp_path / "lrs.md").read_text() and (tmp_path / "lr_results.csv").read_text().count("\n") == 9
    assert math.isnan(lr_sensitivity([None, 12.0, math.inf], 9.0))  # nothing learned: undefined, not 0
    incomplete = sensitivity_table(rows, {("pre_ln", 2, 1): 5, ("pre_ln+qk_norm", 2, 1): 4})  # a run missing
    assert [math.isnan(s["lrs"]) for s in incomplete] == [True, False]
    assert lr_sensitivity([3.0, 3.0], 9.0) == 0.0
    assert best_runs(rows)[("pre_ln", 2, 1)] == points[1].name


def test_scheme_options_become_overrides_and_bad_ones_are_one_line():
    assert parse_scheme("pre_ln+qk_norm+z_loss") == ("pre_ln", ("model.qk_norm=true", "optim.z_loss=1e-4"))
    assert parse_scheme("sandwich+z_loss=1e-5")[1] == ("optim.z_loss=1e-5",)
    assert parse_scheme("pre_ln+model.norm=rmsnorm")[1] == ("model.norm=rmsnorm",)
    with pytest.raises(UserError, match="not one of"):
        parse_scheme("pre_ln+qknorm")
    with pytest.raises(UserError, match="positive finite"):
        lr_points(["pre_ln"], [2], [1e-3, -1.0], [1], 5)
    with pytest.raises(ValueError, match="no_such_scheme"):  # the config's own one-line refusal, before any run
        check_points(lr_points(["no_such_scheme"], [2], [1e-3], [1], 5), None, ["model.arch=decoder_only"])


TINY_LM = ["model.arch=decoder_only", "model.d_model=16", "model.n_heads=2", "model.d_ff=32", "model.dropout=0",
           "model.max_positions=32", "data.block_size=16", "data.synthetic_size=300", "data.vocab_size=300",
           "optim.label_smoothing=0", "train.max_tokens=64", "train.max_updates=2", "train.max_epochs=0",
           "train.valid_every=2", "train.valid_max_sentences=16", "train.save_every=1", "train.save_epochs=false",
           "train.bleu_at_end=false"]


def test_the_sweep_skips_a_finished_run_trains_the_other_and_analyses_its_checkpoints(tmp_path):
    done, new = lr_points(["pre_ln"], [2], [1e-3, 3e-3], [1], 1)
    fake_run(tmp_path / done.name, "completed", 12.5, 12.0)  # finished before an interruption (and worse)
    stamp = (tmp_path / done.name / "summary.json").stat().st_mtime_ns
    lines: list[str] = []
    run_lr_sweep([done, new], tmp_path, None, TINY_LM, jobs=2, cpu=True, log=lines.append)
    assert any(done.name in line and "finished, skipped" for line in lines)
    assert (tmp_path / done.name / "summary.json").stat().st_mtime_ns == stamp
    assert not (tmp_path / f"{done.name}.log").exists()  # no process was started for it
    assert json.loads((tmp_path / new.name / "summary.json").read_text())["status"] == "completed"
    rows, sens = collect_lr([done, new], tmp_path)
    assert [r["status"] for r in rows] == ["completed", "completed"] and len(sens) == 1
    analysis = analyse([done, new], rows, tmp_path, top=1)  # traces the larger LR: the trained run
    t = analysis["traces"][new.name]
    assert t["update"] == [1, 2] and all(math.isfinite(v) and v > 0 for v in t["max_attn_logit"])
    assert all(abs(z - math.log(300)) < 1.0 for z in t["log_z_mean"])  # 2 small updates: log Z near log V
    prof = analysis["profiles"][new.name]
    assert len(prof["variance"]) == 3 and len(prof["angular"]) == 2 and len(prof["removal_bits"]) == 2
    assert "| pre_ln | 2 |" in claims_markdown(sens, analysis)
    assert (tmp_path / new.name / "lr_trace.json").is_file()  # kept with the run: a rerun reads it back
    assert analyse([done, new], rows, tmp_path, top=1) == analysis


def test_tables_and_figures_are_drawn_from_a_fixture(tmp_path):
    from transformer_ln.diagnostics.lr_plots import plot_lr_sweep

    rows = [{"scheme": s, "depth": d, "lr": lr, "seed": 1, "l0": 9.0, "final_loss": f, "status": "completed",
             "capped_loss": 9.0 if f is None else min(f, 9.0)}
            for s in ("pre_ln", "pre_ln+qk_norm") for d in (4,) for lr, f in ((1e-3, 6.0), (1e-2, 5.0), (1e-1, None))]
    sens = [{"scheme": s, "depth": 4, "seed": 1, "lrs": 1.5, "best_lr": 1e-2, "best_loss": 5.0, "diverged": 1}
            for s in ("pre_ln", "pre_ln+qk_norm")]
    prof = {"variance": [1.0, 2.0, 3.0, 4.0, 8.0], "angular": [0.4, 0.3, 0.2, 0.1], "removal_bits": [0.9, 0.5, 0.3, 0.1]}
    analysis = {"traced_lrs": [1e-1],
                "traces": {"a": {"scheme": "pre_ln", "depth": 4, "lr": 0.1, "seed": 1, "update": [1, 2],
                                 "max_attn_logit": [3.0, 9.0], "log_z_mean": [6.0, 7.0]}},
                "profiles": {f"{s}{d}": {"scheme": s, "depth": d, "lr": 1e-2, "seed": 1, **prof}
                             for s in ("pre_ln", "pre_ln+qk_norm") for d in (4,)}}
    made = plot_lr_sweep(rows, sens, analysis, tmp_path, dpi=40)
    names = {p.name for p in made}
    assert {"loss_vs_lr_4L.png", "lr_sensitivity.png", "attention_logits_and_log_z.png", "depth_profiles_4L.pdf"} \
        <= names and all(p.stat().st_size > 1000 for p in made)
    text = claims_markdown(sens, analysis)
    assert "| pre_ln+qk_norm | 4 | 1.5 (1 seed) |" in text and "| a | 1..2 | 3 -> 9 | 6 -> 7 |" in text
    # 4 layers: the deepest quarter is layer 4, the first quarter after the embedding's step layer 2; variance
    # growth over the deeper half var(h_4)/var(h_2) = 8/3
    assert "| pre_ln | 4 | 0.1 (1 seed) | 0.3 (1 seed) | 0.1 (1 seed) | 0.5 (1 seed) | 2.67 (1 seed) |" in text


def test_the_71m_config_has_71m_parameters():
    """The GPU-scale config is the Mix-LN paper's smallest LLaMA (GaLore's llama_71m) at a vocabulary of 32000:
    12 x (4 d^2 attention + 3 d d_ff SwiGLU + 2 d norms) + 2 V d (untied) + d (final norm) = 70,726,144."""
    import torch

    from transformer_ln import build_model, load_run_config
    from transformer_ln.config.run_config import ModelConfig

    cfg = load_run_config(Path(__file__).resolve().parents[1] / "experiments" / "configs" / "lm_71m_llama.yaml")
    model_cfg = ModelConfig.from_dict({**cfg.model.to_dict(), "tgt_vocab_size": 32000, "src_vocab_size": 32000})
    with torch.device("meta"):
        model = build_model(model_cfg)
    d, f, L, V = 512, 1376, 12, 32000
    assert (cfg.model.n_heads, cfg.model.norm, cfg.model.positions, cfg.model.activation) == (8, "rmsnorm", "rope",
                                                                                             "swiglu")
    assert sum(p.numel() for p in model.parameters()) == L * (4 * d * d + 3 * d * f + 2 * d) + 2 * V * d + d
    assert 70.5e6 < L * (4 * d * d + 3 * d * f + 2 * d) + 2 * V * d + d < 71.5e6
