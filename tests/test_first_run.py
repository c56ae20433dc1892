"""A user's own corpus right on the first try (issue 18): honest defaults, results never overwritten, settings
that can be discovered, README code that runs."""
import json
from pathlib import Path

import pytest

from transformer_ln.config.parser import resolve_config
from transformer_ln.config import DEMO, RunConfig

from conftest import TINY_RUN

SMALL = [f"model.{k}={v}" for k, v in TINY_RUN["model"].items()] + ["train.max_tokens=600", "train.log_every=1",
                                                                    "train.bleu_at_end=false"]


def write_corpus(folder: Path, n: int = 40) -> list[str]:
    """A few typed sentences as a user's parallel files; the overrides that point a run at them."""
    words = ["the", "dog", "sees", "a", "cat", "house", "old", "man", "walks", "small"]
    lines = [" ".join(words[(i * k) % len(words)] for k in range(1, 5 + i % 4)) for i in range(n)]
    for split in ("train", "valid"):
        (folder / f"{split}.src").write_text("\n".join(lines) + "\n")
        (folder / f"{split}.tgt").write_text("\n".join(w.upper() for w in lines) + "\n")
    return ["data.source=files", *(f"data.{s}_{side}={folder}/{s}.{side}" for s in ("train", "valid")
                                   for side in ("src", "tgt"))]


