"""The decoder-only language model through the same trainer: every scheme and norm trains, the model learns the
built-in corpus, resume is bit-exact, 2 processes equal 1, FSDP2 equals DDP."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from transformer_ln import ModelConfig, build_model
from transformer_ln.model.norms import NORMS
from transformer_ln.model.schemes import SCHEMES
from transformer_ln.runs.checkpoint import update_checkpoints
from transformer_ln.train import Trainer

from fault_injection import free_port
from conftest import tiny_run_config
from test_train import metrics, prepare

REPO = Path(__file__).resolve().parents[1]
ACCELERATE_FSDP = REPO / "experiments" / "accelerate" / "fsdp.yaml"
# a tiny language model on the built-in corpus's text: 32-token blocks, 8 blocks a batch
LM = ["model.arch=decoder_only", "data.block_size=32", "model.max_positions=64", "train.max_tokens=256",
      "data.synthetic_size=300", "data.vocab_size=300"]
COMBOS = [(r, n) for r in SCHEMES for n in NORMS if SCHEMES[r].has_norms or n == "layernorm"]


def train(out_dir, *overrides, resume=False) -> dict:
    return Trainer(tiny_run_config(out_dir, *LM, *overrides), cpu=True, resume=resume, quiet=True).run()


@pytest.mark.parametrize("residual,norm", COMBOS)
def test_every_scheme_and_norm_builds_a_decoder_only_model_that_trains_one_update(residual, norm):
    torch.manual_seed(0)
    cfg = ModelConfig(arch="decoder_only", residual=residual, norm=norm, d_model=32, n_heads=4, d_ff=64,
                      n_dec_layers=2, tgt_vocab_size=40, dropout=0.1, max_positions=16)
    model = build_model(cfg)
    ids = torch.randint(1, 40, (4, 12))
    if model.scheme.calibrate(model, ids[:, :-1], seed=0) is None:
        assert residual != "admin"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and loss.item() < 3 * math.log(40)  # near log V (ReZero, T-Fixup: no final norm)
    after = model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert any(not torch.equal(before[k], after[k]) for k in after)  # the update changed the weights


def test_a_decoder_only_model_learns_the_built_in_corpus(tmp_path):
    """Validation perplexity of a 4-layer Pre-LN language model falls at least 6-fold in 80 updates (measured:
    from the vocabulary's 300, where a uniform guess and an untrained model are, to 29.8, in 11 s on one core)."""
    summary = train(tmp_path, "model.n_dec_layers=4", "model.d_model=64", "model.d_ff=128", "model.dropout=0.0",
                    "data.synthetic_size=1000", "data.vocab_size=300", "model.residual=pre_ln",
                    "optim.label_smoothing=0", "optim.lr=3e-3", "optim.warmup_updates=20", "train.max_updates=80",
                    "train.valid_every=80", "train.max_epochs=0")
    assert summary["status"] == "completed" and summary["updates"] == 80
    valid = [r["ppl"] for r in metrics(tmp_path, "valid")]
    train_loss = [r["loss"] for r in metrics(tmp_path)]
    assert len(valid) == 1 and math.isfinite(valid[0])
    assert train_loss[0] > math.log2(300) - 0.5  # the untrained model: about log2 V bits per token
    print(f"LM learning: valid perplexity {valid[0]:.1f} after 80 updates (vocabulary 300)")
    assert valid[0] < 300 / 6, valid


def test_decoder_only_resume_is_bit_exact(tmp_path):
    whole = train(tmp_path / "a", "train.max_updates=4")
    first = train(tmp_path / "b", "train.max_updates=2")
    again = train(tmp_path / "b", "train.max_updates=4", resume=True)
    assert whole["status"] == again["status"] == "completed" and first["updates"] == 2 and again["updates"] == 4
    a = load_file(str(update_checkpoints(tmp_path / "a")[-1] / "model.safetensors"))
    b = load_file(str(update_checkpoints(tmp_path / "b")[-1] / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in metrics(tmp_path / "a")] == [r["loss"] for r in metrics(tmp_path / "b")]


def launch(tmp_path, config, *args, fsdp: bool):
    target = ["tests/fsdp_on_cpu.py"] if fsdp else ["-m", "transformer_ln.train"]
    mode = ["--config_file", str(ACCELERATE_FSDP)] if fsdp else ["--multi_gpu"]
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port()),
                           *mode, "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *target,
                           str(config), *args, "--cpu"], capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_decoder_only_two_processes_equal_one_and_fsdp_equals_ddp(tmp_path):
    common = ["model.dropout=0.0", "train.max_updates=3", "model.residual=admin"]
    data = prepare(tmp_path / "prepared", *LM, *common)  # `transformer-ln data prepare` of the text, read by all
    one = train(tmp_path / "one", *common, data, "train.update_freq=2")
    assert one["status"] == "completed"
    configs = {}
    for name in ("ddp", "fsdp"):
        configs[name] = tmp_path / f"{name}.yaml"
        tiny_run_config(tmp_path / name, *LM, *common, data).save(configs[name])
    logs = {name: launch(tmp_path, configs[name], "train.update_freq=1", fsdp=name == "fsdp") for name in configs}
    assert "FSDP2: 2 processes" in logs["fsdp"].stderr + logs["fsdp"].stdout
    l1 = [r["loss"] for r in metrics(tmp_path / "one")]
    ld, lf = ([r["loss"] for r in metrics(tmp_path / n)] for n in ("ddp", "fsdp"))
    assert len(l1) == 3 and l1 == pytest.approx(ld, rel=1e-4) and lf == pytest.approx(ld, rel=1e-6)
    assert json.loads((tmp_path / "fsdp" / "summary.json").read_text())["distributed"] == "FSDP"
    assert json.loads((tmp_path / "fsdp" / "profile.json").read_text()) == json.loads(
        (tmp_path / "ddp" / "profile.json").read_text())
