"""``nirdml tune``: the search space, its checks against the config, and an Optuna study on
digits that survives an interruption and whose best config reproduces its score."""

from __future__ import annotations

import json
import sys

import pytest

from nirdml.cli import main
from nirdml.errors import ConfigError
from nirdml.selection.search_space import apply_params, load_space, parse_param, validate_space
from nirdml.training.config import load_config

# digits, quick: 2 folds of its 5 training classes, 1 epoch, no NIR
QUICK = ["loss.nir.enabled=false", "train.epochs=1", "train.progress=false",
         "train.tensorboard=false", "train.probe_classes=0", "train.device=cpu",
         "data.batch_size=16", "data.samples_per_class=8", "eval.recall_ks=[1, 2]",
         "eval.metrics=[recall, map@r, nmi]"]
SPACE = """\
optim.lr: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}
loss.options.delta: {type: float, low: 0.05, high: 0.2}
loss.options.alpha: {type: categorical, choices: [16, 32]}
"""


def _space(tmp_path, text=SPACE):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("spec", "words"), [
    ({"type": "gaussian"}, ["type must be one of", "float, int, categorical"]),
    ({"type": "float", "low": 1.0}, ["needs low and high"]),
    ({"type": "float", "low": 2.0, "high": 1.0}, ["low must be < high"]),
    ({"type": "float", "low": 0.0, "high": 1.0, "log": True}, ["log scale needs low > 0"]),
    ({"type": "int", "low": 1.5, "high": 4}, ["integer"]),
    ({"type": "float", "low": "a", "high": 1.0}, ["low must be a number"]),
    ({"type": "float", "low": 0.1, "high": 1.0, "log": True, "step": 0.1}, ["log and step"]),
    ({"type": "categorical"}, ["non-empty list 'choices'"]),
    ({"type": "categorical", "choices": [[1, 2]]}, ["choices must be"]),
    ({"type": "categorical", "choices": [1], "low": 0}, ["only choices"]),
    ({"type": "float", "low": 0.1, "high": 1.0, "scale": 2}, ["unknown field", "scale"]),
    ("0.1..1.0", ["expected a mapping"]),
])
def test_bad_space_entries_name_the_key_and_the_problem(spec, words):
    with pytest.raises(ConfigError) as err:
        parse_param("optim.lr", spec)
    assert "'optim.lr'" in str(err.value)
    for w in words:
        assert w in str(err.value)


