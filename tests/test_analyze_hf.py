"""``transformer-ln analyze COMMAND --hf DIR --text FILE``: every analysis command on tiny random GPT-2, LLaMA,
BERT and BART directories written by ``save_pretrained`` (with a word-level tokenizer saved beside them), the files
and numbers it writes, the one-line errors, the depth commands on our own models, and the README's "Analyse your own
model" examples run as written."""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from transformer_ln.cli import main

T = pytest.importorskip("transformers")
T.logging.set_verbosity_error()
V = 48  # the models' vocabulary; the tokenizer's is smaller
TEXT = """The cat sat on the mat .
A big dog ran in the park , and the cat ran too .

the small red bird sat on a big tree
a dog and a cat
"""
PAPER = ("dependency", "output-change", "gradients")
DEPTH = ("hidden-states", "angular", "layer-removal", "attention-logits", "log-partition")
FILES = {"dependency": "dependency", "output-change": "output_change", "gradients": "grad_norms",
         "hidden-states": "hidden_states", "angular": "angular_distance", "layer-removal": "layer_removal",
         "attention-logits": "attention_logits", "log-partition": "log_partition"}


def save_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    words = sorted(set(TEXT.lower().split()))
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    assert len(vocab) < V
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(path)


def tiny(family: str):
    torch.manual_seed(0)
    bert = dict(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                max_position_embeddings=32, pad_token_id=0)
    build = {
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=V, n_positions=32, n_embd=16, n_layer=3, n_head=2,
                                                        bos_token_id=1, eos_token_id=1)),
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32,
                                                          num_hidden_layers=2, num_attention_heads=4,
                                                          num_key_value_heads=2, max_position_embeddings=32,
                                                          bos_token_id=1, eos_token_id=1)),
        "bert": lambda: T.BertForMaskedLM(T.BertConfig(**bert)),
        "bart": lambda: T.BartForConditionalGeneration(T.BartConfig(
            vocab_size=V, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
            pad_token_id=0, bos_token_id=1, eos_token_id=1, decoder_start_token_id=1, forced_eos_token_id=1)),
    }
    return build[family]()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for family in ("gpt2", "llama", "bert", "bart"):
        tiny(family).save_pretrained(root / family)
        save_tokenizer(root / family)
        out[family] = root / family
    (root / "text.txt").write_text(TEXT)
    out["text"] = root / "text.txt"
    return out


def analyze(command: str, model: Path, text: Path, out: Path, *extra: str) -> int:
    return main(["analyze", command, "--hf", str(model), "--text", str(text), "--out", str(out), *extra])


def written(out: Path, command: str) -> dict:
    name = FILES[command]
    for suffix in (".png", ".pdf"):
        path = out / f"{name}{suffix}"
        assert path.is_file() and path.stat().st_size > 1000, path
    assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    return json.loads((out / f"{name}.json").read_text())  # strict JSON: a NaN would not parse back as null


def finite(values) -> bool:
    arr = np.asarray(values, dtype=float)
    return arr.size > 0 and bool(np.isfinite(arr).all())


def check_numbers(command: str, record: dict, stacks: tuple[str, ...]) -> None:
    """The JSON numbers are finite where they must be (and null exactly where they are undefined)."""
    if command == "log-partition":
        r = next(iter(record["results"].values()))
        assert all(math.isfinite(r[k]) for k in ("mean", "std", "min", "max", "mean_square")) and r["n_tokens"] > 0
        return
    results = next(iter(record["results"].values()))
    if command == "gradients":
        assert {r["stack"] for r in results.values()} == set(stacks)
        assert all(finite([r["output_grad_norm"], r["param_grad_norm"]]) for r in results.values())
        assert max(r["output_grad_rel"] for r in results.values()) == 1.0
        return
    if command == "output-change":
        assert set(results) == set(stacks) and all(math.isfinite(v) and v > 0 for v in results.values())
        return
    assert set(results) == set(stacks), (command, results.keys())
    for stack, r in results.items():
        if command == "dependency":
            beta = np.asarray(r["beta"], float)
            assert finite(beta) and np.allclose(np.linalg.norm(beta, axis=1), 1.0)
            assert np.allclose(r["diagonal"], np.diagonal(beta, 1))
        elif command == "hidden-states":
            assert finite(r["variance"]) and finite(r["norm"]) and min(r["variance"]) > 0
            assert r["layer"] == list(range(len(r["variance"])))
        elif command == "angular":
            d = r["distance"]  # d[k][l]: between h_l and h_{l+n}; null past the last layer
            L = len(d[0])
            for n, row in zip(r["gaps"], d):
                assert finite(row[:L + 1 - n]) and all(v is None for v in row[L + 1 - n:])
        elif command == "layer-removal":
            assert finite(r["loss"]) and finite(r["delta"]) and math.isfinite(r["base_loss"])
            assert np.allclose(np.asarray(r["loss"]) - r["base_loss"], r["delta"])
            assert r["layer"] == list(range(1, len(r["loss"]) + 1))
        elif command == "attention-logits":
            assert finite(r["max"]) and all(finite(h) for h in r["per_head"])


