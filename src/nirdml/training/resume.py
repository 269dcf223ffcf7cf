"""What may change when a run is resumed: the run's own config is the truth.

``nirdml train --out RUN --resume`` continues with the config saved in ``RUN``'s checkpoint.
A config or ``--set`` given with ``--resume`` must agree with it, except for the keys in
:data:`RESUMABLE_CHANGES`, which do not change what the run computes (where the data lives,
how it is loaded and logged, on which device) or extend it (more epochs). Anything else would
silently mix two different runs in one folder, so it is refused, listing the differences,
before anything is written.
"""

from __future__ import annotations

from typing import Any

from nirdml.errors import ConfigError
from nirdml.training.config import Config

#: config keys a resumed run may change (``train.epochs`` only upwards)
RESUMABLE_CHANGES = frozenset({
    "train.epochs", "train.device", "train.progress", "train.tensorboard", "train.wandb",
    "train.wandb_project", "data.root", "data.num_workers", "data.eval_batch_size",
    "data.feature_cache", "train.keep_host_memory",
})


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and not key == "options":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(saved: Config, given: Config) -> dict[str, tuple[Any, Any]]:
    """``key -> (saved value, given value)`` for every leaf key that differs."""
    a, b = _flat(saved.to_dict()), _flat(given.to_dict())
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def check_resume_config(saved: Config, given: Config, run_dir: str, epochs_done: int) -> None:
    """Raise ConfigError unless ``given`` may continue the run that ``saved`` describes."""
    diffs = {k: v for k, v in config_differences(saved, given).items()
             if k not in RESUMABLE_CHANGES}
    if diffs:
        listed = "; ".join(f"{k}: {old!r} in the run, {new!r} given"
                           for k, (old, new) in diffs.items())
        raise ConfigError(
            f"--resume: the given config differs from the one {run_dir!r} was trained with "
            f"({listed}). Resume with the run's own config (nirdml train --out {run_dir} "
            f"--resume, no --config/--set), or start a new run with another --out")
    if given.train.epochs < epochs_done:
        raise ConfigError(
            f"--resume: train.epochs={given.train.epochs} but {run_dir!r} has already trained "
            f"{epochs_done} epochs; train.epochs may only grow when resuming")
