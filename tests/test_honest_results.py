"""Honest first results (issue 27, part B): analysis on the run's own sentences, named in every output; settings
that were ignored in silence are one line; validation capped and never twice in a row; the settings header shows
every changed value with its origin; figures whose titles fit at any scheme count; ``translate`` on a folder that is
not a run says so. One tiny training run (a few seconds) serves the analysis and translation tests."""
import json
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from transformer_ln.config import ConfigError, load_run_config
from transformer_ln.errors import UserError
from transformer_ln.train import Trainer

from conftest import tiny_run_config
from test_train_safety import cli, one_line  # noqa: F401 (fixtures)


PREPARED: list[str] = []  # the override that reads the module's prepared tiny corpus (the ``prepared`` fixture)


def config(out_dir, *overrides):
    return tiny_run_config(out_dir, *PREPARED, *overrides)


def train(out_dir, *overrides):
    trainer = Trainer(config(out_dir, *overrides), cpu=True, quiet=True)
    return trainer, trainer.run()


def valid_records(run_dir) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "valid"]


@pytest.fixture(scope="module", autouse=True)
def prepared(tmp_path_factory):
    """The tiny corpus prepared once (``transformer-ln data prepare``); every run of this module reads it."""
    from transformer_ln.data.cli import main as data_main

    root = tmp_path_factory.mktemp("prepared")
    tiny_run_config(root / "unused").save(root / "c.yaml")
    assert data_main(["prepare", str(root / "c.yaml"), "--out", str(root / "data")]) == 0
    PREPARED[:] = [f"data.prepared={root / 'data'}"]
    yield
    PREPARED.clear()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 3-update translation run of the tiny model."""
    out = tmp_path_factory.mktemp("honest") / "run"
    assert train(out, "train.max_updates=3")[1]["status"] == "completed"
    return out


# ------------------------------------------------------------------------------------- 4: settings ignored in silence


def test_data_files_without_data_source_files_are_one_line(cli):
    with pytest.raises(ConfigError, match=r"data.train_src: given, but data.source='synthetic' .*add "
                                          r"data.source=files"):
        load_run_config(None, ["data.train_src=A", "data.train_tgt=B"])
    res = cli("train", "--cpu", "data.train_src=A", "data.train_tgt=B", "train.max_updates=1")
    one_line(res, "data.source=files")


# ------------------------------------------------------------------------------------------------- 5: validation


def test_valid_max_sentences_caps_every_validation(tmp_path):
    _, summary = train(tmp_path / "capped", "train.max_updates=1", "train.valid_every=1",
                       "train.valid_max_sentences=7")
    assert summary["status"] == "completed"
    assert [r["examples"] for r in valid_records(tmp_path / "capped")] == [7]
    with pytest.raises(ConfigError, match="train.valid_max_sentences"):
        load_run_config(None, ["train.valid_max_sentences=-1"])


def test_the_epoch_end_meeting_the_time_limit_validates_once(tmp_path):
    """The epoch's last update validates; when the time limit passes during that validation, the run ends there
    instead of training one more update and validating again (main: updates 37 and 38 both validated)."""
    limit_s = 2.0
    cfg = config(tmp_path / "r", "train.max_tokens=4000", "train.max_updates=0", "train.max_epochs=3",
                 "train.valid_max_sentences=50", f"train.max_minutes={limit_s / 60}")  # a few batches an epoch
    trainer = Trainer(cfg, cpu=True, quiet=True)
    real = trainer.validate

    def slow_validation():  # a validation that outlasts the limit (a large valid split on a busy machine)
        out = real()
        time.sleep(limit_s)
        return out

    trainer.validate = slow_validation
    summary = trainer.run()
    updates = [r["update"] for r in valid_records(tmp_path / "r")]
    assert len(updates) == len(set(updates)), updates
    assert all(b - a > 1 for a, b in zip(updates, updates[1:])), updates  # not twice in a row
    assert updates[-1] == summary["updates"]


def test_a_standalone_admin_layer_without_admin_omega_warns_what_to_pass():
    from transformer_ln import CausalLayer, DecoderLayer, EncoderLayer

    for layer in (EncoderLayer, DecoderLayer, CausalLayer):
        with pytest.warns(UserWarning, match=r"without admin_omega: every omega starts at 1 .*admin_init.*"
                                             r"admin_omega='O\(logn\)'"):
            layer(16, 2, 32, residual="admin")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a choice made is not warned about, nor is a whole model's config
        EncoderLayer(16, 2, 32, residual="admin", admin_omega="profile")
        EncoderLayer(16, 2, 32, residual="admin", admin_omega="O(logn)", n_sublayers=12)


def test_admin_init_on_a_model_that_is_not_ours_says_what_it_needs():
    from transformer_ln import EncoderLayer, admin_init

    class Mine(torch.nn.Module):  # a user's model holding our Admin layers: no .cfg, no encoder/decoder stacks
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 16)
            self.blocks = torch.nn.ModuleList(EncoderLayer(16, 2, 32, residual="admin", admin_omega="profile",
                                                           dropout=0.0) for _ in range(2))

        def forward(self, ids, _unused=None):
            x = self.embed(ids)
            for block in self.blocks:
                x = block(x)
            return x

    model, ids = Mine(), torch.randint(1, 10, (2, 6))
    with pytest.raises(ValueError, match=r"Mine is not our Seq2SeqTransformer .* admin_init\(stack, x, keep=mask\) "
                                         r"without tgt_in") as e:
        admin_init(model, ids, ids)
    assert "\n" not in str(e.value)
    profile = admin_init(model, ids)  # what the message says works: one stack, omega_1 = 1, then > 0
    assert len(profile["stack"]) == 4 and profile["stack"][0] == 1.0 and min(profile["stack"]) > 0


def test_max_tokens_below_the_smallest_batch_warns_once_in_one_line(tmp_path, capsys):
    capsys.readouterr()
    train(tmp_path / "r", "train.max_tokens=8", "train.max_updates=1", "train.valid_max_sentences=4")
    lines = [line for line in capsys.readouterr().err.splitlines() if "train.max_tokens=8" in line]
    assert len(lines) == 1 and lines[0].startswith("warning:") and "raise train.max_tokens to at least" in lines[0]


# ------------------------------------------------------------------------------------------ 6: the settings header


def test_the_settings_header_lists_every_changed_value_with_its_origin(tmp_path):
    from transformer_ln.config.parser import resolve_config

    config = tmp_path / "c.yaml"
    config.write_text("train:\n  save_every: 7\n  log_every: 10\n")
    block = resolve_config([str(config), "model.norm=rmsnorm", "data.unescape=true", "train.valid_every=5",
                            "model.preset=llama"]).settings_block()
    rows = {line.split()[0]: line for line in block.splitlines()[1:]
            if line.startswith("  ") and "." in line.split()[0]}
    assert rows["model.norm"].split()[1:] == ["rmsnorm", "(override)"]
    assert rows["data.unescape"].split()[1:] == ["True", "(override)"]
    assert rows["train.valid_every"].split()[1:] == ["5", "(override)"]
    assert rows["train.save_every"].split()[1:] == ["7", f"({config})"]
    assert rows["model.bias"].split()[1:] == ["False", "(model.preset=llama)"]
    assert "train.log_every" not in rows  # given, but the default value: nothing changed
    assert "model.dropout" not in rows


# ------------------------------------------------------------------------------------------- 9: translate on a non-run


def test_translate_on_a_folder_that_is_not_a_run_says_so(tmp_path, cli):
    (tmp_path / "notes.txt").write_text("not a run\n")
    for command in (("translate", tmp_path), ("evaluate", tmp_path)):
        line = one_line(cli(*command), "is not a training run directory")
        assert "no checkpoints yet" not in line


# ------------------------------------------------------------------------ 3: analysis on the run's own sentences


@pytest.fixture
def titles(monkeypatch):
    """The titles of every figure the analyses draw (suptitle | panel titles), the figures not rendered: writing
    PNG and PDF is tested elsewhere and costs seconds a figure on a busy machine."""
    import transformer_ln.diagnostics.depth_plots as depth_plots
    import transformer_ln.diagnostics.plotting as plotting

    seen = []

    def keep_titles(fig, out, dpi=150):
        seen.append(" ".join((fig.get_suptitle() + " | " + " | ".join(ax.get_title() for ax in fig.axes)).split()))
        return [Path(out).with_suffix(".png")]

    for module in (plotting, depth_plots):
        monkeypatch.setattr(module, "save", keep_titles)
    return seen


def test_analyze_a_run_measures_its_validation_sentences_and_says_so(run, tmp_path, cli, titles):
    from transformer_ln.data import prepare_data
    from transformer_ln.runs.checkpoint import load_model

    res = cli("analyze", "gradients", "--run", run, "--out", tmp_path / "g")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0] == "measured on: run:best, valid[:16], 16 sentence pairs"
    record = json.loads((tmp_path / "g" / "grad_norms.json").read_text())
    assert record["checkpoint"] == "run:best" and record["batch"] == "valid[:16], 16 sentence pairs"
    # the numbers are those of the run's first 16 validation pairs (not of random ids)
    model, cfg = load_model(run)
    batch = prepare_data(cfg, run).batch("valid", np.arange(16))
    from transformer_ln.diagnostics import gradient_norms

    expected = gradient_norms(model, batch["src"], batch["tgt_in"], tgt_out=batch["tgt_out"])
    got = record["results"]["post_ln"]
    assert all(got[k]["output_grad_norm"] == pytest.approx(expected[k]["output_grad_norm"], rel=1e-5)
               for k in expected)
    # random ids only when asked, and then named so
    res = cli("analyze", "gradients", "--run", run, "--random-ids", "--out", tmp_path / "r")
    assert json.loads((tmp_path / "r" / "grad_norms.json").read_text())["batch"] == "random ids 4x20"
    assert res.stdout.splitlines()[0] == "measured on: run:best, random ids 4x20"
    one_line(cli("analyze", "gradients", "--run", run, "--seq-len", "9", "--out", tmp_path / "x"), "--random-ids")
    one_line(cli("analyze", "gradients", "--run", run, "--batch-size", "0", "--out", tmp_path / "x"), "--batch-size 0")


def test_every_analysis_figure_of_a_run_names_its_batch(run, tmp_path, cli, titles):
    for command in ("dependency", "output-change", "gradients", "hidden-states"):
        res = cli("analyze", command, "--run", run, "--batch-size", "5", "--out", tmp_path / command)
        assert res.returncode == 0, res.stderr
        assert "measured on: run:best, valid[:5], 5 sentence pairs" in res.stdout
    assert len(titles) == 4 and all("valid[:5], 5 sentence pairs" in t for t in titles), titles
    hidden = json.loads((tmp_path / "hidden-states" / "hidden_states.json").read_text())
    assert hidden["sources"]["post_ln"]["batch"] == "valid[:5], 5 sentence pairs"
    fresh = cli("analyze", "gradients", "model.residual=pre_ln", "model.n_enc_layers=1", "model.n_dec_layers=1",
                "model.d_model=16", "model.n_heads=2", "model.d_ff=16", "--vocab", "30", "--out", tmp_path / "f")
    assert fresh.stdout.splitlines()[0] == "measured on: init, random ids 4x20"


# --------------------------------------------------------------------------------------------------------- 7: figures


def _norms(schemes, stacks=("encoder", "decoder"), zero=("rezero",)):
    """Gradient norms of 6 sub-layers per stack; the ``zero`` schemes' odd sub-layers exactly 0 (ReZero at init)."""
    return {s: {f"{st}.{i}": {"stack": st, "index": i, "output_grad_rel": v, "param_grad_rel": v}
                for st in stacks for i in range(1, 7)
                for v in [0.0 if s in zero and i % 2 else i / 6 * (k + 1) / len(schemes)]}
            for k, s in enumerate(schemes)}


