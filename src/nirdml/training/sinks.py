"""Where a training run's per-epoch records go: one ``log(record, step)`` for every sink.

:class:`EpochLog` fans a record out to the sinks the config asks for -- the run's
``metrics.jsonl`` (always), the console (``train.progress``), TensorBoard
(``train.tensorboard``; silently off when the package is missing) and Weights & Biases
(``train.wandb``; a ConfigError naming ``pip install wandb`` when it is missing) -- and gives
the final test metrics to the sinks that keep a summary.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from nirdml.console import epoch_line
from nirdml.errors import ConfigError
from nirdml.evaluation.core import is_headline
from nirdml.files import atomic_write_text
from nirdml.training.run_dir import RunDir


def _numbers(record: dict[str, Any], skip: tuple[str, ...] = ()) -> dict[str, float]:
    return {k: v for k, v in record.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k not in skip}


class JsonlSink:
    """Appends each record to ``metrics.jsonl``."""

    def __init__(self, run_dir: RunDir):
        self.run_dir = run_dir

    def log(self, record: dict[str, Any], step: int) -> None:
        self.run_dir.append_record(record)

    def close(self, final: dict[str, Any] | None) -> None:
        pass


class ConsoleSink:
    """One line per epoch on stderr: loss terms, then validation/test metrics in percent."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def log(self, record: dict[str, Any], step: int) -> None:
        print(epoch_line(record, self.epochs, show=lambda key: is_headline(key, brief=True)),
              file=sys.stderr)

    def close(self, final: dict[str, Any] | None) -> None:
        pass


class TensorBoardSink:
    """Scalars of each record at step = epoch; off when tensorboard is not installed."""

    def __init__(self, run_dir: RunDir):
        self.run_dir = run_dir
        self.writer = None
        self.available = True

    def log(self, record: dict[str, Any], step: int) -> None:
        if self.writer is None and self.available:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: skip silently
                self.available = False
                return
            self.writer = SummaryWriter(str(self.run_dir.tensorboard))
        if self.writer is None:
            return
        for k, v in _numbers(record, ("epoch", "time/wall")).items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self, final: dict[str, Any] | None) -> None:
        if self.writer is not None:
            self.writer.close()


class WandbSink:
    """A Weights & Biases run (continued on ``--resume`` through ``OUT/wandb_id``)."""

    def __init__(self, run_dir: RunDir, config):
        try:
            import wandb
        except ImportError:
            raise ConfigError("train.wandb=true needs the wandb package: pip install wandb "
                              "(or set train.wandb=false)") from None
        id_file = run_dir.wandb_id
        if id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            run_id = wandb.util.generate_id()
            atomic_write_text(id_file, run_id + "\n")
        self.run = wandb.init(project=config.train.wandb_project, name=run_dir.root.name,
                              id=run_id, resume="allow", dir=str(run_dir.root),
                              config=config.to_dict())

    def log(self, record: dict[str, Any], step: int) -> None:
        self.run.log(_numbers(record, ("epoch",)), step=step)

    def close(self, final: dict[str, Any] | None) -> None:
        if final is not None:
            self.run.summary.update({f"final/{k}": v for k, v in _numbers(final).items()})
        self.run.finish()


class EpochLog:
    """The sinks of one run; ``log(record, step)`` and ``close(final)`` reach all of them."""

    def __init__(self, sinks: list):
        self.sinks = list(sinks)

    @classmethod
    def for_run(cls, config, run_dir: RunDir, is_main: bool) -> EpochLog:
        """The sinks ``config.train`` asks for (none on ranks other than the main one)."""
        if not is_main:
            return cls([])
        sinks: list = [JsonlSink(run_dir)]
        if config.train.tensorboard:
            sinks.append(TensorBoardSink(run_dir))
        if config.train.wandb:
            sinks.append(WandbSink(run_dir, config))
        if config.train.progress:
            sinks.append(ConsoleSink(config.train.epochs))
        return cls(sinks)

    def log(self, record: dict[str, Any], step: int) -> None:
        """Stamp ``record`` with the wall-clock time (``time/wall``) and hand it to every
        sink."""
        record["time/wall"] = time.time()
        for sink in self.sinks:
            sink.log(record, step)

    def close(self, final: dict[str, Any] | None = None) -> None:
        for sink in self.sinks:
            sink.close(final)
