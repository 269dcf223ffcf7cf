"""``EpochStats``: what one training epoch adds up (loss terms, images, bad steps, time)."""

from __future__ import annotations

import math
import time

import torch


class EpochStats:
    """Per-epoch sums of the loss terms (maxima for ``*_max`` terms), images and bad steps."""

    def __init__(self):
        self.start = time.perf_counter()
        self.steps = self.images = self.bad = self.bad_in_row = 0
        self.sums: dict[str, float] = {}
        self.maxima: dict[str, float] = {}

    def add(self, terms: dict[str, torch.Tensor], images: int) -> None:
        self.bad_in_row = 0
        self.steps += 1
        self.images += images
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
            if k.endswith("_max"):
                self.maxima[k] = max(self.maxima.get(k, -math.inf), float(v))

    def bad_step(self) -> None:
        self.bad += 1
        self.bad_in_row += 1

    def postfix(self) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        loss = self.sums.get("total", self.sums.get("proxy", 0.0))
        return f"loss {loss / max(self.steps, 1):.4g}, {self.images / elapsed:.0f} img/s"

    def record(self) -> dict[str, float]:
        seconds = time.perf_counter() - self.start
        out = {f"train/{k}": v / max(self.steps, 1) for k, v in self.sums.items()}
        out.update({f"train/{k}": v for k, v in self.maxima.items()})  # epoch maxima
        out.update({"train/bad_steps": self.bad, "time/epoch_s": seconds,
                    "time/images_per_s": self.images / max(seconds, 1e-9)})
        return out