def test_every_command_on_a_saved_gpt2(dirs, tmp_path, capsys):
    for command in PAPER + DEPTH:
        out = tmp_path / command
        assert analyze(command, dirs["gpt2"], dirs["text"], out) == 0, command
        record = written(out, command)
        check_numbers(command, record, ("decoder",))
        source = record["source"] if command in PAPER else record["sources"]["gpt2"]
        assert source["lines"] == 4 and source["text"] == str(dirs["text"])  # the empty line is skipped
        printed = capsys.readouterr().out
        assert str(out / f"{FILES[command]}.json") in printed and "gpt2" in printed  # its table and its paths
    removal = json.loads((tmp_path / "layer-removal/layer_removal.json").read_text())
    src = removal["sources"]["gpt2"]
    assert (src["class"], src["head"], src["tokens"]) == ("GPT2LMHeadModel", "causal", 35)
    # the loss layer removal starts from is the model's own loss on the text (padding right, pads masked)
    model = T.AutoModelForCausalLM.from_pretrained(dirs["gpt2"], local_files_only=True).eval()
    tok = T.AutoTokenizer.from_pretrained(dirs["gpt2"], local_files_only=True)
    batch = tok([ln for ln in TEXT.splitlines() if ln.strip()], padding=True, return_tensors="pt")
    with torch.no_grad():
        own = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss
    assert removal["results"]["gpt2"]["decoder"]["base_loss"] == pytest.approx(own.item(), rel=1e-5)


@pytest.mark.parametrize("family, commands, stacks", [
    ("llama", ("dependency", "attention-logits"), ("decoder",)),
    ("bert", ("dependency", "layer-removal"), ("encoder",)),
    ("bart", ("dependency", "hidden-states"), ("encoder", "decoder")),
])
def test_dependency_and_a_depth_statistic_on_llama_bert_bart(dirs, tmp_path, family, commands, stacks, capsys):
    for command in commands:
        assert analyze(command, dirs[family], dirs["text"], tmp_path, "--max-lines", "3") == 0, command
        check_numbers(command, written(tmp_path, command), stacks)
    capsys.readouterr()


