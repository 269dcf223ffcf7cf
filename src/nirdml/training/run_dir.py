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
    OUT/.nirdml                nirdml's marker: this folder is a run (``nirdml.owned``)

The trainer writes through it, the report and ``--resume`` read through it; text files are
written atomically (``nirdml.files``). A folder is a run only when it carries the marker (or,
written by an older nirdml, a nirdml checkpoint beside its ``config.yaml``): nirdml never
writes a run into, resumes or clears a folder it did not create.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nirdml.errors import ConfigError
from nirdml.files import atomic_write_text
from nirdml.owned import check_folder, claim_folder, marker_kind, remove_owned

KIND = "run"
#: the files and folders a run writes (what :meth:`RunDir.reset` and :meth:`RunDir.discard` may
#: remove; anything else in the folder is left alone)
_CHECKPOINT_NAMES = ("last.pt", "best.pt", "last.pt.prev", "best.pt.prev", "last.pt.tmp",
                     "best.pt.tmp")


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
        """Whether the folder holds a training run (nirdml's marker, or an older nirdml's
        checkpoint beside its config)."""
        return marker_kind(self.root) == KIND or self._legacy()

    def _legacy(self) -> bool:
        """A run folder written before the marker: config.yaml and a nirdml checkpoint."""
        if marker_kind(self.root) is not None or not self.config.is_file():
            return False
        try:
            with open(self.checkpoint(), "rb") as fh:
                return fh.read(6) == b"NIRDML"
        except OSError:
            return False

    # ---- writing ------------------------------------------------------------------------------
    def check(self, resume: bool) -> bool:
        """Check, writing nothing, that a run may start (``resume=False``) or continue here:
        one-line ConfigError for a file, a folder nirdml did not write, an unwritable path, a
        new run over a finished or started one, or a resume with nothing to resume. Returns
        whether the folder is a run of ours already."""
        ours = check_folder(self.root, KIND, "--out", legacy=self._legacy())
        if not resume and self.checkpoint().exists():
            raise ConfigError(f"{str(self.root)!r} already holds a run; continue it with "
                              f"--resume or choose a new --out")
        if resume and not self.checkpoint().exists():
            raise ConfigError(f"--resume: no checkpoint in {str(self.checkpoints)!r}")
        return ours

    def create(self) -> None:
        """Make the folder a run folder (marker, ``checkpoints/``) after :meth:`check`."""
        claim_folder(self.root, KIND, "--out", legacy=self._legacy())
        try:
            self.checkpoints.mkdir(exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"output directory {str(self.root)!r} is not writable "
                              f"({exc.strerror}); choose another with --out") from None

    def _own_files(self) -> list[str]:
        names = ["config.yaml", "metrics.jsonl", "final.json", "wandb_id", "report.html"]
        names += [f"checkpoints/{n}" for n in _CHECKPOINT_NAMES] + ["checkpoints"]
        if self.tensorboard.is_dir():
            names += [f"tensorboard/{p.name}" for p in self.tensorboard.iterdir()
                      if p.name.startswith("events.out.tfevents.")]
        return [*names, "tensorboard"]

    def reset(self) -> None:
        """Before a fresh start in a run folder of ours that never wrote a checkpoint (a start
        that failed or was stopped early): remove what that start wrote, keep the marker."""
        remove_owned(self.root, self._own_files(), remove_folder=False, keep_marker=True)

    def discard(self, remove_folder: bool = True) -> None:
        """Undo a start that failed before its first checkpoint: remove what it wrote, the
        marker, and (``remove_folder``: nirdml made it) the folder when nothing else is in
        it."""
        remove_owned(self.root, self._own_files(), remove_folder)

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
