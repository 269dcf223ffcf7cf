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
        "data.name=omniglot", "data.options.download=true", "loss.options.alpha=16",
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
        ("loss.nir.negatives=4", ["loss.nir.negatives", "loss.nir.mode=disc"]),
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


@pytest.mark.parametrize("overrides, words", [
    (["data.name=cifar10"], ["invalid value for data.name: 'cifar10'", "'omniglot'", "'folder'"]),
    (["data.options.max_class=3"], ["data.options.max_class", "data.name='digits'",
                                    "train_digits"]),
    (["model.name=resnet51"], ["invalid value for model.name: 'resnet51'", "'resnet50'",
                               "'timm:<model name>'"]),
    (["model.options.widht=32"], ["model.options.widht", "width"]),
    (["loss.name=proxy_anchr"], ["invalid value for loss.name", "'proxy_anchor'"]),
    (["loss.options.alfa=16"], ["loss.options.alfa", "loss.name='proxy_anchor'", "alpha"]),
    (["loss.nir.mode=release2"], ["loss.nir.mode", "'paper'", "'kl'"]),
    (["loss.nir.noise_kind=salt"], ["loss.nir.noise_kind", "'gaussian'", "'uniform'"]),
    (["loss.nir.cond_mode=nowhere"], ["loss.nir.cond_mode", "'dense_embed'"]),
    (["loss.nir.nll_weight=0.5"], ["loss.nir.nll_weight", "loss.nir.mode=disc"]),
    (["loss.nir.mode=disc", "loss.nir.negatives=0"], ["loss.nir.negatives: 0", ">= 1"]),
    (["loss.nir.weight=-1"], ["loss.nir.weight: -1.0", ">= 0"]),
    (["loss.nir.flow_lr_multiplier=-2"], ["loss.nir.flow_lr_multiplier", ">= 0"]),
    (["loss.nir.num_blocks=0"], ["loss.nir.num_blocks: 0", ">= 1"]),
    (["loss.nir.subnet_depth=1"], ["loss.nir.subnet_depth: 1", ">= 2"]),
    (["loss.nir.clamp=0"], ["loss.nir.clamp", "> 0"]),
    (["loss.sample_rate=0"], ["invalid value for loss.sample_rate", "in (0, 1]"]),
    (["loss.sample_rate=1.5"], ["invalid value for loss.sample_rate", "in (0, 1]"]),
    (["data.train_classes=1"], ["invalid value for data.train_classes", ">= 2"]),
    (["loss.name=triplet", "loss.nir.enabled=false", "loss.proxy_lr_multiplier=null",
      "loss.shard=true"], ["loss.shard=true", "pair-based", "proxy_anchor"]),
    (["loss.name=contrastive", "loss.nir.enabled=false", "loss.proxy_lr_multiplier=null",
      "loss.sample_rate=0.1"], ["loss.sample_rate=0.1", "pair-based", "loss.sample_rate=1"]),
    (["loss.options.shard=true"], ["loss.options.shard", "allowed keys there"]),
    (["eval.metrics=[recal]"], ["invalid value for eval.metrics", "'recal'", "map@r"]),
    (["train.select_on=val", "train.selection_metric=recall@3"],
     ["train.selection_metric: 'recall@3'", "'recall@1'", "'map@r'"]),
])
def test_every_kind_of_setting_is_checked_before_any_data_is_read(monkeypatch, overrides,
                                                                   words):
    """A wrong name, option key, option value or range anywhere in a config is one ConfigError
    naming the key and what is allowed, raised while the config is built: before the dataset
    is opened (its loader is replaced by one that fails the test) and in well under a second
    once the modules are imported."""
    import time

    import nirdml.data.datasets.core as core

    def no_data(*args, **kwargs):
        raise AssertionError("the dataset was opened before the config was checked")

    monkeypatch.setattr(core, "load_splits", no_data)
    load_config("digits")  # imports what validation needs
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_config("digits", overrides)
    assert time.perf_counter() - start < 1.0
    message = str(err.value)
    assert "\n" not in message
    for w in words:
        assert w in message, message


def test_a_config_check_leaves_the_random_state_alone():
    """Validation builds the objective once (so option values are checked up front) under a
    forked RNG: a run's draws are the same whether or not its config was validated."""
    import torch

    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    load_config("digits", ["loss.nir.mode=paper"])
    assert torch.equal(torch.rand(3), expected)
