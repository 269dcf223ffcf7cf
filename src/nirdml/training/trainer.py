"""The training loop: epochs of class-balanced batches, validation, selection, final test.

Everything a run produces lands in one output folder::

    OUT/config.yaml            the resolved configuration
    OUT/metrics.jsonl          one JSON line per epoch (loss terms, lr, throughput, validation)
    OUT/checkpoints/last.pt    model, proxies, flow, optimiser, scheduler, sampler and RNG state
    OUT/checkpoints/best.pt    the checkpoint selected on the validation classes
    OUT/final.json             test metrics of the selected checkpoint
    OUT/tensorboard/           TensorBoard event files
    OUT/wandb_id, OUT/wandb/   the Weights & Biases run (``train.wandb=true``), resumed with the run

Faults: a non-finite loss or gradient skips the step (counted); ``max_bad_steps`` of them in a
row stop the run with a message. A crashed data-loader worker restarts the loader at the first
batch not trained on (counted in ``data/loader_restarts``). SIGINT/SIGTERM finish the current
step, write ``last.pt`` (with the position inside the epoch) and exit; ``resume=True``
continues exactly from there.
"""

from __future__ import annotations

import json
import math
import random
import signal
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nirdml.errors import ConfigError, NirdmlError, TrainingError
from nirdml.nir.monitor import MechanismProbe, flow_state
from nirdml.training import builders
from nirdml.training.checkpoint import load_checkpoint, save_checkpoint
from nirdml.training.config import Config, load_config
from nirdml.training.distributed import DistContext
from nirdml.training.resume import check_resume_config

MAX_LOADER_RESTARTS = 5  # crashed data-loader workers tolerated per epoch


@contextmanager
def _worker_crash_held():
    """Hold PyTorch's "DataLoader worker died" check for the block; yields ``check()``.

    The loader reports a dead worker from a SIGCHLD handler, which raises in the main thread
    wherever it happens to be (mid optimiser step, for instance). Inside this block SIGCHLD only
    records that it came, and ``check()`` runs the loader's handler at a point of our choosing
    (between batches), where a crash can be answered by restarting the loader. Blocking the
    signal with ``pthread_sigmask`` is not enough: another thread (OpenMP, pin-memory) may
    receive it. While held, the loader still finds a dead worker itself within 5 s of waiting.
    """
    previous = None
    if hasattr(signal, "SIGCHLD") and threading.current_thread() is threading.main_thread():
        previous = signal.getsignal(signal.SIGCHLD)
    pending: list[int] = []

    def check() -> None:
        if pending and callable(previous):
            pending.clear()
            previous(signal.SIGCHLD, None)

    if previous is None:
        yield check
        return
    signal.signal(signal.SIGCHLD, lambda signum, frame: pending.append(signum))
    try:
        yield check
    finally:
        signal.signal(signal.SIGCHLD, previous)


def _is_worker_crash(exc: BaseException, batches) -> bool:
    """Whether ``exc``, raised by fetching a batch or by the held check, means a worker died.

    PyTorch reports a dead worker as a RuntimeError naming the "DataLoader worker"; a worker
    killed while handing over a batch instead breaks the transfer (ConnectionResetError,
    EOFError) in the main process, which only counts as a crash when a worker is in fact dead.
    """
    if isinstance(exc, RuntimeError) and "DataLoader worker" in str(exc):
        return True
    if isinstance(exc, (OSError, EOFError)):
        # the transfer breaks when the dying worker's sockets close, a moment before the
        # process is reaped, so give it a few seconds to show up as dead
        workers = getattr(batches, "_workers", [])
        deadline = time.monotonic() + 5.0
        while workers and time.monotonic() < deadline:
            if any(not w.is_alive() for w in workers):
                return True
            time.sleep(0.02)
    return False


