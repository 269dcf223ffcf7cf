"""What a checkpoint of a training run holds, and putting it back (exact resume).

:func:`trainer_state` collects the trainer's state (model, criterion, optimiser, scheduler,
scaler, position in the epoch, selection state, RNG state, preprocessing record, the flow's
initial parameters); :func:`restore_trainer` puts a checkpoint's state back. The sampler's
global batch order depends only on seed and epoch, so a checkpoint written by N ranks resumes
on M ranks at the same global batch.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """The Python, NumPy, torch (and CUDA) generator states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


#: trainer attributes saved as they are and restored on resume
_COUNTERS = ("epoch", "batch_in_epoch", "global_step", "best_score", "best_epoch",
             "bad_steps_total")


def trainer_state(trainer) -> dict[str, Any]:
    """Everything a checkpoint of ``trainer`` holds. Sharded proxies and their optimiser
    moments are gathered into the dense layout (``training.sharding.dense_states``; collective:
    every rank calls this when the proxies are sharded)."""
    from nirdml.training.sharding import dense_states

    criterion, optimizer = dense_states(trainer.criterion, trainer.optimizer)
    return {
        "config": trainer.cfg.to_dict(),
        "model": trainer.model.state_dict(),
        "criterion": criterion,
        "optimizer": optimizer,
        "scheduler": None if trainer.scheduler is None else trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        **{name: getattr(trainer, name) for name in _COUNTERS},
        "num_classes": trainer.splits.train.num_classes,
        "in_chans": trainer.in_chans,
        "image_kind": trainer.preprocessing.image_kind,
        "preprocessing": trainer.preprocessing.to_dict(),
        "world_size": trainer.dist.world_size,
        "rng": rng_state(),
        "flow_init": trainer.flow_init,
    }


def _match_parameter_layout(optimizer) -> None:
    """Give every loaded per-parameter state tensor (Adam's moments) its parameter's memory
    layout. Checkpoints store tensors contiguous, and a channels-last convolution weight's
    moments would come back in another layout: torch's fused Adam walks the parameter, its
    gradient and its moments as raw memory of one layout, so the resumed run would update
    mismatched elements (measured: a resumed run off the uninterrupted one by 1e-3)."""
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if (isinstance(value, torch.Tensor) and value.shape == param.shape
                    and value.stride() != param.stride()):
                state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def restore_trainer(trainer, state: dict[str, Any], where: str = "the checkpoint") -> None:
    """Put a checkpoint's state back into ``trainer`` (weights, optimiser, counters, RNG); a
    state that does not fit the trainer raises a one-line CheckpointError."""
    from nirdml.errors import CheckpointError, ConfigError
    from nirdml.training.sharding import local_states

    saved_classes = state.get("num_classes")  # not an int: left to the loads below
    if isinstance(saved_classes, int) and not isinstance(saved_classes, bool) \
            and saved_classes != trainer.splits.train.num_classes:
        raise ConfigError(
            f"{where} was trained on {saved_classes} classes but data.name="
            f"{trainer.cfg.data.name!r} now has {trainer.splits.train.num_classes} training "
            f"classes; resume with the dataset it was trained on (data.root, data.options)")
    try:
        trainer.model.load_state_dict(state["model"])
        criterion, optimizer = local_states(trainer.criterion, trainer.optimizer,
                                            state["criterion"], state["optimizer"])
        trainer.criterion.load_state_dict(criterion)
        trainer.optimizer.load_state_dict(optimizer)
        _match_parameter_layout(trainer.optimizer)
        if trainer.scheduler is not None and state["scheduler"] is not None:
            trainer.scheduler.load_state_dict(state["scheduler"])
        trainer.scaler.load_state_dict(state["scaler"])
        for name in _COUNTERS:
            setattr(trainer, name, state[name])
        if state.get("flow_init") is not None:
            trainer.flow_init = state["flow_init"]
        set_rng_state(state["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as exc:
        first = (str(exc).splitlines() or [""])[0][:200]
        raise CheckpointError(f"{where} does not fit this run ({type(exc).__name__}: "
                              f"{first}); resume it with the nirdml and config that wrote it"
                              ) from None