def one_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_input_is_one_line_with_exit_status_2(dirs, tmp_path, capsys):
    text = dirs["text"]
    assert analyze("dependency", tmp_path / "nowhere", text, tmp_path / "o") == 2
    assert "no such directory" in one_error(capsys)
    (tmp_path / "plain").mkdir()
    assert analyze("hidden-states", tmp_path / "plain", text, tmp_path / "o") == 2
    assert "not a Hugging Face model directory (no config.json)" in one_error(capsys)
    assert main(["analyze", "dependency", "--hf", str(dirs["gpt2"]), "--out", str(tmp_path / "o")]) == 2
    assert "--text" in one_error(capsys)
    assert analyze("angular", dirs["gpt2"], tmp_path / "missing.txt", tmp_path / "o") == 2
    assert "no such file" in one_error(capsys)
    assert analyze("angular", dirs["gpt2"], text, tmp_path / "o", "--gaps", "7") == 2
    assert "--gaps" in one_error(capsys)
    untokenized = tmp_path / "untokenized"
    tiny("gpt2").save_pretrained(untokenized)
    capsys.readouterr()  # save_pretrained's progress bar
    assert analyze("dependency", untokenized, text, tmp_path / "o") == 2
    assert "no tokenizer" in one_error(capsys)
    opt = tmp_path / "opt"  # a model attach does not know: its message, naming the directory
    T.OPTForCausalLM(T.OPTConfig(vocab_size=V, hidden_size=16, ffn_dim=32, num_hidden_layers=2,
                                 num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=32)
                     ).save_pretrained(opt)
    save_tokenizer(opt)
    capsys.readouterr()
    assert analyze("dependency", opt, text, tmp_path / "o") == 2
    err = one_error(capsys)
    assert "no residual sites recognised in OPTForCausalLM; declare them" in err and str(opt) in err
    base = tmp_path / "base"  # no language-model head: no loss to remove layers against
    T.GPT2Model(T.GPT2Config(vocab_size=V, n_positions=32, n_embd=16, n_layer=2, n_head=2)).save_pretrained(base)
    save_tokenizer(base)
    capsys.readouterr()
    assert analyze("layer-removal", base, text, tmp_path / "o") == 2
    assert "GPT2Model has no language-model head" in one_error(capsys)
    assert main(["analyze", "hidden-states", "--run", str(tmp_path), "--hf", str(dirs["gpt2"]), "--text",
                 str(text), "--out", str(tmp_path / "o")]) == 2
    assert "drop --run" in one_error(capsys)
    assert not (tmp_path / "o").exists()


def test_without_transformers_the_message_says_what_to_install(dirs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    assert analyze("dependency", dirs["gpt2"], dirs["text"], tmp_path / "o") == 2
    assert "pip install transformer_ln[hf]" in one_error(capsys)


def test_help_lists_the_depth_commands_and_hf(capsys):
    assert main(["analyze", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(c in out for c in PAPER + DEPTH) and "--hf DIR --text FILE" in out
    assert main(["analyze", "angular", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(o in out for o in ("--hf", "--text", "--max-lines", "--gaps", "--token"))


def test_depth_commands_on_fresh_models_of_ours(tmp_path, capsys):
    tiny_lm = ["model.arch=decoder_only", "model.d_model=16", "model.n_heads=2", "model.d_ff=32",
               "model.n_dec_layers=2", "--vocab", "40", "--batch-size", "2", "--seq-len", "8",
               "--residuals", "pre_ln,post_ln"]
    for command in ("hidden-states", "layer-removal"):
        assert main(["analyze", command, "--out", str(tmp_path), *tiny_lm]) == 0
        record = written(tmp_path, command)
        assert set(record["results"]) == {"pre_ln", "post_ln"}
        for label in ("pre_ln", "post_ln"):
            check_numbers(command, {"results": {label: record["results"][label]}}, ("decoder",))
    assert "pre_ln" in capsys.readouterr().out
    assert main(["analyze", "hidden-states", "--text", "x.txt", "--out", str(tmp_path), *tiny_lm]) == 2
    assert "--text goes with --hf" in one_error(capsys)


def readme_block(tag: str) -> str:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    found = re.findall(rf"<!-- test: {tag} -->\n```python\n(.*?)```", readme, flags=re.S)
    assert len(found) == 1, f"README.md: one ```python block after <!-- test: {tag} -->"
    return found[0]


@pytest.mark.parametrize("tag", ["readme-hf", "readme-declared"])
def test_the_readme_analyse_your_own_model_examples_run(tag, capsys):
    """Both examples of "Analyse your own model" run as written (the Hugging Face one builds its model directory
    from a tiny config, so nothing is downloaded), and their hooks are gone afterwards."""
    namespace: dict = {"__name__": tag}
    exec(compile(readme_block(tag), f"README.md {tag}", "exec"), namespace)
    model, sites = namespace["model"], namespace["sites"]
    assert len(sites) == 8 and namespace["beta"].shape == (8, 9) and finite(namespace["beta"])
    if tag == "readme-hf":
        assert finite(namespace["stats"]["variance"]) and finite(namespace["removal"]["delta"])
    else:
        assert finite(namespace["removal"]) and finite(namespace["max_logit"])
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert "0." in capsys.readouterr().out
