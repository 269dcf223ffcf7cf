"""``--help`` of every command: defaults shown once, of what actually runs, every option said."""

from __future__ import annotations

import re

import pytest

from nirdml.cli import COMMANDS, main


def _help(capsys, *argv):
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return capsys.readouterr().out


@pytest.mark.parametrize("argv", [[c] for c in COMMANDS if c != "index"]
                         + [["index", "build"], ["index", "info"]])
def test_every_option_has_help_and_defaults_appear_once(argv, capsys):
    text = _help(capsys, *argv)
    options = text.split("options:", 1)[1].split("config keys", 1)[0]
    assert "(default: test) (default: test)" not in options
    for block in re.split(r"\n  (?=-)", options)[1:]:
        assert block.count("(default") <= 1, block
        flags, _, desc = block.partition("  ")
        assert desc.strip() or "\n" in block, f"{argv}: option without help: {block!r}"


def test_train_help_shows_the_defaults_of_the_run_it_does(capsys):
    text = _help(capsys, "train")
    keys = text.split("config keys", 1)[1]
    assert re.search(r"data\.name\s+'digits'", keys)
    assert re.search(r"model\.name\s+'small_cnn'", keys)
    assert re.search(r"train\.epochs\s+15", keys)
    assert "'cub200'" not in keys and "'resnet50'" not in keys