def test_space_file_and_yaml_numbers(tmp_path):
    space = load_space(_space(tmp_path, "optim.lr: {type: float, low: 1e-4, high: 1e-2, "
                                        "log: true}\ntrain.epochs: {type: int, low: 1, high: 3}\n"))
    assert space["optim.lr"].low == 1e-4 and space["optim.lr"].log  # YAML 1.1 '1e-4' string
    assert space["train.epochs"].type == "int"
    with pytest.raises(ConfigError, match="must map config keys"):
        load_space(_space(tmp_path, "[1, 2]\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_space(tmp_path / "nope.yaml")


@pytest.mark.parametrize(("line", "words"), [
    ("optim.lrr: {type: float, low: 0.1, high: 1}", ["optim.lrr", "allowed keys here", "lr"]),
    ("data.folds: {type: int, low: 2, high: 4}", ["set by --folds"]),
    ("data.batch_size: {type: categorical, choices: [16, 91]}", ["91", "multiple"]),
    ("train.epochs: {type: float, low: 0.5, high: 2}", ["train.epochs", "integer"]),
    ("loss.options.margin: {type: float, low: 0.1, high: 0.3}",
     ["proxy_anchor", "invalid key loss.options.margin", "alpha, delta"]),
    ("loss.name: {type: categorical, choices: [proxy_anchor, triplet]}",
     ["triplet", "class proxies"]),
    ("data.options.zoom: {type: float, low: 1, high: 2}",
     ["data.options.zoom", "data.name='digits'"]),
])
def test_every_key_is_checked_against_the_config_before_any_trial(tmp_path, line, words):
    cfg = load_config("digits", QUICK[:1] if "triplet" not in line else [])
    with pytest.raises(ConfigError) as err:
        validate_space(load_space(_space(tmp_path, line + "\n")), cfg)
    for w in words:
        assert w in str(err.value)


def test_apply_params_sets_native_values():
    cfg = load_config("digits", ["loss.nir.enabled=false"])
    out = apply_params(cfg, {"optim.lr": 1e-5, "loss.options.delta": 1e-05,
                             "data.samples_per_class": 4})
    assert out.optim.lr == 1e-5 and out.loss.options == {"delta": 1e-05}
    assert isinstance(out.loss.options["delta"], float) and out.data.samples_per_class == 4
    assert cfg.optim.lr != 1e-5  # the base config is untouched


def test_missing_optuna_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna -> ImportError
    code = main(["tune", "--space", str(_space(tmp_path)), "--trials", "1",
                 "--out", str(tmp_path / "t")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "pip install 'nirdml[tune]'" in err


@pytest.mark.slow
def test_tune_survives_an_interruption_and_its_best_config_reproduces_its_score(
        tmp_path, monkeypatch, capsys):
    optuna = pytest.importorskip("optuna")
    from nirdml.selection.crossval import crossval
    from nirdml.training.trainer import Interrupted, Trainer

    monkeypatch.setenv("NIRDML_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "tune"
    argv = ["tune", "--config", "digits", "--space", str(_space(tmp_path)), "--trials", "3",
            "--folds", "2", "--out", str(out)]
    for o in QUICK:
        argv += ["--set", o]

    # 1. stopped in the second trial's first fold, after its checkpoint (as on SIGINT)
    original, saves = Trainer._save, []

    def stop_third_run(self, name):
        original(self, name)
        if name == "last.pt":
            saves.append(self.out)
            if len(saves) == 3:
                raise Interrupted("stopped by signal 2 (simulated)")

    monkeypatch.setattr(Trainer, "_save", stop_third_run)
    assert main(argv) == 2
    assert "run the same nirdml tune command again" in capsys.readouterr().err
    monkeypatch.setattr(Trainer, "_save", original)
    storage = f"sqlite:///{out / 'study.db'}"
    trials = optuna.load_study(study_name="nirdml", storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL"]
    assert trials[1].user_attrs["failure"] == "interrupted"

    # 2. the same command continues the study: the stopped trial again (same parameters, its
    # stopped fold resumed from its checkpoint), then new ones up to 3 complete trials
    assert main(argv) == 0
    trials = optuna.load_study(study_name="nirdml", storage=storage).trials
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 3 and len(trials) == 4
    retry = trials[2]
    assert retry.user_attrs["retry_of"] == 1 and retry.params == trials[1].params
    assert retry.user_attrs["fold_status"] == ["resumed", "trained"]
    assert trials[0].user_attrs["fold_status"] == ["trained", "trained"]
    summary = json.loads((out / "tune.json").read_text())
    best = max(complete, key=lambda t: t.value)
    assert summary["best"]["number"] == best.number and len(summary["trials"]) == 4

    # 3. nothing left to do; another setup in the same folder is refused
    assert main(argv) == 0
    assert len(optuna.load_study(study_name="nirdml", storage=storage).trials) == 4
    capsys.readouterr()
    assert main([*argv, "--set", "optim.weight_decay=0.01"]) == 2
    assert "holds a search with another config" in capsys.readouterr().err

    # 4. best.yaml is a plain config that reproduces the best trial's score
    assert main(["train", "--config", str(out / "best.yaml"), "--print-config"]) == 0
    cfg = load_config(out / "best.yaml")
    for key, value in best.params.items():
        section, _, name = key.rpartition(".")
        node = cfg
        for part in section.split("."):
            node = getattr(node, part) if not isinstance(node, dict) else node[part]
        assert (node[name] if isinstance(node, dict) else getattr(node, name)) == value
    again = crossval(cfg, 2, tmp_path / "again", ensemble=False)
    assert again["val"]["mean"]["recall@1"] == pytest.approx(best.value, rel=1e-12)


def test_stopped_trials_are_retried_once_and_failed_ones_not():
    optuna = pytest.importorskip("optuna")
    from nirdml.selection.tune import retry_stopped_trials

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(direction="maximize")
    for failure in (None, "interrupted", "TrainingError: 20 consecutive steps"):
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        if failure is not None:  # None: a process killed outright, failed by the heartbeat
            trial.set_user_attr("failure", failure)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    assert retry_stopped_trials(study) == [0, 1]
    assert retry_stopped_trials(study) == []  # once
    waiting = [t for t in study.trials if t.state.name == "WAITING"]
    assert [t.user_attrs["retry_of"] for t in waiting] == [0, 1]
    assert [t.system_attrs["fixed_params"] for t in waiting] == [study.trials[0].params,
                                                                 study.trials[1].params]
    # a parameter set already waiting (or running, or done) is not queued twice
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    study.enqueue_trial(trial.params)
    assert retry_stopped_trials(study) == []
