"""Test helpers shared by several modules."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest runs two workers (pyproject.toml): one intra-op thread each keeps them off each
    # other's core; subprocesses the tests start set OMP_NUM_THREADS themselves
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one intra-op thread is faster, and immune to a busy second core."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An untrained digits checkpoint (:func:`save_untrained_digits_checkpoint`), one per test
    module (a module may define its own ``checkpoint`` instead)."""
    path = tmp_path_factory.mktemp("ck") / "best.pt"
    save_untrained_digits_checkpoint(path)
    return path


def refused(capsys, argv, *words) -> str:
    """``nirdml.cli.main(argv)`` fails (exit 2) with one line on stderr, no traceback, holding
    every one of ``words``; returns that line."""
    from nirdml.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    for word in words:
        assert word in err[0], err[0]
    return err[0]


def save_untrained_digits_checkpoint(path: Path):
    """An untrained 16-d small-CNN digits checkpoint at ``path``; returns the digits splits."""
    from nirdml.models import build_model
    from nirdml.training import builders
    from nirdml.training.checkpoint import save_checkpoint
    from nirdml.training.config import load_config

    cfg = load_config("digits", ["model.embedding_dim=16"])
    splits = builders.build_splits(cfg)
    in_chans = int(splits.test[0][0].shape[0])
    model = build_model("small_cnn", embedding_dim=16, in_chans=in_chans)
    save_checkpoint({"config": cfg.to_dict(), "model": model.state_dict(), "in_chans": in_chans,
                     "image_kind": splits.image_kind, "epoch": 1}, path)
    return splits


# ---- optional test oracles and shared data -----------------------------------------------------
#: True in CI (which sets CI): there every oracle of the [dev] extra is installed and ../shared
#: is beside the checkout, so a missing one is a broken set-up, and a test that needs it fails
#: instead of skipping.
IN_CI = bool(os.environ.get("CI"))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def need(module: str):
    """Import an optional test dependency (an oracle of the [dev] extra): skip the calling test
    when it is missing on a developer's machine, fail in CI."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if IN_CI:
            pytest.fail(f"{module} is missing in CI ({exc}); .ci/run installs '.[dev]'")
        pytest.skip(f"{module} is not installed (pip install -e '.[dev]')")


def need_program(*names: str) -> str:
    """The path of the first program of ``names`` on PATH: skip when none is, fail in CI."""
    import shutil

    for name in names:
        found = shutil.which(name)
        if found:
            return found
    if IN_CI:
        pytest.fail(f"{' or '.join(names)} is missing in CI; .ci/run installs it")
    pytest.skip(f"{' or '.join(names)} is not installed")


def need_shared(relative: str) -> Path:
    """A file or folder under ``../shared/data``: skip when absent, fail in CI."""
    path = SHARED_DATA / relative
    if not path.exists():
        if IN_CI:
            pytest.fail(f"{path} is missing in CI (../shared must sit beside the checkout)")
        pytest.skip(f"{path} is not present")
    return path


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` imported as a module (the scripts are not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
