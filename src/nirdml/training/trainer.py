"""The training loop: epochs of class-balanced batches, validation, selection, final test.

What a run writes is laid out by :class:`~nirdml.training.run_dir.RunDir`; per-epoch records go
to the sinks of :class:`~nirdml.training.sinks.EpochLog`; a checkpoint's content is
:func:`~nirdml.training.state.trainer_state`.

Faults: a non-finite loss or gradient skips the step (counted); ``max_bad_steps`` of them in a
row stop the run with a message. A crashed data-loader worker restarts the loader at the first
batch not trained on (``nirdml.training.loader``; counted in ``data/loader_restarts``).
SIGINT/SIGTERM finish the current step, write ``last.pt`` (with the position inside the epoch)
and exit; ``resume=True`` continues exactly from there.
"""

from __future__ import annotations

import math
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from nirdml.errors import ConfigError, InputError, NirdmlError, TrainingError
from nirdml.host_memory import keep_freed_memory
from nirdml.inference.embed import embed_dataset
from nirdml.nir.monitor import flow_state
from nirdml.training import builders
from nirdml.training.checkpoint import TRAINER_KEYS, load_checkpoint, save_checkpoint
from nirdml.training.config import Config, load_config
from nirdml.training.distributed import DistContext
from nirdml.training.epoch_stats import EpochStats
from nirdml.training.loader import ResilientBatches
from nirdml.training.resume import check_resume_config
from nirdml.training.run_dir import RunDir
from nirdml.training.sharding import dense_copy, is_sharded, proxy_loss_of
from nirdml.training.signals import stop_requests
from nirdml.training.sinks import EpochLog
from nirdml.training.state import restore_trainer, trainer_state

MAX_LOADER_RESTARTS = 5  # crashed data-loader workers tolerated per epoch

SELECTED_ON = {"val": "validation classes (held out from the training classes)",
               "test": "TEST classes: the release's protocol, optimistic, not a clean result",
               "last": "last epoch (no validation split)"}


class Interrupted(NirdmlError):
    """Training stopped on SIGINT/SIGTERM after writing a resumable checkpoint."""