def _shutdown_loader(batches) -> None:
    """Stop a loader iterator's workers now (and unregister them from PyTorch's SIGCHLD check),
    rather than whenever the iterator is garbage-collected."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


class Interrupted(NirdmlError):
    """Training stopped on SIGINT/SIGTERM after writing a resumable checkpoint."""


class Trainer:
    """Runs one configured training job into ``out_dir`` (see the module docstring)."""

    def __init__(self, config: Config, out_dir: str | Path, resume: bool = False,
                 dist: DistContext | None = None, resume_state: dict[str, Any] | None = None):
        self.cfg = config
        self.out = Path(out_dir)
        self.dist = dist or DistContext.from_env()
        self.resume = resume
        self._resume_state = resume_state  # last.pt, when the caller has read it already
        self._stop_signal: int | None = None
        self.device = self.dist.device if self.dist.enabled else builders.resolve_device(
            config.train.device)
        if self.device.type != "cuda" and config.train.amp == "fp16":
            raise ConfigError("train.amp=fp16 needs CUDA; use train.amp=bf16 or none on the CPU")
        self._prepare_output()
        self._wandb_run = self._start_wandb() if config.train.wandb and self.dist.is_main else None
        builders.seed_everything(config.seed)
        if config.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)

        self.splits = builders.build_splits(config)
        self.unreadable = dict(self.splits.unreadable_dropped)  # {split: files left out}
        if self.unreadable and self.dist.is_main:
            print("left out unreadable image files (data.on_error=skip): " + ", ".join(
                f"{n} from {split}" for split, n in self.unreadable.items()), file=sys.stderr)
        self.in_chans = int(self.splits.train[0][0].shape[0])
        self.preprocessing = builders.measure_preprocessing(config, self.splits, self.in_chans)
        self.model = builders.build_model(config, in_chans=self.in_chans).to(self.device)
        if config.model.frozen_backbone:
            self.splits = self._feature_splits()
        self.criterion = builders.build_criterion(config, self.splits.train.num_classes).to(
            self.device)
        self.optimizer = builders.build_optimizer(config, self.model, self.criterion)
        self.scheduler = builders.build_scheduler(config, self.optimizer)
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.train.amp == "fp16")
        from nirdml.data import ClassBalancedBatchSampler

        self.sampler = ClassBalancedBatchSampler(
            self.splits.train.labels, config.data.batch_size, config.data.samples_per_class,
            seed=config.seed, num_replicas=self.dist.world_size, rank=self.dist.rank)
        self.train_model = self.dist.wrap_model(self.model)
        self.train_criterion = self.dist.wrap_criterion(self.criterion)
        self.probe = self._build_probe() if self.dist.is_main else None
        flow = getattr(self.criterion, "flow", None)
        self.flow_init = None if flow is None else flow_state(flow)

        self.epoch = 0  # epochs completed
        self.batch_in_epoch = 0  # batches of the current epoch already done (mid-epoch resume)
        self.global_step = 0
        self.best_score = -math.inf
        self.best_epoch: int | None = None
        self.bad_steps_total = 0
        self._writer = None
        if resume:
            self._load_resume_state()

    # ---- public ---------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train the remaining epochs, then evaluate the selected checkpoint on the test split."""
        with self._signal_handlers():
            while self.epoch < self.cfg.train.epochs:
                record = self._train_one_epoch()
                self.epoch += 1
                self.batch_in_epoch = 0
                if self.scheduler is not None:
                    self.scheduler.step()
                last = self.epoch == self.cfg.train.epochs
                if self.epoch % self.cfg.train.eval_every == 0 or last:
                    record.update(self._validate())
                if self.probe is not None:
                    record.update(self.probe.metrics(self.model, self.criterion, self.device,
                                                     self.flow_init))
                self._log_epoch(record)
                self._save("last.pt")
        final = self._final_test()
        if self._writer is not None:
            self._writer.close()
        if self._wandb_run is not None:
            self._wandb_run.summary.update(
                {f"final/{k}": v for k, v in final.items() if isinstance(v, int | float)})
            self._wandb_run.finish()
        return final

    # ---- one epoch ------------------------------------------------------------------------
    def _train_one_epoch(self) -> dict[str, Any]:
        cfg = self.cfg
        self.model.train()
        self.criterion.train()
        self.model.freeze_backbone(cfg.model.frozen_backbone
                                   or self.epoch < cfg.optim.warmup_epochs)
        if hasattr(self.criterion, "set_epoch"):
            self.criterion.set_epoch(self.epoch)
        self.sampler.set_epoch(self.epoch)
        stats = {"steps": 0, "images": 0, "bad": 0, "bad_in_row": 0, "sums": {}, "maxima": {}}
        restarts = 0
        start = time.perf_counter()
        progress = self._progress(len(self.sampler) - self.batch_in_epoch)
        # the loader's SIGCHLD handler is installed when its first iterator starts; the hold
        # goes on top of it so that a dead worker never raises in the middle of a step
        batches = iter(self._loader())
        with _worker_crash_held() as check_workers:
            try:
                while True:
                    try:
                        x, y = next(batches)
                    except StopIteration:
                        break
                    except Exception as exc:
                        crash = exc
                    else:
                        self._train_batch(x, y, stats, progress, start)
                        try:
                            check_workers()
                            continue
                        except RuntimeError as exc:
                            crash = exc
                    if not _is_worker_crash(crash, batches):
                        raise crash
                    _shutdown_loader(batches)  # also unregisters its workers from the check
                    if restarts >= MAX_LOADER_RESTARTS:
                        self._save("last.pt")
                        raise TrainingError(
                            f"data-loader workers crashed {restarts + 1} times in epoch "
                            f"{self.epoch + 1} ({crash!r}). Check memory (fewer "
                            f"data.num_workers) and the dataset's image files. Last good state: "
                            f"{self.out / 'checkpoints' / 'last.pt'}") from crash
                    restarts += 1
                    warnings.warn(f"data-loader worker crashed ({crash!r}); restarting the "
                                  f"loader at batch {self.batch_in_epoch} of epoch "
                                  f"{self.epoch + 1}", RuntimeWarning, stacklevel=2)
                    batches = iter(self._loader())
            finally:
                _shutdown_loader(batches)
        if progress is not None:
            progress.close()
        seconds = time.perf_counter() - start
        steps = stats["steps"]
        record = {"epoch": self.epoch + 1, "step": self.global_step}
        record.update({f"train/{k}": v / max(steps, 1) for k, v in stats["sums"].items()})
        record.update({f"train/{k}": v for k, v in stats["maxima"].items()})  # epoch maxima
        record.update({
            "train/bad_steps": stats["bad"],
            "time/epoch_s": seconds,
            "time/images_per_s": stats["images"] / max(seconds, 1e-9),
            "lr": self.optimizer.param_groups[0]["lr"],
        })
        bad_samples = getattr(self.splits.train, "bad_samples", 0)
        if bad_samples:
            record["data/bad_samples"] = bad_samples
        record.update({f"data/unreadable_{split}": n for split, n in self.unreadable.items()})
        if restarts:
            record["data/loader_restarts"] = restarts
        return record

    def _loader(self) -> torch.utils.data.DataLoader:
        """A loader over the batches of this epoch not trained on yet.

        It draws its worker base seed from its own generator, not the global RNG, so that a
        loader re-created mid-epoch (resume) leaves the augmentation stream unchanged.
        """
        loader_rng = torch.Generator().manual_seed(self.cfg.seed * 100_003 + self.epoch)
        return torch.utils.data.DataLoader(
            self.splits.train, batch_sampler=self.sampler.from_batch(self.batch_in_epoch),
            num_workers=self.cfg.data.num_workers, pin_memory=self.device.type == "cuda",
            persistent_workers=False, generator=loader_rng)

    def _train_batch(self, x, y, stats: dict, progress, start: float) -> None:
        """Step on one batch and account for it (counters, bad-step policy, signals)."""
        cfg = self.cfg
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        ok = self._step(x, y)
        self.batch_in_epoch += 1
        if ok:
            stats["bad_in_row"] = 0
            stats["steps"] += 1
            stats["images"] += x.shape[0] * self.dist.world_size
            for k, v in self.criterion.last_terms.items():
                stats["sums"][k] = stats["sums"].get(k, 0.0) + float(v)
                if k.endswith("_max"):
                    stats["maxima"][k] = max(stats["maxima"].get(k, -math.inf), float(v))
            self.global_step += 1
        else:
            stats["bad"] += 1
            stats["bad_in_row"] += 1
            self.bad_steps_total += 1
            if stats["bad_in_row"] >= cfg.train.max_bad_steps:
                self._save("last.pt")
                raise TrainingError(
                    f"{stats['bad_in_row']} consecutive steps had a non-finite loss or gradient "
                    f"(epoch {self.epoch + 1}). Likely causes: a learning rate too high "
                    f"(optim.lr={cfg.optim.lr}) or NIR weight/flow lr too high "
                    f"(loss.nir.weight={cfg.loss.nir.weight}, "
                    f"loss.nir.flow_lr_multiplier={cfg.loss.nir.flow_lr_multiplier}). "
                    f"Last good state: {self.out / 'checkpoints' / 'last.pt'}")
        if progress is not None:
            elapsed = max(time.perf_counter() - start, 1e-9)
            loss = stats["sums"].get("total", stats["sums"].get("proxy", 0.0))
            progress.set_postfix_str(f"loss {loss / max(stats['steps'], 1):.4g}, "
                                     f"{stats['images'] / elapsed:.0f} img/s")
            progress.update(1)
        if self._stop_signal is not None:
            if progress is not None:
                progress.close()
            self._save("last.pt")
            raise Interrupted(
                f"stopped by signal {self._stop_signal} in epoch {self.epoch + 1}; state saved "
                f"to {self.out / 'checkpoints' / 'last.pt'}; continue with: "
                f"nirdml train --out {self.out} --resume")

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        """One optimisation step; returns False (and changes nothing) if it was non-finite."""
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        with builders.autocast(self.device, cfg.train.amp):
            emb = self.train_model(x)
        loss = self.train_criterion(emb.float(), y)
        if not torch.isfinite(loss).item():
            return False
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if cfg.optim.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        else:
            norm = torch.norm(torch.stack([p.grad.detach().norm() for p in params
                                           if p.grad is not None]))
        if not torch.isfinite(norm).item():
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler.is_enabled():
                self.scaler.update()
            return False
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return True

    # ---- validation, selection, final test ---------------------------------------------
    def _evaluate(self, dataset, name: str) -> dict[str, float]:
        from nirdml.evaluation import evaluate

        shown = name if self.cfg.train.progress and self.dist.is_main else None
        emb = self.dist.gather_embeddings(builders.embed_dataset(
            self.model, self.dist.shard_dataset(dataset), self.device,
            batch_size=self.cfg.data.eval_batch_size, num_workers=self.cfg.data.num_workers,
            amp=self.cfg.train.amp, progress=shown), len(dataset))
        if not self.dist.is_main:
            return {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return evaluate(emb.embeddings, emb.labels, metrics=self.cfg.eval.metrics,
                            query_mask=emb.is_query, gallery_mask=emb.is_gallery,
                            recall_ks=tuple(self.cfg.eval.recall_ks), progress=shown)

    def _selection_split(self) -> str:
        select = self.cfg.train.select_on
        if select == "val" and self.splits.val is None:
            return "last"
        return select

    def _validate(self) -> dict[str, Any]:
        select = self._selection_split()
        record: dict[str, Any] = {}
        if self.splits.val is not None:
            val = self._evaluate(self.splits.val, "validation")
            record.update({f"val/{k}": v for k, v in val.items()})
        if select == "test":
            test = self._evaluate(self.splits.test, "test")
            record.update({f"test/{k}": v for k, v in test.items()})
        if select == "last":
            score = float(self.epoch)
        else:
            key = f"{select}/{self.cfg.train.selection_metric}"
            if self.dist.is_main and key not in record:
                raise ConfigError(
                    f"invalid value for train.selection_metric: "
                    f"{self.cfg.train.selection_metric!r}; computed metrics: "
                    + ", ".join(k.split("/", 1)[1] for k in record if k.startswith(select)))
            score = self.dist.broadcast_float(record.get(key, 0.0))
        if score > self.best_score:
            self.best_score, self.best_epoch = score, self.epoch
            self._save("best.pt")
        record["selected_epoch"] = self.best_epoch
        return record

    def _final_test(self) -> dict[str, Any]:
        best = self.out / "checkpoints" / "best.pt"
        if best.exists():
            state = load_checkpoint(best, map_location=self.device)
            self.model.load_state_dict(state["model"])
        metrics = self._evaluate(self.splits.test, "test")
        select = self._selection_split()
        final = dict(metrics)
        final.update({
            "selected_epoch": self.best_epoch,
            "selected_on": {
                "val": "validation classes (held out from the training classes)",
                "test": "TEST classes: the release's protocol, optimistic, not a clean result",
                "last": "last epoch (no validation split)",
            }[select],
            "dataset": self.cfg.data.name,
            "split": "test",
            "unreadable_dropped": self.unreadable,
        })
        if self.dist.is_main:
            _atomic_write_text(self.out / "final.json", json.dumps(final, indent=2) + "\n")
        return final

    # ---- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "criterion": self.criterion.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "global_step": self.global_step,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "bad_steps_total": self.bad_steps_total,
            "num_classes": self.splits.train.num_classes,
            "in_chans": self.in_chans,
            "image_kind": self.preprocessing.image_kind,
            "preprocessing": self.preprocessing.to_dict(),
            "world_size": self.dist.world_size,
            "rng": _rng_state(),
            "flow_init": self.flow_init,
        }

    def _save(self, name: str) -> None:
        if self.dist.is_main:
            save_checkpoint(self.state_dict(), self.out / "checkpoints" / name)
        self.dist.barrier()

    def _load_resume_state(self) -> None:
        path = self.out / "checkpoints" / "last.pt"
        state = self._resume_state or load_checkpoint(path, map_location="cpu")
        self._resume_state = None
        self.model.load_state_dict(state["model"])
        self.criterion.load_state_dict(state["criterion"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch = state["epoch"]
        self.batch_in_epoch = state["batch_in_epoch"]
        self.global_step = state["global_step"]
        self.best_score = state["best_score"]
        self.best_epoch = state["best_epoch"]
        self.bad_steps_total = state["bad_steps_total"]
        if state.get("flow_init") is not None:
            self.flow_init = state["flow_init"]
        # the sampler's global batch order depends only on seed and epoch, so a checkpoint
        # written by N ranks resumes on M ranks at the same global batch
        _set_rng_state(state["rng"])
        if self.dist.is_main:
            print(f"resuming {self.out} at epoch {self.epoch + 1} of {self.cfg.train.epochs}, "
                  f"batch {self.batch_in_epoch} of {len(self.sampler)} done", file=sys.stderr)

    def _feature_splits(self):
        """Every split as cached features of the frozen backbone (``model.frozen_backbone``)."""
        import dataclasses

        from nirdml.data import build_transforms
        from nirdml.data.features import feature_splits

        cfg = self.cfg
        encoder = torch.nn.Sequential(self.model.backbone, self.model.pool)
        transform = build_transforms(self.splits.image_kind, train=False,
                                     image_size=cfg.data.image_size)
        model_cfg = dataclasses.asdict(cfg.model)
        for key in ("embedding_dim", "head_hidden", "frozen_backbone", "freeze_bn"):
            model_cfg.pop(key)  # the head does not change the features
        description = {"data": {k: getattr(cfg.data, k) for k in
                                ("name", "root", "options", "image_size", "val_fraction")},
                       "seed": cfg.seed, "model": model_cfg}

        def build():
            return feature_splits(encoder, self.splits, transform, self.device,
                                  cfg.data.feature_cache, description,
                                  cfg.data.eval_batch_size, cfg.data.num_workers,
                                  progress=cfg.train.progress and self.dist.is_main)

        if self.dist.is_main:
            splits = build()
            self.dist.barrier()
            return splits
        self.dist.barrier()  # rank 0 has written the cache
        return build()

    def _build_probe(self) -> MechanismProbe | None:
        """The fixed training-class subset the mechanism metrics are computed on."""
        if self.cfg.train.probe_classes == 0:
            return None
        from nirdml.data import build_transforms

        transform = None if self.splits.image_kind == "features" else build_transforms(
            self.splits.image_kind, train=False, image_size=self.cfg.data.image_size)
        return MechanismProbe(self.splits.train, transform, self.cfg.train.probe_classes,
                              self.cfg.train.probe_per_class, seed=self.cfg.seed,
                              batch_size=self.cfg.data.eval_batch_size)

    # ---- output, logging, signals ---------------------------------------------------------
    def _prepare_output(self) -> None:
        if not self.dist.is_main:
            return
        try:
            (self.out / "checkpoints").mkdir(parents=True, exist_ok=True)
            probe = self.out / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(
                f"output directory {str(self.out)!r} is not writable ({exc.strerror}); "
                f"choose another with --out") from None
        if not self.resume and (self.out / "checkpoints" / "last.pt").exists():
            raise ConfigError(
                f"{str(self.out)!r} already holds a run; continue it with --resume or choose "
                f"a new --out")
        if self.resume:
            last = self.out / "checkpoints" / "last.pt"
            if not last.exists():
                raise ConfigError(f"--resume: no checkpoint in {str(last.parent)!r}")
            if self._resume_state is None:
                self._resume_state = load_checkpoint(last, map_location="cpu")
            check_resume_config(Config.from_dict(self._resume_state["config"]), self.cfg,
                                str(self.out), int(self._resume_state["epoch"]))
        self.cfg.to_yaml(self.out / "config.yaml")

    def _progress(self, total: int):
        if not (self.cfg.train.progress and self.dist.is_main):
            return None
        from nirdml.evaluation.core import progress_bar

        return progress_bar(total, f"epoch {self.epoch + 1}/{self.cfg.train.epochs}", "batch")

    def _log_epoch(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        record["time/wall"] = time.time()
        with open(self.out / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        writer = self._tensorboard()
        if writer is not None:
            for k, v in record.items():
                if isinstance(v, int | float) and k not in ("epoch", "time/wall"):
                    writer.add_scalar(k, v, self.epoch)
            writer.flush()
        if self._wandb_run is not None:
            self._wandb_run.log({k: v for k, v in record.items() if isinstance(v, int | float)
                                 and k != "epoch"}, step=self.epoch)
        if self.cfg.train.progress:
            print(_epoch_line(record, self.cfg.train.epochs), file=sys.stderr)

    def _start_wandb(self):
        """Start (or, with the run folder's ``wandb_id``, continue) a Weights & Biases run."""
        try:
            import wandb
        except ImportError:
            raise ConfigError("train.wandb=true needs the wandb package: pip install wandb "
                              "(or set train.wandb=false)") from None
        id_file = self.out / "wandb_id"
        if id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            run_id = wandb.util.generate_id()
            _atomic_write_text(id_file, run_id + "\n")
        return wandb.init(project=self.cfg.train.wandb_project, name=self.out.name, id=run_id,
                          resume="allow", dir=str(self.out), config=self.cfg.to_dict())

    def _tensorboard(self):
        if not self.cfg.train.tensorboard:
            return None
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: skip silently
                self.cfg.train.tensorboard = False
                return None
            self._writer = SummaryWriter(str(self.out / "tensorboard"))
        return self._writer

    @contextmanager
    def _signal_handlers(self):
        def handler(signum, frame):
            if self._stop_signal is not None:  # second signal: stop now
                raise KeyboardInterrupt
            self._stop_signal = signum

        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


def _epoch_line(record: dict[str, Any], epochs: int) -> str:
    """One console line per epoch: loss terms, then validation/test metrics in percent."""
    losses = "  ".join(f"{k[6:]} {v:.4g}" for k, v in record.items()
                       if k.startswith("train/") and k != "train/bad_steps"
                       and isinstance(v, float) and not k.endswith("_max"))
    from nirdml.evaluation import is_headline
    metrics = "  ".join(f"{k} {100 * v:.2f}%" for k, v in record.items()
                        if k.startswith(("val/", "test/")) and isinstance(v, float)
                        and is_headline(k.split("/")[1], brief=True))
    speed = f"{record['time/epoch_s']:.1f} s, {record['time/images_per_s']:.0f} img/s"
    return f"epoch {record['epoch']}/{epochs} ({speed})  {losses}" + (
        f"  |  {metrics}" if metrics else "")


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def train(config: Config | dict | str | Path | None = None, out_dir: str | Path = "runs/nirdml",
          resume: bool = False, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train from a Config, a dict, a YAML path or a shipped config name; return test metrics.

    ``config=None`` is the offline default (``"digits"``: ProxyAnchor + NIR on sklearn digits),
    or with ``resume=True`` the run's own config (``overrides`` on top, see
    ``nirdml.training.resume``).

    >>> from nirdml.training import train
    >>> final = train("digits", out_dir="runs/d", overrides=["train.epochs=5"])  # doctest: +SKIP
    """
    state = None
    if isinstance(config, Config):
        cfg = config.with_overrides(overrides)
    elif isinstance(config, dict):
        cfg = Config.from_dict(config).with_overrides(overrides)
    elif config is None and resume:  # the run's own config
        state = load_checkpoint(Path(out_dir) / "checkpoints" / "last.pt")
        cfg = Config.from_dict(state["config"]).with_overrides(overrides)
    else:
        cfg = load_config(config or "digits", overrides)
    return Trainer(cfg, out_dir, resume=resume, resume_state=state).fit()
