"""``RunDir``: the layout of a training run's output folder, in one place.

::

    OUT/config.yaml            the resolved configuration
    OUT/metrics.jsonl          one JSON line per epoch (loss terms, lr, throughput, validation)
    OUT/checkpoints/last.pt    model, proxies, flow, optimiser, scheduler, sampler and RNG state
    OUT/checkpoints/best.pt    the checkpoint selected on the validation classes
    OUT/final.json             test metrics of the selected checkpoint
    OUT/tensorboard/           TensorBoard event files
    OUT/wandb_id, OUT/wandb/   the Weights & Biases run (``train.wandb=true``)
    OUT/analysis/              ``nirdml analyze`` output, read by the report
    OUT/report.html            ``nirdml report``'s default output

The trainer writes through it, the report and ``--resume`` read through it; text files are
written atomically (``nirdml.files``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nirdml.errors import ConfigError
from nirdml.files import atomic_write_text


class RunDir:
    """The output folder of one training run (see the module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # ---- the layout ---------------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def final(self) -> Path:
        return self.root / "final.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, name: str = "last.pt") -> Path:
        return self.checkpoints / name

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def wandb_id(self) -> Path:
        return self.root / "wandb_id"

    @property
    def analysis(self) -> Path:
        return self.root / "analysis"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    def is_run(self) -> bool:
        """Whether the folder holds a training run (its metrics log)."""
        return self.metrics.is_file()

    # ---- writing ------------------------------------------------------------------------------
    def prepare(self, resume: bool) -> None:
        """Create the folder (one-line ConfigError if it cannot be written); refuse to start a
        new run over an existing one, or to resume where there is nothing to resume."""
        try:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"output directory {str(self.root)!r} is not writable "
                              f"({exc.strerror}); choose another with --out") from None
        if not resume and self.checkpoint().exists():
            raise ConfigError(f"{str(self.root)!r} already holds a run; continue it with "
                              f"--resume or choose a new --out")
        if resume and not self.checkpoint().exists():
            raise ConfigError(f"--resume: no checkpoint in {str(self.checkpoints)!r}")

    def write_config(self, config) -> None:
        atomic_write_text(self.config, config.to_yaml())

    def append_record(self, record: dict[str, Any]) -> None:
        with open(self.metrics, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def write_final(self, final: dict[str, Any]) -> None:
        atomic_write_text(self.final, json.dumps(final, indent=2) + "\n")

    # ---- reading ------------------------------------------------------------------------------
    def records(self) -> list[dict[str, Any]]:
        """The records of ``metrics.jsonl`` (unparseable lines are skipped)."""
        records = []
        if not self.metrics.is_file():
            return records
        for line in self.metrics.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records