class Trainer:
    """Runs one configured training job into ``out_dir`` (see the module docstring)."""

    def __init__(self, config: Config, out_dir: str | Path, resume: bool = False,
                 dist: DistContext | None = None, resume_state: dict[str, Any] | None = None):
        self.cfg = config
        self.run_dir = RunDir(out_dir)
        self.out = self.run_dir.root
        self.dist = dist or DistContext.from_env()
        self.resume = resume
        self._resume_state = resume_state  # last.pt, when the caller has read it already
        self._stop_signal: int | None = None
        self.device = self.dist.device if self.dist.enabled else builders.resolve_device(
            config.train.device)
        if self.device.type != "cuda" and config.train.amp == "fp16":
            raise ConfigError("train.amp=fp16 needs CUDA; use train.amp=bf16 or none on the CPU")
        if self.device.type == "cpu" and config.train.keep_host_memory:
            keep_freed_memory()  # no page faults on each step's buffers (host_memory)
        # a fresh start that fails before its first checkpoint leaves nothing behind
        self._discard_on_failure = self.dist.is_main and not resume
        self._made_folder = not self.run_dir.root.exists()
        if self.dist.is_main:
            self._check_output()
        builders.seed_everything(config.seed)
        if config.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self._build()
        self.epoch = 0  # epochs completed
        self.batch_in_epoch = 0  # batches of the current epoch already done (mid-epoch resume)
        self.global_step = 0
        self.best_score = -math.inf
        self.best_epoch: int | None = None
        self.bad_steps_total = 0
        with self._undo_on_failure():
            if self.dist.is_main:
                self._create_output()
            self.log = EpochLog.for_run(config, self.run_dir, self.dist.is_main)
            if resume:
                self._load_resume_state()

    def _build(self) -> None:
        """Data, model, objective, optimiser, sampler, DDP wrappers and the NIR probe."""
        cfg, dist = self.cfg, self.dist
        self.splits = builders.build_splits(cfg)
        self.unreadable = dict(self.splits.unreadable_dropped)  # {split: files left out}
        if self.unreadable and dist.is_main:
            print("left out unreadable image files (data.on_error=skip): " + ", ".join(
                f"{n} from {split}" for split, n in self.unreadable.items()), file=sys.stderr)
        for name in ("val", "test"):  # known before any training: a data problem
            split = getattr(self.splits, name)
            if split is not None and split.num_classes < 2:
                raise InputError(f"the {name} split of {cfg.data.name} holds a single class: "
                                 f"every neighbour is a match, so no metric means anything; "
                                 f"use data with at least 2 {name} classes")
        self.in_chans = int(self.splits.train[0][0].shape[0])
        self.preprocessing = builders.measure_preprocessing(cfg, self.splits, self.in_chans)
        self.model = builders.build_model(cfg, in_chans=self.in_chans).to(self.device)
        if cfg.model.frozen_backbone:
            self.splits = builders.build_feature_splits(cfg, self.model, self.splits,
                                                        self.device, dist)
        self.criterion = builders.build_criterion(cfg, self.splits.train.num_classes,
                                                  dist).to(self.device)
        self.proxy_loss = proxy_loss_of(self.criterion)  # draws its negatives per step
        self.optimizer = builders.build_optimizer(cfg, self.model, self.criterion)
        self.scheduler = builders.build_scheduler(cfg, self.optimizer)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.train.amp == "fp16")
        from nirdml.data import ClassBalancedBatchSampler

        self.sampler = ClassBalancedBatchSampler(
            self.splits.train.labels, cfg.data.batch_size, cfg.data.samples_per_class,
            seed=cfg.seed, num_replicas=dist.world_size, rank=dist.rank)
        self.train_model = dist.wrap_model(self.model)
        self.train_criterion = dist.wrap_criterion(self.criterion)
        self.probe = builders.build_probe(cfg, self.splits) if dist.is_main else None
        flow = getattr(self.criterion, "flow", None)
        self.flow_init = None if flow is None else flow_state(flow)

    # ---- public ---------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train the remaining epochs, then evaluate the selected checkpoint on the test split."""
        with self._undo_on_failure(), self._signal_handlers():
            while self.epoch < self.cfg.train.epochs:
                record = self._train_one_epoch()
                self.epoch += 1
                self.batch_in_epoch = 0
                if self.scheduler is not None:
                    self.scheduler.step()
                if self.epoch % self.cfg.train.eval_every == 0 or \
                        self.epoch == self.cfg.train.epochs:
                    record.update(self._validate())
                if self.cfg.train.probe_classes:  # the probe runs on the main rank only
                    probed = dense_copy(self.criterion)  # so sharded proxies are gathered
                    if self.probe is not None:
                        record.update(self.probe.metrics(self.model, probed, self.device,
                                                         self.flow_init))
                self.log.log(record, self.epoch)
                self._save("last.pt")
        final = self._final_test()
        self.log.close(final)
        return final

    # ---- one epoch ------------------------------------------------------------------------
    def _train_one_epoch(self) -> dict[str, Any]:
        cfg = self.cfg
        self.model.train()
        self.criterion.train()
        self.model.freeze_backbone((cfg.model.frozen_backbone and not cfg.model.trainable_blocks)
                                   or self.epoch < cfg.optim.warmup_epochs)
        if hasattr(self.criterion, "set_epoch"):
            self.criterion.set_epoch(self.epoch)
        self.sampler.set_epoch(self.epoch)
        stats = EpochStats()
        progress = self._progress(len(self.sampler) - self.batch_in_epoch)
        batches = ResilientBatches(
            self._loader, lambda: f"batch {self.batch_in_epoch} of epoch {self.epoch + 1}",
            self._give_up, MAX_LOADER_RESTARTS)
        iterator = iter(batches)
        try:
            for x, y in iterator:
                self._train_batch(x, y, stats, progress)
        finally:
            iterator.close()  # at once: restores the SIGCHLD handler, stops the workers
        if progress is not None:
            progress.close()
        record = {"epoch": self.epoch + 1, "step": self.global_step, **stats.record(),
                  "lr": self.optimizer.param_groups[0]["lr"]}
        bad_samples = getattr(self.splits.train, "bad_samples", 0)
        if bad_samples:
            record["data/bad_samples"] = bad_samples
        record.update({f"data/unreadable_{split}": n for split, n in self.unreadable.items()})
        if batches.restarts:
            record["data/loader_restarts"] = batches.restarts
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

    def _give_up(self) -> str:
        self._save("last.pt")
        return f"Last good state: {self.run_dir.checkpoint()}"

    def _train_batch(self, x, y, stats: EpochStats, progress) -> None:
        """Step on one batch and account for it (counters, bad-step policy, signals)."""
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        ok = self._step(x, y)
        self.batch_in_epoch += 1
        if ok:
            stats.add(self.criterion.last_terms, x.shape[0] * self.dist.world_size)
            self.global_step += 1
        else:
            stats.bad_step()
            self.bad_steps_total += 1
            if stats.bad_in_row >= self.cfg.train.max_bad_steps:
                self._stop_for_bad_steps(stats.bad_in_row)
        if progress is not None:
            progress.set_postfix_str(stats.postfix())
            progress.update(1)
        if self._stop_signal is not None:
            if progress is not None:
                progress.close()
            self._save("last.pt")
            raise Interrupted(
                f"stopped by signal {self._stop_signal} in epoch {self.epoch + 1}; state saved "
                f"to {self.run_dir.checkpoint()}; continue with: "
                f"nirdml train --out {self.out} --resume")

    def _stop_for_bad_steps(self, in_row: int) -> None:
        cfg = self.cfg
        self._save("last.pt")
        raise TrainingError(
            f"{in_row} consecutive steps had a non-finite loss or gradient "
            f"(epoch {self.epoch + 1}). Likely causes: a learning rate too high "
            f"(optim.lr={cfg.optim.lr}) or NIR weight/flow lr too high "
            f"(loss.nir.weight={cfg.loss.nir.weight}, "
            f"loss.nir.flow_lr_multiplier={cfg.loss.nir.flow_lr_multiplier}). "
            f"Last good state: {self.run_dir.checkpoint()}")

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        """One optimisation step; returns False (and changes nothing) if it was non-finite."""
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        if self.proxy_loss is not None:
            self.proxy_loss.set_step(self.global_step)  # the negative sample of this step
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
    def _evaluate(self, dataset, name: str) -> dict[str, Any]:
        """The metrics of ``dataset`` on the main rank ({} on the others).

        Collapsed embeddings (``nirdml.embeddings.degenerate_reason``) do not stop the run:
        a warning on stderr, and ``{"degenerate": reason}`` in place of the metrics, which are
        left out (not NaN), so the epoch is never selected (``_validate``) and final.json says
        why it has none. A split of a single class is a data problem: an InputError."""
        from nirdml.embeddings import DegenerateEmbeddingsError
        from nirdml.errors import InputError
        from nirdml.evaluation import evaluate

        shown = name if self.cfg.train.progress and self.dist.is_main else None
        emb = self.dist.gather_embeddings(embed_dataset(
            self.model, self.dist.shard_dataset(dataset), self.device,
            batch_size=self.cfg.data.eval_batch_size, num_workers=self.cfg.data.num_workers,
            amp=self.cfg.train.amp, progress=shown), len(dataset))
        if not self.dist.is_main:
            return {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            try:
                return evaluate(emb.embeddings, emb.labels, metrics=self.cfg.eval.metrics,
                                query_mask=emb.is_query, gallery_mask=emb.is_gallery,
                                recall_ks=tuple(self.cfg.eval.recall_ks), progress=shown)
            except DegenerateEmbeddingsError as exc:
                if exc.kind != "collapsed":
                    raise InputError(f"the {name} split of {self.cfg.data.name}: {exc}") from None
                reason = str(exc)
        print(f"WARNING: the {name} embeddings are degenerate (epoch {self.epoch} of training), "
              f"their metrics are left out: {reason}", file=sys.stderr)
        return {"degenerate": reason}

    def _selection_split(self) -> str:
        select = self.cfg.train.select_on
        return "last" if select == "val" and self.splits.val is None else select

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
            collapsed = f"{select}/degenerate" in record
            if self.dist.is_main and key not in record and not collapsed:
                raise ConfigError(
                    f"invalid value for train.selection_metric: "
                    f"{self.cfg.train.selection_metric!r}; computed metrics: "
                    + ", ".join(k.split("/", 1)[1] for k in record if k.startswith(select)))
            # a collapsed epoch scores -inf: never selected, over a real epoch or at all
            score = self.dist.broadcast_float(-math.inf if collapsed else record.get(key, 0.0))
        if score > self.best_score:
            self.best_score, self.best_epoch = score, self.epoch
            self._save("best.pt")
        record["selected_epoch"] = self.best_epoch
        return record

    def _final_test(self) -> dict[str, Any]:
        """Test metrics of the selected checkpoint (the last model when no epoch was selected)
        into final.json; collapsed test embeddings give ``"degenerate": reason`` there and no
        metrics (``_evaluate``)."""
        best = self.run_dir.checkpoint("best.pt")
        if best.exists():
            self.model.load_state_dict(load_checkpoint(best, map_location=self.device)["model"])
        final = dict(self._evaluate(self.splits.test, "test"))
        final.update({"selected_epoch": self.best_epoch,
                      "selected_on": SELECTED_ON[self._selection_split()],
                      "dataset": self.cfg.data.name, "split": "test",
                      "unreadable_dropped": self.unreadable})
        if self.dist.is_main:
            self.run_dir.write_final(final)
        return final

    # ---- checkpoints, output, signals -----------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return trainer_state(self)

    def _save(self, name: str) -> None:
        sharded = is_sharded(self.criterion)  # then every rank gathers its proxies
        state = self.state_dict() if self.dist.is_main or sharded else None
        if self.dist.is_main:
            save_checkpoint(state, self.run_dir.checkpoint(name))
        self.dist.barrier()

    def _load_resume_state(self) -> None:
        state = self._resume_state or load_checkpoint(self.run_dir.checkpoint(),
                                                      map_location="cpu", require=TRAINER_KEYS)
        self._resume_state = None
        restore_trainer(self, state, f"checkpoint {str(self.run_dir.checkpoint())!r}")
        if self.dist.is_main:
            print(f"resuming {self.out} at epoch {self.epoch + 1} of {self.cfg.train.epochs}, "
                  f"batch {self.batch_in_epoch} of {len(self.sampler)} done", file=sys.stderr)

    def _check_output(self) -> None:
        """Check the run folder, writing nothing (``RunDir.check``); on resume read the
        checkpoint and check the config against the run's own."""
        self._folder_was_ours = self.run_dir.check(self.resume)
        if self.resume:
            if self._resume_state is None:
                self._resume_state = load_checkpoint(self.run_dir.checkpoint(),
                                                     map_location="cpu", require=TRAINER_KEYS)
            check_resume_config(Config.from_dict(self._resume_state["config"]), self.cfg,
                                str(self.out), int(self._resume_state["epoch"]))

    def _create_output(self) -> None:
        """Make the run folder (marker, checkpoints/; what an earlier start that never wrote
        a checkpoint left there is cleared) and write config.yaml."""
        if not self.resume and self._folder_was_ours:
            self.run_dir.reset()
        self.run_dir.create()
        self.run_dir.write_config(self.cfg)

    @contextmanager
    def _undo_on_failure(self):
        """A fresh start that fails before its first checkpoint removes what it wrote (never
        anything else: ``RunDir.discard``)."""
        try:
            yield
        except BaseException:
            if self._discard_on_failure and not self.run_dir.checkpoint().exists():
                self.run_dir.discard(remove_folder=self._made_folder)
            raise

    def _progress(self, total: int):
        if not (self.cfg.train.progress and self.dist.is_main):
            return None
        from nirdml.console import progress_bar

        return progress_bar(total, f"epoch {self.epoch + 1}/{self.cfg.train.epochs}", "batch")

    @contextmanager
    def _signal_handlers(self):
        """SIGINT/SIGTERM ask the loop to stop after the current step (a second one: now)."""
        def request_stop(signum):
            self._stop_signal = signum

        with stop_requests(request_stop, lambda: self._stop_signal is not None):
            yield


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
        state = load_checkpoint(RunDir(out_dir).checkpoint(), require=TRAINER_KEYS)
        cfg = Config.from_dict(state["config"]).with_overrides(overrides)
    else:
        cfg = load_config(config or "digits", overrides)
    return Trainer(cfg, out_dir, resume=resume, resume_state=state).fit()