def _sweep(schemes):
    n = [2, 4, 8]
    return {"config": {"stack": "encoder", "sublayers_per_layer": 2, "seeds": 1, "d_model": 512, "eps": 1e-4,
                       "n_tokens": 80, "perturbation": "random"},
            "definition": {"text": "|ΔF|², stack output, eval mode, pads skipped"},
            "results": {s: {"sublayers": n, "output_change": [1.0 + k, 2.0 + k, 3.5 + k], "ci95": None,
                            "fit": {"linear": {"a": 0.4, "b": 1.0, "r2": 0.97}, "log": {"a": 1.2, "b": 0.2, "r2": 0.99},
                                    "better": "log"}} for k, s in enumerate(schemes)}}


def _inside(fig) -> list[str]:
    """Titles (the figure's and each visible panel's) whose rendered extent leaves the figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    renderer, box = fig.canvas.get_renderer(), fig.bbox
    texts = [fig._suptitle] + [ax.title for ax in fig.axes if ax.get_visible()]
    out = []
    for t in texts:
        if t is not None and t.get_text():
            e = t.get_window_extent(renderer)
            if e.x0 < box.x0 - 1 or e.x1 > box.x1 + 1 or e.y0 < box.y0 - 1 or e.y1 > box.y1 + 1:
                out.append(t.get_text())
    return out


@pytest.mark.parametrize("count", [1, "all"])
def test_figure_titles_lie_inside_the_figure_and_figures_fit_a_page(count):
    """One scheme (the narrowest figures, whose titles were cut off) and every registered one (the widest)."""
    from transformer_ln.diagnostics.plotting import (SCHEME_LABELS, grad_norms_figure, output_change_bars_figure,
                                                     output_change_figure)

    schemes = list(SCHEME_LABELS)[:1] if count == 1 else list(SCHEME_LABELS)
    assert len(schemes) == 1 or len(schemes) >= 10
    where = "run:best, valid[:16], 16 sentence pairs"
    figures = {"output_change sweep": lambda: output_change_figure(_sweep(schemes), "init, random ids 4x20")}
    if count == 1:
        figures["grad_norms decoder-only"] = lambda: grad_norms_figure(_norms(schemes, ("decoder",)), where)
    else:
        figures["grad_norms"] = lambda: grad_norms_figure(_norms(schemes), where)
        figures["output_change bars"] = lambda: output_change_bars_figure(
            {s: {"encoder": 1.0, "decoder": 2.0} for s in schemes}, where)
    for name, make in figures.items():
        fig = make()
        w, h = fig.get_size_inches()
        assert not _inside(fig), (name, _inside(fig))
        assert w <= 10.001 and h <= 8.001, (name, w, h)  # 1500 x 1200 pixels at dpi 150 at most
    from transformer_ln.diagnostics.figure_fit import page_size

    # the 10+-scheme dependency grid (5 columns of 4.2 x 3.6 inches, 3 rows per stack) shrinks to the page, fonts too
    assert page_size(21.0, 21.6) == pytest.approx((21.0 * 8 / 21.6, 8.0, 8 / 21.6))


def test_zero_gradients_are_drawn_as_zeros_not_as_a_tiny_number():
    from transformer_ln.diagnostics.plotting import grad_norms_figure

    fig = grad_norms_figure(_norms(["post_ln", "rezero"], ("decoder",)), "init, random ids 4x20")
    for ax in fig.axes:
        lines = {line.get_label(): line for line in ax.get_lines()}
        rezero = np.asarray(lines["ReZero"].get_ydata(), float)
        assert np.isnan(rezero[[0, 2, 4]]).all() and (rezero[[1, 3, 5]] > 0).all()  # no line through the zeros
        zeros = lines["ReZero: exactly 0"]
        assert zeros.get_marker() == "v" and list(zeros.get_xdata()) == [1, 3, 5]
        smallest = min(np.nanmin(np.asarray(line.get_ydata(), float)) for line in lines.values())
        assert ax.get_ylim()[0] > smallest / 10 > 1e-3  # the floor sits just below the data, not at 1e-12
    assert "exactly 0" in fig.legends[0].get_title().get_text()


def test_analyze_a_decoder_only_run_measures_its_validation_blocks(tmp_path, cli, titles):
    from transformer_ln.train import main as train_main

    out = tmp_path / "lm"
    assert train_main(["--cpu", "model.arch=decoder_only", "model.residual=pre_ln", "model.d_model=32",
                       "model.n_heads=4", "model.d_ff=64", "model.n_dec_layers=1", "data.synthetic_size=100",
                       "data.vocab_size=300", "data.block_size=32", "model.max_positions=64", "train.max_updates=1",
                       "train.max_tokens=256", "train.bleu_at_end=false", "train.valid_max_sentences=3",
                       f"train.out_dir={out}"]) == 0
    assert [r["examples"] for r in valid_records(out)] == [3]  # the cap counts blocks
    res = cli("analyze", "gradients", "--run", out, "--batch-size", "4", "--out", tmp_path / "g")
    assert res.stdout.splitlines()[0] == "measured on: lm:best, valid blocks[:4], 4 blocks of 32 tokens"
    record = json.loads((tmp_path / "g" / "grad_norms.json").read_text())
    assert record["batch"] == "valid blocks[:4], 4 blocks of 32 tokens"
    assert "valid blocks[:4]" in titles[-1]