def test_files_run_without_config_uses_library_defaults_and_prints_where_settings_came_from(tmp_path, capsys):
    from transformer_ln.data.cli import main as data_main
    from transformer_ln.train import main as train_main

    files = write_corpus(tmp_path)
    lib = RunConfig()
    r = resolve_config(files)
    assert not r.demo
    for key in ("data.vocab_size", "optim.warmup_updates", "model.max_positions", "train.max_minutes",
                "train.keep_last", "optim.lr", "model.d_model"):
        sec, name = key.split(".")
        assert getattr(getattr(r.cfg, sec), name) == getattr(getattr(lib, sec), name), key
        assert r.origins.get(key, "default") == "default"
    assert r.origins["data.source"] == "override"
    # the demo is the demo: no CONFIG and the built-in corpus, or --demo
    assert resolve_config([]).demo and resolve_config([]).cfg.data.vocab_size == DEMO["data"]["vocab_size"]
    assert resolve_config(files, demo=True).cfg.optim.warmup_updates == DEMO["optim"]["warmup_updates"]

    out = tmp_path / "run"
    assert train_main([*files, *SMALL, f"train.out_dir={out}", "train.max_minutes=0.0001", "--cpu"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())  # a time limit is recorded as such
    assert summary["status"] == "completed" and summary["stopped"] == "max_minutes"
    assert "optim.warmup_updates  4000" in printed and "(default)" in printed and "(override)" in printed
    saved = RunConfig.load(out / "config.yaml")
    assert (saved.optim.warmup_updates, saved.train.max_epochs, saved.train.keep_last) == (4000, 10, 5)
    # `data stats` resolves the same way, so it describes the run `train` gives
    assert data_main(["stats", *files, *SMALL, "--json", str(tmp_path / "s.json")]) == 0
    stats = json.loads((tmp_path / "s.json").read_text())
    assert (stats["max_positions"], stats["max_tokens"]) == (saved.model.max_positions, saved.train.max_tokens)
    capsys.readouterr()
    assert data_main(["stats", "data.synthetic_size=200"]) == 0
    assert "model.max_positions=256" in capsys.readouterr().out  # the demo's, as `transformer-ln train` uses


def test_config_command_lists_every_key_with_help_and_writes_a_starter_yaml(tmp_path, capsys):
    from transformer_ln.cli import main as cli_main
    from transformer_ln.config.cli import rows

    table = rows()
    flat = {f"{s}.{k}" for s, sec in RunConfig().to_dict().items() for k in sec}
    assert {r["key"] for r in table} == flat and all(r["help"] for r in table)
    assert next(r for r in table if r["key"] == "model.residual")["allowed"][:2] == ["post_ln", "pre_ln"]
    assert cli_main(["config"]) == 0
    out = capsys.readouterr().out
    assert all(k in out for k in flat) and "warmup_updates" in out and "one of relu, gelu" in out
    path = tmp_path / "starter.yaml"
    assert cli_main(["config", "--write", str(path)]) == 0
    assert RunConfig.load(path).to_dict() == RunConfig().to_dict()  # the starter loads back to the defaults
    assert cli_main(["config", "--demo", "--write", str(tmp_path / "d.yaml")]) == 0
    assert RunConfig.load(tmp_path / "d.yaml").model.d_model == DEMO["model"]["d_model"]
    from transformer_ln.train import parse_args
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert "transformer-ln config" in capsys.readouterr().out


def test_every_python_block_of_the_readme_runs():
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert len(blocks) >= 4
    for i, code in enumerate(blocks):
        code = code.replace("2048", "128").replace("512", "64")  # tiny sizes, the same code
        namespace: dict = {"__name__": f"readme_block_{i}"}
        exec(compile(code, f"README.md python block {i + 1}", "exec"), namespace)
    layer = namespace_of(blocks[0])["MyLayer"](16, 3)  # the first block defines a layer: it must run too
    import torch
    assert layer(torch.randn(2, 5, 16)).shape == (2, 5, 16)


def namespace_of(code: str) -> dict:
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    return ns


def test_the_readme_walk_through_runs_as_written_on_the_built_in_corpus(tmp_path, monkeypatch, capsys):
    """The README's bash block (data stats, train, evaluate, translate, average, analyze), line by line."""
    import re
    import shlex

    from transformer_ln.cli import main as cli_main
    from transformer_ln.config import DataConfig
    from transformer_ln.data import load_corpus

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", readme, flags=re.S) if "runs/mine" in b)
    corpus = load_corpus(DataConfig(synthetic_size=200))
    for split, n in (("train", 150), ("valid", 10), ("test", 6)):
        pairs = corpus[split][:n]
        (tmp_path / f"{split}.de").write_text("".join(s + "\n" for s, _ in pairs))
        (tmp_path / f"{split}.en").write_text("".join(t + "\n" for _, t in pairs))
    monkeypatch.chdir(tmp_path)
    env: dict = {}
    tiny = SMALL + ["data.vocab_size=200", "train.max_updates=6", "train.save_every=1", "optim.warmup_updates=3"]
    for line in block.strip().splitlines():
        line = line.split("  #")[0].strip()
        if re.match(r"^\w+=", line):  # FILES="..."
            name, value = line.split("=", 1)
            env[name] = shlex.split(value)[0]
            continue
        argv = shlex.split(re.sub(r"\$(\w+)", lambda m: env[m.group(1)], line))
        assert argv[0] == "transformer-ln", line
        argv = argv[1:] + (tiny if argv[1] == "train" else [])
        assert cli_main(argv) == 0, line
    out = capsys.readouterr().out
    run = tmp_path / "runs/mine"
    assert {p.name for p in run.glob("eval_*.json")} == {"eval_test_best.json", "eval_test_best_limit100.json",
                                                         "eval_test_averaged.json"}
    assert "optim.warmup_updates" in out and (run / "checkpoints/averaged").is_dir()
    assert len([ln for ln in out.splitlines() if ln.startswith("test: BLEU")]) == 3
    # two evaluations with different limits (and a third checkpoint) left their own files, listed in results.md
    limited = json.loads((run / "eval_test_best_limit100.json").read_text())
    assert limited["limit"] == 100 and json.loads((run / "eval_test_best.json").read_text())["limit"] is None
    assert all((run / n.replace("eval_", "hyps_").replace(".json", ".txt")).is_file() for n in
               ("eval_test_best.json", "eval_test_best_limit100.json", "eval_test_averaged.json"))
    results = (run / "results.md").read_text()
    assert all(n in results for n in ("eval_test_best.json", "eval_test_best_limit100.json", "eval_test_averaged"))
    # the README's averaging example fits in what a default run keeps (the run above kept 5 of 6 updates)
    last = max(int(n) for n in re.findall(r"average \S+ --last (\d+)", readme))
    assert RunConfig().train.keep_last >= last and resolve_config([]).cfg.train.keep_last >= last
    assert len(list((run / "checkpoints").glob("update_*"))) == RunConfig().train.keep_last


def test_trackers_are_accelerates_and_a_missing_package_is_one_line(tmp_path):
    import accelerate.tracking as tracking

    from transformer_ln.config import TRACKERS, ConfigError
    from transformer_ln.errors import UserError
    from transformer_ln.training.trainer import trackers
    from conftest import tiny_run_config

    assert set(TRACKERS) == set(tracking.LOGGER_TYPE_TO_CLASS)
    assert tiny_run_config(tmp_path, "train.trackers=tensorboard,wandb").train.trackers == ("tensorboard", "wandb")
    with pytest.raises(ConfigError, match="train.trackers: got 'neptune'; allowed: aim"):
        tiny_run_config(tmp_path, "train.trackers=[neptune]")
    missing = next(n for n in TRACKERS if n not in tracking.get_available_trackers())
    with pytest.raises(UserError, match=f"{missing} not installed \\(pip install {missing}\\)"):
        trackers(tiny_run_config(tmp_path, f"train.trackers=[{missing}]").train)
    assert trackers(tiny_run_config(tmp_path).train) == []


def _fake_run(folder: Path, omega: bool) -> Path:
    """A run directory as the trainer leaves it (metrics.jsonl, summary.json), written by hand."""
    from transformer_ln.runs.summary import Summary

    folder.mkdir(parents=True)
    recs = [{"kind": "train", "update": u, "loss": 9.0 - u, "lr": 1e-4 * u, "grad_norm": 1.0 + u,
             **({"omega_mean": 1.2, "omega_min": 1.0, "omega_max": 1.5} if omega else {})} for u in range(1, 6)]
    recs += [{"kind": "valid", "update": 5, "loss": 4.5, "nll": 4.4}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    Summary(status="completed", updates=5, best_valid_loss=4.5, stopped="max_updates").save(folder / "summary.json")
    return folder


def test_curves_figure_reads_well_and_analyze_prints_its_numbers(tmp_path, capsys):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from transformer_ln.diagnostics.cli import main as analyze
    from transformer_ln.diagnostics.plotting import curves_figure

    plain, admin = _fake_run(tmp_path / "post_ln", False), _fake_run(tmp_path / "admin", True)
    for runs, has_omega in (([plain], False), ([plain, admin], True)):
        fig = curves_figure(runs)
        FigureCanvasAgg(fig).draw()
        shown = [ax for ax in fig.axes if ax.get_visible() and ax.axison]
        assert all(ax.get_lines() for ax in shown)  # no empty panel
        assert any("omega" in ax.get_title() for ax in shown) == has_omega
        assert all("bits" in ax.get_ylabel() for ax in shown if "loss" in ax.get_ylabel())
        box, (w, h) = fig.get_tightbbox(), fig.get_size_inches()
        assert box.x0 >= -0.01 and box.y0 >= -0.01 and box.x1 <= w + 0.01 and box.y1 <= h + 0.01  # nothing clipped
    assert analyze(["curves", str(plain), str(admin), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    row = next(ln for ln in out.splitlines() if ln.startswith("admin"))
    assert row.split()[1:6] == ["completed", "max_updates", "5", "4.000", "4.500"]


def test_single_scheme_dependency_figure_keeps_its_title_inside(monkeypatch):
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    import transformer_ln.diagnostics.plotting as plotting

    figures = []
    monkeypatch.setattr(plotting, "save", lambda fig, out, dpi=150: figures.append(fig) or [])
    rng = np.random.default_rng(0)
    plotting.plot_dependency({"post_ln": {"encoder": rng.random((4, 5)), "decoder": rng.random((6, 7))}}, "unused")
    fig = figures[-1]
    FigureCanvasAgg(fig).draw()
    box, (w, h) = fig.get_tightbbox(), fig.get_size_inches()
    assert box.x0 >= -0.01 and box.y0 >= -0.01 and box.x1 <= w + 0.01 and box.y1 <= h + 0.01


def test_bpe_markers_and_moses_entities_warn_and_data_unescape_removes_them(tmp_path, caplog):
    import logging

    from transformer_ln.config import DataConfig
    from transformer_ln.data import load_corpus

    marked = ["it&apos;s a sm@@ all dog .", "the c@@ at sees &quot; the house &quot; .", "an old man walks ."]
    for split in ("train", "valid"):
        (tmp_path / f"{split}.src").write_text("\n".join(marked) + "\n")
        (tmp_path / f"{split}.tgt").write_text("\n".join("de " + m for m in marked) + "\n")
    files = {f"{s}_{side}": str(tmp_path / f"{s}.{side}") for s in ("train", "valid") for side in ("src", "tgt")}
    with caplog.at_level(logging.WARNING):
        raw = load_corpus(DataConfig(source="files", **files))
    assert "@@" in raw["train"][0][0]
    text = caplog.text
    assert "BPE '@@ ' markers" in text and "Moses-escaped entities" in text and "data.unescape=true" in text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        clean = load_corpus(DataConfig(source="files", unescape=True, **files))
    assert clean["train"][0] == ("it's a small dog .", "de it's a small dog .")
    assert clean["valid"][1][0] == 'the cat sees " the house " .'
    assert not any("@@" in s or "&" in s for pair in clean["train"] for s in pair) and "markers" not in caplog.text
