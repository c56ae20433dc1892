import pytest

from transformer_ln import ConfigError, ModelConfig, RunConfig, load_run_config
from transformer_ln.config import apply_overrides


def test_model_config_defaults_match_the_interface():
    cfg = ModelConfig(src_vocab_size=100, tgt_vocab_size=120)
    assert (cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.n_enc_layers, cfg.n_dec_layers) == (512, 8, 2048, 6, 6)
    assert (cfg.dropout, cfg.attn_dropout, cfg.act_dropout) == (0.1, 0.0, 0.0)
    assert (cfg.activation, cfg.residual, cfg.admin_omega) == ("relu", "post_ln", "profile")
    assert (cfg.share_embeddings, cfg.max_positions, cfg.pad_id) == (False, 1024, 0)


@pytest.mark.parametrize("field,value", [
    ("d_model", 100),          # not divisible by n_heads=8
    ("d_model", 0),
    ("n_heads", -1),
    ("d_ff", 0),
    ("n_enc_layers", 0),
    ("n_dec_layers", -2),
    ("src_vocab_size", 0),
    ("max_positions", 0),
    ("dropout", 1.0),
    ("dropout", -0.1),
    ("attn_dropout", 1.5),
    ("act_dropout", -0.5),
    ("activation", "swish"),
    ("residual", "deep_norm"),
    ("admin_omega", "O(n^2)"),
    ("d_model", "big"),
    ("share_embeddings", "yes"),
])
def test_bad_model_config_names_the_field(field, value):
    kw = dict(src_vocab_size=100, tgt_vocab_size=100)
    kw[field] = value
    with pytest.raises(ValueError) as e:
        ModelConfig(**kw)
    assert field in str(e.value)
    assert repr(value) in str(e.value) or str(value) in str(e.value)


def test_to_dict_from_dict_and_yaml_round_trip():
    cfg = ModelConfig(src_vocab_size=10, tgt_vocab_size=10, residual="admin", admin_omega="O(1)", d_model=64,
                      n_heads=4)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig.from_yaml(cfg.to_yaml()) == cfg
    run = RunConfig.from_dict({"model": {"residual": "pre_ln"}, "optim": {"lr": 1e-3, "betas": [0.9, 0.99]}})
    again = RunConfig.from_yaml(run.to_yaml())
    assert again == run and again.optim.betas == (0.9, 0.99)


def test_unknown_keys_are_errors():
    with pytest.raises(ConfigError, match="dmodel"):
        ModelConfig.from_dict({"src_vocab_size": 5, "tgt_vocab_size": 5, "dmodel": 3})
    with pytest.raises(ConfigError, match="model.n_layers"):
        RunConfig.from_dict({"model": {"n_layers": 3}})
    with pytest.raises(ConfigError, match="modle"):
        RunConfig.from_dict({"modle": {}})


def test_dotted_overrides_are_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  d_model: 64\n  n_heads: 4\ntrain:\n  max_updates: 10\n")
    cfg = load_run_config(path, ["model.residual=admin", "optim.lr=7e-4", "train.max_updates=200",
                                 "model.share_embeddings=true"])
    assert cfg.model.residual == "admin" and cfg.model.d_model == 64
    assert cfg.optim.lr == pytest.approx(7e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.train.max_updates == 200 and cfg.model.share_embeddings is True
    with pytest.raises(ConfigError, match="optim.lr"):
        load_run_config(None, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="model.depth"):
        load_run_config(None, ["model.depth=3"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_run_config(None, ["model.residual"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "missing.yaml")


def test_overrides_do_not_mutate_their_input():
    base = {"model": {"d_model": 64}}
    out = apply_overrides(base, ["model.d_model=128"])
    assert base["model"]["d_model"] == 64 and out["model"]["d_model"] == 128
