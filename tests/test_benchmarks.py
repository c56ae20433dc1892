"""The benchmark scripts keep running: one CPU step of each, figures that agree with each other.

Why: the scripts are what a user with a GPU runs to fill in the README's table; a script that broke silently would
only be found on a machine where time is scarce. Speed itself is not asserted here (that is the scripts' job).
"""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import decode  # noqa: E402
import throughput  # noqa: E402


def test_throughput_script_reports_every_model(tmp_path):
    out = tmp_path / "bench.json"
    # no untimed warm-up step: 6 training steps of the 6+6-layer CPU shape instead of 9 (nothing here is timed)
    assert throughput.main(["--device", "cpu", "--steps", "2", "--warmup", "0",
                            "--schemes", "post_ln", "admin", "--json", str(out)]) == 0
    (result,) = json.loads(out.read_text())["results"]
    models = result["models"]
    assert set(models) == {"nn.Transformer", "post_ln", "admin"}
    shape = throughput.SHAPES["cpu"]
    for name, r in models.items():
        assert len(r["ms_all"]) == 2
        assert r["tokens_per_s"] == pytest.approx(shape.tokens / (r["ms_per_step"] / 1e3))
        assert r["ratio"] == pytest.approx(models["nn.Transformer"]["ms_per_step"] / r["ms_per_step"])
        # like for like: every model starts near the uniform prediction's cross-entropy over the tied vocabulary
        assert abs(r["loss"] - math.log(shape.vocab)) < 1.5, (name, r["loss"])


def test_decode_script_cached_equals_uncached(tmp_path):
    out = tmp_path / "decode.json"
    assert decode.main(["--device", "cpu", "--sentences", "3", "--batch", "3", "--out-len", "8", "--repeats", "1",
                        "--src-len", "5", "9", "--json", str(out)]) == 0
    modes = json.loads(out.read_text())["modes"]
    assert set(modes) == {"cached", "uncached"}
    assert modes["cached"]["same_as_uncached"] == 1.0


@pytest.mark.parametrize("argv, message", [(["--device", "cuda:7"], "cuda"), (["--device", "tpu0"], "tpu0"),
                                           (["--steps", "0"], "--steps")])
def test_throughput_bad_arguments_say_what_is_wrong(argv, message, capsys):
    if argv[1].startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as exc:
        throughput.main(argv)
    text = str(exc.value.code) + capsys.readouterr().err
    assert message in text


def test_lm_speed_script_compares_same_shaped_models(tmp_path):
    pytest.importorskip("transformers")
    import lm_speed

    out = tmp_path / "lm_speed.json"
    assert lm_speed.main(["--quick", "--steps", "1", "--repeats", "1", "--threads", "1", "--json", str(out)]) == 0
    info = json.loads(out.read_text())
    for family in ("gpt2", "llama"):
        ours, hf = f"ours-{family}", f"HF-{family}"
        assert info["params"][ours] == info["params"][hf]  # the same shape on both sides
        assert info["max_logit_diff"][family] < 1e-4  # and the same function
        assert info["generation"][ours]["same_tokens_as_hf"]
        for name in (ours, hf):
            assert info["training"][name]["ms_per_step"] > 0 and info["generation"][name]["tokens_per_s"] > 0
    assert "| LlamaForCausalLM |" in info["markdown"]
