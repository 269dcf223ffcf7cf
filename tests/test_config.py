"""Typed configs: YAML round trip, dotted overrides, clear errors, shipped configs all valid."""

import pytest

from nirdml.errors import ConfigError
from nirdml.training.config import Config, available_configs, load_config


def test_defaults_are_the_release_recipe():
    cfg = Config()
    assert (cfg.model.name, cfg.model.embedding_dim, cfg.optim.lr) == ("resnet50", 128, 1e-5)
    assert (cfg.data.batch_size, cfg.data.samples_per_class) == (90, 2)
    assert cfg.loss.nir.enabled and cfg.loss.nir.mode == "release"


def test_yaml_round_trip(tmp_path):
    cfg = Config().with_overrides(["loss.nir.weight=0.01", "eval.recall_ks=[1,10]"])
    cfg.to_yaml(tmp_path / "c.yaml")
    again = Config.from_yaml(tmp_path / "c.yaml")
    assert again == cfg
    assert again.loss.nir.weight == 0.01 and again.eval.recall_ks == [1, 10]


def test_overrides_parse_types():
    cfg = Config().with_overrides([
        "optim.lr=3e-4", "train.epochs=7", "model.pretrained=false", "optim.grad_clip=null",
        "data.options.download=true", "loss.options.alpha=16",
    ])
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.epochs == 7 and cfg.model.pretrained is False
    assert cfg.optim.grad_clip is None
    assert cfg.data.options == {"download": True} and cfg.loss.options == {"alpha": 16}


@pytest.mark.parametrize(
    "override, words",
    [
        ("loss.nir.mode=banana", ["loss.nir.mode", "'release'", "'paper'"]),
        ("train.amp=fp8", ["train.amp", "'bf16'"]),
        ("data.batchsize=4", ["data.batchsize", "batch_size"]),
        ("nope.x=1", ["nope", "allowed keys"]),
        ("train.epochs=abc", ["train.epochs", "integer"]),
        ("train.epochs=0", ["train.epochs", ">= 1"]),
        ("data.batch_size=91", ["data.batch_size", "multiple"]),
        ("loss.name=sphereface", ["loss.name", "proxy_anchor"]),
        ("optim.lr", ["key.sub=value"]),
        ("loss.nir.mode=flowy", ["loss.nir.mode", "'selfnorm'", "'disc'"]),
        ("loss.nir.noise=-0.1", ["loss.nir.noise", ">= 0"]),
        ("loss.nir.base_scale=big", ["loss.nir.base_scale", "'sphere'", "'learned'"]),
        ("loss.nir.warmup_epochs=100", ["loss.nir.warmup_epochs", "shorter than the run"]),
        ("loss.nir.negatives=0", ["loss.nir.negatives", ">= 1"]),
    ],
)
def test_bad_values_name_the_key_and_the_choices(override, words):
    with pytest.raises(ConfigError) as err:
        Config().with_overrides([override])
    for w in words:
        assert w in str(err.value)


def test_unknown_key_in_yaml(tmp_path):
    (tmp_path / "c.yaml").write_text("data:\n  nmae: cub200\n")
    with pytest.raises(ConfigError, match="data.nmae"):
        Config.from_yaml(tmp_path / "c.yaml")


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Config.from_yaml(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        Config.from_yaml(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="shipped"):
        load_config("no_such_config")


def test_every_shipped_config_is_valid():
    names = available_configs()
    # digits, omniglot, and the paper grid: 3 datasets x 2 dims x (3 losses x with/without NIR
    # + 2 DoublePool rows + 1 control); tests/test_paper_configs.py pins their values
    assert "digits" in names and "omniglot_pa_nir" in names
    assert sum(n.startswith(("cub200_", "cars196_", "sop_")) for n in names) == 54
    for name in names:
        cfg = load_config(name)
        assert cfg.data.batch_size % cfg.data.samples_per_class == 0
    sop = load_config("sop_pa_nir_512")
    assert (sop.model.embedding_dim, sop.loss.nir.weight, sop.optim.milestones) == (
        512, 0.3, [140, 230])
    assert load_config("cub200_pa_128").loss.proxy_lr_multiplier == 2000.0
